"""Losses that return their value and their gradient together: ``(loss, d_input)``.

``cross_entropy`` is softmax cross-entropy on the last axis of ``(..., C)`` logits, for example
``(T, B, C)`` scores of a sequence model, with positions left out by ``ignore_index`` or a
boolean ``mask``; ``mse`` is the mean squared error. Both agree with
``torch.nn.functional.cross_entropy`` / ``mse_loss`` in value and gradient.
"""

from __future__ import annotations

import numpy as np

_REDUCTIONS = ("mean", "sum", "none")


def _check_logits(name: str, value: object) -> np.ndarray:
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    if array.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (the classes), got a scalar")
    return array


def _check_axis(axis: object, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must lie in [{-ndim}, {ndim}), got {axis}")
    return int(axis)


def _check_reduction(reduction: object) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return str(reduction)


def log_softmax(x: object, axis: int = -1) -> np.ndarray:
    """``log(softmax(x))`` along ``axis``, computed without overflow (max subtracted first)."""
    x = _check_logits("x", x)
    axis = _check_axis(axis, x.ndim)
    if x.shape[axis] == 0:  # nothing to normalise (and max has no identity to start from)
        return np.empty_like(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def softmax(x: object, axis: int = -1) -> np.ndarray:
    """``exp(x) / sum(exp(x))`` along ``axis``, computed without overflow."""
    x = _check_logits("x", x)
    axis = _check_axis(axis, x.ndim)
    if x.shape[axis] == 0:
        return np.empty_like(x)
    exp = np.exp(x - x.max(axis=axis, keepdims=True))
    return exp / exp.sum(axis=axis, keepdims=True)


def _check_targets(targets: object, logits_shape: tuple) -> np.ndarray:
    array = np.asarray(targets)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"targets must hold integer class indices, got dtype {array.dtype}")
    if array.shape != logits_shape[:-1]:
        raise ValueError(
            f"targets must have shape {logits_shape[:-1]} (logits {logits_shape} without "
            f"the class axis), got {array.shape}"
        )
    return array


def _check_mask(mask: object, shape: tuple) -> np.ndarray:
    array = np.asarray(mask)
    if array.shape != shape:
        raise ValueError(f"mask must have the targets' shape {shape}, got {array.shape}")
    if array.dtype == np.bool_:
        return array
    if not np.issubdtype(array.dtype, np.number) or not np.isin(array, (0, 1)).all():
        raise TypeError(f"mask must be boolean (or hold only 0 and 1), got dtype {array.dtype}")
    return array.astype(bool)


def _used_positions(targets: np.ndarray, num_classes: int, ignore_index: int,
                    mask: object) -> np.ndarray:
    """Boolean array of the positions that count, after checking their class indices."""
    used = targets != ignore_index
    if mask is not None:
        used &= _check_mask(mask, targets.shape)
    chosen = targets[used]
    if chosen.size and (chosen.min() < 0 or chosen.max() >= num_classes):
        bad = chosen[(chosen < 0) | (chosen >= num_classes)][0]
        raise ValueError(
            f"targets must lie in [0, {num_classes}) where not ignored or masked, found {bad}"
        )
    return used


def cross_entropy(
    logits: object,
    targets: object,
    *,
    ignore_index: int = -100,
    mask: object = None,
    reduction: str = "mean",
) -> tuple[float | np.ndarray, np.ndarray]:
    """Softmax cross-entropy of ``(..., C)`` logits against ``(...)`` integer targets.

    A position counts unless its target equals ``ignore_index`` or ``mask`` (a boolean array of
    the targets' shape) is False there. ``reduction="mean"`` divides the summed loss by the
    number of positions that count, as ``torch.nn.functional.cross_entropy`` does; ``"sum"``
    adds them up; ``"none"`` returns the per-position losses (0 where not counted).

    Returns ``(loss, d_logits)``: ``d_logits`` has the logits' shape and dtype and is zero at
    positions that do not count; for ``"none"`` it is the gradient of ``loss.sum()``.

    When no position counts, the ``"mean"`` loss is 0.0 with zero gradients (PyTorch returns
    nan there): a fully padded batch then contributes nothing instead of poisoning training.
    """
    logits = _check_logits("logits", logits)
    if logits.shape[-1] == 0:
        raise ValueError(
            f"logits must have at least one class (last axis), got shape {logits.shape}"
        )
    targets = _check_targets(targets, logits.shape)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int | np.integer):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    reduction = _check_reduction(reduction)
    num_classes = logits.shape[-1]
    used = _used_positions(targets, num_classes, ignore_index, mask)

    log_probs = log_softmax(logits)
    safe_targets = np.where(used, targets, 0)[..., None]
    picked = np.take_along_axis(log_probs, safe_targets, axis=-1)[..., 0]
    losses = np.where(used, -picked, 0).astype(logits.dtype)

    # d(-log p_target)/d logits = softmax - one_hot(target), zero where the position is unused.
    d_logits = np.exp(log_probs)
    target_probs = np.take_along_axis(d_logits, safe_targets, axis=-1)
    np.put_along_axis(d_logits, safe_targets, target_probs - 1, axis=-1)
    d_logits *= used[..., None]

    if reduction == "none":
        return losses, d_logits
    total = float(losses.sum(dtype=np.float64))
    if reduction == "sum":
        return total, d_logits
    count = int(used.sum())
    if count == 0:
        return 0.0, d_logits
    d_logits /= np.float64(count)  # the count in float64: in float16 past 65504 it is inf
    return total / count, d_logits


def mse(pred: object, target: object, reduction: str = "mean") -> tuple[
        float | np.ndarray, np.ndarray]:
    """Squared error ``(pred - target)**2``, averaged (``"mean"``), summed or per element.

    Returns ``(loss, d_pred)``; for ``"none"``, ``d_pred`` is the gradient of ``loss.sum()``.
    ``target`` must have ``pred``'s shape (no broadcasting, which hides shape bugs).
    """
    pred = np.asarray(pred)
    if not np.issubdtype(pred.dtype, np.floating):
        raise TypeError(f"pred must be a floating-point array, got dtype {pred.dtype}")
    target = np.asarray(target)
    if not (np.issubdtype(target.dtype, np.floating) or np.issubdtype(target.dtype, np.integer)):
        raise TypeError(f"target must be a real-valued array, got dtype {target.dtype}")
    if target.shape != pred.shape:
        raise ValueError(f"target must have pred's shape {pred.shape}, got {target.shape}")
    reduction = _check_reduction(reduction)
    diff = pred - target.astype(pred.dtype, copy=False)
    d_pred = 2 * diff
    if reduction == "none":
        return diff * diff, d_pred
    total = float(np.sum(diff * diff, dtype=np.float64))
    if reduction == "sum":
        return total, d_pred
    count = max(pred.size, 1)
    d_pred /= np.float64(count)  # as in cross_entropy
    return total / count, d_pred
