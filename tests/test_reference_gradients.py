"""Both kernel backends against central finite differences, in float64.

Every test takes the kernel module as a parameter: the NumPy reference always, the C++ core
when it is built, so one suite proves both. The loss is a random linear function of every
output, sum(d_out*out) + sum(d_h_n*h_n) (+ sum(d_c_n*c_n)), whose gradient is exactly what
stack_backward returns for the upstream gradients (d_out, d_h_n, d_c_n).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pyrnn import _backend, reference

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
CELL_NAMES = tuple(GATES)
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
                 dtype=np.float64):
        rng = np.random.default_rng(seed)
        D = 2 if bidirectional else 1
        GH = GATES[cell] * H
        self.cell, self.bidirectional, self.lengths, self.L, self.D = (
            cell, bidirectional, lengths, layers, D)

        def draw(*shape, scale=1.0):
            return (scale * rng.standard_normal(shape)).astype(dtype)

        self.x = draw(T, B, I)
        state_shape = (layers * D, B, H)
        self.h0 = draw(*state_shape) if init_state else np.zeros(state_shape, dtype)
        self.c0 = None
        if cell == "lstm":
            self.c0 = draw(*state_shape) if init_state else np.zeros(state_shape, dtype)
        bound = 1 / np.sqrt(H)  # PyTorch's initialisation range
        self.weights = [
            tuple(
                rng.uniform(-bound, bound, shape).astype(dtype)
                for shape in [(GH, I if k < D else D * H), (GH, H), (GH,), (GH,)]
            )
            for k in range(layers * D)
        ]
        self.masks = None
        if masks:  # dropout with p = 0.4, already scaled by 1/(1-p)
            self.masks = [
                ((rng.random((T, B, D * H)) >= 0.4) / 0.6).astype(dtype)
                for _ in range(layers - 1)
            ]
        self.d_out = draw(T, B, D * H)
        self.d_h_n = draw(*state_shape)
        self.d_c_n = draw(*state_shape) if cell == "lstm" else None

    def forward(self, kernels, keep_tape=False):
        return kernels.stack_forward(
            self.cell, self.x, self.h0, self.c0, self.weights, self.bidirectional,
            self.lengths, self.masks, keep_tape,
        )

    def backward(self, kernels, tape):
        return kernels.stack_backward(tape, self.d_out, self.d_h_n, self.d_c_n)

    def loss(self, kernels):
        out, h_n, c_n, _ = self.forward(kernels)
        total = np.sum(self.d_out * out) + np.sum(self.d_h_n * h_n)
        if c_n is not None:
            total += np.sum(self.d_c_n * c_n)
        return total

    def inputs(self):
        """(name, array) for every differentiable input, in the order backward returns them."""
        named = [("x", self.x), ("h0", self.h0)]
        if self.c0 is not None:
            named.append(("c0", self.c0))
        for k, entry in enumerate(self.weights):
            for name, w in zip(("w_ih", "w_hh", "b_ih", "b_hh"), entry, strict=True):
                named.append((f"weights[{k}] {name}", w))
        return named


def analytic_gradients(problem, kernels):
    _, _, _, tape = problem.forward(kernels, keep_tape=True)
    dx, dh0, dc0, d_weights = problem.backward(kernels, tape)
    grads = [dx, dh0] + ([dc0] if problem.c0 is not None else [])
    return grads + [g for entry in d_weights for g in entry]


def numeric_gradient(problem, kernels, a):
    """Central differences of the loss w.r.t. every entry of a (perturbed in place)."""
    grad = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        orig = a[idx]
        a[idx] = orig + EPS
        plus = problem.loss(kernels)
        a[idx] = orig - EPS
        minus = problem.loss(kernels)
        a[idx] = orig
        grad[idx] = (plus - minus) / (2 * EPS)
    return grad


def relu_preactivations(problem, monkeypatch):
    """Every pre-activation the relu cells compute, recorded through the reference."""
    seen = []

    def recording_step(x_proj, h_prev, c_prev, w_hh, b_hh):
        seen.append(x_proj + h_prev @ w_hh.T + b_hh)
        return reference.rnn_relu_step(x_proj, h_prev, c_prev, w_hh, b_hh)

    cell = reference.CELLS["rnn_relu"]._replace(step=recording_step)
    with monkeypatch.context() as m:
        m.setitem(reference.CELLS, "rnn_relu", cell)
        problem.forward(reference)
    lengths = problem.lengths if problem.lengths is not None else np.full(B, T)
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
        numeric = numeric_gradient(problem, kernels, a)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=name)
        depends.append(np.any(numeric != 0))
    # Zero against zero would prove nothing; only relu units can be dead for a whole array.
    assert all(depends) if problem.cell != "rnn_relu" else sum(depends) > len(depends) // 2


GRID = list(itertools.product(CELL_NAMES, (1, 2), (False, True), (False, True), (False, True)))


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
