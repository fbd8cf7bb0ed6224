"""Recurrent cells as single steps: RNNCell, LSTMCell and GRUCell, with torch.nn.*Cell's
constructor, parameter names (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``; an
LSTMCell with peepholes adds ``weight_ci``, ``weight_cf``, ``weight_co``), shapes and init.

A cell runs one time step of one layer: ``h1 = cell(x, h0)``, ``h1, c1 = lstm_cell(x, (h0,
c0))``; x is (B, I) or (I,), the state (B, H) or (H,) to match, or None (zeros). A call is the
stack kernel of the kernel contract (pyrnn/_backend.py) with T = 1 and one layer, so a cell runs
on the C++ core wherever the core runs its cell, else on the NumPy reference.

In training mode with gradients enabled every call keeps its step on a tape, last in, first out:
``cell.backward(dh1)`` (LSTMCell: ``cell.backward(dh1, dc1)``; either may be None) undoes the
most recent call not yet undone, returns the gradients of that call's input and state, and adds
its weight gradients into ``cell.grads`` (they accumulate until ``zero_grad``). A decoder loop
over time steps runs backward as the same loop reversed, adding each step's dh0 into the
gradient of the h it was given. ``clear_tape()`` drops the steps no backward will undo. The
tape is the calling thread's (docs/threads.md).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from . import _backend, _checks
from ._cells import CELLS, gru_cell, rnn_cell
from .functional import Tape, rnn_backward, rnn_forward
from .module import Module, is_grad_enabled
from .modules import ParamLayout, lstm_variant_repr

__all__ = ["RNNCell", "LSTMCell", "GRUCell"]

Array = np.ndarray


class _Step(NamedTuple):
    """One call's tape, and whether its x was a batch (B, I) rather than one vector (I,)."""

    tape: Tape
    batched: bool


class _CellBase(Module):
    """What the three cells share; `cell` names the kernel ("rnn_tanh", "lstm_peephole", ...)."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, bias: bool, dtype: Any,
                 seed: int | None, backend: str) -> None:
        super().__init__()
        self.cell = cell
        self.input_size = _checks.positive_int("input_size", input_size)
        self.hidden_size = _checks.positive_int("hidden_size", hidden_size)
        self.bias = _checks.flag("bias", bias)
        self.dtype = _checks.float_dtype(dtype)
        self.seed = _checks.seed(seed)
        self.backend = _backend.resolve(_checks.choice("backend", backend, _backend.BACKENDS),
                                        cell)
        self._cell = CELLS[cell]
        self._fits_in_memory()
        self._layout = self._init_params(np.random.default_rng(self.seed))
        self._w_hh_shape = self.params["weight_hh"].shape

    def _fits_in_memory(self) -> None:
        count = self._cell.parameter_count(self.input_size, self.hidden_size, self.bias)
        largest = max(math.prod(s) for s in self._cell.shapes(self.input_size, self.hidden_size)
                      if s is not None)
        _checks.fits_in_memory(
            f"{type(self).__name__}(input_size={self.input_size}, hidden_size="
            f"{self.hidden_size}) with its gradients", 2 * count, self.dtype.itemsize,
            arrays=2 * len(self._cell.params()), scratch=8 * largest)

    def _init_params(self, rng: np.random.Generator) -> ParamLayout:
        """PyTorch's order and init, uniform(-1/sqrt(H), 1/sqrt(H)) (the peepholes too)."""
        bound = 1 / math.sqrt(self.hidden_size)
        sizes = self._cell.sizes(self.input_size, self.hidden_size)
        for param in self._cell.params():
            if param.bias and not self.bias:
                continue
            shape = tuple(sizes[d] for d in param.dims)
            self.add_param(param.name, rng.uniform(-bound, bound, shape).astype(self.dtype))
        return ParamLayout(self._cell, False, self.bias, [""])

    def _weights(self) -> list[tuple[Array | None, ...]]:
        weights = self._layout.gather(self.params)
        w_hh = weights[0][1]  # it sets H for the kernels: another size would run as another cell
        if getattr(w_hh, "shape", None) != self._w_hh_shape:
            raise ValueError(
                f"params['weight_hh']: expected shape {self._w_hh_shape} (hidden_size "
                f"{self.hidden_size}), got {getattr(w_hh, 'shape', type(w_hh).__name__)}; "
                "load other weights with load_state_dict, which checks them")
        return weights

    @property
    def _steps(self) -> list[_Step]:
        """The calling thread's steps not yet undone: a tape belongs to its thread
        (docs/threads.md), so a decoder per thread may share one cell."""
        this_thread = self._this_thread
        if this_thread.tape is None:
            this_thread.tape = []
        return this_thread.tape

    @property
    def pending_steps(self) -> int:
        """How many calls backward can still undo."""
        return len(self._steps)

    def clear_tape(self) -> None:
        """Forget every call not yet undone (a decoder run whose loss is not back-propagated)."""
        self._steps.clear()

    def _step(self, x: Any, h0: Any, c0: Any) -> tuple[Array, Array | None]:
        """One step: (h1, c1 or None), shaped as the state (B, H) or (H,)."""
        x, batched = _step_input(x, self.dtype, self.input_size)
        B, H = x.shape[1], self.hidden_size  # noqa: N806
        h0 = _step_state("h0", h0, batched, B, H, self.dtype)
        c0 = _step_state("c0", c0, batched, B, H, self.dtype) if self._cell.has_c else None
        keep_tape = self.training and is_grad_enabled()
        _, h_n, c_n, tape = rnn_forward(self.cell, x, self._weights(), h0, c0,
                                        backend=self.backend, keep_tape=keep_tape)
        if tape is not None:
            self._steps.append(_Step(tape, batched))
        return _user_state(h_n, batched), None if c_n is None else _user_state(c_n, batched)

    def _undo(self, dh1: Any, dc1: Any) -> tuple[Array, Array, Array | None]:
        """Back-propagate the most recent call not yet undone: (dx, dh0, dc0 or None)."""
        name = type(self).__name__
        if not self._steps:
            raise RuntimeError(
                f"{name}.backward: no step to undo: every call that kept a tape has been undone "
                "already (calls in eval mode or under pyrnn.no_grad() keep none)")
        step = self._steps[-1]
        self._check_grads()
        B, H = step.tape.B, self.hidden_size  # noqa: N806
        d_h = _step_state("dh1", dh1, step.batched, B, H, self.dtype)
        d_c = _step_state("dc1", dc1, step.batched, B, H, self.dtype) if self._cell.has_c else None
        dx, dh0, dc0, d_weights = rnn_backward(step.tape, None, d_h, d_c)
        self._steps.pop()
        with self._grad_lock:
            self._layout.add_grads(self.grads, d_weights)
        return (_user_state(dx, step.batched), _user_state(dh0, step.batched),
                None if dc0 is None else _user_state(dc0, step.batched))

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if self.dtype != np.float32:
            s += f", dtype={self.dtype.name}"
        return s

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def _step_input(x: Any, dtype: np.dtype, input_size: int) -> tuple[Array, bool]:
    """x (B, I) or (I,) as the stack kernels take it, (1, B, I), and whether it was a batch."""
    x = _checks.float_ndarray("x", x)
    if x.dtype.char != dtype.char:
        raise TypeError(f"x: expected dtype {dtype} (the cell's dtype), got {x.dtype}")
    if x.ndim not in (1, 2) or x.shape[-1] != input_size or 0 in x.shape:
        raise ValueError(f"x: expected shape (B, input_size) with B >= 1, or (input_size,), "
                         f"with input_size = {input_size}; got {x.shape}")
    return x.reshape(1, -1, input_size), x.ndim == 2


def _step_state(name: str, value: Any, batched: bool, B: int, H: int,  # noqa: N803
                dtype: np.dtype) -> Array | None:
    """A state (or its gradient) (B, H), or (H,) when x was one vector, as the stack kernels
    take it, (1, B, H); None stays None (zeros)."""
    if value is None:
        return None
    expected, meaning = ((B, H), "(B, hidden_size)") if batched else (
        (H,), "(hidden_size,), as x is one vector")
    return _checks.float_ndarray(name, value, dtype, expected, meaning).reshape(1, B, H)


def _user_state(a: Array, batched: bool) -> Array:
    """(1, B, n) from the kernels as (B, n), or (n,) for an unbatched call."""
    return a[0] if batched else a[0, 0]


class _HiddenStateCell(_CellBase):
    """A cell whose state is h alone (RNNCell, GRUCell)."""

    def __call__(self, x: Array, hx: Array | None = None) -> Array:
        return self._step(x, _checks.single_state("hx", hx), None)[0]

    forward = __call__

    def backward(self, dh1: Array | None) -> tuple[Array, Array]:
        """Undo the most recent call: its (dx, dh0); the weight gradients go into grads."""
        dx, dh0, _ = self._undo(_checks.single_state("dh1", dh1), None)
        return dx, dh0


class RNNCell(_HiddenStateCell):
    """h1 = act(W_ih x + b_ih + W_hh h0 + b_hh), act = tanh or relu (torch.nn.RNNCell).

    ``h1 = cell(x, h0=None)``; ``dx, dh0 = cell.backward(dh1)``.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", dtype: Any = np.float32, seed: int | None = None,
                 backend: str = "auto") -> None:
        nonlinearity = _checks.choice("nonlinearity", nonlinearity, ("tanh", "relu"))
        super().__init__(rnn_cell(nonlinearity), input_size, hidden_size, bias, dtype, seed,
                         backend)
        self.nonlinearity = nonlinearity

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (", nonlinearity='relu'" if self.nonlinearity == "relu" else "")


class GRUCell(_HiddenStateCell):
    """torch.nn.GRUCell: gates r, z, n, n = tanh(W_in x + b_in + r * (W_hn h0 + b_hn)); with
    ``reset_after=False`` the original form n = tanh(W_in x + b_in + W_hn (r * h0) + b_hn).

    ``h1 = cell(x, h0=None)``; ``dx, dh0 = cell.backward(dh1)``.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 dtype: Any = np.float32, seed: int | None = None, backend: str = "auto", *,
                 reset_after: bool = True) -> None:
        reset_after = _checks.flag("reset_after", reset_after)
        super().__init__(gru_cell(reset_after), input_size, hidden_size, bias, dtype, seed,
                         backend)
        self.reset_after = reset_after

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.reset_after else ", reset_after=False")


class LSTMCell(_CellBase):
    """torch.nn.LSTMCell (gates i, f, g, o), with the LSTM's variants: ``peephole=True`` (i and f
    see c0, o sees c1; parameters weight_ci, weight_cf, weight_co of shape (hidden_size,)) and
    ``coupled_gates=True`` (i = 1 - f: gate blocks f, g, o; with peepholes only weight_cf and
    weight_co).

    ``h1, c1 = cell(x, (h0, c0)=None)``; ``dx, (dh0, dc0) = cell.backward(dh1, dc1=None)``.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 dtype: Any = np.float32, seed: int | None = None, backend: str = "auto", *,
                 peephole: bool = False, coupled_gates: bool = False) -> None:
        super().__init__(_checks.lstm_variant(peephole, coupled_gates), input_size, hidden_size,
                         bias, dtype, seed, backend)
        self.peephole, self.coupled_gates = bool(peephole), bool(coupled_gates)

    def __call__(self, x: Array, hx: Any = None) -> tuple[Array, Array]:
        h0, c0 = _checks.state_pair("hx", "(h0, c0)", hx)
        return self._step(x, h0, c0)

    forward = __call__

    def backward(self, dh1: Array | None, dc1: Array | None = None
                 ) -> tuple[Array, tuple[Array, Array]]:
        """Undo the most recent call: (dx, (dh0, dc0)); the weight gradients go into grads."""
        dx, dh0, dc0 = self._undo(dh1, dc1)
        return dx, (dh0, dc0)

    def extra_repr(self) -> str:
        return super().extra_repr() + lstm_variant_repr(self.peephole, self.coupled_gates)
