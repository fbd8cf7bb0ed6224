"""Optimizers and gradient clipping: step-for-step parity with torch.optim, state dicts, checks."""

import json

import numpy as np
import pytest

from pyrnn.layers import Embedding, Linear
from pyrnn.module import Module
from pyrnn.optim import SGD, Adagrad, Adam, RMSprop, clip_grad_norm, clip_grad_value

torch = pytest.importorskip("torch")

STEPS = 10


class TwoLayers(Module):
    """A tiny model with child modules, so parameter names are dotted."""

    def __init__(self, dtype=np.float64, seed=0):
        super().__init__()
        self.embed = Embedding(6, 4, dtype=dtype, seed=seed)
        self.head = Linear(4, 3, dtype=dtype, seed=seed + 1)


def random_grads(model, steps, seed=0):
    """One dict of gradients per step, some entries large so clipping and maxima matter."""
    rng = np.random.default_rng(seed)
    return [
        {name: (rng.standard_normal(value.shape) * rng.choice([0.1, 1, 10])).astype(value.dtype)
         for name, value, _ in model.named_parameters()}
        for _ in range(steps)
    ]


def torch_params(model):
    return {name: torch.tensor(value.copy(), requires_grad=True)
            for name, value, _ in model.named_parameters()}


def run_pyrnn(optimizer, model, grads):
    for step_grads in grads:
        for name, _, grad in model.named_parameters():
            grad[...] = step_grads[name]
        optimizer.step()


def run_torch(optimizer, params, grads):
    for step_grads in grads:
        for name, param in params.items():
            param.grad = torch.from_numpy(step_grads[name].copy())
        optimizer.step()


def assert_same_params(model, params, rtol=1e-12, atol=1e-14):
    for name, value, _ in model.named_parameters():
        np.testing.assert_allclose(value, params[name].detach().numpy(), rtol=rtol, atol=atol,
                                   err_msg=name)


CASES = [
    (SGD, torch.optim.SGD, {"lr": 0.1}),
    (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}),
    (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (SGD, torch.optim.SGD, {"lr": 0.05, "weight_decay": 0.1}),
    (SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.1, "nesterov": True}),
    (Adagrad, torch.optim.Adagrad, {}),
    (Adagrad, torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.05}),
    (Adagrad, torch.optim.Adagrad, {"weight_decay": 0.1, "initial_accumulator_value": 0.5}),
    (Adagrad, torch.optim.Adagrad,
     {"lr": 0.5, "lr_decay": 0.01, "weight_decay": 0.01, "initial_accumulator_value": 0.1,
      "eps": 1e-3}),
    (RMSprop, torch.optim.RMSprop, {}),
    (RMSprop, torch.optim.RMSprop, {"momentum": 0.9}),
    (RMSprop, torch.optim.RMSprop, {"centered": True}),
    (RMSprop, torch.optim.RMSprop, {"alpha": 0.3, "eps": 1e-4}),
    (RMSprop, torch.optim.RMSprop,
     {"lr": 0.001, "centered": True, "momentum": 0.9, "weight_decay": 0.1}),
    (Adam, torch.optim.Adam, {}),
    (Adam, torch.optim.Adam, {"amsgrad": True}),
    (Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}),
    (Adam, torch.optim.Adam, {"betas": (0.3, 0.5)}),
    (Adam, torch.optim.Adam,
     {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05, "amsgrad": True}),
]


def case_id(case):
    cls, _, options = case
    return cls.__name__ + "".join(f"-{key}={value}" for key, value in options.items())


@pytest.mark.parametrize("case", CASES, ids=[case_id(case) for case in CASES])
def test_optimizer_matches_torch_step_for_step_float64(case):
    cls, torch_cls, options = case
    model = TwoLayers()
    params = torch_params(model)
    optimizer = cls(model, **options)
    reference = torch_cls(list(params.values()), foreach=False, **options)
    for step_grads in random_grads(model, STEPS):
        run_pyrnn(optimizer, model, [step_grads])
        run_torch(reference, params, [step_grads])
        assert_same_params(model, params)


@pytest.mark.parametrize("case", CASES, ids=[case_id(case) for case in CASES])
def test_optimizer_state_dict_mid_run_continues_identically(case):
    cls, torch_cls, options = case
    model = TwoLayers()
    params = torch_params(model)
    grads = random_grads(model, STEPS, seed=1)
    reference = torch_cls(list(params.values()), foreach=False, **options)
    run_torch(reference, params, grads)

    first = cls(model, **options)
    run_pyrnn(first, model, grads[:4])
    saved_model, saved_optimizer = model.state_dict(), first.state_dict()
    json.dumps({key: value for key, value in saved_optimizer.items() if key != "state"})

    # A fresh model and optimizer (other hyper-parameters) restored from the state dicts.
    resumed_model = TwoLayers(seed=5)
    resumed_model.load_state_dict(saved_model)
    resumed = cls(resumed_model, lr=0.5)
    resumed.load_state_dict(saved_optimizer)
    run_pyrnn(first, model, grads[4:7])  # the saved dict must not alias the live buffers
    run_pyrnn(resumed, resumed_model, grads[4:])
    assert resumed.step_count == STEPS
    assert_same_params(resumed_model, params)


def test_adam_matches_torch_in_float32():
    model = TwoLayers(dtype=np.float32)
    params = torch_params(model)
    grads = random_grads(model, STEPS, seed=2)
    run_pyrnn(Adam(model, lr=0.01, amsgrad=True, weight_decay=0.01), model, grads)
    run_torch(torch.optim.Adam(list(params.values()), lr=0.01, amsgrad=True,
                               weight_decay=0.01, foreach=False), params, grads)
    assert model.head.weight.dtype == np.float32
    assert_same_params(model, params, rtol=1e-4, atol=1e-6)


def test_optimizer_leaves_gradients_unchanged_and_zero_grad_clears_them():
    model = TwoLayers()
    optimizer = SGD(model, lr=0.1, weight_decay=0.5, momentum=0.9)
    model.head.grads["weight"][...] = 1.0
    optimizer.step()
    assert (model.head.grads["weight"] == 1.0).all()
    optimizer.zero_grad()
    assert all(not grad.any() for _, _, grad in model.named_parameters())


def test_optimizer_accepts_a_list_of_modules_with_indexed_names():
    encoder, decoder = Linear(3, 4, dtype=np.float64, seed=0), Linear(4, 2, dtype=np.float64,
                                                                       seed=1)
    optimizer = Adam([encoder, decoder], lr=0.1)
    assert optimizer.param_names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    before, encoder_before = decoder.weight.copy(), encoder.weight.copy()
    decoder.grads["weight"][...] = 1.0
    optimizer.step()
    # Adam's first step is lr * g / (|g| + eps): lr up to eps.
    np.testing.assert_allclose(decoder.weight, before - 0.1, atol=1e-8)
    np.testing.assert_array_equal(encoder.weight, encoder_before)  # zero gradient, no move


def test_optimizer_state_dict_is_plain_and_keyed_by_parameter_name():
    model = TwoLayers()
    optimizer = RMSprop(model, momentum=0.5, centered=True)
    run_pyrnn(optimizer, model, random_grads(model, 2))
    state = optimizer.state_dict()
    assert state["type"] == "RMSprop" and state["step"] == 2
    assert json.loads(json.dumps(state["hyperparams"]))["centered"] is True
    assert list(state["state"]) == ["embed.weight", "head.weight", "head.bias"]
    assert set(state["state"]["head.bias"]) == {"square_avg", "momentum_buffer", "grad_avg"}
    assert all(isinstance(array, np.ndarray) for buffers in state["state"].values()
               for array in buffers.values())


def test_load_state_dict_rejects_mismatches_and_changes_nothing():
    model = TwoLayers()
    optimizer = Adam(model, lr=0.01)
    run_pyrnn(optimizer, model, random_grads(model, 2))
    good = optimizer.state_dict()
    target = Adam(TwoLayers(), lr=0.123)

    def broken(**changes):
        state = {**good, "state": {name: dict(buffers) for name, buffers in good["state"].items()}}
        state.update(changes)
        return state

    wrong_shape = broken()
    wrong_shape["state"]["head.bias"]["exp_avg"] = np.zeros(5)
    unknown_buffer = broken()
    unknown_buffer["state"]["head.bias"]["velocity"] = np.zeros(3)
    missing_param = broken()
    del missing_param["state"]["embed.weight"]
    cases = [
        (broken(type="SGD"), ValueError, "for 'SGD', not 'Adam'"),
        (broken(hyperparams={"lr": 0.1}), KeyError, "missing"),
        (broken(hyperparams={**good["hyperparams"], "lr": -1.0}), ValueError, "lr must lie"),
        (broken(step=-3), ValueError, "step"),
        (wrong_shape, ValueError, r"head.bias/exp_avg.*shape \(5,\)"),
        (unknown_buffer, KeyError, "velocity"),
        (missing_param, KeyError, "embed.weight"),
        ([1, 2], TypeError, "mapping"),
    ]
    for state, error, message in cases:
        with pytest.raises(error, match=message):
            target.load_state_dict(state)
        assert target.lr == 0.123 and target.step_count == 0
        assert all(not buffers for buffers in target.state.values())


def test_optimizers_reject_bad_hyperparameters():
    model = TwoLayers()
    with pytest.raises(ValueError, match="lr must lie"):
        SGD(model, lr=-0.1)
    with pytest.raises(TypeError, match="lr must be a real number"):
        SGD(model, lr="fast")
    with pytest.raises(ValueError, match="nesterov=True requires momentum > 0"):
        SGD(model, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"betas\[1\] must lie in \[0.0, 1.0\)"):
        Adam(model, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="betas must be a pair"):
        Adam(model, betas=0.9)
    with pytest.raises(TypeError, match="amsgrad must be a bool"):
        Adam(model, amsgrad=1)
    with pytest.raises(ValueError, match="eps must lie"):
        RMSprop(model, eps=-1e-8)
    with pytest.raises(ValueError, match="lr_decay must lie"):
        Adagrad(model, lr_decay=-1)
    with pytest.raises(TypeError, match="model must be a pyrnn Module"):
        Adam({"w": np.zeros(3)})
    with pytest.raises(TypeError, match=r"model\[1\] must be a pyrnn Module"):
        Adam([model, "head"])
    with pytest.raises(ValueError, match="no parameters"):
        Adam(Module())
    with pytest.raises(ValueError, match="twice"):
        Adam([model.head, model.head])


def set_grads(model, grads):
    for name, _, grad in model.named_parameters():
        grad[...] = grads[name]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "keeps"])
def test_clip_grad_norm_matches_torch(norm_type, max_norm):
    model = TwoLayers()
    grads = random_grads(model, 1, seed=3)[0]
    set_grads(model, grads)
    params = torch_params(model)
    for name, param in params.items():
        param.grad = torch.from_numpy(grads[name].copy())
    total = clip_grad_norm(model, max_norm, norm_type)
    total_t = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm, norm_type,
                                             foreach=False)
    assert total == pytest.approx(total_t.item(), rel=1e-12)
    for name, _, grad in model.named_parameters():
        np.testing.assert_allclose(grad, params[name].grad.numpy(), rtol=1e-12, err_msg=name)
    if max_norm < total:
        assert not np.allclose(model.head.grads["weight"], grads["head.weight"])


def test_clip_grad_value_matches_torch():
    model = TwoLayers()
    grads = random_grads(model, 1, seed=4)[0]
    set_grads(model, grads)
    params = torch_params(model)
    for name, param in params.items():
        param.grad = torch.from_numpy(grads[name].copy())
    clip_grad_value(model, 0.7)
    torch.nn.utils.clip_grad_value_(list(params.values()), 0.7)
    for name, _, grad in model.named_parameters():
        np.testing.assert_array_equal(grad, params[name].grad.numpy())
    assert np.abs(model.head.grads["weight"]).max() == 0.7


def test_clip_functions_reject_bad_arguments():
    model = TwoLayers()
    with pytest.raises(ValueError, match="max_norm must lie"):
        clip_grad_norm(model, -1.0)
    with pytest.raises(ValueError, match="norm_type must be > 0"):
        clip_grad_norm(model, 1.0, 0)
    with pytest.raises(ValueError, match="clip_value must lie"):
        clip_grad_value(model, -0.1)
    with pytest.raises(TypeError, match="error_if_nonfinite"):  # checked with finite norms too
        clip_grad_norm(model, 1.0, error_if_nonfinite="yes")
    model.head.grads["bias"][0] = np.nan
    with pytest.raises(RuntimeError, match="nan"):
        clip_grad_norm(model, 1.0, error_if_nonfinite=True)


class TinyLanguageModel(Module):
    """Embedding -> LSTM -> Linear, the shape of a character-level language model."""

    def __init__(self, lstm_cls, backend, vocab=7, embed=5, hidden=6):
        super().__init__()
        self.embed = Embedding(vocab, embed, dtype=np.float64, seed=0)
        self.rnn = lstm_cls(embed, hidden, dtype=np.float64, seed=1, backend=backend)
        self.head = Linear(hidden, vocab, dtype=np.float64, seed=2)


def torch_language_model(model):
    vocab, embed = model.embed.weight.shape
    hidden = model.head.weight.shape[1]
    modules = torch.nn.ModuleDict({
        "embed": torch.nn.Embedding(vocab, embed),
        "rnn": torch.nn.LSTM(embed, hidden),
        "head": torch.nn.Linear(hidden, vocab),
    }).double()
    with torch.no_grad():
        for name, param in modules.named_parameters():
            param.copy_(torch.from_numpy(model.state_dict()[name]))
    return modules


@pytest.mark.parametrize("backend", ["numpy", "cpp"])
def test_lstm_language_model_trained_with_adam_and_truncated_bptt_matches_torch(backend):
    """Four chunks of truncated BPTT (final state carried, history dropped), cross-entropy with
    ignored targets, gradient clipping and Adam: the same losses and weights as PyTorch."""
    modules = pytest.importorskip("pyrnn.modules")
    from pyrnn._backend import cpp_available
    from pyrnn.losses import cross_entropy

    if backend == "cpp" and not cpp_available():
        pytest.skip("the C++ extension is not built")
    model = TinyLanguageModel(modules.LSTM, backend)
    reference = torch_language_model(model)
    optimizer = Adam(model, lr=0.05)
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=0.05, foreach=False)
    rng = np.random.default_rng(0)
    state, reference_state = None, None
    for _ in range(4):
        tokens = rng.integers(0, 7, size=(5, 3))
        targets = rng.integers(0, 7, size=(5, 3))
        targets[0, 1] = -100

        out, (h_n, c_n) = model.rnn(model.embed(tokens), state)
        loss, d_logits = cross_entropy(model.head(out), targets)
        d_x, _ = model.rnn.backward(model.head.backward(d_logits), (None, None))
        model.embed.backward(d_x)
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        state = (h_n, c_n)

        out_t, (h_t, c_t) = reference["rnn"](reference["embed"](torch.from_numpy(tokens)),
                                             reference_state)
        loss_t = torch.nn.functional.cross_entropy(reference["head"](out_t).reshape(-1, 7),
                                                   torch.from_numpy(targets).reshape(-1))
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0, foreach=False)
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        reference_state = (h_t.detach(), c_t.detach())

        assert loss == pytest.approx(loss_t.item(), rel=1e-9)
    for name, param in reference.named_parameters():
        np.testing.assert_allclose(model.state_dict()[name], param.detach().numpy(), rtol=1e-9,
                                   atol=1e-12, err_msg=name)
