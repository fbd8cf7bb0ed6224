"""Fuzzing the compiled extension's entry points: every call either returns or raises a Python
exception, never crashes the interpreter.

The calls go to the extension module itself (``pyrnn._core._impl``, one of the ``_core_*``
builds), past pyrnn/_checks.py, with arguments drawn by hypothesis: valid ones for random sizes
(zero included), then one or two of them broken at random (another dtype or byte order, shape or
number of dimensions, a zero or huge size, a strided, Fortran-ordered, misaligned, read-only or
zero-stride view, None, a list, a scalar, lengths out of range, a junk tape or pack cache).

CI runs a short deterministic budget (``derandomize``, the same examples every run). For a longer
search, set ``PYRNN_FUZZ_EXAMPLES`` (examples per entry point, default 40) and, for new examples
rather than the same ones, ``PYRNN_FUZZ_RANDOM=1``::

    PYRNN_FUZZ_EXAMPLES=5000 PYRNN_FUZZ_RANDOM=1 pytest tests/test_fuzz_bindings.py

A crash ends the test process: pytest's faulthandler prints the stack, and the drawn example can
be replayed with the same settings. Every crash found is kept below as an explicit test.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from pyrnn import _backend

if not _backend.cpp_available():
    pytest.skip("the C++ extension is not built", allow_module_level=True)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pyrnn import _core  # noqa: E402

raw = _core._impl  # the extension module, without pyrnn._core's Python checks
CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
SHARED_PACKS = raw.PackCache()  # filled by the first inference call that gets it, refusing others

FUZZ = settings(
    max_examples=int(os.environ.get("PYRNN_FUZZ_EXAMPLES", "40")),
    derandomize=os.environ.get("PYRNN_FUZZ_RANDOM", "") != "1",
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
# What a call may raise on bad arguments; anything else (or a crash) fails the test.
REFUSALS = (TypeError, ValueError, OverflowError, MemoryError)

sizes = st.sampled_from([1, 1, 2, 3, 5, 0])  # 0: sizes the guards must refuse
dtypes = st.sampled_from([np.float32, np.float64])


def other_shape(a: np.ndarray, dtype: type, draw) -> np.ndarray:
    shape = list(a.shape) or [1]
    axis = draw(st.integers(0, len(shape) - 1))
    shape[axis] = max(0, shape[axis] + draw(st.sampled_from([-1, 1, 7])))
    return np.zeros(shape, dtype)


def misaligned(a: np.ndarray, dtype: type, draw) -> np.ndarray:
    return np.zeros(a.nbytes + 1, np.uint8)[1:].view(dtype).reshape(a.shape)


def read_only(a: np.ndarray, dtype: type, draw) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


def empty_huge(a: np.ndarray, dtype: type, draw) -> np.ndarray:
    """No elements, but sizes whose products overflow."""
    rest = max(a.ndim - 1, 1)
    return np.zeros((0,) + (2 ** (56 // rest),) * rest, dtype)


# Ways to break an argument: each takes the valid array, the dtype and hypothesis's draw.
BREAKERS = {
    "dtype": lambda a, dtype, draw: a.astype(draw(st.sampled_from(
        [np.float16, np.int32, np.int64, np.complex64, np.bool_, object, np.float32,
         np.float64]))),
    "byteorder": lambda a, dtype, draw: a.astype(a.dtype.newbyteorder()),
    "shape": other_shape,
    "ndim": lambda a, dtype, draw: a.reshape(a.shape + (1,) if draw(st.booleans()) else -1),
    "zero": lambda a, dtype, draw: np.zeros((0,) * max(a.ndim, 1), dtype),
    "strided": lambda a, dtype, draw: np.zeros(a.shape + (2,), dtype)[..., 0],
    "fortran": lambda a, dtype, draw: np.zeros(a.shape[::-1], dtype).T,
    "misaligned": misaligned,
    "readonly": read_only,
    "broadcast_huge": lambda a, dtype, draw: np.broadcast_to(
        np.zeros((), dtype), (draw(st.sampled_from([2**31, 2**40, 10**9])),) + a.shape[1:]),
    "empty_huge": empty_huge,
    "none": lambda a, dtype, draw: None,
    "list": lambda a, dtype, draw: a.tolist(),
    "scalar": lambda a, dtype, draw: dtype(1.0),
    "int_array": lambda a, dtype, draw: np.ones(a.shape, np.int64),
}


def breakage(draw, value: object, dtype: type) -> object:
    """value (an array, a list of them, or None) broken one way, drawn."""
    a = np.asarray(value, dtype) if isinstance(value, np.ndarray) else np.zeros(3, dtype)
    return BREAKERS[draw(st.sampled_from(sorted(BREAKERS)))](a, dtype, draw)


def some_of(names: list[str]) -> st.SearchStrategy[set[str]]:
    """The arguments to break: none half the time (so that calls also get past the guards)."""
    return st.just(set()) | st.sets(st.sampled_from(names), min_size=1, max_size=2)


def maybe_break(draw, broken: set[str], name: str, value: object, dtype: type) -> object:
    return breakage(draw, value, dtype) if name in broken else value


def array(rng: np.random.Generator, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.3).astype(dtype)


def stack_weights(draw, broken: set[str], cell: str, dims: tuple[int, ...], dtype: type,
                  rng: np.random.Generator) -> list[tuple]:
    """L*D tuples (w_ih, w_hh, b_ih, b_hh); the first tuple's parts broken as `broken` says."""
    I, H, L, D = dims  # noqa: N806, E741
    GH = GATES[cell] * H  # noqa: N806
    weights = []
    for k in range(L * D):
        shapes = ((GH, I if k < D else D * H), (GH, H), (GH,), (GH,))
        weights.append(tuple(
            maybe_break(draw, broken if k == 0 else set(), part, array(rng, shape, dtype), dtype)
            for part, shape in zip(("w_ih", "w_hh", "b_ih", "b_hh"), shapes, strict=True)))
    if "entry" in broken and weights:
        weights[0] = weights[0][:draw(st.integers(0, 3))]
    return maybe_break(draw, broken, "weights", weights, dtype)


def drawn_lengths(draw, broken: set[str], T: int, B: int) -> np.ndarray | None:  # noqa: N803
    if not draw(st.booleans()):
        return None
    values = st.integers(-2, T + 2) if "lengths" in broken else st.integers(1, max(T, 1))
    return np.array([draw(values) for _ in range(B)], np.int64)


def drawn_packs(draw, broken: set[str], keep_tape: bool) -> object:
    if "packs" in broken:
        return draw(st.sampled_from([raw.PackCache(), object(), 3]))
    if not keep_tape and draw(st.booleans()):  # a fresh cache, or one that served others
        return draw(st.sampled_from([raw.PackCache(), SHARED_PACKS]))
    return None


@st.composite
def forward_args(draw, valid: bool = False) -> dict[str, object]:
    """stack_forward's arguments for random sizes, none, one or two of them broken (valid: all
    valid, no size 0)."""
    cell, dtype, bidirectional = draw(st.sampled_from(CELLS)), draw(dtypes), draw(st.booleans())
    T, B, I, H, L = (draw(st.sampled_from([1, 2, 3, 5]) if valid else sizes)  # noqa: N806, E741
                     for _ in range(5))
    D = 2 if bidirectional else 1  # noqa: N806
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    broken = set() if valid else draw(some_of([
        "x", "h0", "c0", "weights", "entry", "w_ih", "w_hh", "b_ih", "b_hh", "lengths", "masks",
        "packs", "cell"]))
    masks = None
    if L > 1 and draw(st.booleans()):
        masks = maybe_break(draw, broken, "masks",
                            [np.ones((T, B, D * H), dtype) for _ in range(L - 1)], dtype)
    c0 = np.zeros((L * D, B, H), dtype) if cell == "lstm" else None
    keep_tape = draw(st.booleans())
    return {
        "cell": draw(st.sampled_from(["LSTM", "", "gru\0", "rnn"])) if "cell" in broken else cell,
        "x": maybe_break(draw, broken, "x", array(rng, (T, B, I), dtype), dtype),
        "h0": maybe_break(draw, broken, "h0", np.zeros((L * D, B, H), dtype), dtype),
        "c0": maybe_break(draw, broken, "c0", c0, dtype),
        "weights": stack_weights(draw, broken, cell, (I, H, L, D), dtype, rng),
        "bidirectional": bidirectional, "lengths": drawn_lengths(draw, broken, T, B),
        "dropout_masks": masks, "keep_tape": keep_tape,
        "packs": drawn_packs(draw, broken, keep_tape),
    }


def call(f, *args, **kwargs) -> object:
    """f's result, or None when it refused its arguments with a Python exception."""
    try:
        return f(*args, **kwargs)
    except REFUSALS:
        return None


@FUZZ
@given(forward_args())
def test_fuzz_stack_forward(args):
    call(raw.stack_forward, **args)


@FUZZ
@given(forward_args(valid=True) | forward_args(), st.data())
def test_fuzz_stack_backward(args, data):
    args["keep_tape"], args["packs"] = True, None
    result = call(raw.stack_forward, **args)
    tape = result[3] if result is not None else data.draw(st.sampled_from([None, object(), 1]))
    T, B, I, H, L, D = tape.dims if result is not None else (1, 1, 1, 1, 1, 1)  # noqa: N806, E741
    dtype = np.float32 if getattr(tape, "dtype", "float32") == "float32" else np.float64
    G = GATES.get(getattr(tape, "cell", "lstm"), 4)  # noqa: N806
    broken = data.draw(some_of(["d_out", "d_h_n", "d_c_n", "into", "entry"]))
    state = np.ones((L * D, B, H), dtype)
    into = None
    if data.draw(st.booleans()):
        into = [[np.zeros(s, dtype) for s in ((G * H, I if k < D else D * H), (G * H, H),
                                               (G * H,), (G * H,))] for k in range(L * D)]
        if "entry" in broken:
            into[0][data.draw(st.integers(0, 3))] = breakage(data.draw, into[0][0], dtype)
        into = maybe_break(data.draw, broken, "into", into, dtype)
    d_c_n = state if getattr(tape, "cell", "") == "lstm" else None
    call(raw.stack_backward, tape,
         maybe_break(data.draw, broken, "d_out", np.ones((T, B, D * H), dtype), dtype),
         maybe_break(data.draw, broken, "d_h_n", state, dtype),
         maybe_break(data.draw, broken, "d_c_n", d_c_n, dtype), into)


@FUZZ
@given(st.data())
def test_fuzz_dense_and_adam(data):
    dtype = data.draw(dtypes)
    n, k, m = (data.draw(sizes) for _ in range(3))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    broken = data.draw(some_of(["x", "weight", "bias", "d_y", "into", "p", "g", "m", "v",
                                "vmax"]))
    x = maybe_break(data.draw, broken, "x", array(rng, (n, k), dtype), dtype)
    weight = maybe_break(data.draw, broken, "weight", array(rng, (m, k), dtype), dtype)
    bias = maybe_break(data.draw, broken, "bias", array(rng, (m,), dtype), dtype)
    call(raw.linear_forward, x, weight, bias)
    d_y = maybe_break(data.draw, broken, "d_y", array(rng, (n, m), dtype), dtype)
    has_bias = data.draw(st.booleans())
    into = None
    if data.draw(st.booleans()):
        into = [np.zeros((m, k), dtype), np.zeros((m,), dtype) if has_bias else None]
        into = maybe_break(data.draw, broken, "into", into, dtype)
    call(raw.linear_backward, x, weight, d_y, has_bias, into)
    shape = (n, k)
    arrays = [maybe_break(data.draw, broken, name, array(rng, shape, dtype) ** 2, dtype)
              for name in ("p", "g", "m", "v")]
    vmax = None
    if data.draw(st.booleans()):
        vmax = maybe_break(data.draw, broken, "vmax", np.zeros(shape, dtype), dtype)
    scalars = [data.draw(st.floats(allow_nan=True, allow_infinity=True)) for _ in range(6)]
    call(raw.adam_update, *arrays, vmax, *scalars)


@FUZZ
@given(st.integers(-2**70, 2**70), st.integers(-2**70, 2**70),
       st.floats(allow_nan=True, allow_infinity=True),
       st.sampled_from(["team", "alone"]) | st.text(max_size=6))
def test_fuzz_settings(threads, limit, seconds, option):
    before_threads, before = raw.get_num_threads(), raw.memory_cache_info()
    try:
        if not 1 <= threads <= 64:  # a valid large count would start that many threads
            call(raw.set_num_threads, threads)
        call(raw.set_memory_cache_limit, limit, seconds)
        choice = raw._TeamChoice()
        call(choice.record, threads % 7, option, seconds)
        call(choice.pick, threads)
        raw.memory_cache_info()
    finally:
        raw.set_num_threads(before_threads)
        raw.set_memory_cache_limit(before["limit_bytes"], before["idle_seconds"])
