"""pyrnn.torch's cell variants (peephole, coupled_gates, reset_after, residual, proj_size) against
pyrnn's NumPy modules with the same weights: outputs and every gradient; gradcheck; torch.compile;
the choice of kernels following the C++ core's features(); errors for what cannot run."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import pyrnn
from pyrnn import _backend
from pyrnn._cells import PLAIN_CELLS

torch = pytest.importorskip("torch")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import pyrnn.torch as pt  # noqa: E402
from pyrnn.torch import _ops  # noqa: E402
from pyrnn.torch import modules as pt_modules  # noqa: E402

REFERENCE = "pyrnn.torch.[A-Z]+: running pyrnn's NumPy reference"
T, B, I, H = 5, 3, 4, 6  # noqa: E741

VARIANTS = [
    (pyrnn.LSTM, dict(peephole=True)),
    (pyrnn.LSTM, dict(coupled_gates=True)),
    (pyrnn.LSTM, dict(peephole=True, coupled_gates=True, proj_size=2)),
    (pyrnn.LSTM, dict(peephole=True, residual=True)),
    (pyrnn.LSTM, dict(proj_size=3, residual=True)),
    (pyrnn.GRU, dict(reset_after=False)),
    (pyrnn.GRU, dict(reset_after=False, residual=True)),
    (pyrnn.GRU, dict(residual=True)),
    (pyrnn.RNN, dict(residual=True, nonlinearity="relu")),
]
SHAPES = [  # num_layers, bidirectional, bias, lengths
    (2, False, True, None),
    (2, True, False, [5, 2, 4]),
    (3, True, True, [3, 5, 1]),
]


def variant_id(v):
    return v[0].__name__ + "-" + "-".join(f"{k}={w}" for k, w in v[1].items())


def numpy_module(cls, kwargs, layers, bidirectional, bias, seed=0):
    return cls(I, H, num_layers=layers, bidirectional=bidirectional, bias=bias,
               dtype=np.float64, seed=seed, backend="numpy", **kwargs)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_variant_matches_pyrnns_numpy_module(variant, shape):
    cls, kwargs = variant
    layers, bidirectional, bias, lengths = shape
    theirs = numpy_module(cls, kwargs, layers, bidirectional, bias)
    ours = pt.from_module(theirs)
    assert list(ours.state_dict()) == list(theirs.params)
    D, P = 2 if bidirectional else 1, kwargs.get("proj_size") or H  # noqa: N806
    rng = np.random.default_rng(1)
    x, h0, c0 = (rng.standard_normal(s) for s in ((T, B, I), (layers * D, B, P),
                                                  (layers * D, B, H)))
    d_out, d_h, d_c = (rng.standard_normal(s) for s in ((T, B, D * P), (layers * D, B, P),
                                                        (layers * D, B, H)))
    has_c = cls is pyrnn.LSTM
    if lengths is not None:
        d_out[np.arange(T)[:, None] >= np.array(lengths)] = 0.0  # no gradient past the ends
    want_out, want_state = theirs(x, (h0, c0) if has_c else h0, lengths=lengths)
    want_dx, want_dstate = theirs.backward(d_out, (d_h, d_c) if has_c else d_h)

    xt, h0t, c0t = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
    inp = xt if lengths is None else pack_padded_sequence(xt, torch.tensor(lengths),
                                                         enforce_sorted=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", REFERENCE)
        out, state = ours(inp, (h0t, c0t) if has_c else h0t)
    if lengths is not None:
        out = pad_packed_sequence(out, total_length=T)[0]
    states = state if has_c else (state,)
    loss = (out * torch.from_numpy(d_out)).sum() + sum(
        (s * torch.from_numpy(d)).sum() for s, d in zip(states, (d_h, d_c), strict=False))
    loss.backward()

    wants = [want_out, *(want_state if has_c else (want_state,)), want_dx,
             *(want_dstate if has_c else (want_dstate,))]
    gots = [out, *states, xt.grad, h0t.grad, *((c0t.grad,) if has_c else ())]
    for got, want in zip(gots, wants, strict=True):
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=0, atol=1e-11)
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), theirs.grads[name], rtol=0, atol=1e-11,
                                   err_msg=name)


def lstm_variant(**kwargs):
    torch.manual_seed(0)
    return pt.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64, **kwargs)


def test_gradcheck_float64_coupled_peephole_projected_residual():
    lstm = lstm_variant(peephole=True, coupled_gates=True, proj_size=2, residual=True)
    names = [n for n, _ in lstm.named_parameters()]
    assert "weight_cf_l1_reverse" in names and "weight_ci_l0" not in names

    def f(x, h0, c0, *params):
        out, (h, c) = torch.func.functional_call(lstm, dict(zip(names, params, strict=True)),
                                                 (x, (h0, c0)))
        return out, h, c

    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in
              ((4, 2, 3), (4, 2, 2), (4, 2, 4))]
    inputs += [p.detach().clone() for p in lstm.parameters()]
    inputs = tuple(t.requires_grad_() for t in inputs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", REFERENCE)
        assert torch.autograd.gradcheck(f, inputs, atol=1e-7, rtol=1e-6, fast_mode=True)


def test_compile_fullgraph_traces_a_variant():
    torch.manual_seed(0)
    gru = pt.GRU(3, 5, num_layers=2, reset_after=False, residual=True, batch_first=True,
                 dtype=torch.float64)
    compiled = torch.compile(gru, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    results = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", REFERENCE)
        for run in (compiled, gru):
            gru.zero_grad()
            out, h = run(x)
            (out.square().sum() + h.sum()).backward()
            results.append([out.detach(), h.detach(), *(p.grad.clone() for p in gru.parameters())])
    for got, want in zip(*results, strict=True):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)


class Recorder:
    """Kernels that record their calls and run the NumPy reference."""

    def __init__(self):
        self.calls = []
        reference = _backend.prechecked("numpy")
        self.kernels = reference._replace(
            stack_forward=self._recording("stack_forward", reference.stack_forward),
            stack_backward=self._recording("stack_backward", reference.stack_backward))

    def _recording(self, name, fn):
        def call(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)
        return call


@pytest.mark.parametrize("listed", [True, False])
def test_kernels_follow_the_cores_features(listed, monkeypatch):
    """A variant runs on the C++ core exactly when its features() lists what it needs, with no
    change here: the core's kernels are stood in for by recording ones."""
    lstm = lstm_variant(peephole=True, proj_size=2)
    features = frozenset(PLAIN_CELLS) | ({"lstm_peephole", "projection"} if listed else set())
    monkeypatch.setattr(_backend, "cpp_features", lambda: features)
    core, reference = Recorder(), Recorder()
    monkeypatch.setitem(_backend._PRECHECKED, "cpp", core.kernels)
    monkeypatch.setitem(_backend._PRECHECKED, "numpy", reference.kernels)
    monkeypatch.setattr(_backend, "cpp_available", lambda: True)
    assert _ops.kernel_backend("lstm_peephole", True) == ("cpp" if listed else "numpy")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, (h, c) = lstm(x)
        (out.sum() + c.sum()).backward()
    notes = [w for w in caught if "NumPy reference" in str(w.message)]
    used, unused = (core, reference) if listed else (reference, core)
    assert used.calls == ["stack_forward", "stack_backward"] and unused.calls == []
    assert len(notes) == (0 if listed else 1)
    if not listed:
        assert "'lstm_peephole', 'projection'" in str(notes[0].message)


def test_bad_combinations_name_the_arguments(monkeypatch):
    with pytest.raises(TypeError, match="peephole should be of type bool, got: str"):
        pt.LSTM(3, 4, peephole="yes")
    with pytest.raises(TypeError, match="reset_after should be of type bool"):
        pt.GRU(3, 4, reset_after=0)
    with pytest.raises(ValueError, match=r"LSTM\(peephole=True, coupled_gates=True\) runs on "
                       r"pyrnn's kernels only, which take float32 or float64: got "
                       r"dtype=torch.float16"):
        pt.LSTM(3, 4, peephole=True, coupled_gates=True, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"GRU\(reset_after=False\) .* got device=meta"):
        pt.GRU(3, 4, reset_after=False, device="meta")
    with pytest.warns(UserWarning, match="with num_layers=1 it does nothing"):
        pt.RNN(3, 4, residual=True)
    gru = pt.GRU(3, 4, num_layers=2, residual=True)
    with pytest.raises(RuntimeError, match=r"GRU\(residual=True\) runs on pyrnn's kernels only, "
                       "and they cannot run this call: the input is torch.bfloat16"):
        gru.bfloat16()(torch.randn(5, 2, 3, dtype=torch.bfloat16))
    monkeypatch.setattr(pt_modules, "_device_type", lambda t: "cuda")
    with pytest.raises(RuntimeError, match=r"LSTM\(coupled_gates=True\) .* runs on the CPU"):
        pt.LSTM(3, 4, coupled_gates=True)(torch.randn(5, 2, 3))


def test_torch_nn_parameters_for_the_variants_with_torch_nns_layout():
    """reset_after=False and residual change no parameter: torch.nn's numbers and names."""
    torch.manual_seed(5)
    theirs = torch.nn.GRU(3, 4, num_layers=2)
    torch.manual_seed(5)
    ours = pt.GRU(3, 4, num_layers=2, reset_after=False, residual=True)
    assert repr(ours) == repr(theirs)[:-1] + ", reset_after=False, residual=True)"
    for (a, p), (b, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert a == b and torch.equal(p, q)
    coupled = pt.LSTM(3, 4, coupled_gates=True, peephole=True)
    shapes = {n: tuple(p.shape) for n, p in coupled.named_parameters()}
    assert shapes == {"weight_ih_l0": (12, 3), "weight_hh_l0": (12, 4), "bias_ih_l0": (12,),
                      "bias_hh_l0": (12,), "weight_cf_l0": (4,), "weight_co_l0": (4,)}
    bound = 1 / 2  # 1/sqrt(hidden_size), torch's init for all of them
    assert all(float(p.abs().max()) <= bound for p in coupled.parameters())
    assert coupled._flat_weights == list(coupled.parameters())


def test_convert_turns_a_projected_lstm_into_pyrnns_keeping_the_parameters():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.LSTM(3, 5, num_layers=2, proj_size=2))
    before = list(model.parameters())
    x = torch.randn(4, 2, 3)
    want = model(x)[0]
    pt.convert(model)
    assert type(model[0]) is pt.LSTM and model[0].proj_size == 2
    assert all(a is b for a, b in zip(model.parameters(), before, strict=True))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", REFERENCE)
        got = model(x)[0]
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_to_module_and_from_module_carry_the_variants(variant):
    cls, kwargs = variant
    theirs = numpy_module(cls, kwargs, 2, True, True, seed=4).train(False)
    layer = pt.from_module(theirs)
    assert all(getattr(layer, k) == v for k, v in kwargs.items())
    back = layer.to_module()
    assert type(back) is cls and back.training is False
    assert all(getattr(back, k) == v for k, v in kwargs.items())
    assert list(back.params) == list(theirs.params)
    assert all(np.array_equal(back.params[n], theirs.params[n]) for n in theirs.params)
