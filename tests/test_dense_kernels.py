"""The dense-layer kernels under pyrnn.Linear (linear_forward, linear_backward): the C++ core
against the NumPy reference, the reference against the definition, and the argument checks of
both, which a caller bypassing Linear would reach."""

from __future__ import annotations

import numpy as np
import pytest

from pyrnn import _backend, reference

BACKENDS = [reference] + ([_backend.kernels("cpp")] if _backend.cpp_available() else [])
IDS = ["numpy", "cpp"][: len(BACKENDS)]
RTOL = {np.float32: 1e-5, np.float64: 1e-12}


def problem(n, k, m, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x, weight = rng.standard_normal((n, k)), rng.standard_normal((m, k))
    bias, d_y = rng.standard_normal(m), rng.standard_normal((n, m))
    return [a.astype(dtype) for a in (x, weight, bias, d_y)]


@pytest.mark.parametrize("kernels", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, k, m", [(2048, 256, 99), (1, 1, 1), (7, 513, 300), (0, 4, 5)])
def test_linear_kernels_match_the_definition(kernels, dtype, n, k, m):
    x, weight, bias, d_y = problem(n, k, m, dtype)
    x64, w64, d64 = (a.astype(np.float64) for a in (x, weight, d_y))
    tol = {"rtol": RTOL[dtype], "atol": RTOL[dtype] * 10 * np.sqrt(max(n, k, 1))}
    y = kernels.linear_forward(x, weight, bias)
    assert y.dtype == dtype and y.shape == (n, m)
    np.testing.assert_allclose(y, x64 @ w64.T + bias, **tol)
    np.testing.assert_allclose(kernels.linear_forward(x, weight, None), x64 @ w64.T, **tol)
    dx, d_weight, d_bias = kernels.linear_backward(x, weight, d_y, True)
    np.testing.assert_allclose(dx, d64 @ w64, **tol)
    np.testing.assert_allclose(d_weight, d64.T @ x64, **tol)
    np.testing.assert_allclose(d_bias, d64.sum(axis=0), **tol)
    assert kernels.linear_backward(x, weight, d_y, False)[2] is None


@pytest.mark.parametrize("kernels", BACKENDS, ids=IDS)
@pytest.mark.parametrize("has_bias", [True, False])
def test_linear_backward_adds_into_accumulate_into(kernels, has_bias):
    x, weight, _, d_y = problem(50, 6, 4, np.float64)
    d_weight = np.full((4, 6), 2.0)
    d_bias = np.full(4, -1.0) if has_bias else None
    dx, got_weight, got_bias = kernels.linear_backward(x, weight, d_y, has_bias,
                                                       accumulate_into=(d_weight, d_bias))
    assert got_weight is d_weight and got_bias is d_bias
    np.testing.assert_allclose(d_weight, 2.0 + d_y.T @ x, rtol=1e-12)
    if has_bias:
        np.testing.assert_allclose(d_bias, -1.0 + d_y.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(dx, d_y @ weight, rtol=1e-12)
    # No rows: the gradients are zero, and nothing is added.
    empty = kernels.linear_backward(x[:0], weight, d_y[:0], has_bias)
    assert empty[0].shape == (0, 6) and not empty[1].any()
    before = d_weight.copy()
    kernels.linear_backward(x[:0], weight, d_y[:0], has_bias, accumulate_into=(d_weight, d_bias))
    np.testing.assert_array_equal(d_weight, before)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="the C++ extension is not built")
def test_cpp_linear_matches_reference_on_strided_and_byteswapped_inputs():
    cpp = BACKENDS[1]
    x, weight, bias, d_y = problem(40, 9, 5, np.float32)
    x_strided = np.asfortranarray(x)
    weight_swapped = weight.astype(weight.dtype.newbyteorder(">"))
    np.testing.assert_allclose(cpp.linear_forward(x_strided, weight_swapped, bias),
                               reference.linear_forward(x, weight, bias), rtol=1e-5)
    for got, want in zip(cpp.linear_backward(x_strided, weight_swapped, d_y[:, :], True),
                         reference.linear_backward(x, weight, d_y, True), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", BACKENDS, ids=IDS)
def test_linear_kernels_reject_bad_arguments(kernels):
    x, weight, bias, d_y = problem(8, 3, 2, np.float32)
    forward, backward = kernels.linear_forward, kernels.linear_backward

    def grads(d_weight=None, d_bias=None):
        d_weight = np.zeros((2, 3), np.float32) if d_weight is None else d_weight
        return d_weight, np.zeros(2, np.float32) if d_bias is None else d_bias

    read_only = np.zeros(2, np.float32)
    read_only.flags.writeable = False
    cases = [
        (lambda: forward([[1.0]], weight, bias), TypeError, "x: expected a numpy"),
        (lambda: forward(x.astype(np.int32), weight, bias), TypeError,
         "x: expected dtype float32 or float64"),
        (lambda: forward(x[0], weight, bias), ValueError, r"x: expected shape \(N, K\)"),
        (lambda: forward(x, weight[:, :2], bias), ValueError, r"weight: expected shape \(2, 3\)"),
        (lambda: forward(x, weight.astype(np.float64), bias), TypeError,
         "weight: expected dtype float32"),
        (lambda: forward(x, weight, bias[:1]), ValueError, r"bias: expected shape \(2,\)"),
        (lambda: forward(x, weight[:0], None), ValueError,
         r"weight: expected shape \(M, K\) with M >= 1"),
        (lambda: backward(x, weight, d_y[:4], True), ValueError, r"d_y: expected shape \(8, 2\)"),
        (lambda: backward(x, weight, d_y, True, accumulate_into=grads()[:1]), ValueError,
         "accumulate_into: expected 2 entries"),
        (lambda: backward(x, weight, d_y, True, accumulate_into=grads(np.zeros((2, 3)))),
         TypeError, r"accumulate_into\[0\] d_weight: expected dtype float32"),
        (lambda: backward(x, weight, d_y, False, accumulate_into=grads()), ValueError,
         r"accumulate_into\[1\] d_bias: expected None"),
        (lambda: backward(x, weight, d_y, True,
                          accumulate_into=grads(np.zeros((3, 2), np.float32).T)),
         ValueError, r"accumulate_into\[0\] d_weight: expected a C-contiguous"),
        (lambda: backward(x, weight, d_y, True, accumulate_into=grads(weight)), ValueError,
         r"accumulate_into\[0\] d_weight: shares memory with weight"),
        (lambda: backward(x, weight, d_y, True, accumulate_into=grads(d_bias=read_only)),
         ValueError, r"accumulate_into\[1\] d_bias: expected a C-contiguous"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
