"""cross_entropy and mse: finite differences and PyTorch parity (values and gradients)."""

import numpy as np
import pytest

from pyrnn.losses import cross_entropy, log_softmax, mse, softmax


def numeric_grad(loss, array, eps=1e-6):
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


def sequence_case(seed=0, dtype=np.float64):
    """(T, B, C) logits and (T, B) targets with some ignored and some masked positions."""
    rng = np.random.default_rng(seed)
    logits = (3 * rng.standard_normal((4, 3, 5))).astype(dtype)
    targets = rng.integers(0, 5, size=(4, 3))
    targets[3, 0] = targets[2, 1] = -100
    mask = np.ones((4, 3), dtype=bool)
    mask[3, 2] = mask[0, 1] = False
    return logits, targets, mask


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("use_mask", [False, True], ids=["ignore_index", "ignore_index+mask"])
def test_cross_entropy_grad_matches_finite_differences(reduction, use_mask):
    logits, targets, mask = sequence_case()
    kwargs = {"mask": mask if use_mask else None, "reduction": reduction}
    _, d_logits = cross_entropy(logits, targets, **kwargs)

    def loss():
        return cross_entropy(logits, targets, **kwargs)[0]

    np.testing.assert_allclose(d_logits, numeric_grad(loss, logits), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cross_entropy_matches_torch_with_ignore_index(reduction, dtype):
    torch = pytest.importorskip("torch")
    logits, targets, _ = sequence_case(1, dtype)
    loss, d_logits = cross_entropy(logits, targets, reduction=reduction)
    logits_t = torch.from_numpy(logits.copy()).requires_grad_()
    # torch wants the classes on axis 1: flatten the (T, B) positions into N.
    loss_t = torch.nn.functional.cross_entropy(
        logits_t.reshape(-1, 5), torch.from_numpy(targets).reshape(-1), reduction=reduction
    )
    loss_t.sum().backward()
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == np.float64 else {"rtol": 1e-4, "atol": 1e-6}
    expected = loss_t.detach().numpy().reshape(targets.shape) if reduction == "none" else \
        loss_t.item()
    np.testing.assert_allclose(loss, expected, **tol)
    np.testing.assert_allclose(d_logits, logits_t.grad.numpy(), **tol)
    assert d_logits.dtype == dtype


def test_cross_entropy_mask_equals_ignoring_the_masked_targets():
    logits, targets, mask = sequence_case(2)
    ignored = np.where(mask, targets, -100)
    for reduction in ("mean", "sum"):
        masked = cross_entropy(logits, targets, mask=mask, reduction=reduction)
        by_index = cross_entropy(logits, ignored, reduction=reduction)
        assert masked[0] == pytest.approx(by_index[0], rel=1e-12)
        np.testing.assert_allclose(masked[1], by_index[1], rtol=1e-12)


def test_cross_entropy_mean_divides_by_counted_positions():
    logits, targets, mask = sequence_case(3)
    total, _ = cross_entropy(logits, targets, mask=mask, reduction="sum")
    mean, _ = cross_entropy(logits, targets, mask=mask)
    counted = int(((targets != -100) & mask).sum())
    assert counted == 8
    assert mean == pytest.approx(total / counted, rel=1e-12)


def test_cross_entropy_all_positions_ignored_gives_zero_loss_and_grads():
    logits = np.random.default_rng(0).standard_normal((2, 3, 4))
    targets = np.full((2, 3), -100)
    for reduction in ("mean", "sum"):
        loss, d_logits = cross_entropy(logits, targets, reduction=reduction)
        assert loss == 0.0
        assert not d_logits.any()


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 1e4, 0.0]])
    loss, d_logits = cross_entropy(logits, np.array([0, 0]), reduction="none")
    np.testing.assert_allclose(loss, [0.0, 1e4])
    assert np.isfinite(d_logits).all()
    np.testing.assert_allclose(d_logits, [[0, 0, 0], [-1, 1, 0]], atol=1e-12)


def test_cross_entropy_on_a_single_vector():
    logits = np.array([1.0, 2.0, 3.0])
    loss, d_logits = cross_entropy(logits, np.array(2))
    probs = np.exp(logits) / np.exp(logits).sum()
    assert loss == pytest.approx(-np.log(probs[2]))
    np.testing.assert_allclose(d_logits, probs - [0, 0, 1])


def test_cross_entropy_rejects_bad_inputs():
    logits = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\).*found 3"):
        cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(ValueError, match=r"targets must have shape \(2,\)"):
        cross_entropy(logits, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="targets must hold integer"):
        cross_entropy(logits, np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        cross_entropy(np.zeros((2, 3), int), np.array([0, 1]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy(logits, np.array([0, 1]), reduction="avg")
    with pytest.raises(ValueError, match=r"mask must have the targets' shape \(2,\)"):
        cross_entropy(logits, np.array([0, 1]), mask=np.ones(3, bool))
    with pytest.raises(TypeError, match="mask must be boolean"):
        cross_entropy(logits, np.array([0, 1]), mask=np.array([0.5, 1.0]))
    # An out-of-range target is fine where it is masked out.
    cross_entropy(logits, np.array([0, 7]), mask=np.array([True, False]))


def test_softmax_and_log_softmax_agree_with_torch():
    torch = pytest.importorskip("torch")
    x = 10 * np.random.default_rng(0).standard_normal((3, 4, 5))
    for axis in (-1, 0, 1):
        np.testing.assert_allclose(softmax(x, axis), torch.softmax(torch.from_numpy(x), axis),
                                   rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(log_softmax(x, axis),
                                   torch.log_softmax(torch.from_numpy(x), axis), rtol=1e-12)
    with pytest.raises(ValueError, match="axis must lie in"):
        softmax(x, 3)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_grad_matches_finite_differences(reduction):
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((3, 2, 4))
    target = rng.standard_normal((3, 2, 4))
    _, d_pred = mse(pred, target, reduction)
    expected = numeric_grad(lambda: mse(pred, target, reduction)[0], pred)
    np.testing.assert_allclose(d_pred, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_matches_torch(reduction):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    pred = rng.standard_normal((5, 3))
    target = rng.standard_normal((5, 3))
    loss, d_pred = mse(pred, target, reduction)
    pred_t = torch.from_numpy(pred.copy()).requires_grad_()
    loss_t = torch.nn.functional.mse_loss(pred_t, torch.from_numpy(target), reduction=reduction)
    loss_t.sum().backward()
    np.testing.assert_allclose(loss, loss_t.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(d_pred, pred_t.grad.numpy(), rtol=1e-12)


def test_mse_rejects_mismatched_shapes_and_types():
    with pytest.raises(ValueError, match=r"target must have pred's shape \(2, 3\)"):
        mse(np.zeros((2, 3)), np.zeros((3,)))
    with pytest.raises(TypeError, match="pred must be a floating-point"):
        mse(np.zeros(3, int), np.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        mse(np.zeros(3), np.zeros(3), "max")


def test_mean_gradients_stay_finite_in_float16_past_65504_positions():
    n = 70_000  # more positions than float16's largest finite value: the count is kept in float64
    _, d_logits = cross_entropy(np.zeros((n, 2), np.float16), np.zeros(n, np.int64))
    assert d_logits.dtype == np.float16
    np.testing.assert_allclose(d_logits[0].astype(np.float64), [-0.5 / n, 0.5 / n], rtol=1e-2)
    _, d_pred = mse(np.ones(n, np.float16), np.zeros(n, np.float16))
    np.testing.assert_allclose(d_pred[0].astype(np.float64), 2 / n, rtol=1e-2)


def test_softmax_over_an_empty_axis_is_empty_and_cross_entropy_needs_a_class():
    assert softmax(np.ones((2, 0))).shape == (2, 0)
    assert log_softmax(np.ones((0, 3)), axis=0).shape == (0, 3)
    with pytest.raises(ValueError, match="at least one class"):
        cross_entropy(np.zeros((2, 0)), np.array([-100, -100]))
