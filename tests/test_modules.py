"""Module behaviour beyond the numbers: gradient accumulation, modes, state dicts, seeds,
layouts, truncated BPTT, bias=False and repr, for both backends."""

from __future__ import annotations

import math

import numpy as np
import pytest

import pyrnn
from pyrnn import functional

T, B, I, H = 6, 3, 4, 5  # noqa: E741
CLASSES = {"rnn": pyrnn.RNN, "lstm": pyrnn.LSTM, "gru": pyrnn.GRU}


@pytest.fixture(params=list(CLASSES))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def make(kind: str, backend: str, **kwargs) -> pyrnn.Module:
    kwargs = {"dtype": np.float64, "seed": 0, "backend": backend, **kwargs}
    return CLASSES[kind](I, H, **kwargs)


def data(seed: int = 0, shape: tuple[int, ...] = (T, B, I)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def h_of(kind: str, state):
    return state[0] if kind == "lstm" else state


def step(m, kind: str, x: np.ndarray, d_out: np.ndarray):
    """Forward and backward with d_out and a random d_h_n; returns (out, dx)."""
    out, _ = m(x)
    d_h_n = data(99, (m.num_layers * m.num_directions, x.shape[1 - m.batch_first], H))
    dx, _ = m.backward(d_out, (d_h_n, None) if kind == "lstm" else d_h_n)
    return out, dx


# ------------------------------------------------------------------------------- gradients


def test_grads_accumulate_over_backward_calls_and_zero_grad_zeroes_them_in_place(kind, backend):
    m = make(kind, backend, num_layers=2)
    x, d_out = data(1), data(2, (T, B, H))
    step(m, kind, x, d_out)
    once = {name: grad.copy() for name, grad in m.grads.items()}
    arrays = dict(m.grads)
    step(m, kind, x, d_out)
    for name, grad in m.grads.items():
        assert grad is arrays[name]  # optimizers hold these very arrays
        assert np.abs(once[name]).max() > 0, name
        np.testing.assert_allclose(grad, 2 * once[name], rtol=1e-12, atol=1e-15)
    m.zero_grad()
    for name, grad in m.grads.items():
        assert grad is arrays[name]
        assert not grad.any()


def test_weight_update_between_forward_and_backward_does_not_change_the_gradients(kind, backend):
    """The tape holds the weights the forward pass used, as an optimizer may step in between."""
    x, d_out = data(1), data(2, (T, B, H))
    m_updated = make(kind, backend)
    m_updated(x)
    for value in m_updated.params.values():
        value += 0.5
    dx, _ = m_updated.backward(d_out, None)
    m_check = make(kind, backend)
    m_check(x)
    dx_check, _ = m_check.backward(d_out, None)
    np.testing.assert_array_equal(dx, dx_check)
    for name in m_check.grads:
        np.testing.assert_array_equal(m_updated.grads[name], m_check.grads[name])


def test_backward_returns_input_and_state_gradients_shaped_like_the_inputs(kind, backend):
    m = make(kind, backend, num_layers=2, bidirectional=True)
    out, state = m(data(1))
    dx, d_state = m.backward(np.ones_like(out))
    assert dx.shape == (T, B, I)
    if kind == "lstm":
        assert isinstance(d_state, tuple) and len(d_state) == 2
        assert all(d.shape == (4, B, H) for d in d_state)
    else:
        assert d_state.shape == (4, B, H)


# ------------------------------------------------------------------------------- modes


def test_eval_mode_keeps_no_tape_and_train_mode_restores_it(kind, backend):
    m = make(kind, backend)
    x = data(1)
    assert m.eval() is m and not m.training
    out, _ = m(x)
    with pytest.raises(RuntimeError, match="kept no tape"):
        m.backward(out)
    m.train()
    out, _ = m(x)
    m.backward(out)


def test_no_grad_keeps_no_tape_and_does_not_change_outputs(kind, backend):
    m = make(kind, backend)
    x = data(1)
    with pyrnn.no_grad():
        assert not pyrnn.is_grad_enabled()
        quiet, _ = m(x)
    assert pyrnn.is_grad_enabled()
    with pytest.raises(RuntimeError, match="kept no tape"):
        m.backward(quiet)
    taped, _ = m(x)
    np.testing.assert_array_equal(quiet, taped)
    m.backward(taped)


def test_an_eval_forward_discards_the_tape_of_an_earlier_training_forward(kind, backend):
    m = make(kind, backend)
    out, _ = m(data(1))
    m.eval()
    m(data(2))
    with pytest.raises(RuntimeError, match="kept no tape"):
        m.backward(out)


# ------------------------------------------------------------------------------- state dicts


def test_state_dict_round_trip_reproduces_the_module(kind, backend):
    source = make(kind, backend, num_layers=2, bidirectional=True, seed=1)
    target = make(kind, backend, num_layers=2, bidirectional=True, seed=2)
    x = data(1)
    assert not np.allclose(source(x)[0], target(x)[0])
    state = source.state_dict()
    target.load_state_dict(state)
    np.testing.assert_array_equal(source(x)[0], target(x)[0])
    next(iter(state.values()))[...] = 7  # a copy: editing it leaves the module alone
    assert not np.any(next(iter(source.params.values())) == 7)


def test_state_dict_loads_into_the_same_arrays(kind, backend):
    m = make(kind, backend)
    arrays = dict(m.params)
    m.load_state_dict(make(kind, backend, seed=5).state_dict())
    assert all(m.params[name] is arrays[name] for name in arrays)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_parameter_names_and_shapes_equal_torch(kind, bias, bidirectional):
    torch = pytest.importorskip("torch")
    t_cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    kwargs = dict(num_layers=3, bias=bias, bidirectional=bidirectional)
    t_state = t_cls(I, H, **kwargs).state_dict()
    state = CLASSES[kind](I, H, **kwargs).state_dict()
    assert list(state) == list(t_state)  # same names in the same order
    for name, value in t_state.items():
        assert state[name].shape == tuple(value.shape), name
        assert state[name].dtype == np.float32
    m = CLASSES[kind](I, H, **kwargs)
    m.load_state_dict({k: v.numpy() for k, v in t_state.items()})
    for name, value in t_state.items():
        np.testing.assert_array_equal(m.params[name], value.numpy())


# ------------------------------------------------------------------------------- init, seeds


def test_same_seed_gives_identical_weights_and_different_seeds_differ(kind, backend):
    a, b = make(kind, backend, seed=3), make(kind, backend, seed=3)
    c = make(kind, backend, seed=4)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
        assert not np.array_equal(a.params[name], c.params[name])
    unseeded = [make(kind, backend, seed=None).params["weight_hh_l0"] for _ in range(2)]
    assert not np.array_equal(*unseeded)


def test_init_is_uniform_within_one_over_sqrt_hidden_size(kind):
    hidden = 64
    m = CLASSES[kind](I, hidden, num_layers=2, bidirectional=True, seed=0)
    bound = 1 / math.sqrt(hidden)
    values = np.concatenate([value.ravel() for value in m.params.values()])
    assert values.dtype == np.float32
    assert np.abs(values).max() <= bound
    assert np.abs(values).max() > 0.99 * bound  # the whole range is used
    assert abs(values.mean()) < 0.02 * bound
    assert abs(values.std() - bound / math.sqrt(3)) < 0.02 * bound  # std of U(-a, a)


# ------------------------------------------------------------------------------- layouts


def test_batch_first_equals_time_major_transposed(kind, backend):
    x, d_out = data(1), data(2, (T, B, 2 * H))
    tm = make(kind, backend, num_layers=2, bidirectional=True)
    bf = make(kind, backend, num_layers=2, bidirectional=True, batch_first=True)
    lengths = np.array([6, 2, 4])
    out_tm, state_tm = tm(x, lengths=lengths)
    out_bf, state_bf = bf(np.ascontiguousarray(x.transpose(1, 0, 2)), lengths=lengths)
    np.testing.assert_allclose(out_bf, out_tm.transpose(1, 0, 2), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(h_of(kind, state_bf), h_of(kind, state_tm), rtol=1e-13,
                               atol=1e-15)
    dx_tm, _ = tm.backward(d_out)
    dx_bf, _ = bf.backward(d_out.transpose(1, 0, 2))
    assert dx_bf.shape == (B, T, I) and dx_bf.flags.c_contiguous
    np.testing.assert_allclose(dx_bf, dx_tm.transpose(1, 0, 2), rtol=1e-12, atol=1e-15)
    for name in tm.grads:
        np.testing.assert_allclose(bf.grads[name], tm.grads[name], rtol=1e-12, atol=1e-15)


def test_float32_module_computes_in_float32(kind, backend):
    m = make(kind, backend, dtype=np.float32)
    out, state = m(data(1).astype(np.float32))
    dx, _ = m.backward(np.ones_like(out))
    assert out.dtype == h_of(kind, state).dtype == dx.dtype == np.float32
    assert all(grad.dtype == np.float32 for grad in m.grads.values())


# ------------------------------------------------------------------------------- truncated BPTT


def test_truncated_bptt_chunks_carrying_h_n_equal_one_full_pass(kind, backend):
    m = make(kind, backend, num_layers=2, bidirectional=False)
    x = data(1, (10, B, I))
    full_out, full_state = m(x)
    out_1, state_1 = m(x[:4])
    out_2, state_2 = m(x[4:], state_1)
    np.testing.assert_allclose(np.concatenate([out_1, out_2]), full_out, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(h_of(kind, state_2), h_of(kind, full_state), rtol=1e-13,
                               atol=1e-15)
    # Truncation: chunk 2's backward stops at its initial state and returns its gradient.
    dx, d_state = m.backward(np.ones_like(out_2))
    assert dx.shape == (6, B, I) and np.abs(h_of(kind, d_state)).max() > 0


def test_chained_chunk_gradients_equal_full_bptt(kind, backend):
    """Feeding chunk 2's dh0 (dc0) into chunk 1's backward recovers the untruncated gradient."""
    cell = {"rnn": "rnn_tanh", "lstm": "lstm", "gru": "gru"}[kind]
    m = make(kind, backend)
    weights = [tuple(m.params[f"{k}_l0"] for k in ("weight_ih", "weight_hh", "bias_ih",
                                                   "bias_hh"))]
    x, d_out = data(1, (9, B, I)), data(2, (9, B, H))

    def forward(x_part, h0=None, c0=None):
        return functional.rnn_forward(cell, x_part, weights, h0, c0, backend=backend,
                                      keep_tape=True)

    _, _, _, tape = forward(x)
    dx_full, _, _, dw_full = functional.rnn_backward(tape, d_out)
    _, h_1, c_1, tape_1 = forward(x[:5])
    _, _, _, tape_2 = forward(x[5:], h_1, c_1)
    dx_2, dh_1, dc_1, dw_2 = functional.rnn_backward(tape_2, d_out[5:])
    dx_1, _, _, dw_1 = functional.rnn_backward(tape_1, d_out[:5], dh_1, dc_1)
    np.testing.assert_allclose(np.concatenate([dx_1, dx_2]), dx_full, rtol=1e-11, atol=1e-14)
    for full, first, second in zip(dw_full[0], dw_1[0], dw_2[0], strict=True):
        np.testing.assert_allclose(first + second, full, rtol=1e-11, atol=1e-14)


# ------------------------------------------------------------------------------- bias, repr


def test_bias_false_has_no_bias_params_and_equals_zero_biases(kind, backend):
    plain = make(kind, backend, num_layers=2, bidirectional=True, bias=False)
    assert not [name for name in plain.params if "bias" in name]
    assert sorted(plain.params) == sorted(plain.grads)
    biased = make(kind, backend, num_layers=2, bidirectional=True)
    biased.load_state_dict({
        name: (np.zeros_like(v) if "bias" in name else plain.params[name])
        for name, v in biased.params.items()
    })
    x, d_out = data(1), data(2, (T, B, 2 * H))
    out_plain, dx_plain = step(plain, kind, x, d_out)
    out_biased, dx_biased = step(biased, kind, x, d_out)
    np.testing.assert_allclose(out_plain, out_biased, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(dx_plain, dx_biased, rtol=1e-12, atol=1e-15)
    for name, grad in plain.grads.items():
        np.testing.assert_allclose(grad, biased.grads[name], rtol=1e-12, atol=1e-15)


def test_repr_reads_like_torch():
    assert repr(pyrnn.LSTM(10, 20)) == "LSTM(10, 20)"
    assert repr(pyrnn.GRU(10, 20, num_layers=2, bias=False, batch_first=True, dropout=0.5,
                          bidirectional=True)) == (
        "GRU(10, 20, num_layers=2, bias=False, batch_first=True, dropout=0.5, "
        "bidirectional=True)"
    )
    assert repr(pyrnn.RNN(3, 4, nonlinearity="relu", dtype=np.float64)) == (
        "RNN(3, 4, dtype=float64, nonlinearity='relu')"
    )


def test_module_attributes_record_the_configuration(backend):
    m = pyrnn.RNN(3, 4, 2, "relu", False, True, 0.25, True, np.float64, 7, backend)
    assert (m.input_size, m.hidden_size, m.num_layers, m.nonlinearity) == (3, 4, 2, "relu")
    assert (m.bias, m.batch_first, m.dropout, m.bidirectional) == (False, True, 0.25, True)
    assert (m.dtype, m.seed, m.backend, m.cell) == (np.float64, 7, backend, "rnn_relu")


def test_package_exports_modules_functional_and_training_blocks():
    for name in ("RNN", "LSTM", "GRU", "functional", "Module", "no_grad", "Linear",
                 "Embedding", "losses", "optim", "checkpoint"):
        assert name in pyrnn.__all__ and getattr(pyrnn, name) is not None, name
    assert issubclass(pyrnn.LSTM, pyrnn.Module)
    with pytest.raises(AttributeError, match="no attribute 'Conv2d'"):
        pyrnn.Conv2d  # noqa: B018


# ------------------------------------------------------------------------------- functional


def gru_weights_without_b_ih(rng: np.random.Generator) -> list[tuple]:
    """One GRU layer's (w_ih, w_hh, None, b_hh): bias_ih passed as None."""
    return [(rng.standard_normal((3 * H, I)), rng.standard_normal((3 * H, H)), None,
             rng.standard_normal(3 * H))]


def test_functional_gives_no_gradient_for_biases_passed_as_none(backend):
    rng = np.random.default_rng(0)
    weights = gru_weights_without_b_ih(rng)
    out, h_n, c_n, tape = functional.rnn_forward("gru", data(1), weights, backend=backend,
                                                 keep_tape=True)
    assert c_n is None and "gru" in repr(tape) and backend in repr(tape)
    dx, dh0, dc0, d_weights = functional.rnn_backward(tape, np.ones_like(out))
    assert dc0 is None
    assert d_weights[0][2] is None
    assert [d.shape for d in d_weights[0] if d is not None] == [(15, I), (15, H), (15,)]


def test_functional_tape_can_be_used_twice_with_identical_results(backend):
    weights = [tuple(p for p in make("lstm", backend).params.values())]
    out, _, _, tape = functional.rnn_forward("lstm", data(1), weights, backend=backend,
                                             keep_tape=True)
    first = functional.rnn_backward(tape, np.ones_like(out))
    second = functional.rnn_backward(tape, np.ones_like(out))
    for a, b in zip(first[:3], second[:3], strict=True):
        np.testing.assert_array_equal(a, b)


def test_functional_without_keep_tape_returns_no_tape(backend):
    weights = [tuple(p for p in make("rnn", backend).params.values())]
    *_, tape = functional.rnn_forward("rnn_tanh", data(1), weights, backend=backend)
    assert tape is None


def test_functional_adds_into_given_arrays_and_skips_biases_passed_as_none(backend):
    rng = np.random.default_rng(0)
    weights = gru_weights_without_b_ih(rng)
    out, _, _, tape = functional.rnn_forward("gru", data(1), weights, backend=backend,
                                             keep_tape=True)
    fresh = functional.rnn_backward(tape, np.ones_like(out))[3]
    start = gru_weights_without_b_ih(rng)
    targets = [tuple(None if a is None else a.copy() for a in start[0])]
    got = functional.rnn_backward(tape, np.ones_like(out), accumulate_into=targets)[3]
    assert got[0][2] is None
    for returned, target, before, grad in zip(got[0], targets[0], start[0], fresh[0],
                                              strict=True):
        assert returned is target
        if target is not None:
            np.testing.assert_allclose(target, before + grad, rtol=1e-12, atol=1e-12)


def test_functional_refuses_a_target_for_a_bias_passed_as_none(backend):
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((H, I)), rng.standard_normal((H, H)), None, None)]
    out, _, _, tape = functional.rnn_forward("rnn_tanh", data(1), weights, backend=backend,
                                             keep_tape=True)
    targets = [(np.zeros((H, I)), np.zeros((H, H)), np.zeros(H), None)]
    with pytest.raises(ValueError, match=r"accumulate_into\[0\] db_ih: expected None"):
        functional.rnn_backward(tape, np.ones_like(out), accumulate_into=targets)
    with pytest.raises(ValueError, match="accumulate_into: expected 1 tuples"):
        functional.rnn_backward(tape, np.ones_like(out), accumulate_into=[])


def test_grads_the_kernel_cannot_add_into_still_accumulate(kind, backend):
    # A gradient array replaced by a strided one, or two names sharing one array, cannot be
    # handed to the kernel; backward then adds the returned gradients itself.
    x, d_out = data(1), data(2, (T, B, H))
    plain = make(kind, backend)
    step(plain, kind, x, d_out)
    m = make(kind, backend)
    m.grads["weight_hh_l0"] = np.asfortranarray(m.grads["weight_hh_l0"])
    step(m, kind, x, d_out)
    for name, grad in m.grads.items():
        np.testing.assert_allclose(grad, plain.grads[name], rtol=1e-12, atol=1e-15)
    m.zero_grad()
    m.grads["bias_hh_l0"] = m.grads["bias_ih_l0"]
    step(m, kind, x, d_out)
    np.testing.assert_allclose(m.grads["bias_ih_l0"],
                               plain.grads["bias_ih_l0"] + plain.grads["bias_hh_l0"],
                               rtol=1e-12, atol=1e-15)
