"""Pure-NumPy reference of every kernel (see the kernel contract in pyrnn/_backend.py).

This is both the fallback backend and the oracle the C++ core is tested against, so it is
written to be read next to the equations rather than to be fast. Arrays are time-major,
(T, B, ·); the batch is handled with whole-array operations, and the only Python loops are
over time steps, layers and directions.

Variable lengths follow PyTorch's packed sequences. At step t a row b is *active* when
t < lengths[b]; inactive rows keep their state and emit zeros, which gives the forward
direction its state at its own last step and starts the reverse direction at its own last
step from h0.

Each public kernel checks its arguments with ``pyrnn._checks`` (as the C++ core's Python face
does, with the same words) and hands them to its twin with a leading underscore
(``stack_forward`` -> ``_stack_forward``), which takes them checked: the functional layer and
the layers, having checked their own arguments, call the twins (``_backend.prechecked``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import _checks
from ._cells import CELLS

__all__ = ["Tape", "stack_forward", "stack_backward", "linear_forward", "linear_backward",
           "adam_update", "STEPS"]

Array = np.ndarray
# The kernels follow IEEE arithmetic silently, as the C++ core does: an overflow saturates and
# a NaN or inf in the input propagates, whatever the caller's np.seterr says.
IEEE_ERRORS = {"all": "ignore"}


def sigmoid(x: Array) -> Array:
    # exp overflows to inf for very negative x, and 1 / (1 + inf) is the right limit, 0
    # (the stack functions run under IEEE_ERRORS, so that overflow is silent).
    return 1 / (1 + np.exp(-x))


def split(gates: Array, n: int) -> list[Array]:
    """The n gate blocks of a (B, n*H) pre-activation, in PyTorch's stacking order."""
    H = gates.shape[1] // n
    return [gates[:, k * H : (k + 1) * H] for k in range(n)]  # views; np.split is slower


# ---------------------------------------------------------------------------------------------
# Cells: one time step forward, and its backward.
#
# step(x_proj, h_prev, c_prev, w_hh, b_hh, w_peep) -> (h, c, cache), where x_proj = x_t @ w_ih.T
# + b_ih was computed for all steps at once; c is None but for the LSTMs, w_peep None but for
# the cells with peepholes. h is the cell's output: a projected LSTM's stack projects it.
#
# step_backward(d_h, d_c, cache, h_prev, c_prev, w_hh, w_peep) -> (d_ih, d_hh, d_h_prev,
# d_c_prev, d_peep): d_ih is the gradient w.r.t. x_proj (so w.r.t. the input side's gates), d_hh
# the gradient w.r.t. the hidden side's gates before the bias b_hh is added (the two differ only
# for the GRUs, whose reset gate multiplies the hidden side of the candidate); d_peep is None,
# or (K, B, H): each row's gradient of the K peephole vectors, summed over the batch by the
# caller (which knows which rows stepped).
# ---------------------------------------------------------------------------------------------


def rnn_tanh_step(x_proj, h_prev, c_prev, w_hh, b_hh, w_peep):
    h = np.tanh(x_proj + h_prev @ w_hh.T + b_hh)
    return h, None, h


def rnn_tanh_step_backward(d_h, d_c, cache, h_prev, c_prev, w_hh, w_peep):
    h = cache
    d_gates = d_h * (1 - h * h)
    return d_gates, d_gates, d_gates @ w_hh, None, None


def rnn_relu_step(x_proj, h_prev, c_prev, w_hh, b_hh, w_peep):
    h = np.maximum(x_proj + h_prev @ w_hh.T + b_hh, 0)
    return h, None, h


def rnn_relu_step_backward(d_h, d_c, cache, h_prev, c_prev, w_hh, w_peep):
    h = cache
    d_gates = d_h * (h > 0)
    return d_gates, d_gates, d_gates @ w_hh, None, None


def lstm_step(x_proj, h_prev, c_prev, w_hh, b_hh, w_peep):
    gates = x_proj + h_prev @ w_hh.T + b_hh
    i, f, g, o = split(gates, 4)
    i, f, g, o = sigmoid(i), sigmoid(f), np.tanh(g), sigmoid(o)
    c = f * c_prev + i * g
    tanh_c = np.tanh(c)
    h = o * tanh_c
    return h, c, (i, f, g, o, tanh_c)


def lstm_step_backward(d_h, d_c, cache, h_prev, c_prev, w_hh, w_peep):
    i, f, g, o, tanh_c = cache
    d_c = d_c + d_h * o * (1 - tanh_c * tanh_c)  # c reaches the loss directly and through h
    d_i, d_f, d_g, d_o = d_c * g, d_c * c_prev, d_c * i, d_h * tanh_c
    d_gates = np.concatenate(
        [d_i * i * (1 - i), d_f * f * (1 - f), d_g * (1 - g * g), d_o * o * (1 - o)], axis=1
    )
    return d_gates, d_gates, d_gates @ w_hh, d_c * f, None


def lstm_peephole_step(x_proj, h_prev, c_prev, w_hh, b_hh, w_peep):
    """Peepholes (ONNX's P): i and f see c_prev, o sees the new c; w_peep = (w_ci, w_cf, w_co)."""
    w_ci, w_cf, w_co = w_peep
    gates = x_proj + h_prev @ w_hh.T + b_hh
    i, f, g, o = split(gates, 4)
    i = sigmoid(i + w_ci * c_prev)
    f = sigmoid(f + w_cf * c_prev)
    g = np.tanh(g)
    c = f * c_prev + i * g
    o = sigmoid(o + w_co * c)
    tanh_c = np.tanh(c)
    h = o * tanh_c
    return h, c, (i, f, g, o, c, tanh_c)


def lstm_peephole_step_backward(d_h, d_c, cache, h_prev, c_prev, w_hh, w_peep):
    i, f, g, o, c, tanh_c = cache
    w_ci, w_cf, w_co = w_peep
    d_o = d_h * tanh_c * o * (1 - o)  # w.r.t. the pre-activations from here on
    d_c = d_c + d_h * o * (1 - tanh_c * tanh_c) + d_o * w_co  # c reaches o too
    d_i = d_c * g * i * (1 - i)
    d_f = d_c * c_prev * f * (1 - f)
    d_g = d_c * i * (1 - g * g)
    d_gates = np.concatenate([d_i, d_f, d_g, d_o], axis=1)
    d_c_prev = d_c * f + d_i * w_ci + d_f * w_cf
    d_peep = np.stack([d_i * c_prev, d_f * c_prev, d_o * c])
    return d_gates, d_gates, d_gates @ w_hh, d_c_prev, d_peep


def peephole(w: Array | None, c: Array) -> Array | float:
    """A peephole's term w * c, or nothing when the cell has none."""
    return 0.0 if w is None else w * c


def lstm_coupled_step(x_proj, h_prev, c_prev, w_hh, b_hh, w_peep):
    """Coupled gates: blocks f, g, o and i = 1 - f; w_peep = (w_cf, w_co) or None."""
    w_cf, w_co = (None, None) if w_peep is None else w_peep
    gates = x_proj + h_prev @ w_hh.T + b_hh
    f, g, o = split(gates, 3)
    f = sigmoid(f + peephole(w_cf, c_prev))
    g = np.tanh(g)
    c = f * c_prev + (1 - f) * g
    o = sigmoid(o + peephole(w_co, c))
    tanh_c = np.tanh(c)
    h = o * tanh_c
    return h, c, (f, g, o, c, tanh_c)


def lstm_coupled_step_backward(d_h, d_c, cache, h_prev, c_prev, w_hh, w_peep):
    f, g, o, c, tanh_c = cache
    w_cf, w_co = (None, None) if w_peep is None else w_peep
    d_o = d_h * tanh_c * o * (1 - o)
    d_c = d_c + d_h * o * (1 - tanh_c * tanh_c) + peephole(w_co, d_o)
    d_f = d_c * (c_prev - g) * f * (1 - f)
    d_g = d_c * (1 - f) * (1 - g * g)
    d_gates = np.concatenate([d_f, d_g, d_o], axis=1)
    d_c_prev = d_c * f + peephole(w_cf, d_f)
    d_peep = None if w_peep is None else np.stack([d_f * c_prev, d_o * c])
    return d_gates, d_gates, d_gates @ w_hh, d_c_prev, d_peep


def gru_step(x_proj, h_prev, c_prev, w_hh, b_hh, w_peep):
    h_proj = h_prev @ w_hh.T + b_hh
    x_r, x_z, x_n = split(x_proj, 3)
    h_r, h_z, h_n = split(h_proj, 3)
    r = sigmoid(x_r + h_r)
    z = sigmoid(x_z + h_z)
    n = np.tanh(x_n + r * h_n)
    h = (1 - z) * n + z * h_prev
    return h, None, (r, z, n, h_n)


def gru_step_backward(d_h, d_c, cache, h_prev, c_prev, w_hh, w_peep):
    r, z, n, h_n = cache
    d_n = d_h * (1 - z) * (1 - n * n)  # w.r.t. the candidate's pre-activation
    d_z = d_h * (h_prev - n) * z * (1 - z)
    d_r = d_n * h_n * r * (1 - r)
    d_ih = np.concatenate([d_r, d_z, d_n], axis=1)
    d_hh = np.concatenate([d_r, d_z, d_n * r], axis=1)
    return d_ih, d_hh, d_h * z + d_hh @ w_hh, None, None


def split_rows(w: Array, n: int) -> tuple[Array, Array]:
    """The first n-1 gate blocks of w's rows, and the last (GRU: r and z, and n)."""
    H = w.shape[0] // n  # noqa: N806
    return w[: (n - 1) * H], w[(n - 1) * H :]


def gru_reset_before_step(x_proj, h_prev, c_prev, w_hh, b_hh, w_peep):
    """The original GRU (ONNX linear_before_reset=0): the reset gate scales h_prev before W_hn."""
    w_hrz, w_hn = split_rows(w_hh, 3)
    b_hrz, b_hn = split_rows(b_hh, 3)
    x_r, x_z, x_n = split(x_proj, 3)
    h_r, h_z = split(h_prev @ w_hrz.T + b_hrz, 2)
    r = sigmoid(x_r + h_r)
    z = sigmoid(x_z + h_z)
    r_h = r * h_prev
    n = np.tanh(x_n + r_h @ w_hn.T + b_hn)
    h = (1 - z) * n + z * h_prev
    return h, None, (r, z, n, r_h)


def gru_reset_before_step_backward(d_h, d_c, cache, h_prev, c_prev, w_hh, w_peep):
    r, z, n, r_h = cache
    w_hrz, w_hn = split_rows(w_hh, 3)
    d_n = d_h * (1 - z) * (1 - n * n)
    d_z = d_h * (h_prev - n) * z * (1 - z)
    d_r_h = d_n @ w_hn
    d_r = d_r_h * h_prev * r * (1 - r)
    d_rz = np.concatenate([d_r, d_z], axis=1)
    d_gates = np.concatenate([d_rz, d_n], axis=1)
    return d_gates, d_gates, d_h * z + d_r_h * r + d_rz @ w_hrz, None, None


def rows(a: Array) -> Array:
    """(T, B, n) as (T*B, n): every step's rows as one matrix."""
    return a.reshape(-1, a.shape[-1])


def w_hh_grad(d_hh, h_prev, caches):
    """dW_hh summed over the steps: each step's d_hh times what W_hh multiplied, h_prev."""
    return rows(d_hh).T @ rows(h_prev)


def gru_reset_before_w_hh_grad(d_hh, h_prev, caches):
    """As w_hh_grad, but W_hn multiplied r * h_prev."""
    d_rz, d_n = split_rows(rows(d_hh).T, 3)
    r_h = np.stack([cache[3] for cache in caches])
    return np.concatenate([d_rz @ rows(h_prev), d_n @ rows(r_h)])


class Steps(NamedTuple):
    step: Callable[..., Any]
    step_backward: Callable[..., Any]
    w_hh_grad: Callable[..., Any] = w_hh_grad


# The step functions of each cell in pyrnn/_cells.py's table (which says everything else).
STEPS: dict[str, Steps] = {
    "rnn_tanh": Steps(rnn_tanh_step, rnn_tanh_step_backward),
    "rnn_relu": Steps(rnn_relu_step, rnn_relu_step_backward),
    "lstm": Steps(lstm_step, lstm_step_backward),
    "gru": Steps(gru_step, gru_step_backward),
    "lstm_peephole": Steps(lstm_peephole_step, lstm_peephole_step_backward),
    "lstm_coupled": Steps(lstm_coupled_step, lstm_coupled_step_backward),
    "lstm_coupled_peephole": Steps(lstm_coupled_step, lstm_coupled_step_backward),
    "gru_reset_before": Steps(gru_reset_before_step, gru_reset_before_step_backward,
                              gru_reset_before_w_hh_grad),
}


# ---------------------------------------------------------------------------------------------
# One layer, one direction, over the whole sequence.
# ---------------------------------------------------------------------------------------------


class Weights(NamedTuple):
    """One layer and direction's weights, the optional parts None when absent."""

    w_ih: Array
    w_hh: Array
    b_ih: Array
    b_hh: Array
    w_peep: Array | None = None  # (K, H), the peephole vectors
    w_hr: Array | None = None  # (P, H), the projection


@dataclass(frozen=True)
class SequenceTape:
    """What sequence_backward needs from one layer and direction (owned copies)."""

    x: Array  # (T, B, I_k) the layer's input, zero past each sequence's end
    h_prev: Array  # (T, B, P) the state fed into step t
    c_prev: Array | None  # (T, B, H), LSTM only
    m: Array | None  # (T, B, H) the cell's output before the projection, projected LSTM only
    caches: list  # per step t, the cell's saved activations
    weights: Weights
    reverse: bool


def time_steps(T: int, reverse: bool) -> range:
    return range(T - 1, -1, -1) if reverse else range(T)


def sequence_forward(cell, x, h0, c0, weights, active, reverse, keep_tape):
    """Run one cell over x (T, B, I_k); active (T, B, 1) says which rows step at each t.

    Returns out (T, B, P), the final h and c, and the SequenceTape (None unless keep_tape).
    """
    w = Weights(*weights)
    step = STEPS[cell].step
    T, B = x.shape[:2]
    P = h0.shape[1]  # noqa: N806 - the width of h (H unless projected)
    x = np.where(active, x, 0)  # what lies past a sequence's end never reaches any result
    x_proj = x @ w.w_ih.T + w.b_ih  # the input side of every step as one matmul
    out = np.zeros((T, B, P), x.dtype)
    h_prev = np.empty((T, B, P), x.dtype) if keep_tape else None
    c_prev = np.empty((T, *c0.shape), x.dtype) if keep_tape and c0 is not None else None
    m_all = np.empty((T, *c0.shape), x.dtype) if keep_tape and w.w_hr is not None else None
    caches: list = [None] * T
    h, c = h0, c0
    for t in time_steps(T, reverse):
        h_new, c_new, cache = step(x_proj[t], h, c, w.w_hh, w.b_hh, w.w_peep)
        if w.w_hr is not None:  # LSTMP: h = W_hr (o * tanh(c))
            m, h_new = h_new, h_new @ w.w_hr.T
        if keep_tape:
            h_prev[t], caches[t] = h, cache
            if c is not None:
                c_prev[t] = c
            if m_all is not None:
                m_all[t] = m
        h = np.where(active[t], h_new, h)  # finished / not yet started rows keep their state
        if c is not None:
            c = np.where(active[t], c_new, c)
        out[t] = np.where(active[t], h_new, 0)
    if not keep_tape:
        return out, h, c, None
    owned = Weights(*(None if a is None else a.copy() for a in w))
    return out, h, c, SequenceTape(x, h_prev, c_prev, m_all, caches, owned, reverse)


def sequence_backward(cell, tape, active, d_out, d_h_n, d_c_n):
    """BPTT through one layer and direction.

    Returns dx (T, B, I_k), dh0, dc0 (or None) and the weight gradients as a Weights (None for
    the parts the layer does not have).
    """
    steps = STEPS[cell]
    w = tape.weights
    T, B, P = tape.h_prev.shape  # noqa: N806
    GH = w.w_hh.shape[0]  # noqa: N806
    d_ih = np.zeros((T, B, GH), d_out.dtype)
    d_hh = np.zeros((T, B, GH), d_out.dtype)
    d_peep = None if w.w_peep is None else np.zeros(w.w_peep.shape, d_out.dtype)
    d_h_out = None if w.w_hr is None else np.zeros((T, B, P), d_out.dtype)
    d_h, d_c = d_h_n, d_c_n
    for t in time_steps(T, not tape.reverse):
        c_prev = tape.c_prev[t] if tape.c_prev is not None else None
        d_h = d_h + np.where(active[t], d_out[t], 0)
        d_m = d_h  # w.r.t. the cell's own output
        if d_h_out is not None:  # through the projection h = m W_hr^T
            d_h_out[t] = np.where(active[t], d_h, 0)
            d_m = d_h @ w.w_hr
        d_ih_t, d_hh_t, d_h_prev, d_c_prev, d_peep_t = steps.step_backward(
            d_m, d_c, tape.caches[t], tape.h_prev[t], c_prev, w.w_hh, w.w_peep
        )
        # A row that did not step passed its state through untouched, and so its gradient.
        d_ih[t] = np.where(active[t], d_ih_t, 0)
        d_hh[t] = np.where(active[t], d_hh_t, 0)
        if d_peep is not None:
            d_peep += np.where(active[t], d_peep_t, 0).sum(axis=1)
        d_h = np.where(active[t], d_h_prev, d_h)
        if d_c is not None:
            d_c = np.where(active[t], d_c_prev, d_c)
    dx = d_ih @ w.w_ih
    # Weight gradients summed over all steps, each as one matmul over the T*B rows.
    d_weights = Weights(
        rows(d_ih).T @ rows(tape.x),
        steps.w_hh_grad(d_hh, tape.h_prev, tape.caches),
        d_ih.sum(axis=(0, 1)),
        d_hh.sum(axis=(0, 1)),
        d_peep,
        None if d_h_out is None else rows(d_h_out).T @ rows(tape.m),
    )
    return dx, d_h, d_c, d_weights


# ---------------------------------------------------------------------------------------------
# The stack: layers and directions.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tape:
    """What stack_backward needs from a stack_forward call. Opaque to callers; owns its copies,
    and stack_backward only reads it, so it can be used more than once."""

    cell: str
    dtype: np.dtype
    T: int
    B: int
    I: int  # noqa: E741 - the input size, named as in the contract
    H: int
    L: int
    D: int
    proj: int  # the width P of a projected LSTM's h, 0 without projection
    residual: bool
    active: Array  # (T, B, 1) bool: row b steps at time t
    masks: list[Array] | None  # L-1 dropout masks (T, B, D*P)
    dirs: list[SequenceTape]  # L*D, ordered l0-fwd, l0-bwd, l1-fwd, ...

    def __repr__(self) -> str:
        proj = f" P={self.proj}" if self.proj else ""
        residual = " residual" if self.residual else ""
        return (
            f"<pyrnn.reference.Tape {self.cell} {self.dtype} T={self.T} B={self.B} I={self.I} "
            f"H={self.H}{proj} L={self.L} D={self.D}{residual}>"
        )


def stack_forward(
    cell: str,
    x: Array,
    h0: Array,
    c0: Array | None,
    weights: Sequence[tuple[Array | None, ...]],
    bidirectional: bool,
    lengths: Array | None,
    dropout_masks: Sequence[Array] | None,
    keep_tape: bool,
    packs: None = None,
    residual: bool = False,
) -> tuple[Array, Array, Array | None, Tape | None]:
    """Run a stack of L layers and D directions over x (T, B, I).

    Returns (out (T, B, D*P), h_n (L*D, B, P), c_n (L*D, B, H) or None, tape or None), P = H
    unless projected. `packs` must be None: NumPy multiplies by the weights as they are, so there
    is nothing to keep packed.
    """
    _checks.no_packs(packs)
    args = _checks.kernel_forward(cell, x, h0, c0, weights, bidirectional, lengths,
                                  dropout_masks, keep_tape, "numpy", residual)
    return _stack_forward(*args[:-1], None, args.residual)


def _stack_forward(cell, x, h0, c0, weights, bidirectional, lengths, dropout_masks, keep_tape,
                   packs=None, residual=False):
    """stack_forward on arguments _checks.kernel_forward has checked and returned."""
    T, B, I = x.shape  # noqa: N806, E741
    D = 2 if bidirectional else 1  # noqa: N806
    L = len(weights) // D  # noqa: N806
    w_hr = Weights(*weights[0]).w_hr
    H = h0.shape[2] if w_hr is None else w_hr.shape[1]  # noqa: N806
    steps = T if lengths is None else lengths
    active = (np.arange(T)[:, None] < steps)[:, :, None]  # (T, B, 1): row b steps at time t
    # owned copies: the tape outlives the call
    masks = [np.array(m) for m in dropout_masks] if dropout_masks else None
    with np.errstate(**IEEE_ERRORS):
        out, h_n, c_n, dirs = _forward_layers(cell, x, h0, c0, weights, active, masks, L, D,
                                              keep_tape, residual)
    if not keep_tape:
        return out, h_n, c_n, None
    proj = 0 if w_hr is None else h0.shape[2]
    tape = Tape(cell, x.dtype, T, B, I, H, L, D, proj, residual, active, masks, dirs)
    return out, h_n, c_n, tape


def _forward_layers(cell, x, h0, c0, weights, active, masks, L, D, keep_tape, residual):
    """The stack itself, on checked arguments: layer k > 0 reads layer k-1's [fwd, bwd], and
    with residual adds what it read to its output."""
    h_n = np.empty(h0.shape, x.dtype)
    c_n = np.empty(c0.shape, x.dtype) if c0 is not None else None
    dirs = []
    layer_input = x
    for layer in range(L):
        outs = []
        for d in range(D):
            k = layer * D + d
            c0_k = c0[k] if c0 is not None else None
            out_d, h_n[k], c_n_k, seq_tape = sequence_forward(
                cell, layer_input, h0[k], c0_k, weights[k], active, d == 1, keep_tape
            )
            if c_n is not None:
                c_n[k] = c_n_k
            outs.append(out_d)
            dirs.append(seq_tape)
        out = np.concatenate(outs, axis=2)
        if residual and layer > 0:
            out += layer_input  # y_l = layer_l(in_l) + in_l
        if layer < L - 1:
            layer_input = out * masks[layer] if masks is not None else out
    return out, h_n, c_n, dirs


def stack_backward(
    tape: Tape, d_out: Array, d_h_n: Array | None, d_c_n: Array | None,
    accumulate_into: Sequence[tuple[Array | None, ...]] | None = None,
) -> tuple[Array, Array, Array | None, list[tuple[Array | None, ...]]]:
    """BPTT through the stack recorded on tape; d_h_n and d_c_n may be None (zero).

    Returns (dx (T, B, I), dh0 (L*D, B, P), dc0 or None, d_weights shaped like weights). With
    accumulate_into (arrays shaped like weights), the weight gradients are added into those
    arrays in place, and d_weights is them.
    """
    _checks.tape(tape, Tape, "pyrnn.reference.stack_forward")
    return _stack_backward(tape, *_checks.kernel_backward(tape_dims(tape), d_out, d_h_n, d_c_n,
                                                          accumulate_into, "numpy"))


def tape_dims(tape: Tape) -> _checks.TapeDims:
    return _checks.TapeDims(tape.cell, tape.dtype, tape.T, tape.B, tape.I, tape.H, tape.L,
                            tape.D, tape.proj)


def _stack_backward(tape, d_out, d_h_n, d_c_n, accumulate_into=None):
    """stack_backward on arguments _checks.kernel_backward has checked and returned."""
    LD = tape.L * tape.D  # noqa: N806
    if d_h_n is None:
        d_h_n = np.zeros((LD, tape.B, tape.proj or tape.H), tape.dtype)
    if d_c_n is None and CELLS[tape.cell].has_c:
        d_c_n = np.zeros((LD, tape.B, tape.H), tape.dtype)
    with np.errstate(**IEEE_ERRORS):
        dx, dh0, dc0, d_weights = _backward_layers(tape, d_out, d_h_n, d_c_n)
    if accumulate_into is None:
        return dx, dh0, dc0, d_weights
    for targets, grads in zip(accumulate_into, d_weights, strict=True):
        for target, grad in zip(targets, grads, strict=True):
            if target is not None:
                target += grad
    return dx, dh0, dc0, [tuple(entry) for entry in accumulate_into]


def _backward_layers(tape, d_out, d_h_n, d_c_n):
    """BPTT from the last layer down; each layer's dx is the d_out of the layer below (plus,
    with residual, its own d_out: the input reached the output directly too)."""
    L, D = tape.L, tape.D  # noqa: N806
    P = tape.proj or tape.H  # noqa: N806
    has_c = CELLS[tape.cell].has_c
    parts = len(CELLS[tape.cell].parts(bool(tape.proj)))  # d_weights as the weights' form
    dh0 = np.empty(d_h_n.shape, tape.dtype)
    dc0 = np.empty(d_c_n.shape, tape.dtype) if has_c else None
    d_weights: list[Any] = [None] * (L * D)
    d_layer_out = d_out
    for layer in reversed(range(L)):
        dx = 0
        for d in range(D):
            k = layer * D + d
            d_c_n_k = d_c_n[k] if has_c else None
            dx_d, dh0[k], dc0_k, d_weights_k = sequence_backward(
                tape.cell, tape.dirs[k], tape.active, d_layer_out[..., d * P : (d + 1) * P],
                d_h_n[k], d_c_n_k,
            )
            if has_c:
                dc0[k] = dc0_k
            d_weights[k] = tuple(d_weights_k)[:parts]
            dx = dx + dx_d  # both directions read the same layer input
        if tape.residual and layer > 0:
            dx = dx + d_layer_out
        if layer > 0:
            d_layer_out = dx * tape.masks[layer - 1] if tape.masks is not None else dx
    return dx, dh0, dc0, d_weights


def linear_forward(x: Array, weight: Array, bias: Array | None) -> Array:
    """y (N, M) = x (N, K) weight^T + bias, for weight (M, K) and bias (M,) or None."""
    return _linear_forward(*_checks.kernel_linear_forward(x, weight, bias))


def _linear_forward(x, weight, bias):
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y


def linear_backward(
    x: Array, weight: Array, d_y: Array, has_bias: bool,
    accumulate_into: Sequence[Array | None] | None = None,
) -> tuple[Array, Array, Array | None]:
    """Gradients of linear_forward for d_y (N, M): (dx (N, K), d_weight (M, K), d_bias (M,) or
    None). With accumulate_into (d_weight, d_bias or None), they are added into those arrays."""
    return _linear_backward(*_checks.kernel_linear_backward(x, weight, d_y, has_bias,
                                                            accumulate_into))


def _linear_backward(x, weight, d_y, has_bias, accumulate_into=None):
    d_weight, d_bias = d_y.T @ x, (d_y.sum(axis=0) if has_bias else None)
    dx = d_y @ weight
    if accumulate_into is None:
        return dx, d_weight, d_bias
    for target, grad in zip(accumulate_into, (d_weight, d_bias), strict=True):
        if target is not None:
            target += grad
    return dx, accumulate_into[0], accumulate_into[1]


def adam_update(
    param: Array, grad: Array, exp_avg: Array, exp_avg_sq: Array, max_exp_avg_sq: Array | None,
    neg_step_size: float, lerp_weight: float, beta2: float, bias_correction2_sqrt: float,
    eps: float, weight_decay: float,
) -> None:
    """One Adam step in place, as torch.optim.Adam computes it: the moments move towards the
    gradient (plus weight_decay * param), and param by neg_step_size * exp_avg / denom, denom =
    sqrt(exp_avg_sq, or its running maximum max_exp_avg_sq) / bias_correction2_sqrt + eps."""
    _checks.kernel_adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq)
    _adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, neg_step_size, lerp_weight,
                 beta2, bias_correction2_sqrt, eps, weight_decay)


def _adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, neg_step_size, lerp_weight,
                 beta2, bias_correction2_sqrt, eps, weight_decay):
    if weight_decay != 0:
        grad = grad + weight_decay * param  # a new array: the stored gradient is untouched
    if abs(lerp_weight) < 0.5:  # torch.lerp's two branches, for its rounding
        exp_avg += lerp_weight * (grad - exp_avg)
    else:
        exp_avg[...] = grad - (grad - exp_avg) * (1 - lerp_weight)
    exp_avg_sq *= beta2
    exp_avg_sq += (1 - beta2) * grad * grad
    second_moment = exp_avg_sq
    if max_exp_avg_sq is not None:
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    denom = np.sqrt(second_moment) / bias_correction2_sqrt
    denom += eps
    param += neg_step_size * exp_avg / denom
