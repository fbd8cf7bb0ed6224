"""The stateless layer under the modules: one call runs a whole stack, one call back-propagates.

``rnn_forward`` checks every argument, brings arrays into the kernels' form (time-major,
native byte order, C-contiguous), supplies zero initial states and zero biases where none are
given, draws the inter-layer dropout masks, and calls the backend's ``stack_forward`` (the
kernel contract in ``pyrnn/_backend.py``). With ``keep_tape=True`` it returns a :class:`Tape`
that ``rnn_backward`` takes to compute every gradient.

Dtypes are strict: ``x`` is float32 or float64, and every other array (states, weights,
upstream gradients) must have x's dtype; a mismatch is a TypeError naming the argument rather
than a silent cast. Layout is free: non-contiguous and non-native byte-order arrays are
accepted and copied as needed; the results are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _backend, _checks

__all__ = ["Tape", "rnn_forward", "rnn_backward", "dropout_masks", "GATES"]

Array = np.ndarray
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}  # G: weights have G*H rows
WEIGHT_NAMES = ("w_ih", "w_hh", "b_ih", "b_hh")


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
    bias_given: tuple[tuple[bool, bool], ...]  # per entry: were b_ih, b_hh passed (not None)

    def __repr__(self) -> str:
        return (
            f"<pyrnn.functional.Tape {self.cell} {self.backend} {self.dtype} T={self.T} "
            f"B={self.B} I={self.I} H={self.H} L={self.L} D={self.D}>"
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
) -> tuple[Array, Array, Array | None, Tape | None]:
    """Run a stack of recurrent layers over x.

    cell     "rnn_tanh" | "rnn_relu" | "lstm" | "gru"
    x        (T, B, I), or (B, T, I) when batch_first; float32 or float64
    weights  L*D tuples (w_ih (G*H, I_k), w_hh (G*H, H), b_ih (G*H,) or None, b_hh or None),
             ordered l0-fwd, l0-bwd, l1-fwd, ...; I_0 = I, I_k = D*H; None biases are zero
    h0, c0   (L*D, B, H) or None (zeros); c0 only for "lstm"
    lengths  one int in [1, T] per sequence (packed-sequence meaning), or None
    dropout  probability of zeroing each output of every layer but the last, applied only
             when training; masks are drawn from rng (a numpy Generator; None: a fresh one)

    Returns (out (T, B, D*H) or (B, T, D*H), h_n (L*D, B, H), c_n or None, tape or None).
    """
    cell = _checks.choice("cell", cell, tuple(GATES))
    batch_first = _checks.flag("batch_first", batch_first)
    bidirectional = _checks.flag("bidirectional", bidirectional)
    training = _checks.flag("training", training)
    keep_tape = _checks.flag("keep_tape", keep_tape)
    p = _checks.dropout(dropout)
    if rng is not None:
        _checks.generator(rng)
    backend = _backend.resolve(backend)
    x = _time_major_input(x, batch_first)
    T, B, I = x.shape  # noqa: E741
    D = 2 if bidirectional else 1
    kernel_weights, bias_given, L, H = _check_weights(cell, weights, D, I, x.dtype)
    masks = None
    if training and p > 0 and L > 1:
        masks = dropout_masks(rng, L, (T, B, D * H), p, x.dtype)
    out, h_n, c_n, kernel_tape = _run_stack(
        backend, cell, x, kernel_weights, h0, c0, lengths, bidirectional, masks, keep_tape
    )
    tape = None
    if keep_tape:
        tape = Tape(backend, cell, kernel_tape, batch_first, x.dtype, T, B, I, H, L, D,
                    bias_given)
    return _user_layout(out, batch_first), h_n, c_n, tape


def _run_stack(
    backend: str, cell: str, x: Array, kernel_weights: list[tuple[Array, ...]],
    h0: Any, c0: Any, lengths: Any, bidirectional: bool, masks: list[Array] | None,
    keep_tape: bool, packs: Any = None,
) -> tuple[Array, Array, Array | None, Any]:
    """The kernel call under rnn_forward, for callers whose weights are already in kernel form
    (checked, zero arrays for missing biases) and whose x is time-major: checks the states and
    lengths, then runs the backend's stack_forward. Returns its (out, h_n, c_n, kernel tape)."""
    T, B, _ = x.shape  # noqa: N806
    H = kernel_weights[0][1].shape[1]  # noqa: N806
    state_shape = (len(kernel_weights), B, H)
    h0 = _state("h0", h0, state_shape, x.dtype)
    c0 = _cell_state("c0", c0, cell, state_shape, x.dtype)
    lengths = _checks.lengths(lengths, T, B)
    return _backend.kernels(backend).stack_forward(
        cell, x, h0, c0, kernel_weights, bidirectional, lengths, masks, keep_tape, packs
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
    if tape is None:
        raise ValueError("tape: got None; call rnn_forward with keep_tape=True to get one")
    if not isinstance(tape, Tape):
        raise TypeError(
            f"tape: expected the Tape returned by rnn_forward, got {type(tape).__name__}"
        )
    out_shape = (tape.T, tape.B, tape.D * tape.H)
    if d_out is None:
        d_out = np.zeros(out_shape, tape.dtype)
    else:
        d_out = _checks.float_array("d_out", d_out, tape.dtype)
        if tape.batch_first:
            _checks.shape("d_out", d_out, (tape.B, tape.T, tape.D * tape.H), "(B, T, D*H)")
            d_out = np.ascontiguousarray(d_out.transpose(1, 0, 2))
        else:
            _checks.shape("d_out", d_out, out_shape, "(T, B, D*H)")
    state_shape = (tape.L * tape.D, tape.B, tape.H)
    d_h_n = _state("d_h_n", d_h_n, state_shape, tape.dtype)
    d_c_n = _cell_state("d_c_n", d_c_n, tape.cell, state_shape, tape.dtype)
    targets = None if accumulate_into is None else _kernel_targets(accumulate_into, tape)
    dx, dh0, dc0, kernel_d_weights = _backend.kernels(tape.backend).stack_backward(
        tape.kernel_tape, d_out, d_h_n, d_c_n, targets
    )
    d_weights = [
        (dw_ih, dw_hh, db_ih if has_b_ih else None, db_hh if has_b_hh else None)
        for (dw_ih, dw_hh, db_ih, db_hh), (has_b_ih, has_b_hh) in zip(
            kernel_d_weights, tape.bias_given, strict=True
        )
    ]
    return _user_layout(dx, tape.batch_first), dh0, dc0, d_weights


def _kernel_targets(
    accumulate_into: Any, tape: Tape
) -> list[tuple[Array, Array, Array, Array]]:
    """accumulate_into in kernel form: a zero array (whose sum is dropped) where a bias was None.
    The kernel checks the arrays themselves, and the layout when every bias was given."""
    if all(all(given) for given in tape.bias_given):
        return accumulate_into
    n = tape.L * tape.D
    if not isinstance(accumulate_into, list | tuple):
        raise TypeError(f"accumulate_into: expected a list of {n} tuples (one per layer and "
                        f"direction, as d_weights), got {type(accumulate_into).__name__}")
    if len(accumulate_into) != n:
        raise ValueError(f"accumulate_into: expected {n} tuples (one per layer and direction, "
                         f"as d_weights), got {len(accumulate_into)}")
    targets = []
    for k, (entry, given) in enumerate(zip(accumulate_into, tape.bias_given, strict=True)):
        name = f"accumulate_into[{k}]"
        if not isinstance(entry, list | tuple) or len(entry) != 4:
            raise ValueError(f"{name}: expected a tuple (dw_ih, dw_hh, db_ih, db_hh)")
        biases = []
        for part, bias, has_bias in zip(("db_ih", "db_hh"), entry[2:], given, strict=True):
            if has_bias:
                biases.append(bias)
            elif bias is None:
                biases.append(np.zeros(GATES[tape.cell] * tape.H, tape.dtype))
            else:
                raise ValueError(f"{name} {part}: expected None, as the forward pass had no bias")
        targets.append((entry[0], entry[1], *biases))
    return targets


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
    scale = np.asarray(1 / (1 - p), dtype)
    return [
        np.where(rng.random(shape) < 1 - p, scale, np.zeros((), dtype)).astype(dtype)
        for _ in range(num_layers - 1)
    ]


# ---------------------------------------------------------------------------------------------
# Argument checks and layout.
# ---------------------------------------------------------------------------------------------


def _time_major_input(x: Any, batch_first: bool) -> Array:
    x = _checks.float_array("x", x)
    layout = "(B, T, I)" if batch_first else "(T, B, I)"
    if x.ndim != 3 or 0 in x.shape:
        raise ValueError(
            f"x: expected a 3-D array {layout} with every dimension >= 1, got shape {x.shape}"
        )
    return np.ascontiguousarray(x.transpose(1, 0, 2)) if batch_first else x


def _user_layout(a: Array, batch_first: bool) -> Array:
    return np.ascontiguousarray(a.transpose(1, 0, 2)) if batch_first else a


def _state(name: str, value: Any, shape: tuple[int, int, int], dtype: np.dtype) -> Array:
    """An initial state or upstream state gradient; None means zeros."""
    if value is None:
        return np.zeros(shape, dtype)
    value = _checks.float_array(name, value, dtype)
    _checks.shape(name, value, shape, "(L*D, B, H)")
    return value


def _cell_state(name: str, value: Any, cell: str, shape: tuple[int, int, int],
                dtype: np.dtype) -> Array | None:
    if cell == "lstm":
        return _state(name, value, shape, dtype)
    if value is not None:
        raise ValueError(f"{name}: only 'lstm' has a cell state; expected None for {cell!r}")
    return None


_WEIGHT_MEANINGS = ("(G*H, I_k)", "(G*H, H)", "(G*H,)", "(G*H,)")


def _check_weights(
    cell: str, weights: Any, D: int, I: int, dtype: np.dtype  # noqa: N803, E741
) -> tuple[list[tuple[Array, Array, Array, Array]], tuple[tuple[bool, bool], ...], int, int]:
    """Check the weights; return them in kernel form (zero arrays for None biases),
    which biases were given, and the L and H they imply."""
    if not isinstance(weights, list | tuple):
        raise TypeError(
            f"weights: expected a list of (w_ih, w_hh, b_ih, b_hh) tuples, "
            f"got {type(weights).__name__}"
        )
    if len(weights) == 0 or len(weights) % D:
        raise ValueError(
            f"weights: expected L*D entries with L >= 1 and D = {D} (one per layer and "
            f"direction), got {len(weights)}"
        )
    L, G = len(weights) // D, GATES[cell]
    H = _hidden_size(weights[0])
    zeros = np.zeros(G * H, dtype)
    kernel_weights, bias_given = [], []
    for k, entry in enumerate(weights):
        _check_entry(k, entry)
        I_k = I if k < D else D * H  # noqa: N806
        shapes = ((G * H, I_k), (G * H, H), (G * H,), (G * H,))
        arrays = []
        for j, array in enumerate(entry):
            if array is None and j >= 2:
                arrays.append(zeros)
            elif _checks.is_ready(array, dtype, shapes[j]):
                # Without building names for messages: with a small model called a step at a
                # time, the checks below cost a tenth of the call.
                arrays.append(array)
            else:
                array_name = f"weights[{k}] {WEIGHT_NAMES[j]}"
                array = _checks.float_array(array_name, array, dtype)
                _checks.shape(array_name, array, shapes[j], _WEIGHT_MEANINGS[j])
                arrays.append(array)
        kernel_weights.append(tuple(arrays))
        bias_given.append((entry[2] is not None, entry[3] is not None))
    return kernel_weights, tuple(bias_given), L, H


def _check_entry(k: int, entry: Any) -> None:
    """weights[k] must be four parts (w_ih, w_hh, b_ih, b_hh); the message names, not prints, it."""
    if not isinstance(entry, list | tuple) or len(entry) != 4:
        got = f"{len(entry)} items" if isinstance(entry, list | tuple) else type(entry).__name__
        raise ValueError(f"weights[{k}]: expected a tuple (w_ih, w_hh, b_ih, b_hh), got {got}")


def _hidden_size(entry: Any) -> int:
    """H from the first entry's w_hh (G*H, H)."""
    _check_entry(0, entry)
    w_hh = entry[1]
    if not isinstance(w_hh, np.ndarray) or w_hh.ndim != 2 or w_hh.shape[1] < 1:
        got = getattr(w_hh, "shape", type(w_hh).__name__)
        raise ValueError(f"weights[0] w_hh: expected a 2-D array (G*H, H), got {got}")
    return int(w_hh.shape[1])
