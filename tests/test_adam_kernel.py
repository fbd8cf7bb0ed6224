"""adam_update, the kernel under pyrnn.optim.Adam: the C++ core gives the NumPy reference's bits,
through the kernels and through the optimizer, and both check their arguments."""

from __future__ import annotations

import numpy as np
import pytest

from pyrnn import _backend, optim, reference

if not _backend.cpp_available():
    pytest.skip("the C++ extension is not built", allow_module_level=True)

cpp = _backend.kernels("cpp")
# (neg_step_size, lerp_weight, beta2, bias_correction2_sqrt, eps, weight_decay): a first step,
# a late one, weight decay, and a lerp weight past 0.5 (torch.lerp's other branch).
SCALARS = [(-1e-3, 0.1, 0.999, 0.0316, 1e-8, 0.0), (-2e-4, 0.1, 0.999, 0.95, 1e-8, 0.0),
           (-1e-2, 0.1, 0.99, 0.3, 1e-6, 0.1), (-0.5, 0.7, 0.5, 0.9, 1e-8, 0.0)]


def state(n, dtype, amsgrad, seed=0, nan=False):
    rng = np.random.default_rng(seed)
    param, grad = rng.standard_normal(n), rng.standard_normal(n)
    exp_avg, exp_avg_sq = rng.standard_normal(n) * 0.1, rng.random(n) * 0.01
    if nan:
        grad[::7] = np.nan
    arrays = [param, grad, exp_avg, exp_avg_sq, rng.random(n) * 0.02 if amsgrad else None]
    return [None if a is None else a.astype(dtype) for a in arrays]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("scalars", SCALARS)
@pytest.mark.parametrize("n", [1, 100_003])
def test_cpp_adam_update_gives_the_reference_bits(dtype, amsgrad, scalars, n):
    ours, theirs = state(n, dtype, amsgrad), state(n, dtype, amsgrad)
    cpp.adam_update(*ours, *scalars)
    reference.adam_update(*theirs, *scalars)
    for got, want in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(got, want)


def test_cpp_adam_update_propagates_nan_as_numpy_does():
    ours, theirs = state(1000, np.float32, True, nan=True), state(1000, np.float32, True, nan=True)
    cpp.adam_update(*ours, *SCALARS[0])
    reference.adam_update(*theirs, *SCALARS[0])
    for got, want in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(got, want)
    assert np.isnan(ours[0][::7]).all() and not np.isnan(ours[0][1::7]).any()


@pytest.mark.parametrize("kwargs", [{}, {"amsgrad": True, "weight_decay": 0.1},
                                    {"betas": (0.3, 0.5), "lr": 0.5}])
def test_adam_on_the_core_matches_adam_on_numpy_step_for_step(kwargs, monkeypatch):
    import pyrnn

    models = [pyrnn.LSTM(5, 7, num_layers=2, seed=0) for _ in range(2)]
    optimizers = [optim.Adam(m, **kwargs) for m in models]
    rng = np.random.default_rng(1)
    for _ in range(4):
        for name, grad in models[0].grads.items():
            grad[...] = rng.standard_normal(grad.shape)
            models[1].grads[name][...] = grad
        optimizers[0].step()
        with monkeypatch.context() as patch:
            patch.setattr(optim, "_fused_kernels", lambda arrays: reference)
            optimizers[1].step()
        for name, param in models[0].params.items():
            np.testing.assert_array_equal(param, models[1].params[name])


def test_adam_falls_back_to_numpy_for_arrays_the_core_cannot_take():
    import pyrnn

    model = pyrnn.Linear(4, 3, dtype=np.float64, seed=0)
    strided = np.zeros((4, 3)).T  # a view the core does not take: C-contiguity is required
    strided[...] = model.weight
    model.params["weight"] = strided
    model.grads["weight"][...] = 1.0
    optimizer = optim.Adam(model, lr=0.1)
    optimizer.step()
    np.testing.assert_allclose(strided, model.weight - 0.1, rtol=1e-6)


@pytest.mark.parametrize("kernels", [cpp, reference], ids=["cpp", "numpy"])
def test_adam_update_rejects_bad_arrays(kernels):
    param, grad, exp_avg, exp_avg_sq, _ = state(6, np.float32, False)
    scalars = SCALARS[0]
    read_only = exp_avg.copy()
    read_only.flags.writeable = False
    cases = [
        ((param, grad[:5], exp_avg, exp_avg_sq, None), ValueError, r"grad: expected shape \(6,\)"),
        ((param, grad, exp_avg[:5], exp_avg_sq, None), ValueError, r"exp_avg: expected shape"),
        ((param, grad, read_only, exp_avg_sq, None), ValueError, "exp_avg: expected a"),
        ((param, grad, exp_avg, exp_avg, None), ValueError,
         "exp_avg_sq: shares memory with exp_avg"),
        ((param, grad, exp_avg, exp_avg_sq, param), ValueError,
         "max_exp_avg_sq: shares memory with param"),
        ((param, [1.0] * 6, exp_avg, exp_avg_sq, None), TypeError, "grad: expected a"),
    ]
    for arrays, error, message in cases:
        with pytest.raises(error, match=message):
            kernels.adam_update(*arrays, *scalars)
    with pytest.raises(TypeError, match="param: expected"):
        cpp.adam_update(param.astype(np.float16), grad, exp_avg, exp_avg_sq, None, *scalars)
