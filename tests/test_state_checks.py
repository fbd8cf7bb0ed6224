"""State that would silently turn into inf or nan is refused: state dicts of modules and
optimizers, and gradient arrays a user replaced before a backward pass."""

import numpy as np
import pytest

import pyrnn
from pyrnn.layers import Embedding, Linear
from pyrnn.module import Module
from pyrnn.optim import SGD, Adagrad, Adam, RMSprop


class Small(Module):
    def __init__(self, seed=0):
        super().__init__()
        self.embed = Embedding(5, 3, seed=seed)
        self.rnn = pyrnn.GRU(3, 4, seed=seed + 1)
        self.head = Linear(4, 2, seed=seed + 2)


def trained(optimizer_class, steps=2, **hyperparams):
    model = Small()
    optimizer = optimizer_class(model, **hyperparams)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        for _, _, grad in model.named_parameters():
            grad[...] = rng.standard_normal(grad.shape)
        optimizer.step()
    return model, optimizer


# ------------------------------------------------------------------ module state dicts

def test_load_state_dict_refuses_float64_values_that_overflow_float32():
    model = Small()
    state = {name: value.astype(np.float64) for name, value in model.state_dict().items()}
    state["head.weight"][0, 1] = 1e300
    before = model.state_dict()
    with pytest.raises(ValueError, match=r"state_dict\['head.weight'\] holds values in "
                                         r"\[.*, 1e\+300\], beyond float32's"):
        model.load_state_dict(state)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])  # nothing half-loaded


def test_load_state_dict_still_takes_float64_values_that_fit_and_keeps_inf_as_given():
    model = Small()
    state = {name: value.astype(np.float64) for name, value in model.state_dict().items()}
    state["head.bias"][:] = [3e38, -np.inf]  # 3e38 fits float32; an inf given stays an inf
    model.load_state_dict(state)
    assert model.head.bias[0] == np.float32(3e38) and model.head.bias[1] == -np.inf


# ------------------------------------------------------------------ optimizer state dicts

@pytest.mark.parametrize("optimizer_class, hyperparams, buffer", [
    (Adam, {}, "exp_avg_sq"),
    (Adam, {"amsgrad": True}, "max_exp_avg_sq"),
    (Adagrad, {}, "sum"),
    (RMSprop, {}, "square_avg"),
])
def test_negative_squared_gradient_buffers_are_refused(optimizer_class, hyperparams, buffer):
    model, optimizer = trained(optimizer_class, **hyperparams)
    state = optimizer.state_dict()
    state["state"]["rnn.weight_hh_l0"][buffer][0, 0] = -1.0
    fresh = optimizer_class(model, **hyperparams)
    with pytest.raises(ValueError, match=f"rnn.weight_hh_l0/{buffer}' holds negative values"):
        fresh.load_state_dict(state)
    assert fresh.step_count == 0


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e300])
@pytest.mark.parametrize("optimizer_class, hyperparams, buffer", [
    (Adam, {}, "exp_avg"),
    (SGD, {"lr": 0.1, "momentum": 0.9}, "momentum_buffer"),
    (RMSprop, {"centered": True}, "grad_avg"),
])
def test_non_finite_or_overflowing_buffers_are_refused(optimizer_class, hyperparams, buffer,
                                                      value):
    model, optimizer = trained(optimizer_class, **hyperparams)
    state = optimizer.state_dict()
    state["state"]["head.bias"][buffer] = state["state"]["head.bias"][buffer].astype(np.float64)
    state["state"]["head.bias"][buffer][0] = value
    with pytest.raises(ValueError, match=f"head.bias/{buffer}' holds"):
        optimizer_class(model, **hyperparams).load_state_dict(state)


def test_adam_state_refused_when_its_buffers_and_step_disagree():
    model, optimizer = trained(Adam)
    state = optimizer.state_dict()
    del state["state"]["head.weight"]["exp_avg_sq"]  # the next step would divide by sqrt(0)
    with pytest.raises(KeyError, match=r"'head.weight'\] lacks \['exp_avg_sq'\] at step 2"):
        Adam(model).load_state_dict(state)
    state = optimizer.state_dict()
    state["step"] = 0
    with pytest.raises(ValueError, match="at step 0"):
        Adam(model).load_state_dict(state)


def test_infinite_hyperparameters_are_refused():
    model, optimizer = trained(Adam)
    state = optimizer.state_dict()
    state["hyperparams"]["lr"] = float("inf")
    with pytest.raises(ValueError, match="lr must be finite"):
        Adam(model).load_state_dict(state)
    with pytest.raises(ValueError, match="weight_decay must be finite"):
        SGD(model, lr=0.1, weight_decay=float("inf"))


def test_a_refused_adam_state_would_have_put_nan_into_the_parameters():
    """The case from the issue: why a negative exp_avg_sq must be refused."""
    model, optimizer = trained(Adam)
    state = optimizer.state_dict()
    state["state"]["head.weight"]["exp_avg_sq"][...] = -1.0
    optimizer.state = {name: dict(buffers) for name, buffers in state["state"].items()}
    with np.errstate(invalid="ignore"):
        optimizer.step()
    assert np.isnan(model.head.weight).any()
    with pytest.raises(ValueError, match="negative"):
        Adam(Small()).load_state_dict(state)


def test_a_valid_state_still_round_trips():
    for optimizer_class, hyperparams in ((Adam, {"amsgrad": True}), (Adagrad, {}),
                                         (RMSprop, {"centered": True, "momentum": 0.5}),
                                         (SGD, {"lr": 0.1, "momentum": 0.9})):
        model, optimizer = trained(optimizer_class, **hyperparams)
        fresh = optimizer_class(model, **hyperparams)
        fresh.load_state_dict(optimizer.state_dict())
        assert fresh.step_count == 2
    Adam(Small()).load_state_dict(Adam(Small()).state_dict())  # step 0: no buffers yet


# ------------------------------------------------------------------ replaced gradient arrays

def broken_grads(module, name):
    grad = module.grads[name]
    read_only = grad.copy()
    read_only.flags.writeable = False
    return {
        "read-only": (read_only, ValueError, "read-only"),
        "wrong shape": (np.zeros((2, *grad.shape), grad.dtype), ValueError, "expected float32"),
        "wrong dtype": (grad.astype(np.float64), ValueError, "got float64"),
        "not an array": (grad.tolist(), TypeError, "expected a numpy array"),
    }


def run_rnn(module):
    x = np.random.default_rng(0).standard_normal((3, 2, 3)).astype(np.float32)
    out, _ = module(x)
    return lambda: module.backward(np.ones_like(out))


def run_linear(module):
    out = module(np.ones((3, 4), np.float32))
    return lambda: module.backward(np.ones_like(out))


def run_embedding(module):
    out = module(np.array([[0, 1], [1, 4]]))
    return lambda: module.backward(np.ones_like(out))


@pytest.mark.parametrize("kind", ["read-only", "wrong shape", "wrong dtype", "not an array"])
@pytest.mark.parametrize("make, run, name", [
    (lambda: pyrnn.LSTM(3, 4, num_layers=2, seed=0), run_rnn, "bias_hh_l1"),
    (lambda: pyrnn.GRU(3, 4, bidirectional=True, seed=0), run_rnn, "weight_hh_l0_reverse"),
    (lambda: Linear(4, 2, seed=0), run_linear, "bias"),
    (lambda: Embedding(5, 3, seed=0), run_embedding, "weight"),
], ids=["lstm", "gru", "linear", "embedding"])
def test_backward_into_a_replaced_grads_entry_raises_before_adding_anything(make, run, name,
                                                                            kind):
    module = make()
    reference = make()
    run(reference)()
    original = module.grads[name]
    bad, error, message = broken_grads(module, name)[kind]
    backward = run(module)
    module.grads[name] = bad
    with pytest.raises(error, match=rf"grads\['{name}'\]: .*{message}"):
        backward()
    for other, grad in module.grads.items():
        if other != name:
            assert not grad.any(), f"{other} got a gradient before backward raised"
    module.grads[name] = original
    backward()  # the retry adds each gradient once
    for other, grad in module.grads.items():
        np.testing.assert_array_equal(grad, reference.grads[other])
