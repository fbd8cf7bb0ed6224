"""``layer.frozen()``: an inference-only snapshot of a ``pyrnn.torch`` layer, on tensors.

It is pyrnn's NumPy ``FrozenRNN`` (pyrnn/modules.py) of the layer's weights, behind torch's
calling convention: the weights are copied once, checked once and kept packed as the kernels
multiply by them, where the layer's operator packs them on every call. At batch 1 most of a
layer's call is that packing and the operator's way in and out. No autograd, dropout or
``PackedSequence``, and ``torch.compile`` sees a call into NumPy (a graph break).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from . import _ops

if TYPE_CHECKING:
    from .modules import _RNNBase


class FrozenLayer:
    """``fast = layer.frozen()``; ``out, h_n = fast(input, hx)`` (LSTM: ``out, (h_n, c_n)``) as
    the layer returns them in eval mode under ``torch.no_grad``, from copies of its weights
    taken by ``frozen()``: later changes to the layer do not reach it (call ``frozen()`` again).
    Input and states are CPU tensors of the layer's dtype, batched or not, batch_first as the
    layer. Calls follow torch's thread count, as the layer's do."""

    def __init__(self, layer: _RNNBase) -> None:
        self._name = f"pyrnn.torch.{type(layer).__name__}"
        self._dtype = layer._flat_weights[0].dtype
        self._has_c = layer.mode == "LSTM"
        self._batch_dim = 0 if layer.batch_first else 1
        self._input_size = layer.input_size
        D = 2 if layer.bidirectional else 1  # noqa: N806
        # each state's (rows, width): h_0 (L*D, P), c_0 (L*D, H)
        self._state_shapes = ((layer.num_layers * D, layer.proj_size or layer.hidden_size),
                              (layer.num_layers * D, layer.hidden_size))
        self._numpy = layer.to_module().eval().frozen()  # to_module checks dtype and device

    def __call__(self, input: Tensor, hx: Any = None) -> tuple[Tensor, Any]:  # noqa: A002
        x = self._checked_input(input)
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(self._batch_dim)
        states = self._numpy_states(hx, x.size(self._batch_dim), batched)
        _ops.kernel_threads()
        out, state = self._numpy(_ops._array(x), states)
        out = torch.from_numpy(out)
        h_n, c_n = state if self._has_c else (state, None)
        h_n = torch.from_numpy(h_n)
        c_n = None if c_n is None else torch.from_numpy(c_n)
        if not batched:
            out, h_n = out.squeeze(self._batch_dim), h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        return out, ((h_n, c_n) if self._has_c else h_n)

    forward = __call__

    def _checked_input(self, input: Any) -> Tensor:  # noqa: A002
        if isinstance(input, PackedSequence):
            raise TypeError(f"{self._name}.frozen(): input is a PackedSequence, which a frozen "
                            "layer does not take; call the layer itself for packed sequences")
        if not isinstance(input, Tensor):
            raise TypeError(f"{self._name}.frozen(): input must be a Tensor, got "
                            f"{type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"{self._name}.frozen(): expected input to be 2-D or 3-D, got a "
                             f"{input.dim()}-D tensor")
        self._check_tensor("input", input)
        if input.size(-1) != self._input_size:
            raise ValueError(f"{self._name}.frozen(): input.size(-1) must be the input size, "
                             f"{self._input_size}; got {input.size(-1)}")
        return input

    def _check_tensor(self, name: str, t: Tensor) -> None:
        if t.device.type != "cpu":
            raise RuntimeError(f"{self._name}.frozen(): {name} is on {t.device}; a frozen layer "
                               "runs on the CPU")
        if t.dtype != self._dtype:
            raise TypeError(f"{self._name}.frozen(): {name} is {t.dtype}, expected the layer's "
                            f"{self._dtype}")
        if t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{self._name}.frozen(): {name} requires grad, and a frozen layer "
                               "has no backward; call the layer itself to train, or run under "
                               "torch.no_grad()")

    def _numpy_states(self, hx: Any, batch: int, batched: bool) -> Any:
        """hx as the NumPy snapshot takes it: arrays, 3-D (an unbatched state gains its batch)."""
        if hx is None:
            return None
        states = tuple(hx) if self._has_c and isinstance(hx, tuple | list) else (hx,)
        if len(states) != (2 if self._has_c else 1) or not all(
                isinstance(s, Tensor) for s in states):
            wanted = "an (h_0, c_0) pair of Tensors" if self._has_c else "a Tensor"
            raise TypeError(f"{self._name}.frozen(): hx must be {wanted}")
        wanted_dim = 3 if batched else 2
        for name, s, (rows, width) in zip(("h_0", "c_0"), states, self._state_shapes,
                                          strict=False):
            self._check_tensor(name, s)
            if s.dim() != wanted_dim:
                kind = "batched 3-D" if batched else "unbatched 2-D"
                raise RuntimeError(f"{self._name}.frozen(): for {kind} input, {name} should be "
                                   f"{wanted_dim}-D, got {s.dim()}-D")
            expected = (rows, batch, width) if batched else (rows, width)
            if tuple(s.shape) != expected:
                raise RuntimeError(f"{self._name}.frozen(): expected {name} of size "
                                   f"{expected}, got {tuple(s.shape)}")
        arrays = tuple(_ops._array(s if batched else s.unsqueeze(1)) for s in states)
        return arrays if self._has_c else arrays[0]

    def __repr__(self) -> str:
        return f"FrozenLayer({self._numpy!r})"
