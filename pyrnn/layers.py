"""Layers around the recurrent core: ``Linear``, ``Embedding`` and ``one_hot``.

Each layer has PyTorch's parameter names, shapes and default initialisation, a forward pass
(``layer(x)``) and a ``backward(d_y)`` that adds the parameter gradients into ``layer.grads``
in place and returns the gradient with respect to the input (``Linear``) or nothing
(``Embedding``: its input is a tensor of indices).

A layer keeps the one tape of its latest forward pass, and only in training mode with
gradients enabled. To train a layer applied at every time step, call it once on the whole
``(T, B, ...)`` sequence rather than once per step: one matrix product is faster anyway.
"""

from __future__ import annotations

import numpy as np

from . import _backend, _checks
from .module import Module, is_grad_enabled


def _check_seed(seed: object) -> np.random.Generator:
    return np.random.default_rng(_checks.seed(seed))


def one_hot(indices: object, num_classes: int, dtype: object = np.float32) -> np.ndarray:
    """``(...,)`` integer indices in ``[0, num_classes)`` -> ``(..., num_classes)`` one-hot rows."""
    num_classes = _checks.positive_int("num_classes", num_classes)
    array = np.asarray(indices)
    resolved = np.dtype(dtype)
    if not (np.issubdtype(resolved, np.number) or resolved == np.bool_):
        raise TypeError(f"dtype must be a numeric dtype, got {resolved}")
    _checks.fits_in_memory(f"one_hot(num_classes={num_classes}) of {array.size:,} indices",
                           array.size * num_classes, resolved.itemsize)
    array = _checks.indices("indices", array, num_classes)
    out = np.zeros(array.shape + (num_classes,), dtype=resolved)
    np.put_along_axis(out, array[..., None], 1, axis=-1)
    return out


class Linear(Module):
    """``y = x @ weight.T + bias`` on the last axis of any ``(..., in_features)`` array.

    ``weight`` is ``(out_features, in_features)`` and ``bias`` ``(out_features,)``, both drawn
    from ``uniform(-1/sqrt(in_features), 1/sqrt(in_features))`` as PyTorch does. Inputs of
    another floating type are cast to the layer's dtype.

    ``backend`` as the recurrent modules': on "cpp" the products run on the C++ core's threads,
    the same team as the recurrent layers, rather than on NumPy's BLAS threads, which stay busy
    for a while after each product and take the cores from the time loops that follow.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: object = np.float32,
        seed: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.in_features = _checks.positive_int("in_features", in_features)
        self.out_features = _checks.positive_int("out_features", out_features)
        bias = _checks.flag("bias", bias)
        self.dtype = _checks.float_dtype(dtype)
        self.backend = _backend.resolve(_checks.choice("backend", backend, _backend.BACKENDS))
        _checks.fits_in_memory(  # with the float64 draw that fills the weight
            f"Linear({self.in_features}, {self.out_features}) with its gradients",
            2 * self.out_features * (self.in_features + 1), self.dtype.itemsize,
            arrays=4, scratch=8 * self.out_features * self.in_features)
        rng = _check_seed(seed)
        bound = 1.0 / np.sqrt(self.in_features)
        shape = (self.out_features, self.in_features)
        self.weight = self.add_param("weight", self._uniform(rng, bound, shape))
        self.bias = None
        if bias:
            self.bias = self.add_param("bias", self._uniform(rng, bound, (self.out_features,)))
        self._x: np.ndarray | None = None

    def _uniform(self, rng: np.random.Generator, bound: float, shape: tuple) -> np.ndarray:
        return rng.uniform(-bound, bound, size=shape).astype(self.dtype)

    def __call__(self, x: object) -> np.ndarray:
        x = _checks.real_array("x", x)
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have shape (..., {self.in_features}), got {x.shape}"
            )
        keep = self.training and is_grad_enabled()
        rows = x.size // self.in_features
        _checks.call_fits("x", x.shape, self.dtype.itemsize * rows * (
            2 * self.in_features + self.out_features), "the input's copies and the output")
        # The tape is only the input, copied so a caller reusing its buffer cannot change it.
        x = np.array(x, dtype=self.dtype) if keep else x.astype(self.dtype, copy=False)
        # One GEMM over all leading axes (numpy would loop over them for a stacked matmul).
        rows = np.ascontiguousarray(x.reshape(-1, self.in_features))
        weight, bias = self._kernel_params()
        y = _backend.prechecked(self.backend).linear_forward(rows, weight, bias)
        self._x = x if keep else None
        return y.reshape(x.shape[:-1] + (self.out_features,))

    def backward(self, d_y: object) -> np.ndarray:
        """Add ``dL/dweight`` and ``dL/dbias`` into ``grads``; return ``dL/dx``."""
        if self._x is None:
            raise RuntimeError(
                "Linear.backward needs a forward pass in training mode with gradients enabled "
                "first (none recorded)"
            )
        d_y = _checks.real_array("d_y", d_y)
        self._check_grads()
        expected = self._x.shape[:-1] + (self.out_features,)
        if d_y.shape != expected:
            raise ValueError(f"d_y must have shape {expected} (the output's), got {d_y.shape}")
        rows = d_y.size // self.out_features
        _checks.call_fits("d_y", d_y.shape, self.dtype.itemsize * rows * (
            self.in_features + self.out_features), "d_y's copy and the input's gradient")
        d_y_rows = np.ascontiguousarray(d_y.reshape(-1, self.out_features), dtype=self.dtype)
        x_rows = self._x.reshape(-1, self.in_features)
        weight, bias = self._kernel_params()
        has_bias = bias is not None
        targets = self._grad_targets((("d_y", d_y_rows), ("weight", weight)))
        dx, d_weight, d_bias = _backend.prechecked(self.backend).linear_backward(
            x_rows, weight, d_y_rows, has_bias, targets)
        if targets is None:  # grads replaced by arrays the kernel cannot add into: add here
            self.grads["weight"] += d_weight
            if has_bias:
                self.grads["bias"] += d_bias
        return dx.reshape(self._x.shape)

    def _kernel_params(self) -> tuple[np.ndarray, np.ndarray | None]:
        """weight and bias as the kernels take them (checked: a user may have replaced them)."""
        weight, bias, dtype = self.weight, self.bias, self.dtype
        w_shape, b_shape = (self.out_features, self.in_features), (self.out_features,)
        if _checks.is_ready(weight, dtype, w_shape) and (
                bias is None or _checks.is_ready(bias, dtype, b_shape)):
            return weight, bias
        weight = _checks.array("weight", weight, dtype, w_shape)
        return weight, None if bias is None else _checks.array("bias", bias, dtype, b_shape)

    def _grad_targets(self, reads: tuple[tuple[str, np.ndarray], ...]) -> tuple | None:
        """grads as the kernel's accumulate_into, or None when it cannot add into them."""
        has_bias = self.bias is not None
        targets = (self.grads["weight"], self.grads["bias"] if has_bias else None)
        shapes = ((self.out_features, self.in_features), (self.out_features,))
        if not all(t is None or (_checks.core_writable(t, self.dtype) and t.shape == s)
                   for t, s in zip(targets, shapes, strict=True)):
            return None
        _checks.disjoint([*reads, ("grads['weight']", targets[0]), ("grads['bias']", targets[1])],
                         first_written=len(reads))
        return targets

    def __repr__(self) -> str:
        return (
            f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, dtype={self.dtype}, backend={self.backend!r})"
        )


class Embedding(Module):
    """A lookup table: integer indices of any shape ``(...)`` -> rows ``(..., embedding_dim)``.

    ``weight`` is ``(num_embeddings, embedding_dim)``, drawn from ``N(0, 1)`` as PyTorch does.
    Backward adds each output row's gradient into the row it was read from, so an index used
    several times collects the sum of its gradients.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: object = np.float32,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = _checks.positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = _checks.positive_int("embedding_dim", embedding_dim)
        self.dtype = _checks.float_dtype(dtype)
        _checks.fits_in_memory(  # with the float64 draw that fills the weight
            f"Embedding({self.num_embeddings}, {self.embedding_dim}) with its gradients",
            2 * self.num_embeddings * self.embedding_dim, self.dtype.itemsize,
            arrays=2, scratch=8 * self.num_embeddings * self.embedding_dim)
        rng = _check_seed(seed)
        shape = (self.num_embeddings, self.embedding_dim)
        self.weight = self.add_param("weight", rng.standard_normal(shape).astype(self.dtype))
        self._indices: np.ndarray | None = None

    def __call__(self, indices: object) -> np.ndarray:
        indices = np.asarray(indices)
        _checks.call_fits("indices", indices.shape, indices.size * (
            self.embedding_dim * self.dtype.itemsize + 8), "the rows looked up and the tape")
        indices = _checks.indices("indices", indices, self.num_embeddings)
        keep = self.training and is_grad_enabled()
        # A copy, so that a caller reusing its index buffer cannot change the tape.
        self._indices = indices.copy() if keep else None
        return self.weight[indices]

    def backward(self, d_y: object) -> None:
        """Add ``dL/dweight`` into ``grads["weight"]`` (rows of repeated indices sum)."""
        if self._indices is None:
            raise RuntimeError(
                "Embedding.backward needs a forward pass in training mode with gradients "
                "enabled first (none recorded)"
            )
        d_y = _checks.real_array("d_y", d_y)
        self._check_grads()
        expected = self._indices.shape + (self.embedding_dim,)
        if d_y.shape != expected:
            raise ValueError(f"d_y must have shape {expected} (the output's), got {d_y.shape}")
        _checks.call_fits("d_y", d_y.shape, d_y.size * 2 * self.dtype.itemsize
                          + self._indices.size * 24, "the rows sorted by index and their sums")
        rows = d_y.reshape(-1, self.embedding_dim).astype(self.dtype, copy=False)
        indices = self._indices.reshape(-1)
        if indices.size == 0:
            return
        # np.add.at took 1.1 ms for a char-RNN batch (2048 rows of 64) against 0.17 ms for
        # this: rows grouped by index (a stable sort keeps their order) and summed per group.
        order = np.argsort(indices, kind="stable")
        grouped = indices[order]
        starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
        self.grads["weight"][grouped[starts]] += np.add.reduceat(rows[order], starts, axis=0)

    def __repr__(self) -> str:
        return (
            f"Embedding(num_embeddings={self.num_embeddings}, "
            f"embedding_dim={self.embedding_dim}, dtype={self.dtype})"
        )
