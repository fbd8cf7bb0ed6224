"""Both kernel backends against central finite differences, in float64.

Every test takes the kernel module as a parameter: the NumPy reference always, the C++ core
when it is built, so one suite proves both. The loss is a random linear function of every
output, sum(d_out*out) + sum(d_h_n*h_n) (+ sum(d_c_n*c_n)), whose gradient is exactly what
stack_backward returns for the upstream gradients (d_out, d_h_n, d_c_n).
"""

from __future__ import annotations

import contextlib
import itertools
import warnings

import numpy as np
import pytest

import pyrnn
from pyrnn import _backend, reference
from pyrnn._cells import CELLS, PLAIN_CELLS

CELL_NAMES = tuple(CELLS)
T, B, I, H = 4, 3, 3, 2  # noqa: E741 - the contract's names
UNSORTED_LENGTHS = np.array([3, 1, 4])  # unsorted, with a length-1 sequence
EPS = 1e-6
RELU_MARGIN = 1e-4  # relu pre-activations must stay this far from the kink for FD to hold

KERNELS = [
    pytest.param(reference, id="reference"),
    pytest.param(
        "cpp",
        id="cpp",
        marks=pytest.mark.skipif(not _backend.cpp_available(), reason="C++ core not built"),
    ),
]


@pytest.fixture(params=KERNELS)
def kernels(request):
    return _backend.kernels("cpp") if request.param == "cpp" else request.param


class Problem:
    """One random stack: its inputs, its upstream gradients, and its scalar loss."""

    def __init__(self, cell, layers, bidirectional, lengths, init_state, seed, masks=False,
                 dtype=np.float64, sizes=(T, B, I, H), proj=0, residual=False):
        rng = np.random.default_rng(seed)
        T, B, I, H = sizes  # noqa: E741 - the contract's names
        P = proj or H  # noqa: N806 - the width of h
        D = 2 if bidirectional else 1
        spec = CELLS[cell]
        self.cell, self.bidirectional, self.lengths, self.L, self.D = (
            cell, bidirectional, lengths, layers, D)
        self.T, self.B, self.proj, self.residual = T, B, proj, residual

        def draw(*shape):
            return rng.standard_normal(shape).astype(dtype)

        self.x = draw(T, B, I)
        h_shape, c_shape = (layers * D, B, P), (layers * D, B, H)
        self.h0 = draw(*h_shape) if init_state else np.zeros(h_shape, dtype)
        self.c0 = None
        if spec.has_c:
            self.c0 = draw(*c_shape) if init_state else np.zeros(c_shape, dtype)
        bound = 1 / np.sqrt(H)  # PyTorch's initialisation range
        self.weights = [
            tuple(
                None if shape is None else rng.uniform(-bound, bound, shape).astype(dtype)
                for shape in spec.shapes(I if k < D else D * P, H, proj)
            )
            for k in range(layers * D)
        ]
        self.masks = None
        if masks:  # dropout with p = 0.4, already scaled by 1/(1-p)
            self.masks = [
                ((rng.random((T, B, D * P)) >= 0.4) / 0.6).astype(dtype)
                for _ in range(layers - 1)
            ]
        self.d_out = draw(T, B, D * P)
        self.d_h_n = draw(*h_shape)
        self.d_c_n = draw(*c_shape) if spec.has_c else None

    def forward(self, kernels, keep_tape=False):
        if kernels is not reference:  # the C++ core runs the cells and options it has kernels for
            missing = _backend.missing_in_cpp(self.cell, bool(self.proj), self.residual)
            if missing:
                pytest.skip(f"the C++ core has no kernels for {missing} yet")
        return kernels.stack_forward(
            self.cell, self.x, self.h0, self.c0, self.weights, self.bidirectional,
            self.lengths, self.masks, keep_tape, None, self.residual,
        )

    def backward(self, kernels, tape):
        return kernels.stack_backward(tape, self.d_out, self.d_h_n, self.d_c_n)

    def row_losses(self, kernels):
        """The loss split by sequence (B,): row b's part depends on row b's inputs only."""
        out, h_n, c_n, _ = self.forward(kernels)
        rows = np.sum(self.d_out * out, axis=(0, 2)) + np.sum(self.d_h_n * h_n, axis=(0, 2))
        if c_n is not None:
            rows += np.sum(self.d_c_n * c_n, axis=(0, 2))
        return rows

    def inputs(self):
        """(name, array) for every differentiable input, in the order backward returns them."""
        named = [("x", self.x), ("h0", self.h0)]
        if self.c0 is not None:
            named.append(("c0", self.c0))
        names = CELLS[self.cell].part_names(bool(self.proj))
        for k, entry in enumerate(self.weights):
            for name, w in zip(names, entry, strict=True):
                if w is not None:
                    named.append((f"weights[{k}] {name}", w))
        return named


def analytic_gradients(problem, kernels):
    _, _, _, tape = problem.forward(kernels, keep_tape=True)
    dx, dh0, dc0, d_weights = problem.backward(kernels, tape)
    grads = [dx, dh0] + ([dc0] if problem.c0 is not None else [])
    return grads + [g for entry in d_weights for g in entry if g is not None]


@contextlib.contextmanager
def one_thread():
    """Run the C++ core on one thread: thousands of tiny calls on a loaded 2-core machine can
    each wait a whole time slice for a second thread. Results do not depend on the count."""
    before = pyrnn.get_num_threads()
    pyrnn.set_num_threads(1)
    try:
        yield
    finally:
        pyrnn.set_num_threads(before)


def numeric_gradient(problem, kernels, a, per_row):
    """Central differences of the loss w.r.t. every entry of a (perturbed in place).

    per_row: axis 1 of a is the batch (x, h0, c0). Sequences are independent, so one entry is
    perturbed in every row at once and each row's own loss gives that row's derivative.
    """
    grad = np.zeros_like(a)
    shape = (a.shape[0], 1, *a.shape[2:]) if per_row else a.shape
    with one_thread():
        for idx in np.ndindex(shape):
            if per_row:
                idx = (idx[0], slice(None), *idx[2:])
            orig = np.copy(a[idx])
            a[idx] = orig + EPS
            plus = problem.row_losses(kernels)
            a[idx] = orig - EPS
            minus = problem.row_losses(kernels)
            a[idx] = orig
            diff = (plus - minus) / (2 * EPS)
            grad[idx] = diff if per_row else diff.sum()
    return grad


def relu_preactivations(problem, monkeypatch):
    """Every pre-activation the relu cells compute, recorded through the reference."""
    seen = []

    def recording_step(x_proj, h_prev, c_prev, w_hh, b_hh, w_peep):
        seen.append(x_proj + h_prev @ w_hh.T + b_hh)
        return reference.rnn_relu_step(x_proj, h_prev, c_prev, w_hh, b_hh, w_peep)

    steps = reference.STEPS["rnn_relu"]._replace(step=recording_step)
    with monkeypatch.context() as m:
        m.setitem(reference.STEPS, "rnn_relu", steps)
        problem.forward(reference)
    T = problem.T  # noqa: N806
    lengths = problem.lengths if problem.lengths is not None else np.full(problem.B, T)
    active = np.arange(T)[:, None] < lengths
    # Calls come T per layer and direction, the reverse direction from t = T-1 down. Rows past
    # their sequence's end are computed and then discarded, so they may sit anywhere.
    kept = []
    for j, pre in enumerate(seen):
        reverse = (j // T) % problem.D == 1
        t = T - 1 - j % T if reverse else j % T
        kept.append(pre[active[t]].ravel())
    return np.concatenate(kept)


def kink_free_problem(*args, seed, monkeypatch, **kwargs):
    """A relu problem whose pre-activations all stay RELU_MARGIN away from 0 (redraws if not)."""
    for s in range(seed, seed + 50):
        problem = Problem("rnn_relu", *args, seed=s, **kwargs)
        if np.min(np.abs(relu_preactivations(problem, monkeypatch))) > RELU_MARGIN:
            return problem
    raise AssertionError("no kink-free relu problem in 50 draws")


def assert_gradients_match_finite_differences(problem, kernels):
    analytic = analytic_gradients(problem, kernels)
    named = problem.inputs()
    assert len(analytic) == len(named)
    depends = []
    for (name, a), grad in zip(named, analytic, strict=True):
        assert grad.shape == a.shape, name
        numeric = numeric_gradient(problem, kernels, a, per_row=name in ("x", "h0", "c0"))
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=name)
        depends.append(np.any(numeric != 0))
    # Zero against zero would prove nothing; only relu units can be dead for a whole array.
    assert all(depends) if problem.cell != "rnn_relu" else sum(depends) > len(depends) // 2


# The plain cells crossed with every option; the variants' crossing is VARIANTS x STACKS below.
GRID = list(itertools.product(PLAIN_CELLS, (1, 2), (False, True), (False, True), (False, True)))


@pytest.mark.parametrize(
    "cell, layers, bidirectional, with_lengths, init_state",
    GRID,
    ids=[
        f"{c}-L{layer}-{'bi' if bi else 'uni'}-{'len' if ln else 'full'}-{'h0' if h0 else 'zero'}"
        for c, layer, bi, ln, h0 in GRID
    ],
)
def test_grad_matches_finite_differences(
    kernels, cell, layers, bidirectional, with_lengths, init_state, monkeypatch
):
    lengths = UNSORTED_LENGTHS if with_lengths else None
    args = (layers, bidirectional, lengths, init_state)
    seed = GRID.index((cell, layers, bidirectional, with_lengths, init_state))
    if cell == "rnn_relu":
        problem = kink_free_problem(*args, seed=seed, monkeypatch=monkeypatch)
    else:
        problem = Problem(cell, *args, seed=seed)
    assert_gradients_match_finite_differences(problem, kernels)


LSTM_CELLS = tuple(name for name, spec in CELLS.items() if spec.can_project)
# The variants of issue 31 crossed with the stack's options: every LSTM cell with and without a
# projection (P = 2 < H = 3), the reset-before GRU, and residual stacks of every cell.
VARIANTS = [(cell, proj) for cell in LSTM_CELLS for proj in (0, 2)] + [("gru_reset_before", 0)]
STACKS = {  # layers, bidirectional, lengths, init_state, masks, residual
    "L1-uni-full-zero": (1, False, None, False, False, False),
    "L2-bi-len-h0-dropout-residual": (2, True, UNSORTED_LENGTHS, True, True, True),
}
VARIANT_SIZES = (T, B, I, 3)  # H = 3, so that a projection can be narrower


@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.parametrize("cell, proj", VARIANTS, ids=[f"{c}-P{p}" for c, p in VARIANTS])
def test_variant_grad_matches_finite_differences(kernels, cell, proj, stack):
    layers, bidirectional, lengths, init_state, masks, residual = STACKS[stack]
    seed = 500 + 10 * VARIANTS.index((cell, proj)) + list(STACKS).index(stack)
    problem = Problem(cell, layers, bidirectional, lengths, init_state, seed, masks=masks,
                      sizes=VARIANT_SIZES, proj=proj, residual=residual)
    assert_gradients_match_finite_differences(problem, kernels)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_residual_grad_matches_finite_differences(kernels, cell, monkeypatch):
    args = (3, False, UNSORTED_LENGTHS, True)
    if cell == "rnn_relu":
        problem = kink_free_problem(*args, seed=600, monkeypatch=monkeypatch, masks=True,
                                    residual=True)
    else:
        problem = Problem(cell, *args, seed=600, masks=True, residual=True)
    assert_gradients_match_finite_differences(problem, kernels)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_grad_matches_finite_differences_with_dropout_masks(kernels, cell, monkeypatch):
    args = (2, True, UNSORTED_LENGTHS, True)
    if cell == "rnn_relu":
        problem = kink_free_problem(*args, seed=100, monkeypatch=monkeypatch, masks=True)
    else:
        problem = Problem(cell, *args, seed=100, masks=True)
    assert_gradients_match_finite_differences(problem, kernels)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_dropout_mask_scales_what_the_next_layer_reads(kernels, cell):
    problem = Problem(cell, 2, True, None, True, seed=7, masks=True)
    out_masked = problem.forward(kernels)[0]
    # Masks of ones are no dropout at all; the masked run must differ from that.
    problem.masks = [np.ones_like(m) for m in problem.masks]
    assert not np.allclose(problem.forward(kernels)[0], out_masked)
    # A zero mask cuts layer 1 off from x: with no gradient on layer 0's own final states,
    # none can reach x or layer 0's initial states.
    problem.masks = [np.zeros_like(m) for m in problem.masks]
    problem.d_h_n[:2] = 0
    if problem.d_c_n is not None:
        problem.d_c_n[:2] = 0
    _, _, _, tape = problem.forward(kernels, keep_tape=True)
    dx, dh0, _, _ = problem.backward(kernels, tape)
    np.testing.assert_array_equal(dx, 0)
    assert np.all(dh0[:2] == 0) and np.any(dh0[2:] != 0)


def test_relu_grad_matches_finite_differences_away_from_kinks(kernels, monkeypatch):
    problem = kink_free_problem(2, True, UNSORTED_LENGTHS, True, seed=300, monkeypatch=monkeypatch)
    pre = relu_preactivations(problem, monkeypatch)
    # Both sides of the kink are exercised, and none is within reach of the FD step.
    assert np.any(pre > 0) and np.any(pre < 0)
    assert np.min(np.abs(pre)) > RELU_MARGIN > 10 * EPS
    assert_gradients_match_finite_differences(problem, kernels)


def test_relu_passes_no_gradient_through_dead_units(kernels):
    problem = Problem("rnn_relu", 1, False, None, False, seed=3)
    w_ih, w_hh, b_ih, b_hh = problem.weights[0]
    b_ih[:] = -100.0  # every pre-activation is far below 0: every unit is dead at every step
    out, h_n, _, tape = problem.forward(kernels, keep_tape=True)
    np.testing.assert_array_equal(out, 0)
    dx, dh0, _, d_weights = problem.backward(kernels, tape)
    for grad in (dx, dh0, *d_weights[0]):
        np.testing.assert_array_equal(grad, 0)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_float32_matches_float64(kernels, cell):
    p64 = Problem(cell, 2, True, UNSORTED_LENGTHS, True, seed=11, masks=True)
    p32 = Problem(cell, 2, True, UNSORTED_LENGTHS, True, seed=11, masks=True, dtype=np.float32)
    res64, res32 = p64.forward(kernels, keep_tape=True), p32.forward(kernels, keep_tape=True)
    grads64 = p64.backward(kernels, res64[3])
    grads32 = p32.backward(kernels, res32[3])
    for a32, a64 in zip(flatten(res32[:3] + grads32), flatten(res64[:3] + grads64), strict=True):
        assert a32.dtype == np.float32  # no silent upcast
        np.testing.assert_allclose(a32, a64, rtol=1e-4, atol=1e-5)


def assert_same(a, b):
    """Equal up to the last bit or so: what a corrupted tape could never give."""
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def flatten(results):
    """The arrays of a forward or backward result, in order, skipping Nones."""
    arrays = []
    for item in results:
        if isinstance(item, list):
            arrays.extend(a for entry in item for a in entry if a is not None)
        elif item is not None:
            arrays.append(item)
    return arrays


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_nan_in_input_propagates_to_its_own_sequence_only(kernels, cell):
    problem = Problem(cell, 2, True, UNSORTED_LENGTHS, True, seed=5)
    problem.x[1, 0, 0] = np.nan  # row 0 has length 3: step 1 is inside it
    problem.x[2, 1, :] = np.nan  # row 1 has length 1: step 2 lies past its end
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no crash, and no warning either
        out, h_n, c_n, tape = problem.forward(kernels, keep_tape=True)
        dx, dh0, _, _ = problem.backward(kernels, tape)
    # Row 0: the forward direction is NaN from step 1 on, the reverse one from step 1 down.
    assert np.all(np.isnan(out[1:3, 0, :H])) and np.all(np.isnan(out[:2, 0, H:2 * H]))
    assert np.all(np.isnan(h_n[:, 0]))
    if cell != "rnn_relu":  # relu's derivative at NaN is 0 (NaN > 0 is False), as in PyTorch
        assert np.isnan(dx[1, 0]).any()
    # Padding stays zero, and the other rows never see the NaN, not even the one next to it.
    np.testing.assert_array_equal(out[3, 0], 0)
    for a in (out[:, 1:], h_n[:, 1:], dx[:, 1:], dh0[:, 1:]):
        assert np.all(np.isfinite(a))
    if c_n is not None:
        assert np.all(np.isnan(c_n[:, 0])) and np.all(np.isfinite(c_n[:, 1:]))


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_infinite_input_follows_ieee_without_raising(kernels, cell):
    problem = Problem(cell, 2, True, UNSORTED_LENGTHS, True, seed=9)
    problem.x[0, 2] = np.inf
    problem.x[1, 2] = -np.inf
    problem.weights[0][0][:, 0] = 1e300  # overflows every pre-activation of row 0
    with np.errstate(all="raise"):  # the caller's error settings must not turn IEEE into errors
        out, _, _, tape = problem.forward(kernels, keep_tape=True)
        problem.backward(kernels, tape)
    assert not np.all(np.isfinite(out[:, 2]))


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_backward_twice_gives_the_same_result(kernels, cell):
    problem = Problem(cell, 2, True, UNSORTED_LENGTHS, True, seed=21, masks=True)
    tape = problem.forward(kernels, keep_tape=True)[3]
    first, second = problem.backward(kernels, tape), problem.backward(kernels, tape)
    for a, b in zip(flatten(first), flatten(second), strict=True):
        assert_same(a, b)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_tape_survives_caller_mutating_its_arrays(kernels, cell):
    problem = Problem(cell, 2, True, UNSORTED_LENGTHS, True, seed=31, masks=True)
    expected = problem.backward(kernels, problem.forward(kernels, keep_tape=True)[3])
    tape = problem.forward(kernels, keep_tape=True)[3]
    # What an optimizer step or a reused input buffer would do to the caller's arrays.
    for _, a in problem.inputs():
        a[...] = np.nan
    for mask in problem.masks:
        mask[...] = 0
    problem.lengths = UNSORTED_LENGTHS.copy()
    got = problem.backward(kernels, tape)
    for a, b in zip(flatten(got), flatten(expected), strict=True):
        assert_same(a, b)


def test_inference_keeps_no_tape(kernels):
    problem = Problem("lstm", 1, False, None, True, seed=1)
    assert problem.forward(kernels, keep_tape=False)[3] is None
    assert problem.forward(kernels, keep_tape=True)[3] is not None


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_strided_inputs_give_the_same_results(kernels, cell):
    problem = Problem(cell, 2, True, UNSORTED_LENGTHS, True, seed=41)
    expected = problem.forward(kernels)[:3]

    def strided(a):  # same values, not C-contiguous
        if a is None:
            return None
        wide = np.zeros(a.shape + (2,), a.dtype)
        wide[..., 0] = a
        return wide[..., 0]

    problem.x, problem.h0 = strided(problem.x), strided(problem.h0)
    problem.weights = [tuple(strided(w) for w in entry) for entry in problem.weights]
    assert not problem.x.flags.c_contiguous
    for a, b in zip(problem.forward(kernels)[:3], expected, strict=True):
        if b is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_non_native_byte_order_gives_the_same_results(kernels, cell):
    problem = Problem(cell, 2, True, UNSORTED_LENGTHS, True, seed=43, masks=True)
    expected = problem.forward(kernels, keep_tape=True)
    expected_grads = problem.backward(kernels, expected[3])

    def swapped(a):
        return None if a is None else a.astype(a.dtype.newbyteorder("S"))

    problem.x, problem.h0, problem.c0 = swapped(problem.x), swapped(problem.h0), swapped(problem.c0)
    problem.weights = [tuple(swapped(w) for w in entry) for entry in problem.weights]
    problem.masks = [swapped(m) for m in problem.masks]
    problem.d_out, problem.d_h_n = swapped(problem.d_out), swapped(problem.d_h_n)
    problem.d_c_n = swapped(problem.d_c_n)
    got = problem.forward(kernels, keep_tape=True)
    got_grads = problem.backward(kernels, got[3])
    for a, b in zip(flatten(got[:3] + got_grads), flatten(expected[:3] + expected_grads),
                    strict=True):
        assert a.dtype == np.float64  # results come back in the machine's byte order
        assert_same(a, b)


@pytest.mark.skipif(not _backend.cpp_available(), reason="C++ core not built")
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_cpp_matches_reference_on_random_configs(cell):
    core = _backend.kernels("cpp")
    rng = np.random.default_rng(CELLS[cell].num_gates)
    for seed in range(20):
        t, b, i, h = (int(n) for n in rng.integers(1, 6, 4))  # sizes of 1 come up often
        layers, bidirectional = int(rng.integers(1, 4)), bool(rng.integers(2))
        lengths = rng.integers(1, t + 1, b) if rng.integers(2) else None
        problem = Problem(cell, layers, bidirectional, lengths, True, seed=seed,
                          masks=layers > 1 and bool(rng.integers(2)), sizes=(t, b, i, h))
        ref, cpp = problem.forward(reference, True), problem.forward(core, True)
        ref_grads, cpp_grads = problem.backward(reference, ref[3]), problem.backward(core, cpp[3])
        config = f"{cell} T={t} B={b} I={i} H={h} L={layers} bi={bidirectional} {lengths=}"
        for a, c in zip(flatten(ref[:3] + ref_grads), flatten(cpp[:3] + cpp_grads), strict=True):
            np.testing.assert_allclose(c, a, rtol=1e-12, atol=1e-12, err_msg=config)


@pytest.mark.skipif(not _backend.cpp_available(), reason="C++ core not built")
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_cpp_matches_reference_on_random_variant_configs(cell):
    """As above, with projections (LSTM cells) and residual stacks drawn too; the configurations
    the core has no kernels for yet are left out."""
    core = _backend.kernels("cpp")
    rng = np.random.default_rng(700 + CELL_NAMES.index(cell))
    ran = 0
    for seed in range(20):
        t, b, i, h = (int(n) for n in rng.integers(1, 6, 4))
        layers, bidirectional = int(rng.integers(1, 4)), bool(rng.integers(2))
        lengths = rng.integers(1, t + 1, b) if rng.integers(2) else None
        proj = int(rng.integers(1, h)) if CELLS[cell].can_project and h > 1 and rng.integers(2) \
            else 0
        residual = bool(rng.integers(2))
        if _backend.missing_in_cpp(cell, bool(proj), residual):
            continue
        problem = Problem(cell, layers, bidirectional, lengths, True, seed=seed,
                          masks=layers > 1 and bool(rng.integers(2)), sizes=(t, b, i, h),
                          proj=proj, residual=residual)
        ref, cpp = problem.forward(reference, True), problem.forward(core, True)
        ref_grads, cpp_grads = problem.backward(reference, ref[3]), problem.backward(core, cpp[3])
        config = (f"{cell} T={t} B={b} I={i} H={h} P={proj} L={layers} bi={bidirectional} "
                  f"{residual=} {lengths=}")
        for a, c in zip(flatten(ref[:3] + ref_grads), flatten(cpp[:3] + cpp_grads), strict=True):
            np.testing.assert_allclose(c, a, rtol=1e-12, atol=1e-12, err_msg=config)
        ran += 1
    if not ran:
        pytest.skip(f"the C++ core has no kernels for {cell!r} with these options yet")


def with_weight(index, part, value):
    """Edit weights[index][part] of the forward arguments."""

    def edit(a):
        entries = [list(entry) for entry in a["weights"]]
        entries[index][part] = value(entries[index][part])
        a["weights"] = [tuple(entry) for entry in entries]

    return edit


def setter(key, value):
    def edit(a):
        a[key] = value(a[key]) if callable(value) else value

    return edit


def odd_stack(a):
    """Three states and weight entries: consistent with each other, impossible with D = 2."""
    a["h0"], a["c0"], a["weights"] = a["h0"][:3], a["c0"][:3], a["weights"][:3]


BAD_FORWARD = {
    "unknown cell": (setter("cell", "lstmx"), ValueError, "cell"),
    "x not an array": (setter("x", lambda x: x.tolist()), TypeError, "x"),
    "x of ints": (setter("x", lambda x: x.astype(np.int64)), TypeError, "x"),
    "x float16": (setter("x", lambda x: x.astype(np.float16)), TypeError, "x"),
    "x 2-D": (setter("x", lambda x: x[0]), ValueError, "x"),
    "x empty": (setter("x", lambda x: x[:0]), ValueError, "x"),
    "h0 None": (setter("h0", None), ValueError, "h0"),
    "h0 wrong batch": (setter("h0", lambda h: h[:, :2]), ValueError, "h0"),
    "h0 odd L*D when bidirectional": (odd_stack, ValueError, "h0"),
    "h0 float32": (setter("h0", lambda h: h.astype(np.float32)), TypeError, "h0"),
    "c0 None for lstm": (setter("c0", None), ValueError, "c0"),
    "c0 wrong shape": (setter("c0", lambda c: c[:, :, :1]), ValueError, "c0"),
    "weights not a list": (setter("weights", 5), TypeError, "weights"),
    "weights too few": (setter("weights", lambda w: w[:3]), ValueError, "weights"),
    "weights entry of 3": (setter("weights", lambda w: [w[0][:3]] + w[1:]), ValueError,
                           r"weights\[0\]"),
    "w_hh wrong shape": (with_weight(1, 1, lambda w: w[:, :1]), ValueError,
                         r"weights\[1\] w_hh"),
    "layer-1 w_ih reads x": (with_weight(2, 0, lambda w: np.zeros((w.shape[0], I))),
                             ValueError, r"weights\[2\] w_ih"),
    "b_ih float32": (with_weight(0, 2, lambda b: b.astype(np.float32)), TypeError,
                     r"weights\[0\] b_ih"),
    "b_hh wrong size": (with_weight(3, 3, lambda b: b[1:]), ValueError, r"weights\[3\] b_hh"),
    "bidirectional not a bool": (setter("bidirectional", "yes"), TypeError, "bidirectional"),
    "lengths float": (setter("lengths", lambda n: n.astype(float)), TypeError, "lengths"),
    "lengths zero": (setter("lengths", np.array([3, 0, 4])), ValueError, "lengths"),
    "lengths past T": (setter("lengths", np.array([3, 1, T + 1])), ValueError, "lengths"),
    "lengths wrong count": (setter("lengths", np.array([3, 1])), ValueError, "lengths"),
    "dropout_masks too many": (setter("dropout_masks", lambda m: m * 2), ValueError,
                               "dropout_masks"),
    "dropout mask wrong shape": (setter("dropout_masks", lambda m: [m[0][:, :, :1]]),
                                 ValueError, r"dropout_masks\[0\]"),
    "dropout mask float32": (setter("dropout_masks", lambda m: [m[0].astype(np.float32)]),
                             TypeError, r"dropout_masks\[0\]"),
    "keep_tape not a bool": (setter("keep_tape", "yes"), TypeError, "keep_tape"),
}


def forward_arguments(cell="lstm"):
    problem = Problem(cell, 2, True, UNSORTED_LENGTHS, True, seed=51, masks=True)
    return problem, {
        "cell": cell, "x": problem.x, "h0": problem.h0, "c0": problem.c0,
        "weights": problem.weights, "bidirectional": True, "lengths": problem.lengths,
        "dropout_masks": problem.masks, "keep_tape": True,
    }


@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_forward_rejects_bad_argument(kernels, case):
    edit, error, name = BAD_FORWARD[case]
    _, arguments = forward_arguments()
    kernels.stack_forward(**arguments)  # valid as drawn
    edit(arguments)
    with pytest.raises(error, match=name):
        kernels.stack_forward(**arguments)


def test_forward_rejects_c0_for_a_cell_without_one(kernels):
    _, arguments = forward_arguments("gru")
    arguments["c0"] = np.zeros_like(arguments["h0"])
    with pytest.raises(ValueError, match="c0"):
        kernels.stack_forward(**arguments)


BAD_BACKWARD = {
    "d_out wrong shape": ("d_out", lambda d: d[:, :, :2], ValueError),
    "d_out float32": ("d_out", lambda d: d.astype(np.float32), TypeError),
    "d_out not an array": ("d_out", lambda d: d.tolist(), TypeError),
    "d_h_n wrong shape": ("d_h_n", lambda d: d[:2], ValueError),
    "d_c_n wrong shape": ("d_c_n", lambda d: d[:, :1], ValueError),
    "d_c_n float32": ("d_c_n", lambda d: d.astype(np.float32), TypeError),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARD))
def test_backward_rejects_bad_argument(kernels, case):
    name, edit, error = BAD_BACKWARD[case]
    problem, arguments = forward_arguments()
    tape = kernels.stack_forward(**arguments)[3]
    upstream = {"d_out": problem.d_out, "d_h_n": problem.d_h_n, "d_c_n": problem.d_c_n}
    upstream[name] = edit(upstream[name])
    with pytest.raises(error, match=name):
        kernels.stack_backward(tape, **upstream)


def test_backward_rejects_d_c_n_for_a_cell_without_one(kernels):
    problem, arguments = forward_arguments("gru")
    tape = kernels.stack_forward(**arguments)[3]
    with pytest.raises(ValueError, match="d_c_n"):
        kernels.stack_backward(tape, problem.d_out, None, np.zeros_like(problem.d_h_n))


def test_backward_accepts_missing_final_state_gradients(kernels):
    problem = Problem("lstm", 2, True, UNSORTED_LENGTHS, True, seed=61)
    tape = problem.forward(kernels, keep_tape=True)[3]
    problem.d_h_n[...] = 0
    problem.d_c_n[...] = 0
    expected = problem.backward(kernels, tape)
    got = kernels.stack_backward(tape, problem.d_out, None, None)
    for a, b in zip(flatten(got), flatten(expected), strict=True):
        assert_same(a, b)


def test_backward_rejects_a_missing_or_foreign_tape(kernels):
    problem = Problem("gru", 1, False, None, True, seed=71)
    with pytest.raises(ValueError, match="tape"):
        kernels.stack_backward(None, problem.d_out, None, None)
    with pytest.raises(TypeError, match="tape"):
        kernels.stack_backward(object(), problem.d_out, None, None)


# ---------------------------------------------------------------------------------------------
# The variants' parts of the contract: w_peep, w_hr, the form of an entry, widths P and H. Both
# backends check them before anything else (the C++ core before it says what it cannot run).

P_TEST = 2  # the projection's width in these problems, H = 3


def variant_arguments(cell, proj=P_TEST):
    problem = Problem(cell, 2, True, UNSORTED_LENGTHS, True, seed=52, masks=True,
                      sizes=VARIANT_SIZES, proj=proj)
    return problem, {
        "cell": cell, "x": problem.x, "h0": problem.h0, "c0": problem.c0,
        "weights": problem.weights, "bidirectional": True, "lengths": problem.lengths,
        "dropout_masks": problem.masks, "keep_tape": True,
    }


def entry_edit(index, edit):
    """Replace weights[index] by edit(its parts as a list)."""

    def apply(a):
        entries = [list(entry) for entry in a["weights"]]
        entries[index] = edit(entries[index])
        a["weights"] = [tuple(entry) for entry in entries]

    return apply


def part(slot, value):
    def edit(entry):
        entry[slot] = value(entry[slot]) if callable(value) else value
        return entry

    return edit


BAD_VARIANT_FORWARD = {  # cell, proj, edit, error, message
    "w_peep None": ("lstm_peephole", P_TEST, entry_edit(1, part(4, None)), ValueError,
                    r"weights\[1\] w_peep: required for cell 'lstm_peephole'"),
    "w_peep of the coupled cell's 2 rows": (
        "lstm_peephole", 0, entry_edit(0, part(4, lambda w: w[:2])), ValueError,
        r"weights\[0\] w_peep: expected shape \(3, 3\)"),
    "w_peep of 3 rows for the coupled cell": (
        "lstm_coupled_peephole", 0, entry_edit(2, part(4, lambda w: np.vstack([w, w[:1]]))),
        ValueError, r"weights\[2\] w_peep: expected shape \(2, 3\)"),
    "w_peep for a cell without peepholes": (
        "lstm", P_TEST, entry_edit(0, part(4, np.zeros((3, 3)))), ValueError,
        r"weights\[0\] w_peep: expected None, as cell 'lstm' has no peepholes"),
    "w_peep float32": ("lstm_peephole", 0, entry_edit(3, part(4, lambda w: w.astype(np.float32))),
                       TypeError, r"weights\[3\] w_peep: expected dtype float64"),
    "w_hr for a GRU": ("gru_reset_before", 0, entry_edit(0, lambda e: [*e, None, np.eye(3)]),
                       ValueError, r"weights\[0\] w_hr: cell 'gru_reset_before' has no "
                                   r"projection \(only the LSTM cells do\)"),
    "w_hr for an RNN": ("rnn_tanh", 0, entry_edit(0, lambda e: [*e, None, np.eye(3)]),
                        ValueError, r"weights\[0\] w_hr: cell 'rnn_tanh' has no projection"),
    "w_hr of another width than h0": (
        "lstm", P_TEST, entry_edit(0, part(5, lambda w: np.vstack([w, w[:1]]))), ValueError,
        r"weights\[0\] w_hr: expected shape \(P, H\) with P = 2 \(the width of h0\)"),
    "w_hr missing in a later entry": ("lstm_coupled", P_TEST, entry_edit(2, part(5, None)),
                                      ValueError, r"weights\[2\] w_hr: required"),
    "w_hr in a later entry only": (
        "lstm_peephole", 0, entry_edit(1, part(5, np.zeros((3, 3)))), ValueError,
        r"weights\[1\] w_hr: expected None, as the stack is not projected"),
    "w_hr of another H in a later entry": (
        "lstm", P_TEST, entry_edit(3, part(5, lambda w: w[:, :2])), ValueError,
        r"weights\[3\] w_hr: expected shape \(2, 3\)"),
    "6 parts for a plain cell without projection": (
        "lstm", 0, entry_edit(0, lambda e: [*e, None, None]), ValueError,
        r"weights\[0\]: expected 4 entries \(w_ih, w_hh, b_ih, b_hh\) for cell 'lstm', got 6"),
    "4 parts for a cell with peepholes": (
        "lstm_coupled_peephole", 0, entry_edit(1, lambda e: e[:4]), ValueError,
        r"weights\[1\]: expected 6 entries .* for cell 'lstm_coupled_peephole', got 4"),
    "4 parts in a projected stack": (
        "lstm", P_TEST, entry_edit(2, lambda e: e[:4]), ValueError,
        r"weights\[2\]: expected 6 entries .* for cell 'lstm' with projection, got 4"),
    "w_hh of width H in a projected stack": (
        "lstm", P_TEST, entry_edit(1, part(1, lambda w: np.zeros((w.shape[0], 3)))), ValueError,
        r"weights\[1\] w_hh: expected shape \(12, 2\)"),
    "layer 1 reading D*H in a projected stack": (
        "lstm_peephole", P_TEST, entry_edit(2, part(0, lambda w: np.zeros((w.shape[0], 6)))),
        ValueError, r"weights\[2\] w_ih: expected shape \(12, 4\)"),
    "coupled cell with 4 gate blocks": (
        "lstm_coupled", 0, entry_edit(0, part(0, lambda w: np.vstack([w, w[:3]]))), ValueError,
        r"weights\[0\] w_ih: expected shape \(9, 3\)"),
    "c0 of width P": ("lstm", P_TEST, lambda a: a.update(c0=a["c0"][:, :, :P_TEST]),
                      ValueError, r"c0: expected shape \(L\*D, B, H\) = \(4, 3, 3\)"),
    "dropout mask of width D*H": (
        "lstm", P_TEST, lambda a: a.update(dropout_masks=[np.ones((T, B, 6))]), ValueError,
        r"dropout_masks\[0\]: expected shape \(4, 3, 4\)"),
    "c0 for the reset-before GRU": (
        "gru_reset_before", 0, lambda a: a.update(c0=np.zeros((4, 3, 3))), ValueError,
        "c0: only 'lstm' has a cell state"),
    "c0 None for a coupled LSTM": ("lstm_coupled", 0, lambda a: a.update(c0=None), ValueError,
                                   "c0: required for cell 'lstm_coupled'"),
    "residual not a bool": ("lstm", 0, lambda a: a.update(residual="yes"), TypeError,
                            "residual: expected a bool"),
}


@pytest.mark.parametrize("case", list(BAD_VARIANT_FORWARD))
def test_forward_rejects_bad_variant_argument(kernels, case):
    cell, proj, edit, error, message = BAD_VARIANT_FORWARD[case]
    _, arguments = variant_arguments(cell, proj)
    reference.stack_forward(**arguments)  # valid as drawn
    edit(arguments)
    with pytest.raises(error, match=message):
        kernels.stack_forward(**arguments)


BAD_VARIANT_BACKWARD = {  # edit of (d_out, d_h_n, d_c_n, accumulate_into), message[, error]
    "d_out of width D*H": (lambda u: u.update(d_out=np.zeros((T, B, 6))), r"d_out: expected "
                           r"shape \(4, 3, 4\)"),
    "d_h_n of width H": (lambda u: u.update(d_h_n=np.zeros((4, B, 3))), r"d_h_n: expected shape "
                         r"\(4, 3, 2\)"),
    "d_c_n of width P": (lambda u: u.update(d_c_n=np.zeros((4, B, 2))), r"d_c_n: expected shape "
                         r"\(4, 3, 3\)"),
    "accumulate_into of 4 parts": (
        lambda u: u.update(accumulate_into=[tuple(np.zeros_like(a) for a in e[:4])
                                            for e in u.pop("weights")]),
        r"accumulate_into\[0\]: expected 6 entries"),
    "accumulate_into without dw_hr": (
        lambda u: u.update(accumulate_into=[(*(np.zeros_like(a) for a in e[:5]), None)
                                            for e in u.pop("weights")]),
        r"accumulate_into\[0\] dw_hr: expected a numpy array", TypeError),
}


@pytest.mark.parametrize("case", list(BAD_VARIANT_BACKWARD))
def test_backward_rejects_bad_variant_argument(kernels, case):
    edit, message, *error = BAD_VARIANT_BACKWARD[case]
    problem, arguments = variant_arguments("lstm_peephole")
    tape = problem.forward(kernels, keep_tape=True)[3]
    upstream = {"d_out": problem.d_out, "d_h_n": problem.d_h_n, "d_c_n": problem.d_c_n,
                "weights": problem.weights}
    edit(upstream)
    upstream.pop("weights", None)
    with pytest.raises(error[0] if error else ValueError, match=message):
        kernels.stack_backward(tape, **upstream)


def test_variant_gradients_accumulate_into_targets_of_their_form(kernels):
    problem, _ = variant_arguments("lstm_coupled_peephole")
    tape = problem.forward(kernels, keep_tape=True)[3]
    fresh = problem.backward(kernels, tape)[3]
    targets = [tuple(np.ones_like(a) for a in entry) for entry in problem.weights]
    got = kernels.stack_backward(tape, problem.d_out, problem.d_h_n, problem.d_c_n,
                                 accumulate_into=targets)[3]
    for entry, target, grads in zip(got, targets, fresh, strict=True):
        assert len(entry) == 6
        for a, t, g in zip(entry, target, grads, strict=True):
            assert a is t
            assert_same(a, g + 1)


def test_projected_stack_returns_states_of_both_widths(kernels):
    problem, _ = variant_arguments("lstm_peephole")
    out, h_n, c_n, tape = problem.forward(kernels, keep_tape=True)
    assert out.shape == (T, B, 2 * P_TEST) and h_n.shape == (4, B, P_TEST)
    assert c_n.shape == (4, B, 3)
    dx, dh0, dc0, d_weights = problem.backward(kernels, tape)
    assert dh0.shape == (4, B, P_TEST) and dc0.shape == (4, B, 3)
    assert [a.shape for a in d_weights[2]] == [(12, 4), (12, 2), (12,), (12,), (3, 3), (2, 3)]
