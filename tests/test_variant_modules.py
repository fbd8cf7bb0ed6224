"""The variants as module arguments: LSTM(proj_size, peephole, coupled_gates), GRU(reset_after),
residual on all three. Names, shapes, init, state dicts, checkpoints, frozen(), repr, backend
choice and bad arguments; the numbers themselves are proven in test_variants.py and
test_reference_gradients.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import pyrnn
from pyrnn import _backend, checkpoint, functional

T, B, I, H, P = 5, 3, 4, 6, 3  # noqa: E741

# (class, keyword arguments) of every variant and a combination of them
VARIANTS = {
    "lstm_proj": (pyrnn.LSTM, {"proj_size": P}),
    "lstm_peephole": (pyrnn.LSTM, {"peephole": True}),
    "lstm_coupled": (pyrnn.LSTM, {"coupled_gates": True}),
    "lstm_coupled_peephole_proj": (pyrnn.LSTM, {"coupled_gates": True, "peephole": True,
                                                "proj_size": P}),
    "gru_reset_before": (pyrnn.GRU, {"reset_after": False}),
    "rnn_residual": (pyrnn.RNN, {"residual": True}),
    "lstm_peephole_residual": (pyrnn.LSTM, {"peephole": True, "residual": True}),
}


def make(variant, backend="numpy", **kwargs):
    cls, options = VARIANTS[variant]
    module = cls(I, H, **{"dtype": np.float64, "seed": 0, "backend": "numpy", **options,
                          **kwargs})
    if backend == "cpp":
        if _backend.missing_in_cpp(module.cell, module.proj_size > 0,
                                   module.residual and module.num_layers > 1):
            pytest.skip(f"the C++ core has no kernels for {module.cell!r} with these options")
        module = cls(I, H, **{"dtype": np.float64, "seed": 0, "backend": "cpp", **options,
                              **kwargs})
    return module


def hx_of(module, h0, c0):
    return (h0, c0) if module._cell.has_c else h0


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    return request.param


# ------------------------------------------------------------------------------- parameters


def test_parameter_names_and_shapes():
    lstm = pyrnn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P, peephole=True)
    names = [f"{n}_l{k}{r}" for k in range(2) for r in ("", "_reverse")
             for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ci", "weight_cf",
                       "weight_co", "weight_hr")]
    assert list(lstm.params) == names
    assert lstm.params["weight_ih_l0"].shape == (4 * H, I)
    assert lstm.params["weight_ih_l1_reverse"].shape == (4 * H, 2 * P)
    assert lstm.params["weight_hh_l1"].shape == (4 * H, P)
    assert lstm.params["weight_ci_l0"].shape == (H,)
    assert lstm.params["weight_hr_l1_reverse"].shape == (P, H)
    coupled = pyrnn.LSTM(I, H, coupled_gates=True, peephole=True, bias=False)
    assert list(coupled.params) == ["weight_ih_l0", "weight_hh_l0", "weight_cf_l0",
                                    "weight_co_l0"]
    assert coupled.params["weight_ih_l0"].shape == (3 * H, I)
    gru = pyrnn.GRU(I, H, reset_after=False)
    assert {k: v.shape for k, v in gru.params.items()} == {
        k: v.shape for k, v in pyrnn.GRU(I, H).params.items()}


def test_projected_lstm_names_and_shapes_equal_torch():
    torch = pytest.importorskip("torch")
    for bidirectional in (False, True):
        net = torch.nn.LSTM(I, H, num_layers=3, bidirectional=bidirectional, proj_size=P)
        ours = pyrnn.LSTM(I, H, num_layers=3, bidirectional=bidirectional, proj_size=P)
        assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {
            k: v.shape for k, v in ours.state_dict().items()}


def test_init_is_uniform_within_one_over_sqrt_hidden_size_peepholes_too(variant):
    module = make(variant, num_layers=2)
    values = np.concatenate([v.ravel() for v in module.params.values()])
    assert np.all(np.abs(values) <= 1 / np.sqrt(H)) and values.std() > 0.2 / np.sqrt(H)
    for name, value in module.params.items():
        assert value.any(), name  # drawn, not left zero
    again = make(variant, num_layers=2)
    for name, value in module.params.items():
        np.testing.assert_array_equal(value, again.params[name])


def test_parameter_count_computed_before_allocating_is_the_allocated_one(variant):
    for kwargs in ({}, {"num_layers": 3, "bidirectional": True, "bias": False}):
        module = make(variant, **kwargs)
        assert module._parameter_count() == module.num_parameters()


# ------------------------------------------------------------------------------- running


def test_shapes_of_outputs_states_and_their_gradients(variant, backend):
    module = make(variant, backend, num_layers=2, bidirectional=True)
    width = module.proj_size or H
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I))
    out, state = module(x, lengths=[5, 2, 4])
    assert out.shape == (T, B, 2 * width)
    h_n = state[0] if module._cell.has_c else state
    assert h_n.shape == (4, B, width)
    if module._cell.has_c:
        assert state[1].shape == (4, B, H)
    dx, d_state = module.backward(rng.standard_normal(out.shape))
    assert dx.shape == x.shape
    dh0 = d_state[0] if module._cell.has_c else d_state
    assert dh0.shape == (4, B, width)
    for name, grad in module.grads.items():
        assert grad.shape == module.params[name].shape
        assert grad.any(), name


def test_module_gradients_are_the_kernels_peepholes_row_by_row(backend):
    module = make("lstm_coupled_peephole_proj", backend, num_layers=2)
    rng = np.random.default_rng(1)
    x, d_out = rng.standard_normal((T, B, I)), rng.standard_normal((T, B, P))
    _, _, _, tape = functional.rnn_forward(module.cell, x, module._weights(), keep_tape=True,
                                           backend=module.backend)
    d_weights = functional.rnn_backward(tape, d_out)[3]
    module(x)
    module.backward(d_out)
    module(x)
    module.backward(d_out)  # gradients accumulate, rows included
    for k, suffix in enumerate(("_l0", "_l1")):
        w_peep, w_hr = d_weights[k][4], d_weights[k][5]
        for row, name in enumerate(("weight_cf", "weight_co")):
            np.testing.assert_allclose(module.grads[name + suffix], 2 * w_peep[row], rtol=1e-12)
        np.testing.assert_allclose(module.grads["weight_hr" + suffix], 2 * w_hr, rtol=1e-12)


def test_peepholes_changed_in_place_change_the_output(backend):
    module = make("lstm_peephole", backend)
    x = np.random.default_rng(2).standard_normal((T, B, I))
    before, _ = module(x)
    module.params["weight_cf_l0"][...] = 0.9  # what an optimizer step does
    after, _ = module(x)
    assert not np.allclose(before, after)


def test_residual_changes_the_output_of_a_stack_only(backend):
    x = np.random.default_rng(3).standard_normal((T, B, I))
    for layers in (1, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            plain = make("rnn_residual", backend, num_layers=layers, residual=False)
            residual = make("rnn_residual", backend, num_layers=layers)
        if layers == 1:
            np.testing.assert_array_equal(plain(x)[0], residual(x)[0])
        else:
            assert not np.allclose(plain(x)[0], residual(x)[0])


def test_residual_with_one_layer_warns_as_dropout_does():
    with pytest.warns(UserWarning, match="residual acts between stacked layers only"):
        pyrnn.GRU(I, H, residual=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyrnn.GRU(I, H, num_layers=2, residual=True, backend="numpy")


def test_state_dict_round_trip_and_frozen_match(variant, backend):
    module = make(variant, backend, num_layers=2, bidirectional=True)
    other = make(variant, backend, num_layers=2, bidirectional=True, seed=5)
    x = np.random.default_rng(4).standard_normal((T, B, I))
    other.load_state_dict(module.state_dict())
    module.eval()
    other.eval()
    want = module(x, lengths=[5, 1, 3])
    got = other(x, lengths=[5, 1, 3])
    frozen = module.frozen()(x, lengths=[5, 1, 3])
    for a, b, c in zip(_flat(want), _flat(got), _flat(frozen), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def _flat(result):
    out, state = result
    return [out, *(state if isinstance(state, tuple) else (state,))]


def test_checkpoint_carries_the_variant_parameters(variant, tmp_path):
    module = make(variant, num_layers=2)
    path = tmp_path / "model.npz"
    checkpoint.save(path, module)
    header = checkpoint.read_metadata(path)
    assert set(header["parameters"]) == set(module.params)
    restored = make(variant, num_layers=2, seed=9)
    checkpoint.load(path, restored)
    for name, value in module.params.items():
        np.testing.assert_array_equal(restored.params[name], value)


def test_checkpoint_of_one_variant_does_not_load_into_another(tmp_path):
    path = tmp_path / "model.npz"
    checkpoint.save(path, pyrnn.LSTM(I, H, peephole=True))
    with pytest.raises(KeyError, match="weight_ci_l0"):
        checkpoint.load(path, pyrnn.LSTM(I, H))


def test_repr_names_the_variant():
    assert repr(pyrnn.LSTM(I, H, proj_size=P, peephole=True, coupled_gates=True)) == (
        f"LSTM({I}, {H}, proj_size={P}, peephole=True, coupled_gates=True)")
    assert repr(pyrnn.GRU(I, H, num_layers=2, reset_after=False, residual=True)) == (
        f"GRU({I}, {H}, num_layers=2, residual=True, reset_after=False)")
    assert "proj_size=3" in repr(pyrnn.LSTM(I, H, proj_size=P).frozen())


def test_module_attributes_record_the_variant():
    lstm = pyrnn.LSTM(I, H, proj_size=P, peephole=True)
    assert (lstm.proj_size, lstm.peephole, lstm.coupled_gates, lstm.residual) == (P, True,
                                                                                  False, False)
    assert lstm.cell == "lstm_peephole"
    assert pyrnn.LSTM(I, H, coupled_gates=True, peephole=True).cell == "lstm_coupled_peephole"
    assert pyrnn.GRU(I, H, reset_after=False).cell == "gru_reset_before"
    assert pyrnn.GRU(I, H).reset_after is True


# ------------------------------------------------------------------------------- backends


def test_auto_runs_a_variant_the_core_lacks_on_the_reference(monkeypatch):
    if not _backend.cpp_available():
        pytest.skip("no C++ core")
    monkeypatch.setattr(_backend._core, "FEATURES", frozenset(("lstm", "gru")))
    monkeypatch.setattr(_backend, "_warned_missing", set())
    with pytest.warns(RuntimeWarning, match="no kernels for 'lstm_peephole'"):
        lstm = pyrnn.LSTM(I, H, peephole=True)
    assert lstm.backend == "numpy"
    with pytest.warns(RuntimeWarning, match="no kernels for 'projection'"):
        assert pyrnn.LSTM(I, H, proj_size=P).backend == "numpy"
    assert pyrnn.LSTM(I, H).backend == "cpp"
    with pytest.raises(RuntimeError, match=r"backend='cpp'.* no kernels for 'gru_reset_before'"):
        pyrnn.GRU(I, H, reset_after=False, backend="cpp")
    with pytest.raises(RuntimeError, match="no kernels for 'residual'"):
        pyrnn.GRU(I, H, num_layers=2, residual=True, backend="cpp")
    pyrnn.GRU(I, H, residual=True, backend="cpp", num_layers=1)  # nothing to run: allowed


def test_auto_runs_a_variant_the_core_lists_on_the_core(monkeypatch):
    if not _backend.cpp_available():
        pytest.skip("no C++ core")
    features = _backend._core.FEATURES | {"lstm_peephole", "projection"}
    monkeypatch.setattr(_backend._core, "FEATURES", features)
    assert pyrnn.LSTM(I, H, peephole=True, proj_size=P).backend == "cpp"


# ------------------------------------------------------------------------------- bad arguments

BAD_CONSTRUCTORS = {
    "proj_size equal to hidden_size": (pyrnn.LSTM, {"proj_size": H}, ValueError,
                                       r"proj_size: .*0 < proj_size < hidden_size = 6, got 6"),
    "proj_size above hidden_size": (pyrnn.LSTM, {"proj_size": 9}, ValueError, "proj_size"),
    "proj_size negative": (pyrnn.LSTM, {"proj_size": -1}, ValueError, "proj_size"),
    "proj_size a float": (pyrnn.LSTM, {"proj_size": 2.0}, TypeError, "proj_size: expected an int"),
    "proj_size True": (pyrnn.LSTM, {"proj_size": True}, TypeError, "proj_size"),
    "peephole a string": (pyrnn.LSTM, {"peephole": "yes"}, TypeError, "peephole: expected a bool"),
    "coupled_gates 1": (pyrnn.LSTM, {"coupled_gates": 1}, TypeError, "coupled_gates"),
    "reset_after None": (pyrnn.GRU, {"reset_after": None}, TypeError, "reset_after"),
    "residual a string": (pyrnn.RNN, {"residual": "no"}, TypeError, "residual"),
    "proj_size on a GRU": (pyrnn.GRU, {"proj_size": 2}, TypeError, "proj_size"),
    "peephole on a GRU": (pyrnn.GRU, {"peephole": True}, TypeError, "peephole"),
    "reset_after on an LSTM": (pyrnn.LSTM, {"reset_after": False}, TypeError, "reset_after"),
}


@pytest.mark.parametrize("case", list(BAD_CONSTRUCTORS))
def test_constructor_rejects_bad_variant_argument(case):
    cls, kwargs, error, message = BAD_CONSTRUCTORS[case]
    with pytest.raises(error, match=message):
        cls(I, H, **kwargs)


def test_variant_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        pyrnn.LSTM(I, H, 1, True, False, 0.0, False, np.float32, None, "auto", P)


def test_states_that_ignore_proj_size_are_refused(backend):
    lstm = make("lstm_proj", backend, num_layers=2)
    x = np.zeros((T, B, I))
    h_wide, c_wide = np.zeros((2, B, H)), np.zeros((2, B, H))
    h_narrow, c_narrow = np.zeros((2, B, P)), np.zeros((2, B, P))
    with pytest.raises(ValueError, match=r"h0: expected shape \(L\*D, B, proj_size\) = "
                                         r"\(2, 3, 3\), got \(2, 3, 6\)"):
        lstm(x, (h_wide, c_wide))
    with pytest.raises(ValueError, match=r"c0: expected shape \(L\*D, B, H\) = \(2, 3, 6\)"):
        lstm(x, (h_narrow, c_narrow))
    out, _ = lstm(x, (h_narrow, c_wide))
    with pytest.raises(ValueError, match=r"d_out: expected shape \(T, B, D\*proj_size\)"):
        lstm.backward(np.zeros((T, B, H)))
    with pytest.raises(ValueError, match=r"d_h_n: expected shape \(L\*D, B, proj_size\)"):
        lstm.backward(np.zeros(out.shape), (h_wide, None))
    with pytest.raises(ValueError, match=r"d_c_n: expected shape \(L\*D, B, H\)"):
        lstm.backward(np.zeros(out.shape), (None, c_narrow))
    lstm.backward(np.zeros(out.shape), (h_narrow, c_wide))


def test_x_of_the_hidden_width_is_refused_by_a_projected_layer_stack():
    lstm = pyrnn.LSTM(I, H, proj_size=P, num_layers=2)
    with pytest.raises(ValueError, match="params.*weight_hh_l0.*load other weights"):
        lstm.params["weight_hh_l0"] = np.zeros((4 * H, H), np.float32)
        lstm(np.zeros((T, B, I), np.float32))


def test_functional_refuses_a_projection_for_a_gru_naming_both():
    w = [(np.zeros((3 * H, I)), np.zeros((3 * H, P)), None, None, None, np.zeros((P, H)))]
    with pytest.raises(ValueError, match=r"weights\[0\] w_hr: cell 'gru' has no projection"):
        functional.rnn_forward("gru", np.zeros((T, B, I)), w)


def test_functional_refuses_peepholes_for_a_cell_without_naming_both():
    w = [(np.zeros((4 * H, I)), np.zeros((4 * H, H)), None, None, np.zeros((3, H)), None)]
    with pytest.raises(ValueError, match=r"weights\[0\]: expected 4 entries .* for cell 'lstm'"):
        functional.rnn_forward("lstm", np.zeros((T, B, I)), w)
    w = [(*w[0][:5], np.zeros((P, H)))]
    w[0] = (w[0][0], np.zeros((4 * H, P)), *w[0][2:])
    with pytest.raises(ValueError, match=r"weights\[0\] w_peep: expected None, as cell 'lstm' "
                                         r"has no peepholes"):
        functional.rnn_forward("lstm", np.zeros((T, B, I)), w)


def test_functional_runs_variants_with_biases_passed_as_none(backend):
    if backend == "cpp" and _backend.missing_in_cpp("lstm_coupled_peephole", True):
        pytest.skip("the C++ core has no kernels for it yet")
    rng = np.random.default_rng(6)
    w = [(rng.standard_normal((3 * H, I)), rng.standard_normal((3 * H, P)), None, None,
          rng.standard_normal((2, H)), rng.standard_normal((P, H)))]
    out, h_n, c_n, tape = functional.rnn_forward("lstm_coupled_peephole", rng.standard_normal(
        (T, B, I)), w, keep_tape=True, backend=backend)
    assert out.shape == (T, B, P) and c_n.shape == (1, B, H)
    d_weights = functional.rnn_backward(tape, np.ones(out.shape))[3]
    assert [None if g is None else g.shape for g in d_weights[0]] == [
        (3 * H, I), (3 * H, P), None, None, (2, H), (P, H)]
