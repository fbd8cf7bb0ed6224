"""RNN, LSTM and GRU modules with PyTorch's constructor, parameter names, shapes and init.

A module holds its weights in ``params`` (``weight_ih_l0``, ``weight_hh_l0_reverse``, ...) and
runs them through ``pyrnn.functional``. In training mode with gradients enabled, a forward
call keeps a tape for the calling thread; that thread's ``backward`` uses it once, returns the
gradients of the inputs and adds the weight gradients into ``grads`` in place (they accumulate
until ``zero_grad``; see docs/threads.md for several threads).

The variants are keyword arguments: ``LSTM(proj_size=, peephole=, coupled_gates=)``,
``GRU(reset_after=)`` and ``residual=`` on all three; each picks a cell of the table in
pyrnn/_cells.py (``_checks.lstm_variant``, ``gru_variant``), whose parameters the module holds
under PyTorch-style names (``weight_ci_l0``, ``weight_hr_l0_reverse``). ``ParamLayout`` maps
those names onto the kernels' weights tuples (the peephole vectors are rows of one w_peep).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from . import _backend, _checks
from ._cells import CELLS, Cell, rnn_cell
from .functional import Tape, _run_backward, _run_stack, _upstream, _user_layout, rnn_forward
from .module import Module, is_grad_enabled

__all__ = ["RNN", "LSTM", "GRU", "FrozenRNN"]

Array = np.ndarray
# A slot of a weights tuple as a module holds it: None (absent, or a bias the module does not
# have), one parameter's name, or the names of the rows of w_peep.
Slot = str | tuple[str, ...] | None


class ParamLayout:
    """Which named parameters make up each weights tuple of the kernel contract.

    entries: per layer and direction (l0-fwd, l0-bwd, l1-fwd, ...), one Slot per part of the
    cell's form (pyrnn/_cells.py). `gather` lays arrays keyed by name (params or grads) out as
    the kernels take weights (stacking the peephole rows into one (K, H) array, a copy);
    `add_grads` adds the kernels' weight gradients into arrays keyed by name.
    """

    def __init__(self, spec: Cell, projected: bool, bias: bool, suffixes: list[str]) -> None:
        slots_per_part = len(spec.parts(projected))
        self.entries: list[tuple[Slot, ...]] = []
        for suffix in suffixes:
            slots: list[Any] = [None] * slots_per_part
            for param in spec.params(projected):
                if param.bias and not bias:
                    continue
                name = param.name + suffix
                if param.row is None:
                    slots[param.part] = name
                else:
                    slots[param.part] = (*(slots[param.part] or ()), name)
            self.entries.append(tuple(slots))
        self.stacked = any(isinstance(slot, tuple) for slot in self.entries[0])

    def names(self) -> list[str]:
        """Every parameter's name, in the order of the entries and their parts."""
        return [n for entry in self.entries for slot in entry if slot is not None
                for n in ((slot,) if isinstance(slot, str) else slot)]

    def gather(self, arrays: dict[str, Array]) -> list[tuple[Array | None, ...]]:
        return [tuple(_gathered(arrays, slot) for slot in entry) for entry in self.entries]

    def add_grads(self, grads: dict[str, Array], d_weights: list[tuple[Array | None, ...]]
                  ) -> None:
        """grads[name] += its gradient, in place (optimizers hold these arrays)."""
        for entry, d_entry in zip(self.entries, d_weights, strict=True):
            for slot, grad in zip(entry, d_entry, strict=True):
                if isinstance(slot, str):
                    grads[slot] += grad
                elif slot is not None:
                    for row, name in enumerate(slot):
                        grads[name] += grad[row]


def _gathered(arrays: dict[str, Array], slot: Slot) -> Array | None:
    if slot is None or isinstance(slot, str):
        return None if slot is None else arrays[slot]
    return np.stack([arrays[name] for name in slot])

# Why a module has no tape, for backward's error message.
_NO_FORWARD = (
    "no forward pass has run yet in this thread (a tape belongs to the thread whose forward pass "
    "recorded it: call backward in that thread)"
)
_NO_TAPE = (
    "the last forward pass kept no tape because it ran in eval mode or under pyrnn.no_grad(); "
    "call .train() and run the forward pass with gradients enabled"
)
_USED = (
    "backward was already called for the last forward pass (its tape is freed after one "
    "backward, as in PyTorch); run the forward pass again"
)


def lstm_variant_repr(peephole: bool, coupled_gates: bool) -> str:
    """The LSTM variant flags that differ from their defaults, as a repr lists them."""
    return ((", peephole=True" if peephole else "")
            + (", coupled_gates=True" if coupled_gates else ""))


class _RNNBase(Module):
    """What RNN, LSTM and GRU share; `cell` names the kernel ("rnn_tanh", "lstm", ...)."""

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        dtype: Any = np.float32,
        seed: int | None = None,
        backend: str = "auto",
        proj_size: int = 0,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.cell = cell  # the kernels' name for it
        self.input_size = _checks.positive_int("input_size", input_size)
        self.hidden_size = _checks.positive_int("hidden_size", hidden_size)
        self.num_layers = _checks.positive_int("num_layers", num_layers)
        self.bias = _checks.flag("bias", bias)
        self.batch_first = _checks.flag("batch_first", batch_first)
        self.dropout = _checks.dropout(dropout)
        self.bidirectional = _checks.flag("bidirectional", bidirectional)
        self.dtype = _checks.float_dtype(dtype)
        self.seed = _checks.seed(seed)
        self.proj_size = _checks.proj_size(proj_size, self.hidden_size)
        self.residual = _checks.flag("residual", residual)
        self.backend = _backend.resolve(_checks.choice("backend", backend, _backend.BACKENDS),
                                        cell, self.proj_size > 0,
                                        self.residual and self.num_layers > 1)
        for name, value in (("dropout", self.dropout), ("residual", self.residual)):
            if value and self.num_layers == 1:
                warnings.warn(
                    f"{name} acts between stacked layers only, so with num_layers=1 it does "
                    f"nothing (got {name}={value})",
                    UserWarning,
                    stacklevel=3,
                )
        self._cell = CELLS[cell]
        self._fits_in_memory()
        self._rng = np.random.default_rng(self.seed)  # the init, then the dropout masks
        self._layout = self._init_params()
        self._w_hh_shape = self.params[self._layout.entries[0][1]].shape
        # self.grads as last checked (see _checked_targets); read and set under _grad_lock
        self._known_targets: tuple[list[tuple[str, Array]], Any, Any] | None = None

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def _width(self) -> int:
        """P: the width of h and of each direction's output (proj_size, else hidden_size)."""
        return self.proj_size or self.hidden_size

    def _fits_in_memory(self) -> None:
        """Refuse sizes whose parameters and gradients would not fit, before allocating any:
        their numbers, the arrays holding them (a layer of small ones costs as much again) and
        the float64 draw that fills the largest."""
        H, D, L = self.hidden_size, self.num_directions, self.num_layers  # noqa: N806
        params = self._cell.params(self.proj_size > 0)
        per_entry = sum(not param.bias or self.bias for param in params)
        shapes = self._cell.shapes(max(self.input_size, D * self._width), H, self.proj_size)
        largest = max(math.prod(s) for s in shapes if s is not None)
        _checks.fits_in_memory(
            f"{type(self).__name__}(input_size={self.input_size}, hidden_size={H}, "
            f"num_layers={L}) with its gradients", 2 * self._parameter_count(),
            self.dtype.itemsize, arrays=2 * L * D * per_entry, scratch=8 * largest)

    def _parameter_count(self) -> int:
        """How many numbers _init_params will allocate (computed without allocating them)."""
        H, D = self.hidden_size, self.num_directions  # noqa: N806
        first, later = (self._cell.parameter_count(fan_in, H, self.bias, self.proj_size)
                        for fan_in in (self.input_size, D * self._width))
        return D * (first + (self.num_layers - 1) * later)

    def _init_params(self) -> ParamLayout:
        """Create the parameters in PyTorch's order, uniform(-1/sqrt(H), 1/sqrt(H)) like
        PyTorch's default (the peepholes too); return how they make up the weights tuples."""
        H, D = self.hidden_size, self.num_directions  # noqa: N806
        projected = self.proj_size > 0
        bound = 1 / math.sqrt(H)
        suffixes = [f"_l{layer}" + ("_reverse" if d == 1 else "")
                    for layer in range(self.num_layers) for d in range(D)]
        for k, suffix in enumerate(suffixes):
            fan_in = self.input_size if k < D else D * self._width
            sizes = self._cell.sizes(fan_in, H, self.proj_size)
            for param in self._cell.params(projected):
                if param.bias and not self.bias:
                    continue
                shape = tuple(sizes[d] for d in param.dims)
                value = self._rng.uniform(-bound, bound, shape).astype(self.dtype)
                self.add_param(param.name + suffix, value)
        return ParamLayout(self._cell, projected, self.bias, suffixes)

    def _weights(self) -> list[tuple[Array | None, ...]]:
        # The kernel tapes keep their own (packed) copy of the weights, so an optimizer may update
        # these arrays in place between forward and backward without corrupting the gradients.
        weights = self._layout.gather(self.params)
        # The kernels take P from the first w_hh and check every other array against it: arrays
        # of another size put into params would otherwise run as a network of that size.
        w_hh, name = weights[0][1], self._layout.entries[0][1]
        if getattr(w_hh, "shape", None) != self._w_hh_shape:
            raise ValueError(
                f"params[{name!r}]: expected shape {self._w_hh_shape} (hidden_size "
                f"{self.hidden_size}), got {getattr(w_hh, 'shape', type(w_hh).__name__)}; "
                "load other weights with load_state_dict, which checks them"
            )
        return weights

    # --------------------------------------------------------------------------- forward

    def _split_hx(self, hx: Any) -> tuple[Array | None, Array | None]:
        return hx, None

    def _pack_state(self, h: Array, c: Array | None) -> Any:
        return h

    def __call__(self, x: Array, hx: Any = None, lengths: Any = None) -> tuple[Array, Any]:
        """out (T, B, D*H) (batch_first: (B, T, D*H)) and the final state, as PyTorch."""
        h0, c0 = self._split_hx(hx)
        _checks.module_input(x, self.dtype, self.input_size)
        keep_tape = self.training and is_grad_enabled()
        out, h_n, c_n, tape = rnn_forward(
            self.cell, x, self._weights(), h0, c0,
            lengths=lengths, batch_first=self.batch_first, bidirectional=self.bidirectional,
            dropout=self.dropout, training=self.training, rng=self._rng, backend=self.backend,
            keep_tape=keep_tape, residual=self.residual,
        )
        this_thread = self._this_thread
        this_thread.tape = tape
        this_thread.no_tape_reason = _NO_TAPE
        return out, self._pack_state(h_n, c_n)

    forward = __call__

    def frozen(self) -> FrozenRNN:
        """An inference-only snapshot of this module, faster on small models: see FrozenRNN."""
        return FrozenRNN(self)

    # --------------------------------------------------------------------------- backward

    def _split_d_hx(self, d_hx: Any) -> tuple[Array | None, Array | None]:
        return d_hx, None

    def backward(self, d_out: Array | None, d_hx: Any = None) -> tuple[Array, Any]:
        """Back-propagate the last forward pass: returns dx and the initial state's gradient,
        and adds every weight gradient into self.grads. d_out or d_hx may be None (zero).
        The last forward pass is this thread's (see docs/threads.md)."""
        this_thread = self._this_thread
        tape = this_thread.tape
        if tape is None:
            reason = this_thread.no_tape_reason or _NO_FORWARD
            raise RuntimeError(f"{type(self).__name__}.backward: {reason}")
        self._check_grads()
        d_h_n, d_c_n = self._split_d_hx(d_hx)
        _checks.rnn_backward_fits(tape.dims, d_out, tape.batch_first, tape.backend)
        reads = (("d_out", d_out), ("d_h_n", d_h_n), ("d_c_n", d_c_n))
        d_out, d_h_n, d_c_n = _upstream(tape, d_out, d_h_n, d_c_n)
        # The kernels add into self.grads while they hold the lock; a backward pass that finds
        # it taken (another thread's) computes fresh gradients and adds them after waiting.
        lock = self._grad_lock
        owned = lock.acquire(False)  # without waiting
        try:
            targets = self._grad_targets(tape, reads) if owned else None
            dx, dh0, dc0, d_weights = _run_backward(tape, d_out, d_h_n, d_c_n, targets)
        finally:
            if owned:
                lock.release()
        if targets is None:
            with lock:
                self._layout.add_grads(self.grads, d_weights)
        this_thread.tape = None
        this_thread.no_tape_reason = _USED
        return dx, self._pack_state(dh0, dc0)

    def _grad_targets(self, tape: Tape,
                      reads: tuple[tuple[str, Any], ...]) -> list[tuple[Array, ...]] | None:
        """self.grads laid out for the kernels to add into in place (saving a pass over every
        gradient and the arrays holding it); None when they cannot take them (replaced by
        strided views, say), and backward adds them itself. The arrays are checked once while
        they stay the same (a step of a small model is a few tens of microseconds); the
        upstream gradients (reads, as given) every call, as they may not lie in their memory.
        None for a cell with peepholes, whose w_peep gradient is no array of self.grads."""
        if self._layout.stacked:
            return None
        grads, known = self.grads, self._known_targets
        if known is None or not all(grads[n] is a for n, a in known[0]):
            known = self._known_targets = self._checked_targets(tape)
        _, written, targets = known
        if targets is not None:
            _checks.reads_apart(reads, written)
        return targets

    def _checked_targets(self, tape: Tape) -> tuple[list[tuple[str, Array]], Any, Any]:
        """(name, array) of self.grads, those arrays checked disjoint, and their layout for the
        kernels; None for the last two when the kernels cannot add into them."""
        keyed = [(n, self.grads[n]) for n in self._layout.names()]
        try:
            targets = _checks.rnn_targets(self._layout.gather(self.grads), tape.dims,
                                          tape.bias_given, (None, None, None))
            return keyed, _checks.written_apart([(f"grads[{n!r}]", a) for n, a in keyed]), targets
        except (TypeError, ValueError):
            return keyed, None, None

    # --------------------------------------------------------------------------- repr

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.dtype != np.float32:
            s += f", dtype={self.dtype.name}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.residual:
            s += ", residual=True"
        return s

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class RNN(_RNNBase):
    """Elman RNN, h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act = tanh or relu.

    ``out, h_n = rnn(x, h0=None, lengths=None)``; ``dx, dh0 = rnn.backward(d_out, d_h_n)``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        dtype: Any = np.float32,
        seed: int | None = None,
        backend: str = "auto",
        *,
        residual: bool = False,
    ) -> None:
        nonlinearity = _checks.choice("nonlinearity", nonlinearity, ("tanh", "relu"))
        super().__init__(
            rnn_cell(nonlinearity), input_size, hidden_size, num_layers, bias, batch_first,
            dropout, bidirectional, dtype, seed, backend, residual=residual,
        )
        self.nonlinearity = nonlinearity

    def _split_hx(self, hx: Any) -> tuple[Array | None, Array | None]:
        return _single_hx(hx)

    def _split_d_hx(self, d_hx: Any) -> tuple[Array | None, Array | None]:
        return _checks.single_state("d_hx", d_hx), None

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (", nonlinearity='relu'" if self.nonlinearity == "relu" else "")


class GRU(_RNNBase):
    """GRU, gates r, z, n: in PyTorch's (cuDNN) form, n = tanh(W_in x + b_in + r*(W_hn h +
    b_hn)), or with ``reset_after=False`` in the original form (ONNX's linear_before_reset=0),
    n = tanh(W_in x + b_in + W_hn (r*h) + b_hn), with the same parameters.

    ``out, h_n = gru(x, h0=None, lengths=None)``; ``dx, dh0 = gru.backward(d_out, d_h_n)``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        dtype: Any = np.float32,
        seed: int | None = None,
        backend: str = "auto",
        *,
        reset_after: bool = True,
        residual: bool = False,
    ) -> None:
        super().__init__(
            _checks.gru_variant(reset_after), input_size, hidden_size, num_layers, bias,
            batch_first, dropout, bidirectional, dtype, seed, backend, residual=residual,
        )
        self.reset_after = reset_after

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.reset_after else ", reset_after=False")

    def _split_hx(self, hx: Any) -> tuple[Array | None, Array | None]:
        return _single_hx(hx)

    def _split_d_hx(self, d_hx: Any) -> tuple[Array | None, Array | None]:
        return _checks.single_state("d_hx", d_hx), None


class LSTM(_RNNBase):
    """LSTM, gates i, f, g, o, and its variants (keyword arguments, combinable):

    - ``proj_size=P`` (0 < P < hidden_size): PyTorch's LSTMP, h = W_hr (o * tanh(c)) of width P
      (h0, h_n and out too; c keeps hidden_size), parameters ``weight_hr_l{k}`` (P, H);
    - ``peephole=True``: i and f see c_{t-1}, o sees c_t (ONNX's P), parameters
      ``weight_ci_l{k}``, ``weight_cf_l{k}``, ``weight_co_l{k}`` of shape (H,);
    - ``coupled_gates=True``: i = 1 - f, so gate blocks f, g, o (weight_ih (3H, I)); with
      peepholes only ``weight_cf`` and ``weight_co``.

    ``out, (h_n, c_n) = lstm(x, (h0, c0)=None, lengths=None)``;
    ``dx, (dh0, dc0) = lstm.backward(d_out, (d_h_n, d_c_n))``. Either part of a pair may be
    None (zeros).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        dtype: Any = np.float32,
        seed: int | None = None,
        backend: str = "auto",
        *,
        proj_size: int = 0,
        peephole: bool = False,
        coupled_gates: bool = False,
        residual: bool = False,
    ) -> None:
        super().__init__(
            _checks.lstm_variant(peephole, coupled_gates), input_size, hidden_size, num_layers,
            bias, batch_first, dropout, bidirectional, dtype, seed, backend, proj_size, residual,
        )
        self.peephole, self.coupled_gates = bool(peephole), bool(coupled_gates)

    def extra_repr(self) -> str:
        return super().extra_repr() + lstm_variant_repr(self.peephole, self.coupled_gates)

    def _split_hx(self, hx: Any) -> tuple[Array | None, Array | None]:
        return _state_pair_hx(hx)

    def _split_d_hx(self, d_hx: Any) -> tuple[Array | None, Array | None]:
        return _checks.state_pair("d_hx", "(d_h_n, d_c_n)", d_hx)

    def _pack_state(self, h: Array, c: Array | None) -> Any:
        return h, c


class FrozenRNN:
    """An inference-only snapshot of an RNN, LSTM or GRU: ``fast = lstm.frozen()``.

    ``fast(x, hx=None, lengths=None)`` returns what the module returns in eval mode, bit for
    bit, from copies of the weights taken by ``frozen()``: later changes to the module do not
    reach it (call ``frozen()`` again). On the C++ backend it keeps the weights packed as the
    kernels multiply by them, where the module packs them on every call, and it checks them once:
    at batch 1 a call is 20-27 % faster than the module's with H = 100 and 6-12 % with H = 128
    (2 threads), a few % on large models. One set of packs is kept per batch size and thread
    count, the 4 most recently used, each about the size of the weights. Calls from several
    Python threads at once are safe. No tape, backward or dropout.
    """

    def __init__(self, module: _RNNBase) -> None:
        self.cell = module.cell
        self.input_size, self.hidden_size = module.input_size, module.hidden_size
        self.num_layers, self.bidirectional = module.num_layers, module.bidirectional
        self.batch_first, self.dtype = module.batch_first, module.dtype
        self.proj_size, self.residual = module.proj_size, module.residual
        self.backend = module.backend
        self._name = type(module).__name__
        self._cell = module._cell
        self._has_c = module._cell.has_c
        self._split_hx = _state_pair_hx if self._has_c else _single_hx
        # Checked once here (the module's arrays may have been replaced by anything), then
        # private and read-only: the packs stay true to them.
        weights = _checks.rnn_weights(module._cell, module._weights(), module.num_directions,
                                      self.input_size, self.dtype).weights
        self._weights = [tuple(None if a is None else _frozen_copy(a) for a in entry)
                         for entry in weights]
        self._packs = _backend.new_pack_cache(self.backend)

    def __call__(self, x: Array, hx: Any = None, lengths: Any = None) -> tuple[Array, Any]:
        """out (T, B, D*H) (batch_first: (B, T, D*H)) and the final state, as the module."""
        h0, c0 = self._split_hx(hx)
        _checks.module_input(x, self.dtype, self.input_size)
        x = _checks.rnn_input(x, self.batch_first)
        _checks.rnn_call_fits(self._cell, x, self.batch_first,
                              max(self.hidden_size, self.proj_size), self.num_layers,
                              2 if self.bidirectional else 1, self.backend, "infer")
        x = _checks.time_major(x, self.batch_first)
        out, h_n, c_n, _ = _run_stack(
            self.backend, self.cell, x, self._weights, h0, c0, lengths, self.bidirectional,
            None, False, self._packs, self.residual and self.num_layers > 1,
        )
        out = _user_layout(out, self.batch_first)
        return (out, (h_n, c_n)) if self._has_c else (out, h_n)

    forward = __call__

    def __repr__(self) -> str:
        layers = f", num_layers={self.num_layers}" if self.num_layers != 1 else ""
        bi = ", bidirectional=True" if self.bidirectional else ""
        proj = f", proj_size={self.proj_size}" if self.proj_size else ""
        residual = ", residual=True" if self.residual else ""
        return (f"FrozenRNN({self._name}({self.input_size}, {self.hidden_size}{layers}{bi}"
                f"{proj}{residual}), "
                f"cell={self.cell!r}, dtype={self.dtype.name}, backend={self.backend!r})")


def _frozen_copy(a: Array) -> Array:
    copy = np.array(a, order="C", copy=True)
    copy.flags.writeable = False
    return copy


# How RNN/GRU and LSTM read hx, shared by the modules and FrozenRNN.
def _single_hx(hx: Any) -> tuple[Array | None, Array | None]:
    return _checks.single_state("hx", hx), None


def _state_pair_hx(hx: Any) -> tuple[Array | None, Array | None]:
    return _checks.state_pair("hx", "(h0, c0)", hx)
