"""``pyrnn.torch.RNN``, ``LSTM`` and ``GRU``: torch.nn's recurrent modules, run by pyrnn's core.

Each is a ``torch.nn.RNNBase`` built by torch's own constructor, so its parameters, their names,
shapes, initialisation, ``_flat_weights``, ``state_dict`` and ``repr`` are torch.nn's. The forward
pass takes what torch.nn's takes (a Tensor, batched or not, batch_first or not, or a
``PackedSequence``; an optional initial state) and returns the same outputs; torch's own checks
raise torch's errors. The recurrence runs as ``torch.ops.pyrnn.rnn_forward`` (``_ops``), or, where
pyrnn cannot run the call, as torch's own implementation with the same parameters (``_VF``), with
one warning per module and reason.

They are deliberately not subclasses of torch.nn.RNN/LSTM/GRU: Dynamo refuses to trace those
classes, and these trace into the pyrnn operators under ``torch.compile(fullgraph=True)``.

pyrnn's cell variants are keyword-only constructor arguments after ``dtype``:
``LSTM(peephole=, coupled_gates=)``, ``GRU(reset_after=)`` and ``residual=`` on all three (their
meaning: pyrnn/_backend.py's kernel contract). Their parameters are the cell table's
(pyrnn/_cells.py), under pyrnn's names (``weight_ci_l0``), in the order of pyrnn's NumPy modules,
with torch's initialisation. A variant that torch.nn lacks runs on pyrnn's kernels only: where
they cannot run the call it raises rather than fall back. pyrnn's operators run a stack on the
C++ core when its features() lists what the stack needs, else on the NumPy reference (one
warning per module).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import _VF, Tensor
from torch.nn.utils.rnn import PackedSequence

import pyrnn

from .. import _backend
from .._cells import CELLS, PLAIN_CELLS, gru_cell, lstm_cell
from . import _ops
from .frozen import FrozenLayer

__all__ = ["RNN", "LSTM", "GRU", "from_module"]

_TORCH_CALLS = {"RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu, "LSTM": _VF.lstm,
                "GRU": _VF.gru}
_DTYPES = (torch.float32, torch.float64)


class _RNNBase(torch.nn.RNNBase):
    """What RNN, LSTM and GRU share. A state is handled as a tuple of tensors: (h,) or (h, c)."""

    _warned: set[str]
    # The variants' flags and their defaults, as class attributes too: convert() makes these
    # modules from torch.nn's objects, which have none of them.
    _VARIANTS: dict[str, bool] = {"residual": False}
    residual = False

    # ---------------------------------------------------------------- variants

    def _kernel_cell(self) -> str:
        """The kernel contract's cell of this module ("lstm_peephole", "gru", ...)."""
        return {"RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}[self.mode]

    def _variant_kwargs(self) -> dict[str, bool]:
        """The variant keyword arguments of this module (proj_size aside: torch.nn's)."""
        return {name: getattr(self, name) for name in self._VARIANTS}

    def _variant_args(self) -> dict[str, bool]:
        """The variant keyword arguments given other than their defaults."""
        return {k: v for k, v in self._variant_kwargs().items() if v != self._VARIANTS[k]}

    def extra_repr(self) -> str:
        return "".join([super().extra_repr(),
                        *(f", {k}={v}" for k, v in self._variant_args().items())])

    def _torch_runs_it(self) -> bool:
        """Whether torch's own implementation computes this module (a fallback exists)."""
        return self._kernel_cell() in PLAIN_CELLS and not self._residual_acts()

    def _residual_acts(self) -> bool:
        """residual=True does something (more than one layer)."""
        return self.residual and self.num_layers > 1

    def _init_variant(self, residual: Any, device: Any, dtype: Any) -> None:
        """Set the flags common to the variants, after torch's constructor, and lay out the
        parameters of the cell (_lay_out_params)."""
        self.residual = _flag("residual", residual)
        if self.residual and self.num_layers == 1:
            warnings.warn("residual acts between stacked layers only, so with num_layers=1 it "
                          "does nothing (got residual=True)", UserWarning, stacklevel=3)
        if not self._torch_runs_it():
            self._check_variant_dtype_device(device, dtype)
        self._lay_out_params(device, dtype)

    def _check_variant_dtype_device(self, device: Any, dtype: Any) -> None:
        """A variant torch.nn lacks runs on pyrnn's kernels only: float32/float64 on the CPU."""
        args = ", ".join(f"{k}={v}" for k, v in self._variant_args().items())
        name = type(self).__name__
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"{name}({args}) runs on pyrnn's kernels only, which take float32 "
                             f"or float64: got dtype={dtype}")
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"{name}({args}) runs on pyrnn's kernels only, which run on the "
                             f"CPU: got device={device}")

    def _lay_out_params(self, device: Any, dtype: Any) -> None:
        """Make the parameters those of the cell table (pyrnn/_cells.py) in its order: torch's
        constructor made torch.nn's; a variant's of other shapes (coupled gates: 3H rows) are
        replaced, its peephole vectors added. Reinitialised as torch does (uniform(-1/sqrt(H),
        1/sqrt(H)), all of them) when anything changed, so a variant with torch.nn's
        parameters draws torch.nn's numbers."""
        spec, projected = CELLS[self._kernel_cell()], self.proj_size > 0
        D = 2 if self.bidirectional else 1  # noqa: N806
        width = self.proj_size or self.hidden_size
        names, per_entry, changed = [], [], False
        for layer in range(self.num_layers):
            for direction in range(D):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                sizes = spec.sizes(self.input_size if layer == 0 else D * width,
                                   self.hidden_size, self.proj_size)
                entry = []
                for param in spec.params(projected):
                    if param.bias and not self.bias:
                        continue
                    shape = tuple(sizes[d] for d in param.dims)
                    name = param.name + suffix
                    old = self._parameters.get(name)
                    if old is None or tuple(old.shape) != shape:
                        self.register_parameter(name, torch.nn.Parameter(
                            torch.empty(shape, device=device, dtype=dtype)))
                        changed = True
                    entry.append(name)
                names += entry
                per_entry.append(entry)
        for name in names:  # the cell table's order (dicts keep the order of insertion)
            self._parameters[name] = self._parameters.pop(name)
        self._flat_weights_names, self._all_weights = names, per_entry
        self._init_flat_weights()
        if changed:
            self.reset_parameters()

    # ---------------------------------------------------------------- state, per cell

    def _split_state(self, hx: Any) -> tuple[Tensor, ...]:
        if isinstance(hx, tuple | list):
            raise TypeError(f"{type(self).__name__}: hx must be a Tensor (only LSTM takes an "
                            f"(h_0, c_0) pair), got a {type(hx).__name__}")
        return (hx,)

    def _join_state(self, states: tuple[Tensor, ...]) -> Any:
        return states[0]

    def _state_sizes(self) -> tuple[int, ...]:
        return (self.hidden_size,)

    # ---------------------------------------------------------------- forward

    def forward(self, input: Any, hx: Any = None) -> tuple[Any, Any]:  # noqa: A002 - torch's name
        """output, h_n (LSTM: output, (h_n, c_n)), as torch.nn's module returns them."""
        self._update_flat_weights()
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        name = type(self).__name__
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D tensor "
                             "instead")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)  # noqa: A001
        states = self._initial_states(input, hx, input.size(batch_dim), batched)
        self.check_forward_args(input, self._join_state(states), None)
        out, states = self._run(input, states, None)
        if not batched:
            out = out.squeeze(batch_dim)
            states = tuple(s.squeeze(1) for s in states)
        return out, self._join_state(states)

    # Under torch.compile a graph break: turning packed rows into (T, B, I) and back reads
    # batch_sizes on the host (shapes that depend on data), which Dynamo cannot trace; torch's own
    # pack_padded_sequence is marked by Dynamo as not to be traced for the same reason.
    @torch.compiler.disable
    def _forward_packed(self, packed: PackedSequence, hx: Any) -> tuple[PackedSequence, Any]:
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        states = self._initial_states(data, hx, int(batch_sizes[0]), True)
        self.check_forward_args(data, self._join_state(states), batch_sizes)
        if sorted_indices is not None:  # the caller's order -> the packed (sorted) order
            states = tuple(s.index_select(1, sorted_indices) for s in states)
        out, states = self._run(data, states, batch_sizes)
        if unsorted_indices is not None:
            states = tuple(s.index_select(1, unsorted_indices) for s in states)
        return (PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices),
                self._join_state(states))

    def _initial_states(self, input: Tensor, hx: Any, batch: int, batched: bool
                        ) -> tuple[Tensor, ...]:
        """hx as a tuple of 3-D states (zeros when None), in the caller's batch order."""
        if hx is None:
            D = 2 if self.bidirectional else 1  # noqa: N806
            return tuple(torch.zeros(self.num_layers * D, batch, size, dtype=input.dtype,
                                     device=input.device) for size in self._state_sizes())
        states = self._split_state(hx)
        self._check_states(states, input.dtype, batched)
        return states if batched else tuple(s.unsqueeze(1) for s in states)

    def _check_states(self, states: tuple[Any, ...], dtype: torch.dtype, batched: bool) -> None:
        """Each state a Tensor of the input's dtype, 3-D for batched input, 2-D for unbatched."""
        name = type(self).__name__
        if any(not isinstance(s, Tensor) for s in states):
            raise TypeError(f"{name}: hx must hold Tensors, got "
                            f"{[type(s).__name__ for s in states]}")
        wanted = 3 if batched else 2
        if any(s.dim() != wanted for s in states):
            dims = ", ".join(f"{s.dim()}-D" for s in states)
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, hx should also be {wanted}-D but got "
                               f"({dims}) tensor(s)")
        for s in states:
            if s.dtype != dtype:
                raise RuntimeError(f"{name}: hx dtype ({s.dtype}) does not match the input "
                                   f"dtype ({dtype})")

    def _run(self, input: Tensor, states: tuple[Tensor, ...], batch_sizes: Tensor | None
             ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The recurrence over checked arguments: (output, final states), by pyrnn's operator or,
        where it cannot run the call, by torch's own."""
        reason = self._fallback_reason(input, states)
        if reason is None:
            self._note_reference_kernels()
            return self._run_pyrnn(input, states, batch_sizes)
        if not self._torch_runs_it():
            args = ", ".join(f"{k}={v}" for k, v in self._variant_args().items())
            raise RuntimeError(f"pyrnn.torch.{type(self).__name__}({args}) runs on pyrnn's "
                               f"kernels only, and they cannot run this call: {reason}")
        self._warn_once(f"running torch's own implementation, because {reason}")
        return self._run_torch(input, states, batch_sizes)

    def _run_torch(self, input: Tensor, states: tuple[Tensor, ...], batch_sizes: Tensor | None
                   ) -> tuple[Tensor, tuple[Tensor, ...]]:
        call = _TORCH_CALLS[self.mode]
        hx = states if self.mode == "LSTM" else states[0]
        flags = (self.bias, self.num_layers, self.dropout, self.training, self.bidirectional)
        if batch_sizes is None:
            result = call(input, hx, self._flat_weights, *flags, self.batch_first)
        else:
            result = call(input, batch_sizes, hx, self._flat_weights, *flags)
        return result[0], tuple(result[1:])

    def _run_pyrnn(self, input: Tensor, states: tuple[Tensor, ...], batch_sizes: Tensor | None
                   ) -> tuple[Tensor, tuple[Tensor, ...]]:
        lengths = None
        if batch_sizes is not None:  # packed rows -> (T, B, I) in the packed order, with lengths
            x, lengths = torch._pad_packed_sequence(input, batch_sizes, False, 0.0,
                                                    batch_sizes.numel())
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        cell = self._kernel_cell()
        has_c = CELLS[cell].has_c
        out, h_n, c_n, _ = _ops.rnn_forward(
            cell, x, states[0], states[1] if has_c else None, self._flat_weights, self.bias,
            self.bidirectional, lengths, self._dropout_masks(x), False, self.proj_size > 0,
            self._residual_acts())
        states = (h_n, c_n) if has_c else (h_n,)
        if batch_sizes is not None:
            return torch._pack_padded_sequence(out, lengths, False)[0], states
        return (out.transpose(0, 1) if self.batch_first else out), states

    def _dropout_masks(self, x: Tensor) -> list[Tensor]:
        """The L-1 inter-layer masks (T, B, D*H) for a training pass, drawn from torch's
        generator: each unit kept with probability 1-p and scaled by 1/(1-p)."""
        if not (self.training and self.dropout > 0 and self.num_layers > 1):
            return []
        keep = 1.0 - self.dropout
        scale = 1.0 / keep if keep > 0 else 0.0
        D = 2 if self.bidirectional else 1  # noqa: N806
        shape = (x.shape[0], x.shape[1], D * (self.proj_size or self.hidden_size))
        return [torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep).mul_(scale)
                for _ in range(self.num_layers - 1)]

    # ---------------------------------------------------------------- fallback

    def _fallback_reason(self, input: Tensor, states: tuple[Tensor, ...]) -> str | None:
        """Why pyrnn's operator cannot run this call (None: it can). The weights are all of one
        device and dtype, as torch requires; torch's checks have compared the input's dtype."""
        weight = self._flat_weights[0]
        for t in (input, *states, weight):
            if _device_type(t) != "cpu":
                return f"its tensors are on {t.device}, and pyrnn's core runs on the CPU"
        if input.dtype not in _DTYPES:
            return f"the input is {input.dtype}, and pyrnn's core runs float32 and float64"
        if not _backend.cpp_available() and self._torch_runs_it():
            return "pyrnn's C++ core is unavailable"
        if not torch.compiler.is_compiling() and _in_transform():
            return ("forward-mode AD and torch.func transforms (vmap, jvp, grad) are not "
                    "supported by pyrnn's operators")
        return None

    def _note_reference_kernels(self) -> None:
        """Warn once per module when its stack runs on the NumPy reference kernels (correct,
        slower), because the loaded C++ core's features() lacks what it needs; the operators
        pick the kernels by the same test (_ops.kernel_backend)."""
        if (not self.proj_size and self._torch_runs_it()) or torch.compiler.is_compiling():
            return  # torch.nn's cells: run by every build of the core (or by torch without it)
        missing = _backend.missing_in_cpp(self._kernel_cell(), self.proj_size > 0,
                                          self._residual_acts())
        if missing:
            self._warn_once(f"running pyrnn's NumPy reference kernels (correct, slower), because "
                            f"this build of pyrnn's C++ core has none for "
                            f"{', '.join(map(repr, missing))}")

    def _warn_once(self, message: str) -> None:
        if torch.compiler.is_compiling():
            return
        warned = self.__dict__.setdefault("_warned", set())
        if message not in warned:
            warned.add(message)
            warnings.warn(f"pyrnn.torch.{type(self).__name__}: {message}", RuntimeWarning,
                          stacklevel=4)

    # ---------------------------------------------------------------- NumPy modules

    def to_module(self) -> pyrnn.RNN | pyrnn.LSTM | pyrnn.GRU:
        """This layer as pyrnn's NumPy module (``pyrnn.LSTM`` etc.), with copies of its weights,
        in its dtype (float32 or float64) and mode (training or eval)."""
        dtype = self._flat_weights[0].dtype
        if dtype not in _DTYPES:
            raise TypeError(f"to_module: pyrnn's modules are float32 or float64, this layer's "
                            f"parameters are {dtype}")
        cls = {"LSTM": pyrnn.LSTM, "GRU": pyrnn.GRU}.get(self.mode, pyrnn.RNN)
        extra = self._variant_kwargs()
        extra |= {"nonlinearity": self.nonlinearity} if cls is pyrnn.RNN else {}
        extra |= {"proj_size": self.proj_size} if cls is pyrnn.LSTM else {}
        module = cls(self.input_size, self.hidden_size, num_layers=self.num_layers,
                     bias=self.bias, batch_first=self.batch_first, dropout=self.dropout,
                     bidirectional=self.bidirectional, dtype=_NUMPY_DTYPES[dtype], **extra)
        module.load_state_dict({name: p.detach().cpu().numpy()
                                for name, p in self.named_parameters()})
        return module.train(self.training)

    def frozen(self) -> FrozenLayer:
        """An inference-only snapshot of this layer, with its weights kept packed: see
        FrozenLayer (several times faster than the layer at batch 1)."""
        return FrozenLayer(self)


class RNN(_RNNBase):
    """torch.nn.RNN's module (Elman RNN, tanh or relu), run by pyrnn's core; ``residual=True``
    adds each layer's input to its output above the first."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device: Any = None,
                 dtype: Any = None, *, residual: bool = False) -> None:
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if nonlinearity not in modes:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or "
                             "'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(modes[nonlinearity], input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, 0, device, dtype)
        self._init_variant(residual, device, dtype)


class GRU(_RNNBase):
    """torch.nn.GRU's module (gates r, z, n), run by pyrnn's core. ``reset_after=False``: the
    original GRU, n = tanh(W_in x + b_in + W_hn (r * h) + b_hn), with torch.nn's parameters;
    ``residual=True`` as RNN's."""

    _VARIANTS = {"reset_after": True, "residual": False}
    reset_after = True

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device: Any = None, dtype: Any = None, *, reset_after: bool = True,
                 residual: bool = False) -> None:
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)
        self.reset_after = _flag("reset_after", reset_after)
        self._init_variant(residual, device, dtype)

    def _kernel_cell(self) -> str:
        return gru_cell(self.reset_after)


class LSTM(_RNNBase):
    """torch.nn.LSTM's module (gates i, f, g, o; ``proj_size`` as torch.nn's), run by pyrnn's
    core, and pyrnn's variants: ``peephole=True`` (i and f see c_{t-1}, o sees c_t; parameters
    ``weight_ci_l{k}``, ``weight_cf_l{k}``, ``weight_co_l{k}`` (H,)), ``coupled_gates=True``
    (i = 1 - f: gate blocks f, g, o, weight_ih (3H, I); with peepholes no weight_ci), and
    ``residual=True`` as RNN's; any combination, with proj_size too."""

    _VARIANTS = {"peephole": False, "coupled_gates": False, "residual": False}
    peephole = coupled_gates = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device: Any = None, dtype: Any = None, *,
                 peephole: bool = False, coupled_gates: bool = False,
                 residual: bool = False) -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)
        self.peephole = _flag("peephole", peephole)
        self.coupled_gates = _flag("coupled_gates", coupled_gates)
        self._init_variant(residual, device, dtype)

    def _kernel_cell(self) -> str:
        return lstm_cell(self.peephole, self.coupled_gates)

    # torch.nn.LSTM's own checks and permutation of the (h, c) pair, so its errors are torch's
    get_expected_cell_size = torch.nn.LSTM.get_expected_cell_size
    check_forward_args = torch.nn.LSTM.check_forward_args
    permute_hidden = torch.nn.LSTM.permute_hidden

    def _split_state(self, hx: Any) -> tuple[Tensor, ...]:
        if not isinstance(hx, tuple | list) or len(hx) != 2:
            got = (f"a {type(hx).__name__} of {len(hx)}" if isinstance(hx, tuple | list)
                   else type(hx).__name__)
            raise TypeError(f"LSTM: hx must be a tuple (h_0, c_0), got {got}")
        return tuple(hx)

    def _join_state(self, states: tuple[Tensor, ...]) -> Any:
        return states[0], states[1]

    def _state_sizes(self) -> tuple[int, ...]:
        return (self.proj_size or self.hidden_size, self.hidden_size)


def _flag(name: str, value: Any) -> bool:
    """A variant's flag: a bool, as torch.nn's constructor wants its bias and batch_first."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
    return value


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def from_module(module: pyrnn.RNN | pyrnn.LSTM | pyrnn.GRU) -> _RNNBase:
    """pyrnn's NumPy module (``pyrnn.LSTM`` etc.) as a ``pyrnn.torch`` module with copies of its
    weights, in its dtype and mode. (``convert`` turns torch.nn's modules into these.)"""
    kinds = {pyrnn.LSTM: LSTM, pyrnn.GRU: GRU, pyrnn.RNN: RNN}
    cls = kinds.get(type(module))
    if cls is None:
        hint = (" (torch.nn modules are converted by pyrnn.torch.convert)"
                if isinstance(module, torch.nn.Module) else "")
        raise TypeError(f"from_module: expected a pyrnn.RNN, pyrnn.LSTM or pyrnn.GRU, got "
                        f"{type(module).__name__}{hint}")
    extra = {name: getattr(module, name) for name in cls._VARIANTS}
    extra |= {"nonlinearity": module.nonlinearity} if cls is RNN else {}
    extra |= {"proj_size": module.proj_size} if cls is LSTM else {}
    layer = cls(module.input_size, module.hidden_size, num_layers=module.num_layers,
                bias=module.bias, batch_first=module.batch_first, dropout=module.dropout,
                bidirectional=module.bidirectional, dtype=_TORCH_DTYPES[module.dtype], **extra)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.from_numpy(module.params[name]))
    return layer.train(module.training)


def _device_type(t: Tensor) -> str:
    """The device type a tensor lives on (a function of its own, so tests can pretend CUDA)."""
    return t.device.type


def _in_transform() -> bool:
    """True inside forward-mode AD or a torch.func transform, which pyrnn's operators lack."""
    return (torch.autograd.forward_ad._current_level >= 0
            or torch._C._are_functorch_transforms_active())
