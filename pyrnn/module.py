"""The base every pyrnn layer and model shares: named parameters, their gradients, modes.

A module owns ``params`` and ``grads``, two dicts of NumPy arrays with the same keys. The arrays
keep their identity for the module's life: ``zero_grad`` zeroes them in place, backward adds into
them in place, ``load_state_dict`` copies into them. Optimizers rely on that.

Child modules assigned as attributes are registered by name, as in PyTorch, so a model's
``state_dict()`` holds ``"rnn.weight_ih_l0"``, ``"head.weight"`` and so on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping

import numpy as np

from . import _checks

# Per thread, as torch's grad mode: one thread's no_grad block must not stop another thread's
# training pass from keeping its tape, and blocks that overlap in two threads must not leave the
# mode off when both have ended.
_grad_mode = threading.local()


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Within this block, forward passes of this thread keep no tape (as ``torch.no_grad``)."""
    previous = is_grad_enabled()
    _grad_mode.enabled = False
    try:
        yield
    finally:
        _grad_mode.enabled = previous


def is_grad_enabled() -> bool:
    """Whether forward passes of this thread keep a tape (False inside ``no_grad``)."""
    return getattr(_grad_mode, "enabled", True)


class Module:
    """Named parameters with gradients, child modules, train/eval mode."""

    def __init__(self) -> None:
        object.__setattr__(self, "params", {})
        object.__setattr__(self, "grads", {})
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, Module):
            self._children[name] = value
        else:  # a child replaced by anything else (None, say) takes its parameters with it
            self._children.pop(name, None)
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        object.__delattr__(self, name)
        self._children.pop(name, None)

    def add_param(self, name: str, value: np.ndarray) -> np.ndarray:
        """Register a parameter and its zeroed gradient; returns the parameter array."""
        self.params[name] = value
        self.grads[name] = np.zeros_like(value)
        return value

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(name, parameter, gradient) for this module and its children, depth first."""
        for name, value in self.params.items():
            yield prefix + name, value, self.grads[name]
        for child_name, child in self._children.items():
            yield from child.named_parameters(prefix + child_name + ".")

    def zero_grad(self) -> None:
        for _, _, grad in self.named_parameters():
            grad.fill(0)

    def train(self, mode: bool = True) -> Module:
        mode = _checks.flag("mode", mode)
        object.__setattr__(self, "training", mode)
        for child in self._children.values():
            child.train(mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def num_parameters(self) -> int:
        return sum(value.size for _, value, _ in self.named_parameters())

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter, keyed by PyTorch-style dotted names."""
        return {name: value.copy() for name, value, _ in self.named_parameters()}

    def load_state_dict(self, state_dict: Mapping[str, object]) -> None:
        """Copy parameters in, after checking every key and shape first (never half-loads)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        own = {name: value for name, value, _ in self.named_parameters()}
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise KeyError(
                f"state_dict keys do not match {type(self).__name__}: "
                f"missing {missing}, unexpected {unexpected}"
            )
        incoming = {}
        for name, target in own.items():
            try:
                value = np.asarray(state_dict[name])
            except ValueError as error:  # ragged nested lists, say
                raise ValueError(f"state_dict[{name!r}] is not an array: {error}") from error
            if value.shape != target.shape:
                raise ValueError(
                    f"state_dict[{name!r}] has shape {value.shape}, expected {target.shape}"
                )
            if value.dtype.kind not in "fiu":  # NumPy counts timedelta64 among its integers
                raise TypeError(
                    f"state_dict[{name!r}] has dtype {value.dtype}, expected a real number type"
                )
            incoming[name] = _cast_without_overflow(f"state_dict[{name!r}]", value, target.dtype)
        for name, target in own.items():
            np.copyto(target, incoming[name], casting="unsafe")

    def _check_grads(self) -> None:
        """Before a backward pass adds into any of them: every gradient array must be a
        writable ndarray of its parameter's shape and dtype (a user may have replaced one), so
        that a refused backward has added nothing and can be retried once the array is fixed."""
        grads = self.grads
        for name, param in self.params.items():
            grad = grads.get(name)
            if not (isinstance(grad, np.ndarray) and grad.shape == param.shape
                    and grad.dtype == param.dtype and grad.flags.writeable):
                _refuse_grad(f"{type(self).__name__}.grads[{name!r}]", grad, param)


def _refuse_grad(where: str, grad: object, param: np.ndarray) -> None:
    if not isinstance(grad, np.ndarray):
        raise TypeError(f"{where}: expected a numpy array, got {type(grad).__name__}")
    if grad.shape != param.shape or grad.dtype != param.dtype:
        raise ValueError(f"{where}: expected {param.dtype} {param.shape} (as its parameter), "
                         f"got {grad.dtype} {grad.shape}")
    raise ValueError(f"{where}: the array is read-only")


def _cast_without_overflow(name: str, value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """value as dtype; ValueError when a finite value would become inf (1e300 in float32)."""
    with np.errstate(over="ignore"):  # reported below, naming the parameter
        cast = value.astype(dtype, copy=False)
    if value.dtype.kind == "f" and cast is not value and value.size:
        overflow = np.isfinite(value) & ~np.isfinite(cast)
        if overflow.any():
            finite = value[np.isfinite(value)]
            raise ValueError(
                f"{name} holds values in [{finite.min():.6g}, {finite.max():.6g}], beyond "
                f"{np.dtype(dtype)}'s largest finite magnitude {np.finfo(dtype).max:.6g}: they "
                "would become inf"
            )
    return cast
