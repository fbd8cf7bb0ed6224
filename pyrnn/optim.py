"""Optimizers (SGD, Adagrad, RMSprop, Adam) and gradient clipping for pyrnn modules.

An optimizer takes a ``Module`` (or a list of them, whose names are then prefixed ``"0."``,
``"1."``, ... as in ``torch.nn.ModuleList``) and updates its parameters in place from the
gradients in ``module.grads``. Each ``step()`` applies exactly the formulas of the matching
``torch.optim`` class (single-tensor path) in the same order, so on the same gradients both give
the same parameters to rounding.

``state_dict()`` is a plain dict: ``{"type", "hyperparams", "step", "state"}`` where ``state``
maps each parameter name to its buffers (NumPy arrays) and every other value is a JSON-able
number, bool or list. Hyper-parameters are attributes (``opt.lr = 1e-4`` changes the rate).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from types import ModuleType

import numpy as np

from . import _backend, _checks, reference
from .module import Module

ParamEntry = tuple[str, np.ndarray, np.ndarray]


def _named_parameters(model: object, argument: str = "model") -> list[ParamEntry]:
    """(name, param, grad) of a Module or a list of Modules, checked for duplicates."""
    if isinstance(model, Module):
        entries = list(model.named_parameters())
    elif isinstance(model, Iterable) and not isinstance(model, str | bytes | Mapping):
        modules = list(model)
        for index, item in enumerate(modules):
            if not isinstance(item, Module):
                raise TypeError(
                    f"{argument}[{index}] must be a pyrnn Module, got {type(item).__name__}"
                )
        entries = [
            entry for index, item in enumerate(modules)
            for entry in item.named_parameters(f"{index}.")
        ]
    else:
        raise TypeError(
            f"{argument} must be a pyrnn Module or a list of Modules, got {type(model).__name__}"
        )
    if not entries:
        raise ValueError(f"{argument} has no parameters to optimize")
    seen: dict[int, str] = {}
    for name, param, _ in entries:
        if id(param) in seen:
            raise ValueError(f"{argument} lists one parameter twice: {seen[id(param)]!r}, {name!r}")
        seen[id(param)] = name
    return entries


def _number(name: str, value: object, low: float = 0.0, high: float = math.inf,
            high_open: bool = False, finite: bool = True) -> float:
    """A real number in [low, high] (or [low, high)), as a float; finite unless told."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if finite and math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    above = value >= high if high_open else value > high
    if not low <= value or above or math.isnan(value):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must lie in [{low}, {high}{bracket}, got {value}")
    return value


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _lerp_(start: np.ndarray, end: np.ndarray, weight: float) -> None:
    """``start += weight * (end - start)`` in place, with torch.lerp's two-branch rounding."""
    if abs(weight) < 0.5:
        start += weight * (end - start)
    else:
        start[...] = end - (end - start) * (1 - weight)


class Optimizer:
    """What every optimizer shares: parameters, step count, buffers, state dicts.

    A subclass names its hyper-parameters (``HYPERPARAMS``) and the buffers it may keep per
    parameter (``BUFFERS``), checks hyper-parameter values (``_check_hyperparams``) and updates
    one parameter (``_update``). Buffers are created when first needed, as torch.optim does.
    """

    HYPERPARAMS: tuple[str, ...] = ()
    BUFFERS: tuple[str, ...] = ()
    # Buffers the first step creates and every later step reads: present exactly when step > 0.
    STEP_BUFFERS: tuple[str, ...] = ()
    # Buffers of squared gradients, whose square root the update takes.
    NON_NEGATIVE: tuple[str, ...] = ()

    def __init__(self, model: object, **hyperparams: object) -> None:
        self._entries = _named_parameters(model)
        for name, param, _ in self._entries:
            if not np.issubdtype(param.dtype, np.floating):
                raise TypeError(f"parameter {name!r} must be floating point, got {param.dtype}")
        for key, value in self._check_hyperparams(hyperparams).items():
            setattr(self, key, value)
        params, buffers = [param for _, param, _ in self._entries], len(self.BUFFERS)
        _checks.fits_in_memory(  # the buffers a step may make: refused before any is made
            f"{type(self).__name__}'s state ({buffers} buffer{'s' * (buffers != 1)} per "
            "parameter)", buffers * sum(p.size for p in params), max(p.itemsize for p in params),
            arrays=buffers * len(params))
        self.step_count = 0
        self.state: dict[str, dict[str, np.ndarray]] = {
            name: self._initial_buffers(param) for name, param, _ in self._entries
        }

    def _check_hyperparams(self, values: Mapping[str, object]) -> dict[str, object]:
        raise NotImplementedError

    def _initial_buffers(self, param: np.ndarray) -> dict[str, np.ndarray]:
        return {}

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    @property
    def param_names(self) -> list[str]:
        return [name for name, _, _ in self._entries]

    @property
    def hyperparams(self) -> dict[str, object]:
        """The current hyper-parameters, JSON-able (tuples as lists)."""
        return {key: _jsonable(getattr(self, key)) for key in self.HYPERPARAMS}

    def step(self) -> None:
        """Update every parameter in place from its current gradient."""
        self.step_count += 1
        for name, param, grad in self._entries:
            self._update(param, grad, self.state[name])

    def zero_grad(self) -> None:
        for _, _, grad in self._entries:
            grad.fill(0)

    def state_dict(self) -> dict[str, object]:
        return {
            "type": type(self).__name__,
            "hyperparams": self.hyperparams,
            "step": self.step_count,
            "state": {
                name: {buffer: array.copy() for buffer, array in buffers.items()}
                for name, buffers in self.state.items()
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, object]) -> None:
        """Restore hyper-parameters, step count and buffers, after checking all of them."""
        hyperparams, step, state = self.check_state_dict(state_dict)
        for key, value in hyperparams.items():
            setattr(self, key, value)
        self.step_count = step
        self.state = state

    def check_state_dict(
        self, state_dict: Mapping[str, object]
    ) -> tuple[dict[str, object], int, dict[str, dict[str, np.ndarray]]]:
        """Validate a state dict for this optimizer without applying it.

        Returns (hyper-parameters, step count, fresh buffer copies); raises TypeError,
        KeyError or ValueError naming the first entry that does not fit.
        """
        kind = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        _expect_keys("optimizer state_dict", state_dict, {"type", "hyperparams", "step", "state"})
        if state_dict["type"] != kind:
            raise ValueError(f"optimizer state_dict is for {state_dict['type']!r}, not {kind!r}")
        incoming = state_dict["hyperparams"]
        if not isinstance(incoming, Mapping):
            raise TypeError(f"state_dict['hyperparams'] must be a mapping, got {incoming!r}")
        _expect_keys("state_dict['hyperparams']", incoming, set(self.HYPERPARAMS))
        hyperparams = self._check_hyperparams(incoming)
        step = state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"state_dict['step'] must be an int >= 0, got {step!r}")
        return hyperparams, int(step), self._check_buffers(state_dict["state"], int(step))

    def _check_buffers(self, state: object, step: int) -> dict[str, dict[str, np.ndarray]]:
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict['state'] must be a mapping, got {type(state).__name__}")
        _expect_keys("state_dict['state']", state, set(self.param_names))
        checked = {}
        for name, param, _ in self._entries:
            buffers = state[name]
            if not isinstance(buffers, Mapping):
                raise TypeError(f"state_dict['state'][{name!r}] must be a mapping of arrays")
            unknown = sorted(set(buffers) - set(self.BUFFERS), key=str)
            if unknown:
                raise KeyError(
                    f"state_dict['state'][{name!r}] has unknown buffers {unknown}; "
                    f"{type(self).__name__} keeps {list(self.BUFFERS)}"
                )
            checked[name] = {
                buffer: _checked_buffer(f"{name}/{buffer}", value, param)
                for buffer, value in buffers.items()
            }
            self._check_buffer_values(name, checked[name], step)
        return checked

    def _check_buffer_values(self, name: str, buffers: dict[str, np.ndarray], step: int) -> None:
        """What the algorithm needs of one parameter's buffers: the ones every step reads are
        there once a step was taken (and not before), squared-gradient sums are >= 0."""
        kind, where = type(self).__name__, f"state_dict['state'][{name!r}]"
        present = [buffer for buffer in self.STEP_BUFFERS if buffer in buffers]
        if step == 0 and present:
            raise ValueError(f"{where} holds {present} at step 0; {kind} makes them at its "
                             "first step")
        missing = [buffer for buffer in self.STEP_BUFFERS if buffer not in buffers]
        if step > 0 and missing:
            raise KeyError(f"{where} lacks {missing} at step {step}; {kind} keeps them from its "
                           "first step on")
        for buffer in self.NON_NEGATIVE:
            array = buffers.get(buffer)
            if array is not None and array.size and array.min() < 0:
                raise ValueError(
                    f"optimizer buffer '{name}/{buffer}' holds negative values (down to "
                    f"{array.min():.6g}); {kind}'s {buffer} sums squared gradients, so it is >= 0"
                )

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value}" for key, value in self.hyperparams.items())
        return f"{type(self).__name__}({options})"


def _jsonable(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def _expect_keys(what: str, mapping: Mapping, expected: set) -> None:
    missing = sorted(expected - set(mapping))
    unexpected = sorted(set(mapping) - expected, key=str)
    if missing or unexpected:
        raise KeyError(f"{what} keys do not match: missing {missing}, unexpected {unexpected}")


def _checked_buffer(name: str, value: object, param: np.ndarray) -> np.ndarray:
    """A fresh copy of the buffer in the parameter's dtype; every value finite before and
    after the conversion (a nan or inf buffer would write nan into the parameter)."""
    array = np.asarray(value)
    if array.shape != param.shape:
        raise ValueError(
            f"optimizer buffer {name!r} has shape {array.shape}, expected {param.shape}"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"optimizer buffer {name!r} has dtype {array.dtype}, expected floating")
    if not np.isfinite(array).all():
        raise ValueError(f"optimizer buffer {name!r} holds nan or inf")
    with np.errstate(over="ignore"):  # reported below, naming the buffer
        cast = np.array(array, dtype=param.dtype)
    if not np.isfinite(cast).all():
        raise ValueError(
            f"optimizer buffer {name!r} holds values in [{array.min():.6g}, {array.max():.6g}], "
            f"beyond {param.dtype}'s largest finite magnitude {np.finfo(param.dtype).max:.6g}"
        )
    return cast


def _with_weight_decay(grad: np.ndarray, param: np.ndarray, weight_decay: float) -> np.ndarray:
    # torch: grad.add(param, alpha=weight_decay), a new array; the stored gradient is untouched.
    return grad + weight_decay * param if weight_decay != 0 else grad


def _fused_kernels(arrays: tuple[np.ndarray | None, ...]) -> ModuleType:
    """The C++ core for an update over these arrays (param first) when it can take them: one
    pass over them on the core's threads instead of NumPy's passes, with the same bits. Else
    the NumPy reference, which also takes other float types and layouts."""
    if not _backend.cpp_available():
        return reference
    dtype = arrays[0].dtype
    if dtype not in _checks.FLOAT_DTYPES:
        return reference
    if all(a is None or _checks.core_writable(a, dtype) for a in arrays):
        return _backend.kernels("cpp")
    return reference


def _buffer(state: dict[str, np.ndarray], name: str, like: np.ndarray) -> np.ndarray:
    """The named buffer, created as zeros on first use (torch creates them lazily too)."""
    if name not in state:
        state[name] = np.zeros_like(like)
    return state[name]


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, dampening, Nesterov, weight decay.

    ``buf = grad`` on the first step, then ``buf = momentum * buf + (1 - dampening) * grad``;
    the step is ``-lr * buf`` (or ``-lr * (grad + momentum * buf)`` with Nesterov).
    """

    HYPERPARAMS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    BUFFERS = ("momentum_buffer",)

    def __init__(self, model: object, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(model, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov)

    def _check_hyperparams(self, values: Mapping[str, object]) -> dict[str, object]:
        checked = {
            "lr": _number("lr", values["lr"]),
            "momentum": _number("momentum", values["momentum"]),
            "dampening": _number("dampening", values["dampening"], -math.inf),
            "weight_decay": _number("weight_decay", values["weight_decay"]),
            "nesterov": _flag("nesterov", values["nesterov"]),
        }
        if checked["nesterov"] and (checked["momentum"] <= 0 or checked["dampening"] != 0):
            raise ValueError(
                "nesterov=True requires momentum > 0 and dampening == 0, got "
                f"momentum={checked['momentum']}, dampening={checked['dampening']}"
            )
        return checked

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray]) -> None:
        d_p = _with_weight_decay(grad, param, self.weight_decay)
        if self.momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d_p.copy()
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * d_p
            d_p = d_p + self.momentum * buf if self.nesterov else buf
        param += -self.lr * d_p


class Adagrad(Optimizer):
    """Adagrad: ``sum += grad**2``; step ``-clr * grad / (sqrt(sum) + eps)``,
    ``clr = lr / (1 + (step - 1) * lr_decay)``."""

    HYPERPARAMS = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
    BUFFERS = ("sum",)
    NON_NEGATIVE = ("sum",)

    def __init__(self, model: object, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10) -> None:
        super().__init__(model, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps)

    def _check_hyperparams(self, values: Mapping[str, object]) -> dict[str, object]:
        return {name: _number(name, values[name]) for name in self.HYPERPARAMS}

    def _initial_buffers(self, param: np.ndarray) -> dict[str, np.ndarray]:
        return {"sum": np.full_like(param, self.initial_accumulator_value)}

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray]) -> None:
        grad = _with_weight_decay(grad, param, self.weight_decay)
        clr = self.lr / (1 + (self.step_count - 1) * self.lr_decay)
        state_sum = state.get("sum")
        if state_sum is None:
            state_sum = state["sum"] = np.full_like(param, self.initial_accumulator_value)
        state_sum += grad * grad
        std = np.sqrt(state_sum)
        std += self.eps
        param += -clr * grad / std


class RMSprop(Optimizer):
    """RMSprop: ``square_avg = alpha * square_avg + (1 - alpha) * grad**2``; divide the
    gradient by ``sqrt(square_avg) + eps`` (minus the squared running mean when centered),
    optionally through a momentum buffer."""

    HYPERPARAMS = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")
    BUFFERS = ("square_avg", "momentum_buffer", "grad_avg")
    STEP_BUFFERS = ("square_avg",)
    NON_NEGATIVE = ("square_avg",)

    def __init__(self, model: object, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False) -> None:
        super().__init__(model, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered)

    def _check_hyperparams(self, values: Mapping[str, object]) -> dict[str, object]:
        checked = {name: _number(name, values[name]) for name in self.HYPERPARAMS[:-1]}
        checked["centered"] = _flag("centered", values["centered"])
        return checked

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray]) -> None:
        grad = _with_weight_decay(grad, param, self.weight_decay)
        square_avg = _buffer(state, "square_avg", param)
        square_avg *= self.alpha
        square_avg += (1 - self.alpha) * grad * grad
        if self.centered:
            grad_avg = _buffer(state, "grad_avg", param)
            _lerp_(grad_avg, grad, 1 - self.alpha)
            avg = np.sqrt(square_avg + -1 * grad_avg * grad_avg)
        else:
            avg = np.sqrt(square_avg)
        avg += self.eps
        if self.momentum > 0:
            buf = _buffer(state, "momentum_buffer", param)
            buf *= self.momentum
            buf += grad / avg
            param += -self.lr * buf
        else:
            param += -self.lr * grad / avg


class Adam(Optimizer):
    """Adam (L2 weight decay added to the gradient, as torch.optim.Adam), optional AMSGrad."""

    HYPERPARAMS = ("lr", "betas", "eps", "weight_decay", "amsgrad")
    BUFFERS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    STEP_BUFFERS = ("exp_avg", "exp_avg_sq")
    NON_NEGATIVE = ("exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, model: object, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False) -> None:
        super().__init__(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad)

    def _check_hyperparams(self, values: Mapping[str, object]) -> dict[str, object]:
        betas = values["betas"]
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of floats, got {betas!r}")
        return {
            "lr": _number("lr", values["lr"]),
            "betas": (_number("betas[0]", betas[0], 0.0, 1.0, high_open=True),
                      _number("betas[1]", betas[1], 0.0, 1.0, high_open=True)),
            "eps": _number("eps", values["eps"]),
            "weight_decay": _number("weight_decay", values["weight_decay"]),
            "amsgrad": _flag("amsgrad", values["amsgrad"]),
        }

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray]) -> None:
        beta1, beta2 = self.betas
        exp_avg = _buffer(state, "exp_avg", param)
        exp_avg_sq = _buffer(state, "exp_avg_sq", param)
        max_exp_avg_sq = _buffer(state, "max_exp_avg_sq", param) if self.amsgrad else None
        bias_correction1 = 1 - beta1 ** self.step_count
        bias_correction2 = 1 - beta2 ** self.step_count
        arrays = (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq)
        _fused_kernels(arrays).adam_update(
            *arrays, -(self.lr / bias_correction1), 1 - beta1, beta2, bias_correction2 ** 0.5,
            self.eps, self.weight_decay)


def clip_grad_norm(model: object, max_norm: float, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False) -> float:
    """Scale all gradients by ``max_norm / (total_norm + 1e-6)`` when ``total_norm > max_norm``.

    ``total_norm`` is the ``norm_type``-norm of all gradients seen as one vector (``inf`` for
    the largest magnitude), as ``torch.nn.utils.clip_grad_norm_`` computes it; it is returned.
    A nan or inf total raises RuntimeError if ``error_if_nonfinite``, else leaves the gradients
    unscaled (torch would fill them with nan).
    """
    entries = _named_parameters(model)
    max_norm = _number("max_norm", max_norm, finite=False)
    norm_type = _number("norm_type", norm_type, finite=False)
    error_if_nonfinite = _flag("error_if_nonfinite", error_if_nonfinite)
    if norm_type == 0:
        raise ValueError("norm_type must be > 0 (or inf), got 0.0")
    grads = [grad for _, _, grad in entries]
    norms = np.array([_vector_norm(grad.ravel(), norm_type) for grad in grads])
    total_norm = _vector_norm(norms, norm_type)
    if not math.isfinite(total_norm):
        if error_if_nonfinite:
            raise RuntimeError(f"the total gradient norm is {total_norm}; cannot clip")
        return total_norm
    clip_coef = max_norm / (total_norm + 1e-6)
    if clip_coef < 1:
        for grad in grads:
            grad *= clip_coef
    return total_norm


def _vector_norm(values: np.ndarray, norm_type: float) -> float:
    if values.size == 0:
        return 0.0
    if norm_type == 2:
        # Summed in float64 as einsum casts each buffer, without float64 copies of the whole
        # gradient (they were most of clip_grad_norm's time); einsum, not np.dot: a BLAS dot
        # may wake BLAS threads that fight the core's OpenMP team.
        return float(np.sqrt(np.einsum("i,i->", values, values, dtype=np.float64)))
    magnitudes = np.abs(values.astype(np.float64, copy=False))
    if math.isinf(norm_type):
        return float(magnitudes.max())
    return float(np.sum(magnitudes ** norm_type) ** (1 / norm_type))


def clip_grad_value(model: object, clip_value: float) -> None:
    """Clamp every gradient entry into ``[-clip_value, clip_value]`` in place."""
    clip_value = _number("clip_value", clip_value, finite=False)
    for _, _, grad in _named_parameters(model):
        np.clip(grad, -clip_value, clip_value, out=grad)
