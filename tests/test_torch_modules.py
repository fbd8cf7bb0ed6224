"""pyrnn.torch's modules against torch.nn's: outputs, states and every gradient on every option,
torch's errors for bad input, the fallback to torch's own implementation, convert() and the
moves to and from pyrnn's NumPy modules."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import pyrnn

torch = pytest.importorskip("torch")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import pyrnn.torch as pt  # noqa: E402
from pyrnn.torch import modules as pt_modules  # noqa: E402

pytestmark = pytest.mark.skipif(not pyrnn.backend_info()["cpp_available"],
                                reason="pyrnn.torch runs the C++ core")

PAIRS = {"lstm": (pt.LSTM, torch.nn.LSTM), "gru": (pt.GRU, torch.nn.GRU),
         "rnn_tanh": (pt.RNN, torch.nn.RNN), "rnn_relu": (pt.RNN, torch.nn.RNN)}
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def make_pair(cell: str, *args, dtype=torch.float64, **kwargs):
    """A torch.nn module and pyrnn's, with the same weights (loaded from torch's state_dict)."""
    ours_cls, theirs_cls = PAIRS[cell]
    if cell.startswith("rnn"):
        kwargs["nonlinearity"] = cell[4:]
    theirs = theirs_cls(*args, dtype=dtype, **kwargs)
    ours = ours_cls(*args, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def run(module, x, hx, packed_lengths=None, enforce_sorted=True):
    """Forward then backward of a fixed function of every output; returns the outputs and the
    gradients of x, of each initial state and of every parameter, as plain tensors."""
    x = x.detach().clone().requires_grad_()
    states = hx if isinstance(hx, tuple) else (hx,) if hx is not None else ()
    states = tuple(s.detach().clone().requires_grad_() for s in states)
    given = None if hx is None else states if isinstance(hx, tuple) else states[0]
    inp = x
    if packed_lengths is not None:
        inp = pack_padded_sequence(x, packed_lengths, batch_first=module.batch_first,
                                   enforce_sorted=enforce_sorted)
    out, state = module(inp, given)
    if packed_lengths is not None:
        out, _ = pad_packed_sequence(out, batch_first=module.batch_first)
    finals = state if isinstance(state, tuple) else (state,)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    loss = (out * weights).sum() + sum((f * f).sum() for f in finals)
    module.zero_grad()
    loss.backward()
    grads = [x.grad] + [s.grad for s in states] + [p.grad for p in module.parameters()]
    return [out.detach(), *(f.detach() for f in finals)], grads


def assert_same(ours, theirs, dtype):
    for a, b in zip(ours, theirs, strict=True):
        a, b = a.detach(), b.detach()
        assert a.shape == b.shape
        scale = max(1.0, float(b.abs().max()))
        assert float((a - b).abs().max()) <= TOL[dtype] * scale


OPTIONS = [
    # num_layers, bidirectional, batch_first, bias, initial state, packing, dtype
    (1, False, False, True, False, None, torch.float64),
    (2, True, False, True, True, None, torch.float64),
    (2, False, True, False, True, None, torch.float64),
    (3, True, True, True, False, None, torch.float32),
    (2, True, False, True, True, "sorted", torch.float64),
    (2, True, True, False, True, "unsorted", torch.float64),
    (1, False, False, True, True, "unsorted", torch.float32),
]


@pytest.mark.parametrize("cell", list(PAIRS))
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o)).replace(
    "torch.", ""))
def test_matches_torch_nn(cell, options):
    layers, bidirectional, batch_first, bias, initial, packing, dtype = options
    torch.manual_seed(len(cell) * 10 + layers)
    T, B, I, H = 5, 3, 4, 6  # noqa: N806, E741
    ours, theirs = make_pair(cell, I, H, num_layers=layers, bidirectional=bidirectional,
                             batch_first=batch_first, bias=bias, dtype=dtype)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=dtype)
    D = 2 if bidirectional else 1  # noqa: N806
    hx = None
    if initial:
        hx = torch.randn(layers * D, B, H, dtype=dtype)
        if cell == "lstm":
            hx = (hx, torch.randn(layers * D, B, H, dtype=dtype))
    lengths = None
    if packing:
        lengths = torch.tensor([5, 4, 2] if packing == "sorted" else [2, 5, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pyrnn must run every one of these itself
        got = run(ours, x, hx, lengths, packing == "sorted")
    want = run(theirs, x, hx, lengths, packing == "sorted")
    assert_same(got[0], want[0], dtype)
    assert_same(got[1], want[1], dtype)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_unbatched_input_matches_torch_nn(cell):
    torch.manual_seed(1)
    ours, theirs = make_pair(cell, 3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, dtype=torch.float64)
    hx = torch.randn(4, 5, dtype=torch.float64)
    hx = (hx, torch.randn(4, 5, dtype=torch.float64)) if cell == "lstm" else hx
    for given in (None, hx):
        got, want = run(ours, x, given), run(theirs, x, given)
        assert got[0][0].shape == (6, 10)
        assert_same(got[0], want[0], torch.float64)
        assert_same(got[1], want[1], torch.float64)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_is_off_in_eval_mode_as_torch_nn(cell):
    ours, theirs = make_pair(cell, 4, 6, num_layers=3, dropout=0.5)
    ours.eval()
    theirs.eval()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    assert torch.equal(ours(x)[0], ours(x)[0])
    assert_same([ours(x)[0]], [theirs(x)[0]], torch.float64)


def test_dropout_in_training_draws_from_torchs_generator():
    lstm = pt.LSTM(4, 6, num_layers=2, dropout=0.5, dtype=torch.float64)
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    torch.manual_seed(3)
    first = lstm(x)[0]
    torch.manual_seed(3)
    assert torch.equal(lstm(x)[0], first)  # the same seed draws the same masks
    assert not torch.equal(lstm(x)[0], first)
    lstm.eval()
    assert not torch.allclose(lstm(x)[0], first)
    # The gradient is the gradient of the function with those masks: finite differences agree.
    lstm.train()

    def with_fixed_masks(inp):
        torch.manual_seed(5)
        return lstm(inp)[0]

    assert torch.autograd.gradcheck(with_fixed_masks, (x.clone().requires_grad_(),))


def test_outputs_and_state_shapes_match_torch_nn():
    ours, theirs = make_pair("lstm", 3, 4, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    (o1, (h1, c1)), (o2, (h2, c2)) = ours(x), theirs(x)
    assert c1.shape == c2.shape
    assert o1.shape == o2.shape == (2, 7, 8) and o1.stride() == o2.stride()
    assert h1.shape == h2.shape == (4, 2, 4)


# --------------------------------------------------------------------------- bad input

def test_wrong_h0_shape_names_the_expected_shape():
    gru = pt.GRU(4, 6, num_layers=2)
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(2, 3, 6\), got \[1, 3, 6\]"):
        gru(torch.randn(5, 3, 4), torch.zeros(1, 3, 6))
    lstm = pt.LSTM(4, 6)
    with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size \(1, 3, 6\), got "
                                           r"\[1, 2, 6\]"):
        lstm(torch.randn(5, 3, 4), (torch.zeros(1, 3, 6), torch.zeros(1, 2, 6)))


def test_rejects_bad_input_as_torch_nn_does():
    lstm = pt.LSTM(4, 6)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size. "
                                           "Expected 4, got 5"):
        lstm(torch.randn(5, 3, 5))
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 4D"):
        lstm(torch.randn(5, 3, 4, 1))
    with pytest.raises(ValueError, match="input dtype .* does not match weight dtype"):
        lstm(torch.randn(5, 3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="hx should also be 3-D but got \\(2-D, 3-D\\)"):
        lstm(torch.randn(5, 3, 4), (torch.zeros(3, 6), torch.zeros(1, 3, 6)))
    with pytest.raises(TypeError, match="hx must be a tuple \\(h_0, c_0\\)"):
        lstm(torch.randn(5, 3, 4), torch.zeros(1, 3, 6))
    with pytest.raises(TypeError, match="only LSTM takes"):
        pt.GRU(4, 6)(torch.randn(5, 3, 4), (torch.zeros(1, 3, 6), torch.zeros(1, 3, 6)))
    with pytest.raises(RuntimeError, match="hx dtype \\(torch.float64\\) does not match"):
        pt.GRU(4, 6)(torch.randn(5, 3, 4), torch.zeros(1, 3, 6, dtype=torch.float64))


def test_constructor_checks_are_torch_nns():
    with pytest.raises(ValueError, match="Unknown nonlinearity 'sigmoid'"):
        pt.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="dropout should be a number in range"):
        pt.LSTM(3, 4, dropout=1.5)
    with pytest.raises(ValueError, match="hidden_size must be greater than zero"):
        pt.GRU(3, 0)
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        pt.LSTM(3, 4, proj_size=4)


# ---------------------------------------------------------------------------- fallback

def test_non_cpu_tensors_run_torchs_implementation_with_one_warning(monkeypatch):
    ours, theirs = make_pair("gru", 4, 6, num_layers=2)
    monkeypatch.setattr(pt_modules, "_device_type", lambda t: "cuda")
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="on cpu, and pyrnn's core runs on the CPU") as record:
        got = run(ours, x, None)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per module and reason
        ours(x)
    assert_same(got[0], run(theirs, x, None)[0], torch.float64)

    def torch_only(*args):
        raise AssertionError("pyrnn's operator ran for a non-CPU call")

    monkeypatch.setattr(pt_modules._ops, "rnn_forward", torch_only)
    ours(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_torchs_implementation(dtype):
    ours, theirs = make_pair("lstm", 4, 6, dtype=dtype)
    x = torch.randn(5, 3, 4, dtype=dtype)
    with pytest.warns(RuntimeWarning, match=f"the input is {dtype}"):
        out, (h, c) = ours(x)
    want, (h2, c2) = theirs(x)
    assert out.dtype == dtype and torch.equal(out, want) and torch.equal(c, c2)


@pytest.mark.parametrize("options", OPTIONS[:6], ids=lambda o: "-".join(map(str, o)).replace(
    "torch.", ""))
def test_projections_run_pyrnns_kernels_and_match_torch_nn(options, monkeypatch):
    """proj_size runs through pyrnn's operators (the C++ core when its features() lists
    "projection", else the NumPy reference) and equals torch.nn.LSTM(proj_size) forward and
    backward, its parameters included."""
    layers, bidirectional, batch_first, bias, initial, packing, dtype = options
    torch.manual_seed(layers)
    T, B, I, H, P = 5, 3, 4, 6, 3  # noqa: N806, E741
    ours, theirs = make_pair("lstm", I, H, num_layers=layers, bidirectional=bidirectional,
                             batch_first=batch_first, bias=bias, dtype=dtype, proj_size=P)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=dtype)
    D = 2 if bidirectional else 1  # noqa: N806
    hx = None
    if initial:
        hx = (torch.randn(layers * D, B, P, dtype=dtype), torch.randn(layers * D, B, H,
                                                                       dtype=dtype))
    lengths = None
    if packing:
        lengths = torch.tensor([5, 4, 2] if packing == "sorted" else [2, 5, 3])
    want = run(theirs, x, hx, lengths, packing == "sorted")

    def torch_only(*args):
        raise AssertionError("torch's own implementation ran a projected LSTM")

    monkeypatch.setattr(ours, "_run_torch", torch_only)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "pyrnn.torch.LSTM: running pyrnn's NumPy reference")
        got = run(ours, x, hx, lengths, packing == "sorted")
    assert_same(got[0], want[0], dtype)
    assert_same(got[1], want[1], dtype)


def test_projections_off_the_cpu_run_torchs_implementation(monkeypatch):
    ours, theirs = make_pair("lstm", 4, 6, proj_size=3, num_layers=2)
    monkeypatch.setattr(pt_modules, "_device_type", lambda t: "cuda")
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="running torch's own implementation"):
        got = run(ours, x, None)
    assert_same(got[0], run(theirs, x, None)[0], torch.float64)


def test_forward_mode_ad_runs_torchs_implementation():
    import torch.autograd.forward_ad as fwad

    ours, theirs = make_pair("gru", 3, 4)
    x, tangent = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 2, 3,
                                                                        dtype=torch.float64)
    with fwad.dual_level():
        with pytest.warns(RuntimeWarning, match="forward-mode AD"):
            got = fwad.unpack_dual(ours(fwad.make_dual(x, tangent))[0]).tangent
        want = fwad.unpack_dual(theirs(fwad.make_dual(x, tangent))[0]).tangent
    assert torch.allclose(got, want)


# ---------------------------------------------------------------------- convert, modules

class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 5)
        self.body = torch.nn.Sequential(torch.nn.LSTM(5, 8, batch_first=True))
        self.gru = torch.nn.GRU(8, 8, bidirectional=True, batch_first=True)
        self.head = torch.nn.Linear(16, 11)

    def forward(self, ids):
        out, _ = self.body[0](self.embed(ids))
        out, _ = self.gru(out)
        return self.head(out)


def test_convert_keeps_the_parameter_objects_and_hooks():
    model = Tagger()
    before = dict(model.named_parameters())
    old_lstm = model.body[0]
    calls = []
    old_lstm.register_forward_hook(lambda *args: calls.append(1))
    assert pt.convert(model) is model
    assert type(model.body[0]) is pt.LSTM and type(model.gru) is pt.GRU
    assert type(old_lstm) is torch.nn.LSTM  # the old module is left as it was
    after = dict(model.named_parameters())
    assert list(after) == list(before) and all(after[n] is before[n] for n in before)
    assert all(w is before[f"gru.{n}"] for n, w in zip(model.gru._flat_weights_names,
                                                       model.gru._flat_weights, strict=True))
    model(torch.randint(0, 11, (2, 7)))
    assert calls == [1]
    shared = torch.nn.GRU(3, 3)
    twice = torch.nn.Sequential(shared, torch.nn.Sequential(shared))
    pt.convert(twice)
    assert type(twice[0]) is pt.GRU and twice[1][0] is twice[0]
    lone = torch.nn.RNN(3, 4)
    assert type(pt.convert(lone)) is pt.RNN and pt.convert(lone).weight_hh_l0 is lone.weight_hh_l0


def test_an_optimizer_built_before_convert_trains_the_converted_model_as_torch_nn():
    torch.manual_seed(0)
    model = Tagger().double()
    reference = Tagger().double()
    reference.load_state_dict(model.state_dict())
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    reference_adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    pt.convert(model)
    ids = torch.randint(0, 11, (4, 9))
    losses = []
    for _ in range(5):
        for net, opt in ((model, adam), (reference, reference_adam)):
            opt.zero_grad()
            logits = net(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-2] < losses[0]
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-10), name


def test_state_dict_moves_both_ways_with_torch_nn():
    ours, theirs = make_pair("lstm", 3, 4, num_layers=2, bidirectional=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    fresh = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    fresh.load_state_dict(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), ours.parameters(),
                                                 strict=True))


def test_same_initialisation_as_torch_nn():
    torch.manual_seed(7)
    theirs = torch.nn.GRU(5, 9, num_layers=2, bias=False)
    torch.manual_seed(7)
    ours = pt.GRU(5, 9, num_layers=2, bias=False)
    assert repr(ours) == repr(theirs)
    for a, b in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert a[0] == b[0] and torch.equal(a[1], b[1])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_from_module_and_to_module_round_trip_pyrnns_numpy_modules(cell):
    cls = {"lstm": pyrnn.LSTM, "gru": pyrnn.GRU, "rnn_relu": pyrnn.RNN}[cell]
    extra = {"nonlinearity": "relu"} if cell == "rnn_relu" else {}
    numpy_module = cls(3, 4, num_layers=2, bidirectional=True, batch_first=True,
                       dtype=np.float64, seed=0, **extra)
    layer = pt.from_module(numpy_module)
    assert type(layer).__name__ == cls.__name__ and layer.batch_first
    x = np.random.default_rng(0).standard_normal((2, 5, 3))
    want, _ = numpy_module(x)
    got, _ = layer(torch.from_numpy(x))
    assert np.allclose(got.detach().numpy(), want, atol=1e-12)
    back = layer.to_module()
    assert type(back) is cls and back.dtype == np.float64
    assert all(np.array_equal(back.params[n], numpy_module.params[n]) for n in back.params)
    with pytest.raises(TypeError, match="pyrnn.torch.convert"):
        pt.from_module(torch.nn.LSTM(3, 4))
