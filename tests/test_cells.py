"""The cells as single steps: RNNCell, LSTMCell, GRUCell.

- PyTorch: nn.RNNCell, nn.LSTMCell and nn.GRUCell state dicts load as is; a loop of steps (a
  decoder feeding each h back in, the loss reading every step's h and c) gives torch's states,
  and backward run as the loop reversed gives torch's gradients of every x, of h0, c0 and of
  every parameter; batched and unbatched, with and without a state, bias or not, both dtypes.
- The variants (peepholes, coupled gates, reset-before): a loop of cell steps is the one-layer
  module over the sequence (itself checked against ONNX Runtime and finite differences), outputs
  and gradients.
- The tape: last in, first out; none in eval mode or under no_grad; a refused backward leaves
  its step to undo; a backward with nothing to undo is a clear error.
"""

from __future__ import annotations

import numpy as np
import pytest

import pyrnn
from pyrnn import _backend, checkpoint

I, H = 4, 5  # noqa: E741
STEPS = 4
TOL = {np.float32: 2e-5, np.float64: 1e-12}

# name: (class, keyword arguments, the module of one layer with the same parameters)
CELL_KINDS = {
    "rnn_tanh": (pyrnn.RNNCell, {}, pyrnn.RNN),
    "rnn_relu": (pyrnn.RNNCell, {"nonlinearity": "relu"}, pyrnn.RNN),
    "lstm": (pyrnn.LSTMCell, {}, pyrnn.LSTM),
    "gru": (pyrnn.GRUCell, {}, pyrnn.GRU),
    "lstm_peephole": (pyrnn.LSTMCell, {"peephole": True}, pyrnn.LSTM),
    "lstm_coupled": (pyrnn.LSTMCell, {"coupled_gates": True}, pyrnn.LSTM),
    "lstm_coupled_peephole": (pyrnn.LSTMCell, {"coupled_gates": True, "peephole": True},
                              pyrnn.LSTM),
    "gru_reset_before": (pyrnn.GRUCell, {"reset_after": False}, pyrnn.GRU),
}
PLAIN = ("rnn_tanh", "rnn_relu", "lstm", "gru")


def make_cell(kind, backend="numpy", **kwargs):
    cls, options, _ = CELL_KINDS[kind]
    if backend == "cpp" and _backend.missing_in_cpp(kind):
        pytest.skip(f"the C++ core has no kernels for {kind!r} yet")
    return cls(I, H, **{"dtype": np.float64, "seed": 0, "backend": backend, **options,
                        **kwargs})


def has_c(cell):
    return isinstance(cell, pyrnn.LSTMCell)


# ------------------------------------------------------------------------------- PyTorch


def torch_cell(torch, kind, bias, dtype):
    cls = {"rnn_tanh": torch.nn.RNNCell, "rnn_relu": torch.nn.RNNCell,
           "lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}[kind]
    options = {"nonlinearity": "relu"} if kind == "rnn_relu" else {}
    return cls(I, H, bias=bias, dtype=torch.float64 if dtype == np.float64 else torch.float32,
               **options)


def torch_loop(torch, net, xs, state, d_hs, d_cs):
    """The loop in torch: each step reads the previous one's state; the loss is sum(d_h * h)
    (+ sum(d_c * c)) over the steps. Returns states, and the gradients of xs and state."""
    xs = [torch.tensor(x, requires_grad=True) for x in xs]
    state = tuple(None if s is None else torch.tensor(s, requires_grad=True) for s in state)
    lstm = isinstance(net, torch.nn.LSTMCell)
    hx = (state if state[0] is not None else None) if lstm else state[0]
    hs, cs, loss = [], [], 0
    for x, d_h, d_c in zip(xs, d_hs, d_cs, strict=True):
        hx = net(x, hx)
        h, c = hx if lstm else (hx, None)
        hs.append(h)
        cs.append(c)
        loss = loss + (h * torch.tensor(d_h)).sum()
        if c is not None:
            loss = loss + (c * torch.tensor(d_c)).sum()
    loss.backward()
    result = {f"h{t}": h for t, h in enumerate(hs)}
    result.update({f"c{t}": c for t, c in enumerate(cs) if c is not None})
    result.update({f"dx{t}": x.grad for t, x in enumerate(xs)})
    result.update({name: s.grad for name, s in zip(("dh0", "dc0"), state, strict=True)
                   if s is not None})
    result.update({f"grads[{n}]": p.grad for n, p in net.named_parameters()})
    return {k: v.detach().numpy() for k, v in result.items()}


def pyrnn_loop(cell, xs, state, d_hs, d_cs):
    """The same loop with a pyrnn cell, and backward as the loop reversed."""
    lstm = has_c(cell)
    hx = (state if state[0] is not None else None) if lstm else state[0]
    hs, cs = [], []
    for x in xs:
        hx = cell(x, hx)
        h, c = hx if lstm else (hx, None)
        hs.append(h)
        cs.append(c)
    result = {f"h{t}": h for t, h in enumerate(hs)}
    result.update({f"c{t}": c for t, c in enumerate(cs) if c is not None})
    d_h_next = d_c_next = 0  # what step t+1 passed back to the state step t made
    for t in reversed(range(len(xs))):
        d_h = d_hs[t] + d_h_next
        if lstm:
            result[f"dx{t}"], (d_h_next, d_c_next) = cell.backward(d_h, d_cs[t] + d_c_next)
        else:
            result[f"dx{t}"], d_h_next = cell.backward(d_h)
    if state[0] is not None:
        result["dh0"] = d_h_next
        if lstm:
            result["dc0"] = d_c_next
    result.update({f"grads[{n}]": g for n, g in cell.grads.items()})
    return result


def loop_data(kind, batched, with_state, dtype, seed):
    rng = np.random.default_rng(seed)
    lead = (3,) if batched else ()
    lstm = CELL_KINDS[kind][0] is pyrnn.LSTMCell

    def draw(n):
        return rng.standard_normal((*lead, n)).astype(dtype)

    xs = [draw(I) for _ in range(STEPS)]
    state = (draw(H) if with_state else None, draw(H) if with_state and lstm else None)
    d_hs = [draw(H) for _ in range(STEPS)]
    d_cs = [draw(H) if lstm else None for _ in range(STEPS)]
    return xs, state, d_hs, d_cs


def assert_results_close(got, want, dtype):
    assert sorted(got) == sorted(want)
    for name, b in want.items():
        a = got[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        scale = max(float(np.abs(b).max(initial=0)), 1e-2)
        assert np.abs(a - b).max(initial=0) <= TOL[dtype] * scale, name


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched, with_state", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("kind", PLAIN)
def test_cell_loop_matches_torch_states_and_every_gradient(kind, batched, with_state, bias,
                                                          dtype, backend):
    torch = pytest.importorskip("torch")
    torch.manual_seed(PLAIN.index(kind))
    net = torch_cell(torch, kind, bias, dtype)
    cell = make_cell(kind, backend, bias=bias, dtype=dtype)
    cell.load_state_dict({k: v.detach().numpy() for k, v in net.state_dict().items()})
    data = loop_data(kind, batched, with_state, dtype, seed=PLAIN.index(kind))
    assert_results_close(pyrnn_loop(cell, *data), torch_loop(torch, net, *data), dtype)


def test_cell_parameters_are_torch_names_shapes_and_init():
    torch = pytest.importorskip("torch")
    for kind in PLAIN:
        for bias in (True, False):
            net = torch_cell(torch, kind, bias, np.float32)
            cell = make_cell(kind, bias=bias, dtype=np.float32)
            assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {
                k: v.shape for k, v in cell.state_dict().items()}
            for name, value in cell.params.items():
                assert np.abs(value).max() <= 1 / np.sqrt(H) and value.std() > 0, name


# ------------------------------------------------------------------------------- variants


def module_like(cell, kind):
    """The one-layer module of the same cell and parameters (names with the suffix _l0)."""
    cls, options, module_cls = CELL_KINDS[kind]
    module = module_cls(I, H, bias=cell.bias, dtype=cell.dtype, backend="numpy", **options)
    module.load_state_dict({f"{k}_l0": v for k, v in cell.state_dict().items()})
    return module


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_loop_is_the_one_layer_module(kind, bias, backend):
    cell = make_cell(kind, backend, bias=bias)
    module = module_like(cell, kind)
    xs, state, d_hs, d_cs = loop_data(kind, True, True, np.float64, seed=3)
    hx = (state[0][None], state[1][None]) if has_c(cell) else state[0][None]
    out, final = module(np.stack(xs), hx)
    # d_out reaches every h; d_c of the steps before the last has no input in a module: zero
    # there, so that both compute the same loss
    d_cs = [None if d is None else (d if t == STEPS - 1 else np.zeros_like(d))
            for t, d in enumerate(d_cs)]
    got = pyrnn_loop(cell, xs, state, d_hs, d_cs)
    d_final = (np.zeros((1, 3, H)), d_cs[-1][None]) if has_c(cell) else None
    dx, d_state = module.backward(np.stack(d_hs), d_final)
    for t in range(STEPS):
        np.testing.assert_allclose(got[f"h{t}"], out[t], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got[f"dx{t}"], dx[t], rtol=1e-11, atol=1e-13)
    dh0, dc0 = d_state if has_c(cell) else (d_state, None)
    np.testing.assert_allclose(got["dh0"], dh0[0], rtol=1e-11, atol=1e-13)
    if dc0 is not None:
        np.testing.assert_allclose(got[f"c{STEPS - 1}"], final[1][0], rtol=1e-12)
        np.testing.assert_allclose(got["dc0"], dc0[0], rtol=1e-11, atol=1e-13)
    for name, grad in module.grads.items():
        np.testing.assert_allclose(got[f"grads[{name[:-3]}]"], grad, rtol=1e-11, atol=1e-13)


def test_variant_cell_parameters():
    cell = pyrnn.LSTMCell(I, H, peephole=True)
    assert list(cell.params) == ["weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ci",
                                 "weight_cf", "weight_co"]
    assert cell.params["weight_ci"].shape == (H,)
    coupled = pyrnn.LSTMCell(I, H, coupled_gates=True, peephole=True, bias=False)
    assert {k: v.shape for k, v in coupled.params.items()} == {
        "weight_ih": (3 * H, I), "weight_hh": (3 * H, H), "weight_cf": (H,), "weight_co": (H,)}
    assert pyrnn.GRUCell(I, H, reset_after=False).cell == "gru_reset_before"


# ------------------------------------------------------------------------------- the tape


def test_backward_undoes_the_most_recent_call_first(backend):
    cell = make_cell("gru", backend)
    rng = np.random.default_rng(4)
    x1, x2, d = rng.standard_normal((3, I)), rng.standard_normal((3, I)), np.ones((3, H))
    h1 = cell(x1)
    cell(x2, h1)
    assert cell.pending_steps == 2
    dx2, _ = cell.backward(d)
    dx1, _ = cell.backward(d)
    assert cell.pending_steps == 0
    alone = make_cell("gru", backend)
    alone(x1)
    np.testing.assert_allclose(alone.backward(d)[0], dx1, rtol=1e-13)
    alone(x2, h1)
    np.testing.assert_allclose(alone.backward(d)[0], dx2, rtol=1e-13)


def test_weight_gradients_accumulate_until_zero_grad(backend):
    cell = make_cell("lstm", backend)
    x = np.random.default_rng(5).standard_normal((2, I))
    cell(x)
    cell.backward(np.ones((2, H)))
    once = {k: v.copy() for k, v in cell.grads.items()}
    cell(x)
    cell.backward(np.ones((2, H)), None)
    for name, grad in cell.grads.items():
        np.testing.assert_allclose(grad, 2 * once[name], rtol=1e-13)
    cell.zero_grad()
    assert not any(g.any() for g in cell.grads.values())


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_backward_with_nothing_to_undo_is_a_clear_error(kind, backend):
    cell = make_cell(kind, backend)
    name = type(cell).__name__
    with pytest.raises(RuntimeError, match=rf"{name}\.backward: no step to undo"):
        cell.backward(np.ones((1, H)))
    cell(np.ones((1, I)))
    cell.backward(np.ones((1, H)))
    with pytest.raises(RuntimeError, match="no step to undo"):
        cell.backward(np.ones((1, H)))
    cell.eval()
    cell(np.ones((1, I)))
    with pytest.raises(RuntimeError, match="eval mode"):
        cell.backward(np.ones((1, H)))
    cell.train()
    with pyrnn.no_grad():
        cell(np.ones((1, I)))
    assert cell.pending_steps == 0
    cell(np.ones((1, I)))
    cell.clear_tape()
    with pytest.raises(RuntimeError, match="no step to undo"):
        cell.backward(np.ones((1, H)))


def test_a_refused_backward_leaves_its_step_to_undo(backend):
    cell = make_cell("lstm", backend)
    cell(np.ones((2, I)))
    with pytest.raises(ValueError, match=r"dh1: expected shape \(B, hidden_size\) = \(2, 5\)"):
        cell.backward(np.ones((3, H)))
    assert not any(g.any() for g in cell.grads.values())
    cell.backward(np.ones((2, H)))
    assert cell.pending_steps == 0


def test_unbatched_call_gives_and_takes_vectors(backend):
    cell = make_cell("lstm", backend)
    x = np.random.default_rng(6).standard_normal(I)
    h, c = cell(x)
    assert h.shape == c.shape == (H,)
    h_b, c_b = cell(x[None])
    np.testing.assert_allclose(h, h_b[0], rtol=1e-14)
    dx_b, _ = cell.backward(np.ones((1, H)))
    dx, (dh0, dc0) = cell.backward(np.ones(H))
    assert dx.shape == (I,) and dh0.shape == dc0.shape == (H,)
    np.testing.assert_allclose(dx, dx_b[0], rtol=1e-14)


def test_state_dict_and_checkpoint_round_trip(tmp_path):
    cell = pyrnn.LSTMCell(I, H, peephole=True, seed=1)
    path = tmp_path / "cell.npz"
    checkpoint.save(path, cell)
    other = pyrnn.LSTMCell(I, H, peephole=True, seed=2)
    checkpoint.load(path, other)
    x = np.ones((2, I), np.float32)
    np.testing.assert_array_equal(cell(x)[0], other(x)[0])
    with pytest.raises(KeyError, match="weight_ci"):
        checkpoint.load(path, pyrnn.LSTMCell(I, H))


def test_repr_names_the_options():
    assert repr(pyrnn.RNNCell(I, H, nonlinearity="relu", bias=False)) == (
        "RNNCell(4, 5, bias=False, nonlinearity='relu')")
    assert repr(pyrnn.LSTMCell(I, H, peephole=True, coupled_gates=True)) == (
        "LSTMCell(4, 5, peephole=True, coupled_gates=True)")
    assert repr(pyrnn.GRUCell(I, H, reset_after=False, dtype=np.float64)) == (
        "GRUCell(4, 5, dtype=float64, reset_after=False)")


# ------------------------------------------------------------------------------- backends


def test_plain_cells_run_on_the_core_and_match_the_reference():
    if not _backend.cpp_available():
        pytest.skip("no C++ core")
    for kind in PLAIN:
        fast, slow = make_cell(kind, "cpp"), make_cell(kind, "numpy")
        assert fast.backend == "cpp"
        xs, state, d_hs, d_cs = loop_data(kind, True, True, np.float64, seed=7)
        got, want = pyrnn_loop(fast, xs, state, d_hs, d_cs), pyrnn_loop(slow, xs, state, d_hs,
                                                                         d_cs)
        for name, b in want.items():
            np.testing.assert_allclose(got[name], b, rtol=1e-12, atol=1e-13, err_msg=name)


def test_cpp_refuses_a_variant_cell_it_lacks_naming_it(monkeypatch):
    if not _backend.cpp_available():
        pytest.skip("no C++ core")
    monkeypatch.setattr(_backend._core, "FEATURES", frozenset(("lstm", "gru")))
    monkeypatch.setattr(_backend, "_warned_missing", set())
    with pytest.raises(RuntimeError, match=r"backend='cpp'.* no kernels for 'lstm_peephole'"):
        pyrnn.LSTMCell(I, H, peephole=True, backend="cpp")
    with pytest.warns(RuntimeWarning, match="'gru_reset_before'"):
        assert pyrnn.GRUCell(I, H, reset_after=False).backend == "numpy"
    assert pyrnn.GRUCell(I, H).backend == "cpp"


# ------------------------------------------------------------------------------- bad inputs

BAD_CALLS = {  # kind, x, hx, error, message
    "x of 3 dimensions": ("gru", np.zeros((1, 2, I)), None, ValueError,
                          r"x: expected shape \(B, input_size\)"),
    "x of another input size": ("gru", np.zeros((2, I + 1)), None, ValueError,
                                "input_size = 4; got"),
    "x of no rows": ("gru", np.zeros((0, I)), None, ValueError, "B >= 1"),
    "x a list": ("gru", [[0.0] * I], None, TypeError, "x: expected a numpy array"),
    "x of another dtype": ("gru", np.zeros((2, I), np.float32), None, TypeError,
                           "x: expected dtype float64"),
    "h0 of another batch": ("gru", np.zeros((2, I)), np.zeros((3, H)), ValueError,
                            r"h0: expected shape \(B, hidden_size\) = \(2, 5\)"),
    "h0 batched for an unbatched x": ("rnn_tanh", np.zeros(I), np.zeros((1, H)), ValueError,
                                      r"h0: expected shape \(hidden_size,\), as x is one vector"),
    "h0 of another dtype": ("gru", np.zeros((2, I)), np.zeros((2, H), np.float32), TypeError,
                            "h0: expected dtype float64"),
    "a pair for a GRU": ("gru", np.zeros((2, I)), (np.zeros((2, H)), np.zeros((2, H))),
                         TypeError, "only LSTM takes an"),
    "one array for an LSTM": ("lstm", np.zeros((2, I)), np.zeros((2, H)), TypeError,
                              r"hx: expected a pair \(h0, c0\)"),
    "c0 of another width": ("lstm", np.zeros((2, I)), (None, np.zeros((2, H + 1))), ValueError,
                            r"c0: expected shape \(B, hidden_size\) = \(2, 5\)"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_call_rejects_bad_argument(case, backend):
    kind, x, hx, error, message = BAD_CALLS[case]
    cell = make_cell(kind, backend)
    with pytest.raises(error, match=message):
        cell(x, hx)
    assert cell.pending_steps == 0


BAD_CONSTRUCTORS = {
    "peephole on an RNNCell": (pyrnn.RNNCell, {"peephole": True}, TypeError, "peephole"),
    "reset_after on an LSTMCell": (pyrnn.LSTMCell, {"reset_after": False}, TypeError,
                                   "reset_after"),
    "proj_size on an LSTMCell": (pyrnn.LSTMCell, {"proj_size": 2}, TypeError, "proj_size"),
    "peephole not a bool": (pyrnn.LSTMCell, {"peephole": 1}, TypeError, "peephole: expected"),
    "coupled_gates not a bool": (pyrnn.LSTMCell, {"coupled_gates": "yes"}, TypeError,
                                 "coupled_gates"),
    "reset_after not a bool": (pyrnn.GRUCell, {"reset_after": None}, TypeError, "reset_after"),
    "nonlinearity unknown": (pyrnn.RNNCell, {"nonlinearity": "sigmoid"}, ValueError,
                             "nonlinearity"),
    "hidden_size zero": (pyrnn.GRUCell, {"hidden_size": 0}, ValueError, "hidden_size"),
    "backend unknown": (pyrnn.GRUCell, {"backend": "gpu"}, ValueError, "backend"),
}


@pytest.mark.parametrize("case", list(BAD_CONSTRUCTORS))
def test_constructor_rejects_bad_argument(case):
    cls, kwargs, error, message = BAD_CONSTRUCTORS[case]
    args = {"input_size": I, "hidden_size": H, **kwargs}
    with pytest.raises(error, match=message):
        cls(**args)


def test_params_of_another_size_are_refused():
    cell = pyrnn.GRUCell(I, H)
    cell.params["weight_hh"] = np.zeros((3 * (H + 1), H + 1), np.float32)
    with pytest.raises(ValueError, match=r"params\['weight_hh'\]: expected shape \(15, 5\)"):
        cell(np.zeros((1, I), np.float32))
