"""Calls and constructors that cannot fit in memory are refused before anything is allocated.

No test here allocates much: the inputs are broadcast views (a billion steps of one stored
number), the memory available is pinned with monkeypatch, and while a test runs the process may
not grow its address space by more than 2 GiB (a broken check fails with NumPy's MemoryError
instead of taking the machine's memory from everything else on it).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import numpy as np
import pytest
from _child import child_env
from _sanitizers import measures_rss

import pyrnn
from pyrnn import _backend, _checks, functional, optim, reference
from pyrnn._cells import CELLS

GIB = 2**30
BILLION_STEPS = np.broadcast_to(np.float32(0), (10**9, 1, 4))  # 4 bytes of memory
NEEDS = r"this call would allocate about [\d,]+ bytes \([\d,.]+ GiB\) for .*, but "
AVAILABLE = r"8,589,934,592 bytes \(8.0 GiB\) of memory are available"


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(autouse=True)
def capped(monkeypatch):
    """8 GiB available, as pyrnn sees it; at most 2 GiB more address space, as the OS allows."""
    monkeypatch.setattr(_checks, "available_memory", lambda: 8 * GIB)
    if not os.path.exists("/proc/self/statm"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_bytes() + 2 * GIB
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else
                                            min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture
def every_call_weighed(monkeypatch):
    """Weigh small calls too, so that small arrays can stand for large ones."""
    monkeypatch.setattr(_checks, "_CHEAP_BYTES", 0)


def refused(shape, name="x"):
    return pytest.raises(MemoryError, match=rf"{name} of shape {shape}: {NEEDS}{AVAILABLE}")


# ------------------------------------------------------------------------------- forward


def test_refuses_an_lstm_over_a_billion_steps_before_allocating(backend):
    with refused(r"\(1000000000, 1, 4\)"):
        pyrnn.LSTM(4, 6, backend=backend)(BILLION_STEPS)


@pytest.mark.parametrize("kind", ["eval", "no_grad", "frozen"])
def test_refuses_inference_over_a_billion_steps(backend, kind):
    net = pyrnn.GRU(4, 6, backend=backend)
    with refused(r"\(1000000000, 1, 4\)"):
        if kind == "eval":
            net.eval()(BILLION_STEPS)
        elif kind == "frozen":
            net.frozen()(BILLION_STEPS)
        else:
            with pyrnn.no_grad():
                net(BILLION_STEPS)


def test_refuses_a_batch_first_input_of_a_billion_rows(backend):
    x = np.broadcast_to(np.float32(0), (10**9, 1, 4))
    with refused(r"\(1000000000, 1, 4\)"):
        pyrnn.RNN(4, 6, batch_first=True, backend=backend)(x)


def test_the_refusal_is_a_value_error_too(backend):
    with pytest.raises(ValueError, match="x of shape"):
        pyrnn.LSTM(4, 6, backend=backend)(BILLION_STEPS)


def test_functional_refuses_what_its_dropout_masks_would_add(backend, every_call_weighed,
                                                             monkeypatch):
    weights = [(np.zeros((6, 4), np.float32), np.zeros((6, 6), np.float32), None, None),
               (np.zeros((6, 6), np.float32), np.zeros((6, 6), np.float32), None, None)]
    x = np.zeros((50, 2, 4), np.float32)
    spec = CELLS["rnn_tanh"]
    plain = _checks.stack_bytes(spec, (50, 2, 4, 6, 2, 1), 4, "infer", backend)
    monkeypatch.setattr(_checks, "available_memory", lambda: plain + 50 * 2 * 4)
    functional.rnn_forward("rnn_tanh", x, weights, backend=backend)  # fits without masks
    with pytest.raises(MemoryError, match=r"x of shape \(50, 2, 4\)"):
        functional.rnn_forward("rnn_tanh", x, weights, dropout=0.5, training=True,
                               backend=backend)


@pytest.mark.parametrize("kernels", ["numpy", "cpp"])
def test_the_kernels_refuse_a_billion_steps_called_directly(kernels):
    if kernels == "cpp" and not _backend.cpp_available():
        pytest.skip("the C++ extension is not built")
    z = np.zeros
    weights = [(z((24, 4), np.float32), z((24, 6), np.float32), z(24, np.float32),
                z(24, np.float32))]
    state = z((1, 1, 6), np.float32)
    for keep_tape in (False, True):
        with refused(r"\(1000000000, 1, 4\)"):
            _backend.kernels(kernels).stack_forward("lstm", BILLION_STEPS, state, state, weights,
                                                    False, None, None, keep_tape)


# ------------------------------------------------------------------------------- backward


def test_refuses_a_backward_that_would_not_fit_and_keeps_the_tape(backend, every_call_weighed,
                                                                   monkeypatch):
    net = pyrnn.LSTM(4, 6, backend=backend)
    out, _ = net(np.ones((5, 2, 4), np.float32))
    monkeypatch.setattr(_checks, "available_memory", lambda: 1000)
    with pytest.raises(MemoryError, match=r"d_out of shape \(5, 2, 6\): this call would "
                                          r"allocate about [\d,]+ bytes .* but 1,000 bytes"):
        net.backward(np.ones_like(out))
    monkeypatch.setattr(_checks, "available_memory", lambda: 8 * GIB)
    dx, _ = net.backward(np.ones_like(out))  # the refused call left the tape for this one
    assert dx.shape == (5, 2, 4)


def test_functional_and_kernel_backward_refuse_what_would_not_fit(backend, every_call_weighed,
                                                                   monkeypatch):
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((3, 2)), rng.standard_normal((3, 3)), None, None)]
    x = rng.standard_normal((4, 2, 2))
    out, _, _, tape = functional.rnn_forward("rnn_tanh", x, weights, backend=backend,
                                             keep_tape=True)
    monkeypatch.setattr(_checks, "available_memory", lambda: 100)
    with pytest.raises(MemoryError, match=r"d_out of shape \(4, 2, 3\)"):
        functional.rnn_backward(tape, np.ones_like(out))
    with pytest.raises(MemoryError, match=r"d_out of shape \(4, 2, 3\)"):
        _backend.kernels(backend).stack_backward(tape.kernel_tape, np.ones_like(out), None, None)


# ------------------------------------------------------------------------------- constructors


def test_the_constructor_counts_the_arrays_as_well_as_the_numbers(monkeypatch):
    # 10**6 layers of 4 small weights and 4 gradients: 17.4 GB of numbers, 27 GB with the
    # arrays that hold them; the count of numbers alone let this through, then it ran until
    # the system killed it.
    monkeypatch.setattr(_checks, "available_memory", lambda: 24 * GIB)
    with pytest.raises(MemoryError, match=r"LSTM\(input_size=8, hidden_size=16, "
                                          r"num_layers=1000000\) with its gradients would hold "
                                          r"4,351,998,976 numbers, [\d,]+ bytes with their "
                                          r"arrays, 2\d.\d GiB: more than"):
        pyrnn.LSTM(8, 16, num_layers=10**6)


@measures_rss
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_the_constructors_estimate_covers_what_it_allocates():
    code = (
        "import os, pyrnn\n"
        "rss = lambda: (int(open('/proc/self/statm').read().split()[1])\n"
        "               * os.sysconf('SC_PAGE_SIZE'))\n"
        "before = rss(); net = pyrnn.LSTM(8, 16, num_layers=4000); print(rss() - before)\n"
    )
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True, env=child_env())
                .stdout)
    net = pyrnn.LSTM(8, 16, num_layers=2)
    per_layer = 2 * net._cell.parameter_count(16, 16) * 4 + 8 * _checks._ARRAY_BYTES
    assert grown <= 4000 * per_layer, (grown, 4000 * per_layer)
    assert grown > 4000 * 2 * net._cell.parameter_count(16, 16) * 4  # the numbers alone do not


@pytest.mark.parametrize("make", [lambda: pyrnn.Linear(10**5, 10**5),
                                  lambda: pyrnn.Embedding(10**9, 64),
                                  lambda: pyrnn.GRU(10**5, 10**4)])
def test_layers_whose_parameters_would_not_fit_are_refused(make):
    with pytest.raises(MemoryError, match=r"with its gradients would hold [\d,]+ numbers, "
                                          r"[\d,]+ bytes with their arrays, [\d,.]+ GiB: more "
                                          r"than this machine's 8.0 GiB of available memory"):
        make()


# ------------------------------------------------------------------------------- layers


def test_linear_refuses_a_broadcast_input_too_large_to_copy():
    x = np.broadcast_to(np.float32(0), (10**10, 4))
    with refused(r"\(10000000000, 4\)"):
        pyrnn.Linear(4, 3)(x)


def test_linear_backward_refuses_what_would_not_fit(every_call_weighed, monkeypatch):
    layer = pyrnn.Linear(4, 3)
    y = layer(np.ones((10, 4), np.float32))
    monkeypatch.setattr(_checks, "available_memory", lambda: 100)
    with pytest.raises(MemoryError, match=r"d_y of shape \(10, 3\): this call would allocate"):
        layer.backward(np.ones_like(y))


def test_embedding_refuses_broadcast_indices_too_many_to_look_up():
    indices = np.broadcast_to(np.int64(0), (10**10,))
    with refused(r"\(10000000000,\)", name="indices"):
        pyrnn.Embedding(10, 3)(indices)


def test_one_hot_refuses_before_reading_a_billion_indices():
    with pytest.raises(MemoryError, match=r"one_hot\(num_classes=100\) of 1,000,000,000 indices"):
        pyrnn.layers.one_hot(np.broadcast_to(0, (10**9,)), 100)


def test_dropout_masks_refuse_a_shape_that_would_not_fit():
    with pytest.raises(MemoryError, match=r"dropout_masks of shape \(1000000, 1000, 100\)"):
        functional.dropout_masks(None, 3, (10**6, 10**3, 100), 0.5, np.float32)


# ------------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize(("make", "buffers"), [(optim.Adam, 3), (optim.SGD, 1)])
def test_optimizers_refuse_state_that_would_not_fit(every_call_weighed, monkeypatch, make,
                                                    buffers):
    model = pyrnn.GRU(8, 16, num_layers=2)
    monkeypatch.setattr(_checks, "available_memory", lambda: model.num_parameters() * 4)
    name = make.__name__
    with pytest.raises(MemoryError, match=rf"{name}'s state \({buffers} buffers? per "
                                          rf"parameter\) would hold "
                                          rf"{buffers * model.num_parameters():,} numbers"):
        make(model, lr=0.1)


# ------------------------------------------------------------------------------- the estimates


def test_available_memory_keeps_within_a_cgroup_limit(monkeypatch):
    monkeypatch.undo()  # the real function, not the fixture's 8 GiB
    monkeypatch.setattr(_checks, "_cgroup_room", lambda: 12345)
    assert _checks.available_memory() == 12345
    monkeypatch.setattr(_checks, "_cgroup_room", lambda: None)
    available = _checks.available_memory()
    assert available is None or 0 < available <= 2 * (_checks._memory_bytes() or available)


PEAK = """
import sys
import numpy as np
import pyrnn
backend, cell, mode = sys.argv[1:4]
cls = {"lstm": pyrnn.LSTM, "gru": pyrnn.GRU, "rnn_tanh": pyrnn.RNN}[cell]
net = cls(128, 256, num_layers=2, bidirectional=True, backend=backend, seed=0)
x = np.ones((100, 64, 128), np.float32)
tiny = x[:2, :1].copy()  # warms code pages and threads, not the buffer pool's large blocks
if mode == "infer":
    net.eval()
    net(tiny)
else:
    out, _ = net(tiny)
    net.backward(np.ones_like(out))
    if mode == "backward":
        out, _ = net(x)
def status(key):  # this process's VmRSS or VmHWM (its peak since clear_refs), in bytes
    line = next(s for s in open("/proc/self/status") if s.startswith(key + ":"))
    return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
net.backward(np.ones_like(out)) if mode == "backward" else net(x)
print(status("VmHWM") - base)
"""


@measures_rss
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's peak RSS")
@pytest.mark.parametrize("mode", ["infer", "train", "backward"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_call_estimate_covers_the_peak_a_call_reaches(backend, cell, mode):
    peak = int(subprocess.run([sys.executable, "-c", PEAK, backend, cell, mode],
                              capture_output=True, text=True, check=True,
                              env=child_env()).stdout)
    estimate = _checks.stack_bytes(CELLS[cell], (100, 64, 128, 256, 2, 2), 4, mode, backend)
    assert peak <= estimate, (peak, estimate)


def test_reference_refuses_what_it_would_not_fit(every_call_weighed, monkeypatch):
    rng = np.random.default_rng(0)
    w = [(rng.standard_normal((3, 2)), rng.standard_normal((3, 3)), np.zeros(3), np.zeros(3))]
    monkeypatch.setattr(_checks, "available_memory", lambda: 100)
    with pytest.raises(MemoryError, match=r"x of shape \(4, 2, 2\)"):
        reference.stack_forward("rnn_tanh", rng.standard_normal((4, 2, 2)), np.zeros((1, 2, 3)),
                                None, w, False, None, None, False)
