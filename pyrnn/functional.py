"""The stateless layer under the modules: one call runs a whole stack, one call back-propagates.

``rnn_forward`` checks every argument (with ``pyrnn._checks``), brings arrays into the
kernels' form (time-major, native byte order, C-contiguous), supplies zero initial states and
zero biases where none are given, draws the inter-layer dropout masks, and calls the backend's
``stack_forward`` (the kernel contract in ``pyrnn/_backend.py``) without checking again. With
``keep_tape=True`` it returns a :class:`Tape` that ``rnn_backward`` takes to compute every
gradient.

Dtypes are strict: ``x`` is float32 or float64, and every other array (states, weights,
upstream gradients) must have x's dtype; a mismatch is a TypeError naming the argument rather
than a silent cast. Layout is free: non-contiguous and non-native byte-order arrays are
accepted and copied as needed; the results are the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _backend, _checks
from ._cells import CELLS

__all__ = ["Tape", "rnn_forward", "rnn_backward", "dropout_masks"]

Array = np.ndarray


@dataclass(frozen=True, eq=False)
class Tape:
    """What rnn_backward needs from one rnn_forward call. Opaque to callers; it owns copies of
    what it needs, so later changes to the caller's arrays (an optimizer step) do not affect it.
    """

    backend: str
    cell: str
    kernel_tape: Any
    batch_first: bool
    dtype: np.dtype
    T: int
    B: int
    I: int  # noqa: E741 - the input size, named as in the contract
    H: int
    L: int
    D: int
    proj: int  # the width of a projected LSTM's h, 0 without projection
    bias_given: tuple[tuple[bool, ...], ...]  # per entry and part: passed (not None)
    dims: _checks.TapeDims  # the cell, dtype and sizes above, as the checks take them

    def __repr__(self) -> str:
        proj = f" P={self.proj}" if self.proj else ""
        return (
            f"<pyrnn.functional.Tape {self.cell} {self.backend} {self.dtype} T={self.T} "
            f"B={self.B} I={self.I} H={self.H}{proj} L={self.L} D={self.D}>"
        )


def rnn_forward(
    cell: str,
    x: Array,
    weights: Sequence[Sequence[Array | None]],
    h0: Array | None = None,
    c0: Array | None = None,
    *,
    lengths: Any = None,
    batch_first: bool = False,
    bidirectional: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    rng: np.random.Generator | None = None,
    backend: str = "auto",
    keep_tape: bool = False,
    residual: bool = False,
) -> tuple[Array, Array, Array | None, Tape | None]:
    """Run a stack of recurrent layers over x.

    cell     a name of the kernel contract: "rnn_tanh" | "rnn_relu" | "lstm" | "gru" |
             "lstm_peephole" | "lstm_coupled" | "lstm_coupled_peephole" | "gru_reset_before"
    x        (T, B, I), or (B, T, I) when batch_first; float32 or float64
    weights  L*D tuples (w_ih (G*H, I_k), w_hh (G*H, P), b_ih (G*H,) or None, b_hh or None),
             with two more parts (w_peep (K, H), w_hr (P, H)) for a cell with peepholes or a
             projected LSTM, None for the one it lacks (the kernel contract's forms); ordered
             l0-fwd, l0-bwd, l1-fwd, ...; I_0 = I, I_k = D*P, P = H unless projected; None
             biases are zero
    h0, c0   h0 (L*D, B, P), c0 (L*D, B, H), or None (zeros); c0 only for the LSTM cells
    lengths  one int in [1, T] per sequence (packed-sequence meaning), or None
    dropout  probability of zeroing each output of every layer but the last, applied only
             when training; masks are drawn from rng (a numpy Generator; None: a fresh one)
    residual layers above the first add their input (after dropout) to their output

    Returns (out (T, B, D*P) or (B, T, D*P), h_n (L*D, B, P), c_n or None, tape or None).
    """
    spec = _checks.cell(cell)
    batch_first = _checks.flag("batch_first", batch_first)
    bidirectional = _checks.flag("bidirectional", bidirectional)
    training = _checks.flag("training", training)
    keep_tape = _checks.flag("keep_tape", keep_tape)
    residual = _checks.flag("residual", residual)
    p = _checks.dropout(dropout)
    if rng is not None:
        _checks.generator(rng)
    _checks.choice("backend", backend, _backend.BACKENDS)
    x = _checks.rnn_input(x, batch_first)
    I = x.shape[2]  # noqa: N806, E741
    D = 2 if bidirectional else 1  # noqa: N806
    checked = _checks.rnn_weights(spec, weights, D, I, x.dtype)
    L, H, proj = checked.L, checked.H, checked.proj  # noqa: N806
    residual = residual and L > 1  # one layer has no layer above the first
    backend = _backend.resolve(backend, spec.name, bool(proj), residual)
    masked = training and p > 0 and L > 1
    _checks.rnn_call_fits(spec, x, batch_first, max(H, proj), L, D, backend,
                          "train" if keep_tape else "infer", masked)
    x = _checks.time_major(x, batch_first)
    T, B, _ = x.shape  # noqa: N806
    masks = dropout_masks(rng, L, (T, B, D * (proj or H)), p, x.dtype) if masked else None
    out, h_n, c_n, kernel_tape = _run_stack(
        backend, spec.name, x, checked.weights, h0, c0, lengths, bidirectional, masks, keep_tape,
        residual=residual,
    )
    tape = None
    if keep_tape:
        dims = _checks.TapeDims(spec.name, x.dtype, T, B, I, H, L, D, proj)
        tape = Tape(backend, spec.name, kernel_tape, batch_first, x.dtype, T, B, I, H, L, D, proj,
                    checked.bias_given, dims)
    return _user_layout(out, batch_first), h_n, c_n, tape


def _run_stack(
    backend: str, cell: str, x: Array, kernel_weights: list[tuple[Array, ...]],
    h0: Any, c0: Any, lengths: Any, bidirectional: bool, masks: list[Array] | None,
    keep_tape: bool, packs: Any = None, residual: bool = False,
) -> tuple[Array, Array, Array | None, Any]:
    """The kernel call under rnn_forward, for callers whose weights are already in kernel form
    (checked, zero arrays for missing biases) and whose x is time-major and checked: checks the
    states and lengths, then runs the backend's stack_forward. Returns its (out, h_n, c_n,
    kernel tape)."""
    T, B, _ = x.shape  # noqa: N806
    LD, first = len(kernel_weights), kernel_weights[0]  # noqa: N806
    P = first[1].shape[1]  # noqa: N806 - w_hh (G*H, P)
    w_hr = first[5] if len(first) > 5 else None
    H = P if w_hr is None else w_hr.shape[1]  # noqa: N806
    h0 = _checks.state("h0", h0, (LD, B, P), x.dtype, _checks.h_meaning(w_hr is not None))
    c0 = _checks.cell_state("c0", c0, CELLS[cell], (LD, B, H), x.dtype)
    lengths = _checks.lengths(lengths, T, B)
    return _backend.prechecked(backend).stack_forward(
        cell, x, h0, c0, kernel_weights, bidirectional, lengths, masks, keep_tape, packs,
        residual,
    )


def rnn_backward(
    tape: Tape, d_out: Array | None, d_h_n: Array | None = None, d_c_n: Array | None = None,
    *, accumulate_into: Sequence[Sequence[Array | None]] | None = None,
) -> tuple[Array, Array, Array | None, list[tuple[Array | None, ...]]]:
    """Back-propagate through the forward call recorded on tape.

    d_out has out's shape (batch_first as in the forward); d_out, d_h_n and d_c_n may be None
    (zero). Returns (dx shaped like x, dh0 (L*D, B, H), dc0 or None, d_weights), d_weights
    shaped like the forward's weights, with None where a bias was None. The tape stays valid.

    accumulate_into: None, or arrays laid out as d_weights (None where a bias was None), of the
    tape's dtype, C-contiguous and writable, each its own memory. The weight gradients are then
    added into them in place, as gradients accumulate in a module, and d_weights is them.
    """
    _checks.tape(tape, Tape, "rnn_forward")
    _checks.rnn_backward_fits(tape.dims, d_out, tape.batch_first, tape.backend)
    reads = (d_out, d_h_n, d_c_n)  # as given: the targets may share none of their memory
    d_out, d_h_n, d_c_n = _upstream(tape, d_out, d_h_n, d_c_n)
    targets = None
    if accumulate_into is not None:
        targets = _checks.rnn_targets(accumulate_into, tape.dims, tape.bias_given, reads)
    return _run_backward(tape, d_out, d_h_n, d_c_n, targets)


def _upstream(tape: Tape, d_out: Any, d_h_n: Any, d_c_n: Any) -> tuple[Array, Array, Any]:
    """The upstream gradients checked, in kernel form (None: zeros; d_out time-major)."""
    LD = tape.L * tape.D  # noqa: N806
    d_out = _checks.rnn_d_out(d_out, tape.dims, tape.batch_first)
    d_h_n = _checks.state("d_h_n", d_h_n, (LD, tape.B, tape.dims.P), tape.dtype,
                          _checks.h_meaning(tape.proj))
    d_c_n = _checks.cell_state("d_c_n", d_c_n, CELLS[tape.cell], (LD, tape.B, tape.H), tape.dtype)
    return d_out, d_h_n, d_c_n


def _run_backward(
    tape: Tape, d_out: Array, d_h_n: Array, d_c_n: Array | None,
    targets: list[tuple[Array, ...]] | None,
) -> tuple[Array, Array, Array | None, list[tuple[Array | None, ...]]]:
    """The kernel call under rnn_backward, on checked arguments in kernel form (d_out
    time-major, targets with zero arrays for missing biases)."""
    dx, dh0, dc0, kernel_d_weights = _backend.prechecked(tape.backend).stack_backward(
        tape.kernel_tape, d_out, d_h_n, d_c_n, targets
    )
    if all(map(all, tape.bias_given)):
        d_weights = [tuple(grads) for grads in kernel_d_weights]
    else:  # None for the biases the forward pass was not given
        d_weights = [
            tuple(grad if given else None for grad, given in zip(grads, entry_given, strict=True))
            for grads, entry_given in zip(kernel_d_weights, tape.bias_given, strict=True)
        ]
    return _user_layout(dx, tape.batch_first), dh0, dc0, d_weights


def dropout_masks(
    rng: np.random.Generator, num_layers: int, shape: tuple[int, int, int], p: float,
    dtype: Any,
) -> list[Array]:
    """The num_layers-1 inter-layer masks: each unit kept with probability 1-p and then
    scaled by 1/(1-p), so the expected value of every output is unchanged (as torch.nn.Dropout).
    Drawn layer by layer, each as rng.random(shape) < 1-p over the time-major (T, B, D*H)."""
    rng = _checks.generator(rng)
    num_layers = _checks.positive_int("num_layers", num_layers)
    if not isinstance(shape, tuple | list) or len(shape) != 3:
        raise TypeError(f"shape: expected 3 positive ints (T, B, D*H), got {shape!r}")
    shape = tuple(_checks.positive_int(f"shape[{i}]", n) for i, n in enumerate(shape))
    p = _checks.dropout(p, "p")
    dtype = _checks.float_dtype(dtype)
    _checks.fits_in_memory(f"dropout_masks of shape {shape}", (num_layers - 1) * math.prod(shape),
                           dtype.itemsize, arrays=num_layers - 1, scratch=9 * math.prod(shape))
    scale = np.asarray(1 / (1 - p), dtype)
    return [
        np.where(rng.random(shape) < 1 - p, scale, np.zeros((), dtype)).astype(dtype)
        for _ in range(num_layers - 1)
    ]


def _user_layout(a: Array, batch_first: bool) -> Array:
    return np.ascontiguousarray(a.transpose(1, 0, 2)) if batch_first else a
