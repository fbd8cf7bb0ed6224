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

pyrnn's cell variants (peephole, coupled_gates, reset_after, residual, and proj_size in the core)
are to join as keyword-only constructor arguments after ``dtype``, their extra parameters
registered under pyrnn's names, and as schema arguments of the operators with defaults (so that
existing calls and traced graphs keep their meaning); _variant_reason then stops naming them.
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
from . import _ops

__all__ = ["RNN", "LSTM", "GRU", "from_module"]

_CELLS = {"RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "LSTM": "lstm", "GRU": "gru"}
_TORCH_CALLS = {"RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu, "LSTM": _VF.lstm,
                "GRU": _VF.gru}
_DTYPES = (torch.float32, torch.float64)


class _RNNBase(torch.nn.RNNBase):
    """What RNN, LSTM and GRU share. A state is handled as a tuple of tensors: (h,) or (h, c)."""

    _warned: set[str]

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
        if reason is not None:
            self._warn_once(reason)
            return self._run_torch(input, states, batch_sizes)
        return self._run_pyrnn(input, states, batch_sizes)

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
        cell = _CELLS[self.mode]
        out, h_n, c_n, _ = _ops.rnn_forward(
            cell, x, states[0], states[1] if cell == "lstm" else None, self._flat_weights,
            self.bias, self.bidirectional, lengths, self._dropout_masks(x), False)
        states = (h_n, c_n) if cell == "lstm" else (h_n,)
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
        shape = (x.shape[0], x.shape[1], D * self.hidden_size)
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
        variant = self._variant_reason()
        if variant is not None:
            return variant
        if not _backend.cpp_available():
            return "pyrnn's C++ core is unavailable"
        if not torch.compiler.is_compiling() and _in_transform():
            return ("forward-mode AD and torch.func transforms (vmap, jvp, grad) are not "
                    "supported by pyrnn's operators")
        return None

    def _variant_reason(self) -> str | None:
        """Why pyrnn's core cannot run this module's cell variant (None: it can). The one place
        the variants plug in: once the core runs proj_size (and peephole, coupled_gates,
        reset_after, residual as constructor arguments), its test leaves here and _run_pyrnn
        passes it to the operators as a schema argument with a default."""
        if self.proj_size > 0:
            return "proj_size > 0 (projected LSTM) is not in pyrnn's core yet"
        return None

    def _warn_once(self, reason: str) -> None:
        if torch.compiler.is_compiling():
            return
        warned = self.__dict__.setdefault("_warned", set())
        if reason not in warned:
            warned.add(reason)
            warnings.warn(f"pyrnn.torch.{type(self).__name__}: running torch's own "
                          f"implementation, because {reason}", RuntimeWarning, stacklevel=4)

    # ---------------------------------------------------------------- NumPy modules

    def to_module(self) -> pyrnn.RNN | pyrnn.LSTM | pyrnn.GRU:
        """This layer as pyrnn's NumPy module (``pyrnn.LSTM`` etc.), with copies of its weights,
        in its dtype (float32 or float64) and mode (training or eval)."""
        if self.proj_size > 0:
            raise ValueError("to_module: pyrnn's NumPy LSTM has no projections (proj_size > 0)")
        dtype = self._flat_weights[0].dtype
        if dtype not in _DTYPES:
            raise TypeError(f"to_module: pyrnn's modules are float32 or float64, this layer's "
                            f"parameters are {dtype}")
        cls = {"LSTM": pyrnn.LSTM, "GRU": pyrnn.GRU}.get(self.mode, pyrnn.RNN)
        extra = {"nonlinearity": self.nonlinearity} if cls is pyrnn.RNN else {}
        module = cls(self.input_size, self.hidden_size, num_layers=self.num_layers,
                     bias=self.bias, batch_first=self.batch_first, dropout=self.dropout,
                     bidirectional=self.bidirectional, dtype=_NUMPY_DTYPES[dtype], **extra)
        module.load_state_dict({name: p.detach().cpu().numpy()
                                for name, p in self.named_parameters()})
        return module.train(self.training)


class RNN(_RNNBase):
    """torch.nn.RNN's module (Elman RNN, tanh or relu), run by pyrnn's core."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device: Any = None,
                 dtype: Any = None) -> None:
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if nonlinearity not in modes:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or "
                             "'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(modes[nonlinearity], input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, 0, device, dtype)


class GRU(_RNNBase):
    """torch.nn.GRU's module (gates r, z, n), run by pyrnn's core."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)


class LSTM(_RNNBase):
    """torch.nn.LSTM's module (gates i, f, g, o), run by pyrnn's core; ``proj_size > 0`` runs
    torch's own implementation for now."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device: Any = None, dtype: Any = None) -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)

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
    extra = {"nonlinearity": module.nonlinearity} if cls is RNN else {}
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
