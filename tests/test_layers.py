"""Linear, Embedding and one_hot: finite differences, PyTorch parity, input checks."""

import numpy as np
import pytest

from pyrnn.layers import Embedding, Linear, one_hot
from pyrnn.module import no_grad


def numeric_grad(loss, array, eps=1e-6):
    """Central differences of the scalar loss() with respect to every entry of array."""
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + eps
        plus = loss()
        array[index] = saved - eps
        minus = loss()
        array[index] = saved
        grad[index] = (plus - minus) / (2 * eps)
    return grad


@pytest.mark.parametrize("shape", [(5,), (3, 5), (4, 3, 5)], ids=["vector", "batch", "sequence"])
def test_linear_grad_matches_finite_differences(shape):
    rng = np.random.default_rng(0)
    layer = Linear(5, 4, dtype=np.float64, seed=1)
    x = rng.standard_normal(shape)
    weights = rng.standard_normal(shape[:-1] + (4,))

    def loss():
        return float(np.sum(layer(x) * weights))

    loss()
    d_x = layer.backward(weights)
    np.testing.assert_allclose(d_x, numeric_grad(loss, x), rtol=1e-7, atol=1e-9)
    for name in ("weight", "bias"):
        expected = numeric_grad(loss, layer.params[name])
        np.testing.assert_allclose(layer.grads[name], expected, rtol=1e-7, atol=1e-9)


def test_linear_backward_accumulates_until_zero_grad():
    layer = Linear(3, 2, dtype=np.float64, seed=0)
    x = np.ones((4, 3))
    d_y = np.ones((4, 2))
    layer(x)
    layer.backward(d_y)
    once = layer.grads["weight"].copy()
    layer.backward(d_y)
    np.testing.assert_allclose(layer.grads["weight"], 2 * once)
    layer.zero_grad()
    assert not layer.grads["weight"].any() and not layer.grads["bias"].any()


def test_linear_matches_torch_forward_and_backward_float32():
    torch = pytest.importorskip("torch")
    layer = Linear(6, 3, seed=2)
    reference = torch.nn.Linear(6, 3)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(layer.weight))
        reference.bias.copy_(torch.from_numpy(layer.bias))
    x = np.random.default_rng(3).standard_normal((5, 2, 6)).astype(np.float32)
    d_y = np.random.default_rng(4).standard_normal((5, 2, 3)).astype(np.float32)
    x_t = torch.from_numpy(x).requires_grad_()
    y_t = reference(x_t)
    y_t.backward(torch.from_numpy(d_y))
    y = layer(x)
    d_x = layer.backward(d_y)
    np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_x, x_t.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.grads["weight"], reference.weight.grad.numpy(), rtol=1e-4)
    np.testing.assert_allclose(layer.grads["bias"], reference.bias.grad.numpy(), rtol=1e-4)


def test_linear_init_follows_torch_bounds_and_names():
    layer = Linear(100, 50, seed=0)
    assert layer.weight.shape == (50, 100) and layer.bias.shape == (50,)
    assert layer.weight.dtype == np.float32
    assert list(layer.state_dict()) == ["weight", "bias"]
    bound = 1 / np.sqrt(100)
    assert np.abs(layer.weight).max() <= bound and np.abs(layer.bias).max() <= bound
    # A uniform(-b, b) sample of 5000 values fills most of its range.
    assert np.abs(layer.weight).max() > 0.95 * bound
    assert np.array_equal(Linear(100, 50, seed=0).weight, layer.weight)


def test_linear_without_bias_has_only_weight():
    layer = Linear(3, 2, bias=False, dtype=np.float64, seed=0)
    assert list(layer.params) == ["weight"]
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(layer(x), x @ layer.weight.T)
    layer.backward(np.ones((2, 2)))
    np.testing.assert_allclose(layer.grads["weight"], np.ones((2, 2)).T @ x)


def test_linear_keeps_no_tape_in_eval_mode_or_under_no_grad():
    layer = Linear(3, 2, seed=0)
    layer.eval()
    layer(np.ones((1, 3), np.float32))
    with pytest.raises(RuntimeError, match="training mode"):
        layer.backward(np.ones((1, 2), np.float32))
    layer.train()
    with no_grad():
        layer(np.ones((1, 3), np.float32))
    with pytest.raises(RuntimeError, match="training mode"):
        layer.backward(np.ones((1, 2), np.float32))


def test_linear_tape_is_not_changed_by_caller_reusing_input_buffer():
    layer = Linear(2, 1, dtype=np.float64, seed=0)
    x = np.ones((1, 2))
    layer(x)
    x[...] = 100.0
    layer.backward(np.ones((1, 1)))
    np.testing.assert_allclose(layer.grads["weight"], [[1.0, 1.0]])


def test_linear_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="forward"):
        Linear(3, 2).backward(np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="in_features"):
        Linear(0, 2)
    with pytest.raises(TypeError, match="out_features"):
        Linear(3, 2.5)
    with pytest.raises(TypeError, match="dtype"):
        Linear(3, 2, dtype=np.int32)
    with pytest.raises(TypeError, match="seed"):
        Linear(3, 2, seed="1")
    layer = Linear(3, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\)"):
        layer(np.ones((4, 2), np.float32))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        layer(np.ones((4, 3), np.int64))
    layer(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"d_y must have shape \(4, 2\)"):
        layer.backward(np.ones((4, 3), np.float32))


def test_embedding_grad_matches_finite_differences_with_repeated_indices():
    rng = np.random.default_rng(0)
    layer = Embedding(6, 3, dtype=np.float64, seed=1)
    indices = np.array([[0, 2, 2], [5, 0, 2]])
    weights = rng.standard_normal((2, 3, 3))

    def loss():
        return float(np.sum(layer(indices) * weights))

    loss()
    layer.backward(weights)
    expected = numeric_grad(loss, layer.params["weight"])
    np.testing.assert_allclose(layer.grads["weight"], expected, rtol=1e-7, atol=1e-9)
    # Index 2 appears three times: its row collects the sum of three output gradients.
    np.testing.assert_allclose(layer.grads["weight"][2], weights[0, 1] + weights[0, 2]
                               + weights[1, 2])
    assert not layer.grads["weight"][[1, 3, 4]].any()


def test_embedding_matches_torch_lookup_and_grad():
    torch = pytest.importorskip("torch")
    layer = Embedding(10, 4, seed=0)
    reference = torch.nn.Embedding(10, 4)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(layer.weight))
    indices = np.random.default_rng(1).integers(0, 10, size=(7, 3))
    d_y = np.random.default_rng(2).standard_normal((7, 3, 4)).astype(np.float32)
    out_t = reference(torch.from_numpy(indices))
    out_t.backward(torch.from_numpy(d_y))
    np.testing.assert_array_equal(layer(indices), out_t.detach().numpy())
    layer.backward(d_y)
    np.testing.assert_allclose(layer.grads["weight"], reference.weight.grad.numpy(), rtol=1e-5,
                               atol=1e-6)


def test_embedding_grad_accumulates_like_add_at_and_ignores_empty_batches():
    rng = np.random.default_rng(3)
    layer = Embedding(50, 8, dtype=np.float64, seed=0)
    expected = np.zeros((50, 8))
    for shape in ((64, 32), (0, 4), (), (5,)):
        indices = rng.integers(0, 50, size=shape)
        d_y = rng.standard_normal(shape + (8,))
        layer(indices)
        layer.backward(d_y)
        np.add.at(expected, indices.reshape(-1), d_y.reshape(-1, 8))
        np.testing.assert_allclose(layer.grads["weight"], expected, rtol=1e-12, atol=1e-12)


def test_embedding_init_is_standard_normal():
    weight = Embedding(1000, 50, dtype=np.float64, seed=0).weight
    assert weight.shape == (1000, 50)
    assert abs(weight.mean()) < 0.02 and abs(weight.std() - 1) < 0.02


def test_embedding_rejects_bad_indices_and_backward_before_forward():
    layer = Embedding(5, 2)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\), found 5"):
        layer(np.array([0, 5]))
    with pytest.raises(ValueError, match="found -1"):
        layer(np.array([-1]))
    with pytest.raises(TypeError, match="indices must hold integers"):
        layer(np.array([0.0, 1.0]))
    layer(np.array([[1, 2]]))
    with pytest.raises(ValueError, match=r"d_y must have shape \(1, 2, 2\)"):
        layer.backward(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="embedding_dim"):
        Embedding(5, 0)


def test_one_hot_sets_one_entry_per_index():
    encoded = one_hot(np.array([[2, 0], [1, 2]]), 3, dtype=np.float64)
    assert encoded.shape == (2, 2, 3) and encoded.dtype == np.float64
    np.testing.assert_array_equal(encoded.argmax(-1), [[2, 0], [1, 2]])
    np.testing.assert_array_equal(encoded.sum(-1), np.ones((2, 2)))
    assert one_hot(1, 4).tolist() == [0, 1, 0, 0]


def test_one_hot_matches_torch():
    torch = pytest.importorskip("torch")
    indices = np.random.default_rng(0).integers(0, 7, size=(4, 5))
    expected = torch.nn.functional.one_hot(torch.from_numpy(indices), 7).numpy()
    np.testing.assert_array_equal(one_hot(indices, 7, dtype=np.int64), expected)


def test_one_hot_rejects_out_of_range_and_bad_class_count():
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\), found 3"):
        one_hot(np.array([3]), 3)
    with pytest.raises(ValueError, match="num_classes"):
        one_hot(np.array([0]), 0)
    with pytest.raises(TypeError, match="indices must hold integers"):
        one_hot(np.array([True]), 2)


@pytest.mark.parametrize("make", [lambda: Linear(3, 2, seed=-1), lambda: Embedding(3, 2, seed=-1)])
def test_layers_name_a_negative_seed(make):
    with pytest.raises(ValueError, match="seed: expected None or a non-negative int"):
        make()


@pytest.mark.parametrize("make", [lambda d: Linear(3, 2, dtype=d),
                                  lambda d: Embedding(3, 2, dtype=d)])
def test_layers_take_dtypes_as_the_recurrent_modules_do(make):
    with pytest.raises(TypeError, match="dtype: expected float32 or float64, got None"):
        make(None)                                  # not NumPy's float64 default
    assert make(">f4").dtype == np.float32          # big-endian spelled, native stored


@pytest.mark.parametrize("make", [lambda: Linear(2**40, 2**40), lambda: Embedding(2**62, 2),
                                  lambda: one_hot([0, 1], 2**62)])
def test_layers_refuse_sizes_beyond_the_machines_memory_by_name(make):
    with pytest.raises(ValueError, match=r"(Linear|Embedding|one_hot)\(.* would hold [\d,]+ "
                                         r"numbers, .* GiB: more than this machine's"):
        make()


def test_linear_names_a_bias_that_is_not_a_bool():
    with pytest.raises(TypeError, match="bias: expected a bool"):
        Linear(3, 2, bias="yes")


@pytest.mark.parametrize("bias", [True, False])
def test_linear_cpp_backend_matches_numpy_backend(bias):
    from pyrnn import _backend

    if not _backend.cpp_available():
        pytest.skip("the C++ extension is not built")
    layers = [Linear(7, 5, bias=bias, seed=3, backend=b) for b in ("cpp", "numpy")]
    x = np.random.default_rng(0).standard_normal((6, 4, 7)).astype(np.float32)
    d_y = np.random.default_rng(1).standard_normal((6, 4, 5)).astype(np.float32)
    outs = [layer(x) for layer in layers]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    dxs = [layer.backward(d_y) for layer in layers]
    np.testing.assert_allclose(dxs[0], dxs[1], rtol=1e-5, atol=1e-6)
    for name in layers[0].grads:
        np.testing.assert_allclose(layers[0].grads[name], layers[1].grads[name], rtol=1e-5,
                                   atol=1e-5)
    assert "backend='cpp'" in repr(layers[0]) and "backend='numpy'" in repr(layers[1])


def test_linear_adds_into_grads_it_cannot_hand_to_the_kernel():
    layer = Linear(3, 2, dtype=np.float64, seed=0)
    strided = np.zeros((3, 2)).T  # the right shape, but not C-contiguous
    layer.grads["weight"] = strided
    x = np.random.default_rng(0).standard_normal((4, 3))
    d_y = np.random.default_rng(1).standard_normal((4, 2))
    layer(x)
    layer.backward(d_y)
    layer(x)
    layer.backward(d_y)
    np.testing.assert_allclose(strided, 2 * d_y.T @ x, rtol=1e-12)
    np.testing.assert_allclose(layer.grads["bias"], 2 * d_y.sum(axis=0), rtol=1e-12)


def test_linear_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        Linear(3, 2, backend="gpu")
