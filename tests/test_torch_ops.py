"""The operators under pyrnn.torch: gradients (gradcheck), the tape's lifetime, threads,
torch.library's own checks of the registrations, and torch.compile(fullgraph=True)."""

from __future__ import annotations

import gc
import os
import threading
import warnings

import pytest

import pyrnn
from pyrnn._cells import CELLS

torch = pytest.importorskip("torch")
import pyrnn.torch as pt  # noqa: E402
from pyrnn.torch import _ops  # noqa: E402

pytestmark = pytest.mark.skipif(not pyrnn.backend_info()["cpp_available"],
                                reason="pyrnn.torch runs the C++ core")



def op_inputs(cell, T=4, B=3, I=2, H=3, L=2, D=2, bias=True, lengths=None,  # noqa: N803, E741
              dtype=torch.float64, seed=0):
    """Arguments of rnn_forward with every tensor requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype,  # noqa: E731
                                      requires_grad=True)
    G = CELLS[cell].num_gates  # noqa: N806
    weights = []
    for layer in range(L):
        for _ in range(D):
            fan_in = I if layer == 0 else D * H
            weights += [rand(G * H, fan_in), rand(G * H, H)]
            weights += [rand(G * H), rand(G * H)] if bias else []
    c0 = rand(L * D, B, H) if cell == "lstm" else None
    return dict(x=rand(T, B, I), h0=rand(L * D, B, H), c0=c0, weights=weights, has_biases=bias,
                bidirectional=D == 2, lengths=lengths)


def stack(cell, x, h0, c0, weights, has_biases, bidirectional, lengths, call=None):
    call = call or _ops.rnn_forward
    out, h_n, c_n, _ = call(cell, x, h0, c0, weights, has_biases, bidirectional, lengths, [],
                            False)
    return (out, h_n, c_n) if cell == "lstm" else (out, h_n)


# the eager entry point (which calls the Autograd kernel itself) and the dispatcher's operator
CALLS = {"eager": _ops.rnn_forward, "dispatcher": torch.ops.pyrnn.rnn_forward.default}


@pytest.mark.parametrize("cell,bias,lengths", [
    ("lstm", True, None), ("gru", True, [4, 2, 3]), ("rnn_tanh", False, None),
    ("rnn_relu", True, [1, 4, 4]), ("lstm", False, [3, 4, 1]),
])
@pytest.mark.parametrize("call", list(CALLS))
def test_gradcheck_float64(cell, bias, lengths, call):
    args = op_inputs(cell, bias=bias, lengths=None if lengths is None else torch.tensor(lengths))
    tensors = [args["x"], args["h0"]] + ([args["c0"]] if cell == "lstm" else []) + args["weights"]
    n_states = 2 if cell == "lstm" else 1

    def f(x, *rest):
        states, weights = rest[:n_states], list(rest[n_states:])
        c0 = states[1] if cell == "lstm" else None
        return stack(cell, x, states[0], c0, weights, bias, True, args["lengths"], CALLS[call])

    # fast_mode: checks random projections of the Jacobian, not its ~500 columns one by one
    assert torch.autograd.gradcheck(f, tuple(tensors), atol=1e-7, rtol=1e-6, fast_mode=True)


def test_double_backward_raises_a_clear_error():
    lstm = pt.LSTM(2, 3, dtype=torch.float64)
    x = torch.randn(4, 1, 2, dtype=torch.float64, requires_grad=True)
    out, _ = lstm(x)
    (dx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="pyrnn: double backward .* is not supported"):
        dx.sum().backward()


def test_backward_twice_with_retain_graph_gives_the_same_gradients():
    gru = pt.GRU(2, 3, num_layers=2, dtype=torch.float64)
    x = torch.randn(5, 2, 2, dtype=torch.float64, requires_grad=True)
    loss = gru(x)[0].square().sum()
    loss.backward(retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in gru.parameters()]
    loss.backward()
    second = [x.grad] + [p.grad for p in gru.parameters()]
    assert all(torch.allclose(2 * a, b) for a, b in zip(first, second, strict=True))


def test_tapes_live_exactly_as_long_as_their_graphs():
    gc.collect()
    start = _ops.live_tapes()
    lstm = pt.LSTM(2, 3)
    x = torch.randn(4, 2, 2, requires_grad=True)
    losses = [lstm(x)[0].sum() for _ in range(3)]  # three graphs alive at once
    assert _ops.live_tapes() == start + 3
    losses[0].backward()
    del losses[0]  # its graph is freed by backward (no retain_graph)
    assert _ops.live_tapes() == start + 2
    losses.clear()  # graphs dropped without a backward
    gc.collect()
    assert _ops.live_tapes() == start
    with torch.no_grad():
        lstm(x)
    lstm(x.detach())  # nothing requires grad... but the weights do: a graph, freed with out
    gc.collect()
    assert _ops.live_tapes() == start


def test_backward_without_a_tape_names_the_reason():
    args = op_inputs("gru")
    out, h_n, c_n, handle = _ops.rnn_forward("gru", args["x"].detach(), args["h0"].detach(), None,
                                             [w.detach() for w in args["weights"]], True, True,
                                             None, [], False)
    with pytest.raises(RuntimeError, match="kept no tape"):
        _ops.rnn_backward(handle, torch.ones_like(out), None, None, "gru", 2, 2, True, True)


def test_graphs_in_several_threads_give_the_serial_results():
    torch.manual_seed(0)
    gru = pt.GRU(3, 8, num_layers=2, bidirectional=True, dtype=torch.float64)
    inputs = [torch.randn(6, 2, 3, dtype=torch.float64) for _ in range(6)]

    def grads_of(x):
        x = x.clone().requires_grad_()
        out, h = gru(x)
        return torch.autograd.grad(out.square().sum() + h.sum(), [x, *gru.parameters()])

    serial = [grads_of(x) for x in inputs]
    results, errors = [None] * len(inputs), []

    def work(k):
        try:
            for _ in range(3):
                results[k] = grads_of(inputs[k])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, serial, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_core_follows_torchs_thread_count_until_set_explicitly(default_threads):
    gru = pt.GRU(2, 3)
    x = torch.randn(3, 1, 2)
    for n in (1, 2):
        torch.set_num_threads(n)
        gru(x)
        assert pyrnn.get_num_threads() == n
    pyrnn.set_num_threads(1)
    torch.set_num_threads(2)
    gru(x)
    assert pyrnn.get_num_threads() == 1


def test_torch_library_opcheck_accepts_the_forward_operator():
    """Schema, fake kernel, autograd registration, and AOT tracing with dynamic shapes (forward
    and backward) against eager. (The backward operator's inputs include a handle, which names
    its tape by its memory: the clones opcheck makes of it name none.)"""
    args = op_inputs("lstm", lengths=torch.tensor([4, 1, 3]))
    forward = ("lstm", args["x"], args["h0"], args["c0"], args["weights"], True, True,
               args["lengths"], [], False)
    results = torch.library.opcheck(torch.ops.pyrnn.rnn_forward.default, forward)
    assert set(results.values()) == {"SUCCESS"}


# ------------------------------------------------------------------------------- compile

class CharModel(torch.nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.embed = torch.nn.Embedding(13, 6)
        rnn = {"lstm": pt.LSTM, "gru": pt.GRU}[cell]
        self.rnn = rnn(6, 8, num_layers=2, batch_first=True, dropout=0.2)
        self.head = torch.nn.Linear(8, 13)

    def forward(self, ids, state=None):
        out, state = self.rnn(self.embed(ids), state)
        return self.head(out), state


def compiled_matches_eager(cell, backend):
    torch.manual_seed(0)
    model = CharModel(cell)
    model.eval()  # the same numbers need the same (no) dropout masks
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    ids = torch.randint(0, 13, (3, 7))
    grads = []
    for run in (compiled, model):
        model.zero_grad()
        logits, _ = run(ids)
        logits.square().mean().backward()
        grads.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    model.train()  # training mode traces too: dropout masks from torch's generator
    logits, (h, c) = compiled(ids) if cell == "lstm" else (*compiled(ids)[:1], (None, None))
    logits.sum().backward()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_compile_fullgraph_traces_through_the_operators(cell):
    compiled_matches_eager(cell, "aot_eager")


def test_compile_fullgraph_with_inductor_gives_the_same_numbers():
    """Inductor's own code generation, with the operators as the graph's external calls (the
    states are given, so that no kernel of Inductor's is compiled: that takes ~20 s here)."""
    torch.manual_seed(0)
    lstm = pt.LSTM(4, 8, num_layers=2, dtype=torch.float64)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for run in (torch.compile(lstm, fullgraph=True, backend="inductor"), lstm):
        lstm.zero_grad()
        out, (h, c) = run(x, (h0, c0))
        grads = torch.autograd.grad(out.sum() + h.sum() + c.sum(), [x, h0, c0,
                                                                    *lstm.parameters()])
        results.append([out, h, c, *grads])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def packed_run(rnn, cell, enforce_sorted):
    """A function packing padded input, running rnn on it and padding its output: (out, h_n[,
    c_n])."""
    def run(x, lengths, h0):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
        state = (h0, torch.zeros_like(h0)) if cell == "lstm" else h0
        out, state = rnn(packed, state)
        padded, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=x.shape[0])
        return (padded, *state) if cell == "lstm" else (padded, state)
    return run


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_compile_runs_packed_sequences_as_eager_does(cell, enforce_sorted):
    """A PackedSequence (lengths sorted or not) through a pyrnn.torch layer inside a compiled
    function: outputs and every gradient equal eager's. With fullgraph=False: torch's own
    pack_padded_sequence is marked by Dynamo as not to be traced, so fullgraph=True fails in torch
    before pyrnn's layer is reached (asserted below, so that this test is revisited when torch
    traces packing), and pyrnn's packed forward is a graph break too (its packed rows become
    (T, B, I) by batch_sizes read on the host)."""
    torch.manual_seed(0)
    rnn = {"lstm": pt.LSTM, "gru": pt.GRU}[cell](3, 5, num_layers=2, bidirectional=True,
                                                   dtype=torch.float64)
    lengths = torch.tensor([6, 4, 3, 1] if enforce_sorted else [3, 6, 1, 4])
    x = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 4, 5, dtype=torch.float64, requires_grad=True)
    run = packed_run(rnn, cell, enforce_sorted)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="pack_padded_sequence"):
        torch.compile(run, fullgraph=True, backend="aot_eager")(x, lengths, h0)
    results = []
    for fn in (torch.compile(run, backend="aot_eager"), run):
        outputs = fn(x, lengths, h0)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
                   for o in outputs)
        grads = torch.autograd.grad(loss, [x, h0, *rnn.parameters()])
        results.append([*outputs, *grads])
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(*results, strict=True))


def test_torch_nns_own_lstm_cannot_compile_fullgraph():
    """The premise of the test above: Dynamo refuses torch.nn.LSTM under fullgraph."""
    with pytest.raises(Exception, match="Attempted to wrap RNN, GRU, or LSTM"):
        torch.compile(torch.nn.LSTM(2, 3), fullgraph=True, backend="eager")(torch.randn(4, 1, 2))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc")
def test_the_core_and_torch_share_one_openmp_runtime():
    """Why the core's teams and torch's intra-op pool never oversubscribe the cores: both
    libraries link libgomp.so.1, and the process loads it once (whichever is imported first).
    (Wheels that bundle a renamed copy, as scikit-learn's libgomp-<hash>.so.1, keep their own.)"""
    pt.GRU(2, 3)(torch.randn(3, 1, 2))  # both have run a call
    with open("/proc/self/maps", encoding="utf-8") as f:
        paths = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    shared = {p for p in paths if os.path.basename(p).startswith(("libgomp.so", "libiomp5.so"))}
    assert len(shared) == 1, paths


def test_profiler_and_tracer_see_the_operator():
    """Eager calls skip the dispatcher; a profiler or torch.jit.trace still records the op."""
    gru, x = pt.GRU(2, 3), torch.randn(3, 1, 2)
    with torch.profiler.profile() as prof:
        gru(x)
    assert "pyrnn::rnn_forward" in {e.name for e in prof.events()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer warnings
        traced = torch.jit.trace(gru, (x,), check_trace=False)
    assert "pyrnn::rnn_forward" in str(traced.graph)
