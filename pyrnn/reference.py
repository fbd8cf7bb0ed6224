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
Weights = tuple[Array, Array, Array, Array]  # w_ih, w_hh, b_ih, b_hh


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
# step(x_proj, h_prev, c_prev, w_hh, b_hh) -> (h, c, cache), where x_proj = x_t @ w_ih.T + b_ih
# was computed for all steps at once; c is None except for the LSTM.
#
# step_backward(d_h, d_c, cache, h_prev, c_prev, w_hh) -> (d_ih, d_hh, d_h_prev, d_c_prev):
# d_ih is the gradient w.r.t. x_proj (so w.r.t. the input side's gates), d_hh the gradient
# w.r.t. h_prev @ w_hh.T + b_hh. They differ only for the GRU, whose reset gate multiplies the
# hidden side of its candidate.
# ---------------------------------------------------------------------------------------------


def rnn_tanh_step(x_proj, h_prev, c_prev, w_hh, b_hh):
    h = np.tanh(x_proj + h_prev @ w_hh.T + b_hh)
    return h, None, h


def rnn_tanh_step_backward(d_h, d_c, cache, h_prev, c_prev, w_hh):
    h = cache
    d_gates = d_h * (1 - h * h)
    return d_gates, d_gates, d_gates @ w_hh, None


def rnn_relu_step(x_proj, h_prev, c_prev, w_hh, b_hh):
    h = np.maximum(x_proj + h_prev @ w_hh.T + b_hh, 0)
    return h, None, h


def rnn_relu_step_backward(d_h, d_c, cache, h_prev, c_prev, w_hh):
    h = cache
    d_gates = d_h * (h > 0)
    return d_gates, d_gates, d_gates @ w_hh, None


def lstm_step(x_proj, h_prev, c_prev, w_hh, b_hh):
    gates = x_proj + h_prev @ w_hh.T + b_hh
    i, f, g, o = split(gates, 4)
    i, f, g, o = sigmoid(i), sigmoid(f), np.tanh(g), sigmoid(o)
    c = f * c_prev + i * g
    tanh_c = np.tanh(c)
    h = o * tanh_c
    return h, c, (i, f, g, o, tanh_c)


def lstm_step_backward(d_h, d_c, cache, h_prev, c_prev, w_hh):
    i, f, g, o, tanh_c = cache
    d_c = d_c + d_h * o * (1 - tanh_c * tanh_c)  # c reaches the loss directly and through h
    d_i, d_f, d_g, d_o = d_c * g, d_c * c_prev, d_c * i, d_h * tanh_c
    d_gates = np.concatenate(
        [d_i * i * (1 - i), d_f * f * (1 - f), d_g * (1 - g * g), d_o * o * (1 - o)], axis=1
    )
    return d_gates, d_gates, d_gates @ w_hh, d_c * f


def gru_step(x_proj, h_prev, c_prev, w_hh, b_hh):
    h_proj = h_prev @ w_hh.T + b_hh
    x_r, x_z, x_n = split(x_proj, 3)
    h_r, h_z, h_n = split(h_proj, 3)
    r = sigmoid(x_r + h_r)
    z = sigmoid(x_z + h_z)
    n = np.tanh(x_n + r * h_n)
    h = (1 - z) * n + z * h_prev
    return h, None, (r, z, n, h_n)


def gru_step_backward(d_h, d_c, cache, h_prev, c_prev, w_hh):
    r, z, n, h_n = cache
    d_n = d_h * (1 - z) * (1 - n * n)  # w.r.t. the candidate's pre-activation
    d_z = d_h * (h_prev - n) * z * (1 - z)
    d_r = d_n * h_n * r * (1 - r)
    d_ih = np.concatenate([d_r, d_z, d_n], axis=1)
    d_hh = np.concatenate([d_r, d_z, d_n * r], axis=1)
    return d_ih, d_hh, d_h * z + d_hh @ w_hh, None


class Steps(NamedTuple):
    step: Callable[..., Any]
    step_backward: Callable[..., Any]


# The step functions of each cell in pyrnn/_cells.py's table (which says everything else).
STEPS: dict[str, Steps] = {
    "rnn_tanh": Steps(rnn_tanh_step, rnn_tanh_step_backward),
    "rnn_relu": Steps(rnn_relu_step, rnn_relu_step_backward),
    "lstm": Steps(lstm_step, lstm_step_backward),
    "gru": Steps(gru_step, gru_step_backward),
}


# ---------------------------------------------------------------------------------------------
# One layer, one direction, over the whole sequence.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceTape:
    """What sequence_backward needs from one layer and direction (owned copies)."""

    x: Array  # (T, B, I_k) the layer's input, zero past each sequence's end
    h_prev: Array  # (T, B, H) the state fed into step t
    c_prev: Array | None  # (T, B, H), LSTM only
    caches: list  # per step t, the cell's saved activations
    w_ih: Array
    w_hh: Array
    reverse: bool


def time_steps(T: int, reverse: bool) -> range:
    return range(T - 1, -1, -1) if reverse else range(T)


def sequence_forward(cell, x, h0, c0, weights, active, reverse, keep_tape):
    """Run one cell over x (T, B, I_k); active (T, B, 1) says which rows step at each t.

    Returns out (T, B, H), the final h and c, and the SequenceTape (None unless keep_tape).
    """
    w_ih, w_hh, b_ih, b_hh = weights
    step = STEPS[cell].step
    T, B = x.shape[:2]
    H = h0.shape[1]
    x = np.where(active, x, 0)  # what lies past a sequence's end never reaches any result
    x_proj = x @ w_ih.T + b_ih  # the input side of every step as one matmul
    out = np.zeros((T, B, H), x.dtype)
    h_prev = np.empty((T, B, H), x.dtype) if keep_tape else None
    c_prev = np.empty((T, B, H), x.dtype) if keep_tape and c0 is not None else None
    caches: list = [None] * T
    h, c = h0, c0
    for t in time_steps(T, reverse):
        h_new, c_new, cache = step(x_proj[t], h, c, w_hh, b_hh)
        if keep_tape:
            h_prev[t], caches[t] = h, cache
            if c is not None:
                c_prev[t] = c
        h = np.where(active[t], h_new, h)  # finished / not yet started rows keep their state
        if c is not None:
            c = np.where(active[t], c_new, c)
        out[t] = np.where(active[t], h_new, 0)
    if not keep_tape:
        return out, h, c, None
    return out, h, c, SequenceTape(x, h_prev, c_prev, caches, w_ih.copy(), w_hh.copy(), reverse)


def sequence_backward(cell, tape, active, d_out, d_h_n, d_c_n):
    """BPTT through one layer and direction.

    Returns dx (T, B, I_k), dh0, dc0 (or None) and (dw_ih, dw_hh, db_ih, db_hh).
    """
    step_backward = STEPS[cell].step_backward
    T, B, H = tape.h_prev.shape
    GH = tape.w_hh.shape[0]
    d_ih = np.zeros((T, B, GH), d_out.dtype)
    d_hh = np.zeros((T, B, GH), d_out.dtype)
    d_h, d_c = d_h_n, d_c_n
    for t in time_steps(T, not tape.reverse):
        c_prev = tape.c_prev[t] if tape.c_prev is not None else None
        d_h = d_h + np.where(active[t], d_out[t], 0)
        d_ih_t, d_hh_t, d_h_prev, d_c_prev = step_backward(
            d_h, d_c, tape.caches[t], tape.h_prev[t], c_prev, tape.w_hh
        )
        # A row that did not step passed its state through untouched, and so its gradient.
        d_ih[t] = np.where(active[t], d_ih_t, 0)
        d_hh[t] = np.where(active[t], d_hh_t, 0)
        d_h = np.where(active[t], d_h_prev, d_h)
        if d_c is not None:
            d_c = np.where(active[t], d_c_prev, d_c)
    dx = d_ih @ tape.w_ih
    # Weight gradients summed over all steps, each as one matmul over the T*B rows.
    dw_ih = d_ih.reshape(T * B, GH).T @ tape.x.reshape(T * B, -1)
    dw_hh = d_hh.reshape(T * B, GH).T @ tape.h_prev.reshape(T * B, H)
    return dx, d_h, d_c, (dw_ih, dw_hh, d_ih.sum(axis=(0, 1)), d_hh.sum(axis=(0, 1)))


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
    active: Array  # (T, B, 1) bool: row b steps at time t
    masks: list[Array] | None  # L-1 dropout masks (T, B, D*H)
    dirs: list[SequenceTape]  # L*D, ordered l0-fwd, l0-bwd, l1-fwd, ...

    def __repr__(self) -> str:
        return (
            f"<pyrnn.reference.Tape {self.cell} {self.dtype} T={self.T} B={self.B} I={self.I} "
            f"H={self.H} L={self.L} D={self.D}>"
        )


def stack_forward(
    cell: str,
    x: Array,
    h0: Array,
    c0: Array | None,
    weights: Sequence[Weights],
    bidirectional: bool,
    lengths: Array | None,
    dropout_masks: Sequence[Array] | None,
    keep_tape: bool,
    packs: None = None,
) -> tuple[Array, Array, Array | None, Tape | None]:
    """Run a stack of L layers and D directions over x (T, B, I).

    Returns (out (T, B, D*H), h_n (L*D, B, H), c_n or None, tape or None). `packs` must be None:
    NumPy multiplies by the weights as they are, so there is nothing to keep packed.
    """
    _checks.no_packs(packs)
    return _stack_forward(*_checks.kernel_forward(cell, x, h0, c0, weights, bidirectional,
                                                  lengths, dropout_masks, keep_tape, "numpy"))


def _stack_forward(cell, x, h0, c0, weights, bidirectional, lengths, dropout_masks, keep_tape,
                   packs=None):
    """stack_forward on arguments _checks.kernel_forward has checked and returned."""
    T, B, I = x.shape  # noqa: N806, E741
    D = 2 if bidirectional else 1  # noqa: N806
    L = len(weights) // D  # noqa: N806
    steps = T if lengths is None else lengths
    active = (np.arange(T)[:, None] < steps)[:, :, None]  # (T, B, 1): row b steps at time t
    # owned copies: the tape outlives the call
    masks = [np.array(m) for m in dropout_masks] if dropout_masks else None
    with np.errstate(**IEEE_ERRORS):
        out, h_n, c_n, dirs = _forward_layers(cell, x, h0, c0, weights, active, masks, L, D,
                                              keep_tape)
    if not keep_tape:
        return out, h_n, c_n, None
    tape = Tape(cell, x.dtype, T, B, I, h0.shape[2], L, D, active, masks, dirs)
    return out, h_n, c_n, tape


def _forward_layers(cell, x, h0, c0, weights, active, masks, L, D, keep_tape):
    """The stack itself, on checked arguments: layer k > 0 reads layer k-1's [fwd, bwd]."""
    h_n = np.empty(h0.shape, x.dtype)
    c_n = np.empty(h0.shape, x.dtype) if c0 is not None else None
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
        if layer < L - 1:
            layer_input = out * masks[layer] if masks is not None else out
    return out, h_n, c_n, dirs


def stack_backward(
    tape: Tape, d_out: Array, d_h_n: Array | None, d_c_n: Array | None,
    accumulate_into: Sequence[Weights] | None = None,
) -> tuple[Array, Array, Array | None, list[Weights]]:
    """BPTT through the stack recorded on tape; d_h_n and d_c_n may be None (zero).

    Returns (dx (T, B, I), dh0 (L*D, B, H), dc0 or None, d_weights shaped like weights). With
    accumulate_into (arrays shaped like weights), the weight gradients are added into those
    arrays in place, and d_weights is them.
    """
    _checks.tape(tape, Tape, "pyrnn.reference.stack_forward")
    return _stack_backward(tape, *_checks.kernel_backward(tape_dims(tape), d_out, d_h_n, d_c_n,
                                                          accumulate_into, "numpy"))


def tape_dims(tape: Tape) -> _checks.TapeDims:
    return _checks.TapeDims(tape.cell, tape.dtype, tape.T, tape.B, tape.I, tape.H, tape.L,
                            tape.D)


def _stack_backward(tape, d_out, d_h_n, d_c_n, accumulate_into=None):
    """stack_backward on arguments _checks.kernel_backward has checked and returned."""
    state_shape = (tape.L * tape.D, tape.B, tape.H)
    if d_h_n is None:
        d_h_n = np.zeros(state_shape, tape.dtype)
    if d_c_n is None and CELLS[tape.cell].has_c:
        d_c_n = np.zeros(state_shape, tape.dtype)
    with np.errstate(**IEEE_ERRORS):
        dx, dh0, dc0, d_weights = _backward_layers(tape, d_out, d_h_n, d_c_n)
    if accumulate_into is None:
        return dx, dh0, dc0, d_weights
    for targets, grads in zip(accumulate_into, d_weights, strict=True):
        for target, grad in zip(targets, grads, strict=True):
            target += grad
    return dx, dh0, dc0, [tuple(entry) for entry in accumulate_into]


def _backward_layers(tape, d_out, d_h_n, d_c_n):
    """BPTT from the last layer down; each layer's dx is the d_out of the layer below."""
    B, H, L, D = tape.B, tape.H, tape.L, tape.D
    has_c = CELLS[tape.cell].has_c
    dh0 = np.empty((L * D, B, H), tape.dtype)
    dc0 = np.empty((L * D, B, H), tape.dtype) if has_c else None
    d_weights: list[Any] = [None] * (L * D)
    d_layer_out = d_out
    for layer in reversed(range(L)):
        dx = 0
        for d in range(D):
            k = layer * D + d
            d_c_n_k = d_c_n[k] if has_c else None
            dx_d, dh0[k], dc0_k, d_weights[k] = sequence_backward(
                tape.cell, tape.dirs[k], tape.active, d_layer_out[..., d * H : (d + 1) * H],
                d_h_n[k], d_c_n_k,
            )
            if has_c:
                dc0[k] = dc0_k
            dx = dx + dx_d  # both directions read the same layer input
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
