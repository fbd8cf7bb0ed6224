"""module.frozen(): an inference-only snapshot whose C++ calls keep the weights packed between
calls. It must return the module's eval-mode results bit for bit, whatever the batch size, thread
count, layout or caller, and never run stale or foreign packs."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import pyrnn
from pyrnn import _backend, reference

CLASSES = {"rnn": pyrnn.RNN, "lstm": pyrnn.LSTM, "gru": pyrnn.GRU}
needs_cpp = pytest.mark.skipif(not _backend.cpp_available(), reason="C++ core not built")


@pytest.fixture(params=list(CLASSES))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def threads():
    before = pyrnn.get_num_threads()
    yield pyrnn.set_num_threads
    pyrnn.set_num_threads(before)


def make(kind: str, backend: str = "auto", I: int = 5, H: int = 7, **kwargs) -> pyrnn.Module:  # noqa: E741, N803
    kwargs = {"seed": 3, "backend": backend, **kwargs}
    return CLASSES[kind](I, H, **kwargs).eval()


def data(shape: tuple[int, ...], dtype=np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def flat(result) -> list[np.ndarray]:
    out, state = result
    return [out, *state] if isinstance(state, tuple) else [out, state]


def assert_same(got, want) -> None:
    for g, w in zip(flat(got), flat(want), strict=True):
        np.testing.assert_array_equal(g, w)


def initial_state(m: pyrnn.Module, B: int, dtype, seed: int = 1):  # noqa: N803
    shape = (m.num_layers * m.num_directions, B, m.hidden_size)
    h0 = data(shape, dtype, seed)
    return (h0, data(shape, dtype, seed + 1)) if isinstance(m, pyrnn.LSTM) else h0


VARIANTS = {
    "plain": {},
    "two_layers_bidirectional": {"num_layers": 2, "bidirectional": True},
    "batch_first": {"batch_first": True},
    "no_bias": {"bias": False, "num_layers": 2},
}


@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=lambda d: d.__name__)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_frozen_matches_the_module_in_eval_mode_exactly(kind, backend, variant, dtype):
    m = make(kind, backend, dtype=dtype, **VARIANTS[variant])
    fast = m.frozen()
    B, T = 4, 6  # noqa: N806
    x = data((B, T, 5) if m.batch_first else (T, B, 5), dtype)
    hx = initial_state(m, B, dtype)
    lengths = np.array([6, 2, 5, 1])
    for _ in range(3):  # the first call fills the packs, the next ones read them
        assert_same(fast(x), m(x))
        assert_same(fast(x, hx, lengths=lengths), m(x, hx, lengths=lengths))


@needs_cpp
@pytest.mark.parametrize("thread_count", (1, 2, 4))
@pytest.mark.parametrize("B_H", [(16, 96), (9, 190), (1, 190), (1, 20)], ids=str)  # noqa: N803
def test_frozen_agrees_for_every_step_plan_and_thread_count(kind, B_H, thread_count, threads):
    # By rows (16, 96), by units (9, 190), a batch of one by units (1, 190), one thread (1, 20);
    # with 4 threads on a bidirectional layer each direction plans a team of two but runs inside
    # the other's parallel region, where OpenMP gives it one thread.
    B, H = B_H  # noqa: N806
    threads(thread_count)
    m = make(kind, "cpp", I=8, H=H, num_layers=2, bidirectional=True)
    fast = m.frozen()
    x = data((7, B, 8))
    lengths = np.arange(B) % 7 + 1 if B > 1 else None
    want = m(x, lengths=lengths)
    for _ in range(3):
        assert_same(fast(x, lengths=lengths), want)


@needs_cpp
@pytest.mark.parametrize("B", [1, 6])
def test_frozen_stack_agrees_whichever_way_its_layers_run(kind, B, threads):  # noqa: N803
    # Two layers, one direction, two threads: the layers run at once (stack.hpp, layer_lanes), on
    # packs laid out for that; every call must give the module's bits.
    threads(2)
    m = make(kind, "cpp", I=8, H=48, num_layers=2)
    fast = m.frozen()
    x = data((9, B, 8))
    want = m(x)
    for _ in range(40):
        assert_same(fast(x), want)


@needs_cpp
def test_frozen_stack_agrees_as_its_batch_moves_its_layers_between_lanes_and_teams(kind, threads):
    # Two threads run this stack's layers at once for B=1 and one after another, each with both
    # threads, for B=64 (past team_plan.hpp's kLanesMaxMacs), on packs laid out for either way.
    threads(2)
    m = make(kind, "cpp", I=8, H=256, num_layers=2)
    fast = m.frozen()
    for B in (1, 64, 1, 64):  # noqa: N806
        x = data((3, B, 8))
        assert_same(fast(x), m(x))


@needs_cpp
def test_frozen_keeps_one_set_of_packs_per_batch_size_and_thread_count(threads):
    m = make("lstm", "cpp", I=8, H=40)
    fast = m.frozen()
    threads(2)
    for B in (1, 3, 3, 1):  # noqa: N806
        assert_same(fast(data((5, B, 8))), m(data((5, B, 8))))
    threads(1)
    assert_same(fast(data((5, 3, 8))), m(data((5, 3, 8))))
    # batches of one may run another build of the core, with a cache of its own
    assert "entries=3>" in repr(fast._packs)
    for B in (2, 4, 5, 6, 7, 8):  # noqa: N806
        assert_same(fast(data((5, B, 8))), m(data((5, B, 8))))
    held = [cache.entries for cache in fast._packs._by_module.values()]
    assert max(held) == 4 and sum(held) <= 5


def test_frozen_is_a_snapshot_of_the_weights(kind, backend):
    m = make(kind, backend)
    x = data((6, 2, 5))
    fast = m.frozen()
    before = fast(x)
    m.params["weight_hh_l0"][...] *= 2  # in place, as an optimizer step would
    m.params["bias_ih_l0"][...] += 1
    assert_same(fast(x), before)
    assert not np.array_equal(m(x)[0], before[0])
    assert_same(m.frozen()(x), m(x))


def test_frozen_checks_its_inputs(kind, backend):
    fast = make(kind, backend).frozen()
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        fast(data((6, 2, 5), np.float64))
    with pytest.raises(ValueError, match="x: expected input size 5"):
        fast(data((6, 2, 4)))
    with pytest.raises(ValueError, match="x: expected a 3-D array"):
        fast(data((6, 5)))
    with pytest.raises(ValueError, match=r"lengths: every length must be in \[1, T\]"):
        fast(data((6, 2, 5)), lengths=[7, 1])
    bad_h0 = data((2, 2, 7))
    with pytest.raises(ValueError, match="h0: expected shape"):
        fast(data((6, 2, 5)), (bad_h0, None) if kind == "lstm" else bad_h0)
    if kind != "lstm":
        with pytest.raises(TypeError, match="hx: expected one array"):
            fast(data((6, 2, 5)), (bad_h0, bad_h0))
    assert not hasattr(fast, "backward")


def test_frozen_rejects_a_module_whose_weights_were_replaced_badly(kind, backend):
    m = make(kind, backend)
    m.params["weight_ih_l0"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"weights\[0\] w_ih: expected shape"):
        m.frozen()


@needs_cpp
def test_frozen_calls_from_many_threads_agree(kind, threads):
    # The first calls race to fill the packs: one fills, the others wait for it, none reads
    # half-made packs.
    threads(2)
    m = make(kind, "cpp", I=16, H=150, num_layers=2)
    inputs = [data((9, B, 16), seed=B) for B in (1, 2, 9, 1, 2, 9, 16, 16)]
    want = [m(x) for x in inputs]
    fast = m.frozen()
    got: list = [None] * len(inputs)

    def run(i: int) -> None:
        for _ in range(3):
            got[i] = fast(inputs[i])

    workers = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)


def test_frozen_describes_itself(backend):
    fast = pyrnn.GRU(3, 4, num_layers=2, bidirectional=True, backend=backend).frozen()
    assert repr(fast) == (
        "FrozenRNN(GRU(3, 4, num_layers=2, bidirectional=True), cell='gru', dtype=float32, "
        f"backend='{backend}')"
    )


# ---------------------------------------------------------------------------------------------
# The kernel contract's `packs` argument, called directly


def kernel_args(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    w = tuple(rng.standard_normal(s).astype(np.float32) for s in ((6, 3), (6, 2), (6,), (6,)))
    h0 = np.zeros((1, 2, 2), np.float32)
    return x, h0, [w]


@needs_cpp
def test_pack_cache_serves_only_the_weights_it_was_filled_from():
    from pyrnn import _core

    x, h0, weights = kernel_args()
    packs = _core.PackCache()
    want = _core.stack_forward("gru", x, h0, None, weights, False, None, None, False)
    got = _core.stack_forward("gru", x, h0, None, weights, False, None, None, False, packs)
    np.testing.assert_array_equal(got[0], want[0])
    _, _, copies = kernel_args()  # equal values, other arrays
    with pytest.raises(ValueError, match="packs: this PackCache holds packs of other weight"):
        _core.stack_forward("gru", x, h0, None, copies, False, None, None, False, packs)
    w_ih, w_hh, b_ih, b_hh = weights[0]
    as_rnn = [(w_ih[:2], w_hh[:2], b_ih[:2], b_hh[:2])]  # the same memory, as another cell's
    with pytest.raises(ValueError, match="packs: this PackCache holds packs of other weight"):
        _core.stack_forward("rnn_tanh", x, h0, None, as_rnn, False, None, None, False, packs)


@needs_cpp
def test_pack_cache_rejects_training_and_strangers():
    from pyrnn import _core

    x, h0, weights = kernel_args()
    with pytest.raises(ValueError, match="packs: only for inference"):
        _core.stack_forward("gru", x, h0, None, weights, False, None, None, True, _core.PackCache())
    with pytest.raises(TypeError, match="packs: expected None or a pyrnn._core.PackCache"):
        _core.stack_forward("gru", x, h0, None, weights, False, None, None, False, object())


def test_reference_takes_no_packs():
    x, h0, weights = kernel_args()
    with pytest.raises(TypeError, match="packs: the NumPy reference keeps no packs"):
        reference.stack_forward("gru", x, h0, None, weights, False, None, None, False, object())
