"""The variants of issue 31 against oracles that are not pyrnn, and against each other.

- ONNX Runtime runs the peephole and coupled-gate LSTMs (its LSTM operator with P, with
  input_forget) and the reset-before GRU (GRU, linear_before_reset=0) forward: outputs and final
  states of both kernel backends must match it, one ONNX node per layer (tests/onnx_models.py).
- PyTorch runs the projected LSTM: ``nn.LSTM(proj_size=P)``'s state_dict loads into
  ``pyrnn.LSTM(proj_size=P)`` as is and gives the same outputs and gradients.
- Variants that reduce to another cell must: zero peepholes are the plain LSTM, coupled gates
  are an LSTM whose input gate is the negated forget gate, an identity projection is none,
  a reset gate held at 1 makes both GRU forms one, a residual stack is its layers plus their
  inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

import pyrnn
from pyrnn import _backend, reference
from pyrnn._cells import CELLS

KERNELS = [
    pytest.param("numpy", id="reference"),
    pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(not _backend.cpp_available(),
                                                             reason="C++ core not built")),
]


@pytest.fixture(params=KERNELS)
def kernels(request):
    return _backend.kernels(request.param)


def runs(kernels, cell, proj=0, residual=False):
    """Skip unless the kernels run that cell and options (the C++ core lists what it runs)."""
    if kernels is not reference:
        missing = _backend.missing_in_cpp(cell, bool(proj), residual)
        if missing:
            pytest.skip(f"the C++ core has no kernels for {missing} yet")


def draw_stack(cell, T, B, I, H, L=1, D=1, proj=0, dtype=np.float64, seed=0, scale=1.0):  # noqa: E741
    """Random inputs and weights of a stack, as the kernel contract takes them."""
    rng = np.random.default_rng(seed)
    spec = CELLS[cell]
    P = proj or H  # noqa: N806

    def draw(*shape, s=1.0):
        return rng.uniform(-s, s, shape).astype(dtype)

    weights = [tuple(None if shape is None else draw(*shape, s=scale / np.sqrt(H))
                     for shape in spec.shapes(I if k < D else D * P, H, proj))
               for k in range(L * D)]
    x = draw(T, B, I)
    h0 = draw(L * D, B, P, s=0.5)
    c0 = draw(L * D, B, H, s=0.5) if spec.has_c else None
    return x, h0, c0, weights


def max_error(got, want):
    return float(np.max(np.abs(np.asarray(got) - np.asarray(want)), initial=0.0))


# ---------------------------------------------------------------------------------------------
# ONNX Runtime: peepholes, coupled gates, reset-before GRU (forward)

ORT_CELLS = ("lstm", "lstm_peephole", "lstm_coupled", "lstm_coupled_peephole", "gru",
             "gru_reset_before")
ORT_CONFIGS = {  # T, B, I, H, L, D, lengths
    "basic": (6, 3, 4, 5, 1, 1, None),
    "bidirectional": (5, 2, 3, 4, 1, 2, None),
    "lengths": (7, 4, 3, 5, 1, 1, np.array([7, 2, 5, 1])),
    "bidirectional_lengths": (6, 4, 3, 4, 1, 2, np.array([3, 6, 1, 4])),
    "two_layers_bidirectional_lengths": (5, 3, 4, 6, 2, 2, np.array([5, 1, 3])),
    "wide": (4, 8, 16, 64, 1, 2, None),
}
ORT_TOLERANCE = 2e-6  # ORT's LSTM and GRU run float32 only; values are in (-1, 1) but c's


@pytest.mark.parametrize("config", list(ORT_CONFIGS))
@pytest.mark.parametrize("cell", ORT_CELLS)
def test_forward_matches_onnx_runtime(kernels, cell, config):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx_models import ort_stack

    runs(kernels, cell)
    T, B, I, H, L, D, lengths = ORT_CONFIGS[config]  # noqa: N806, E741
    # Large weights (scale 3) drive the gates into saturation too, where the forms differ most.
    x, h0, c0, weights = draw_stack(cell, T, B, I, H, L, D, dtype=np.float32,
                                    seed=ORT_CELLS.index(cell), scale=3.0)
    want = ort_stack(cell, x, h0, c0, weights, D == 2, lengths)
    got = kernels.stack_forward(cell, x, h0, c0, weights, D == 2, lengths, None, False)[:3]
    for name, a, b in zip(("out", "h_n", "c_n"), got, want, strict=True):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape, name
        assert max_error(a, b) <= ORT_TOLERANCE, f"{name}: {max_error(a, b):.3g}"


def test_onnx_mapping_sees_the_peepholes_and_the_reset_form():
    """The oracle itself: ORT's answers change with each part the mapping carries."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx_models import ort_stack

    x, h0, c0, weights = draw_stack("lstm_peephole", 5, 2, 3, 4, dtype=np.float32, seed=1,
                                    scale=3.0)
    with_p = ort_stack("lstm_peephole", x, h0, c0, weights, False, None)[0]
    for row in range(3):  # each of w_ci, w_cf, w_co reaches ORT's answer
        w_peep = weights[0][4].copy()
        w_peep[row] = 0
        entry = (*weights[0][:4], w_peep, None)
        assert max_error(ort_stack("lstm_peephole", x, h0, c0, [entry], False, None)[0],
                         with_p) > 1e-3
    x, h0, _, weights = draw_stack("gru", 5, 2, 3, 4, dtype=np.float32, seed=2, scale=3.0)
    after = ort_stack("gru", x, h0, None, weights, False, None)[0]
    before = ort_stack("gru_reset_before", x, h0, None, weights, False, None)[0]
    assert max_error(after, before) > 1e-3


# ---------------------------------------------------------------------------------------------
# PyTorch: the projected LSTM through the module, outputs and gradients

PROJ_CONFIGS = {  # T, B, I, H, P, num_layers, bidirectional, lengths
    "one_layer": (5, 3, 4, 6, 3, 1, False, None),
    "bidirectional_lengths": (6, 4, 3, 5, 2, 1, True, [6, 2, 4, 1]),
    "two_layers_bidirectional_lengths": (6, 3, 4, 8, 3, 2, True, [3, 6, 1]),
    "three_layers_to_one": (4, 2, 3, 4, 1, 3, False, None),
}


@pytest.mark.parametrize("config", list(PROJ_CONFIGS))
def test_projected_lstm_matches_torch(backend, config):
    torch = pytest.importorskip("torch")
    T, B, I, H, P, L, bidirectional, lengths = PROJ_CONFIGS[config]  # noqa: N806, E741
    if backend == "cpp" and _backend.missing_in_cpp("lstm", True):
        pytest.skip("the C++ core has no projection kernels yet")
    torch.manual_seed(list(PROJ_CONFIGS).index(config))
    net = torch.nn.LSTM(I, H, num_layers=L, bidirectional=bidirectional, proj_size=P,
                        dtype=torch.float64)
    ours = pyrnn.LSTM(I, H, num_layers=L, bidirectional=bidirectional, proj_size=P,
                      dtype=np.float64, backend=backend)
    ours.load_state_dict({k: v.numpy() for k, v in net.state_dict().items()})
    D = 2 if bidirectional else 1  # noqa: N806
    rng = np.random.default_rng(7)
    x = rng.standard_normal((T, B, I))
    h0, c0 = rng.standard_normal((L * D, B, P)), rng.standard_normal((L * D, B, H))
    d_out = rng.standard_normal((T, B, D * P))
    d_h_n, d_c_n = rng.standard_normal((L * D, B, P)), rng.standard_normal((L * D, B, H))

    out, (h_n, c_n) = ours(x, (h0, c0), lengths=lengths)
    dx, (dh0, dc0) = ours.backward(d_out, (d_h_n, d_c_n))

    tx, th0, tc0 = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
    if lengths is None:
        t_out, (t_h, t_c) = net(tx, (th0, tc0))
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(tx, torch.tensor(lengths),
                                                         enforce_sorted=False)
        t_out, (t_h, t_c) = net(packed, (th0, tc0))
        t_out = torch.nn.utils.rnn.pad_packed_sequence(t_out, total_length=T)[0]
    loss = ((t_out * torch.tensor(d_out)).sum() + (t_h * torch.tensor(d_h_n)).sum()
            + (t_c * torch.tensor(d_c_n)).sum())
    loss.backward()
    pairs = {"out": (out, t_out), "h_n": (h_n, t_h), "c_n": (c_n, t_c), "dx": (dx, tx.grad),
             "dh0": (dh0, th0.grad), "dc0": (dc0, tc0.grad)}
    pairs.update({f"grads[{name}]": (ours.grads[name], param.grad)
                  for name, param in net.named_parameters()})
    assert any(name.startswith("grads[weight_hr") for name in pairs)
    for name, (a, b) in pairs.items():
        b = b.detach().numpy()
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Variants that reduce to another cell


def forward(kernels, cell, x, h0, c0, weights, bidirectional=False, lengths=None, residual=False,
            keep_tape=False):
    return kernels.stack_forward(cell, x, h0, c0, weights, bidirectional, lengths, None,
                                 keep_tape, None, residual)


def assert_outputs_equal(a, b, rtol=1e-13):
    for u, v in zip(a[:3], b[:3], strict=True):
        if v is None:
            assert u is None
        else:
            np.testing.assert_allclose(u, v, rtol=rtol, atol=1e-14)


def test_zero_peepholes_are_the_plain_lstm(kernels):
    runs(kernels, "lstm_peephole")
    x, h0, c0, weights = draw_stack("lstm_peephole", 6, 3, 4, 5, L=2, D=2, seed=3)
    plain = [entry[:4] for entry in weights]
    zero = [(*entry[:4], np.zeros_like(entry[4]), None) for entry in weights]
    lengths = np.array([6, 2, 4])
    assert_outputs_equal(forward(kernels, "lstm_peephole", x, h0, c0, zero, True, lengths),
                         forward(reference, "lstm", x, h0, c0, plain, True, lengths))
    assert not np.allclose(forward(kernels, "lstm_peephole", x, h0, c0, weights, True)[0],
                           forward(reference, "lstm", x, h0, c0, plain, True)[0])


@pytest.mark.parametrize("peephole", [False, True])
def test_coupled_gates_are_an_lstm_whose_input_gate_is_the_negated_forget_gate(kernels, peephole):
    """sigma(-a) = 1 - sigma(a): rows (-W_f, W_f, W_g, W_o) make the plain LSTM's i = 1 - f."""
    cell = "lstm_coupled_peephole" if peephole else "lstm_coupled"
    runs(kernels, cell)
    x, h0, c0, weights = draw_stack(cell, 5, 3, 4, 6, L=2, seed=4, scale=2.0)
    as_lstm = []
    for entry in weights:
        four = tuple(np.concatenate([-a[: a.shape[0] // 3], a]) for a in entry[:4])
        if peephole:
            w_cf, w_co = entry[4]
            as_lstm.append((*four, np.stack([-w_cf, w_cf, w_co]), None))
        else:
            as_lstm.append(four)
    plain = "lstm_peephole" if peephole else "lstm"
    assert_outputs_equal(forward(kernels, cell, x, h0, c0, weights),
                         forward(reference, plain, x, h0, c0, as_lstm), rtol=1e-12)


@pytest.mark.parametrize("cell", ["lstm", "lstm_peephole", "lstm_coupled_peephole"])
def test_identity_projection_is_none(kernels, cell):
    runs(kernels, cell, proj=1)
    x, h0, c0, weights = draw_stack(cell, 5, 3, 4, 5, L=2, D=2, seed=5)
    eye = np.eye(5)
    projected = [(*entry[:4], entry[4] if len(entry) > 4 else None, eye) for entry in weights]
    problem = (x, h0, c0)
    got = forward(kernels, cell, *problem, projected, True, keep_tape=True)
    want = forward(reference, cell, *problem, weights, True, keep_tape=True)
    assert_outputs_equal(got, want)
    rng = np.random.default_rng(0)
    d_out, d_h_n = rng.standard_normal(got[0].shape), rng.standard_normal(got[1].shape)
    d_c_n = rng.standard_normal(got[2].shape)
    g = kernels.stack_backward(got[3], d_out, d_h_n, d_c_n)
    w = reference.stack_backward(want[3], d_out, d_h_n, d_c_n)
    assert_outputs_equal(g, w)  # dx, dh0, dc0
    for g_entry, w_entry in zip(g[3], w[3], strict=True):
        for a, b in zip(g_entry, w_entry):  # noqa: B905 - the projected entry has dw_hr more
            if b is not None:
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_a_reset_gate_held_open_makes_both_gru_forms_one(kernels):
    runs(kernels, "gru_reset_before")
    x, h0, _, weights = draw_stack("gru", 5, 3, 4, 6, L=2, D=2, seed=6)
    H = 6  # noqa: N806
    held = []
    for w_ih, w_hh, b_ih, b_hh in weights:  # r = sigma(1e3) = 1 for every input
        w_ih, w_hh, b_ih = w_ih.copy(), w_hh.copy(), b_ih.copy()
        w_ih[:H], w_hh[:H], b_ih[:H] = 0, 0, 1e3
        held.append((w_ih, w_hh, b_ih, b_hh))
    assert_outputs_equal(forward(kernels, "gru_reset_before", x, h0, None, held, True),
                         forward(reference, "gru", x, h0, None, held, True))
    assert not np.allclose(forward(kernels, "gru_reset_before", x, h0, None, weights, True)[0],
                           forward(reference, "gru", x, h0, None, weights, True)[0])


@pytest.mark.parametrize("cell", list(CELLS))
def test_residual_stack_is_its_layers_plus_their_inputs(kernels, cell):
    proj = 3 if CELLS[cell].can_project else 0
    runs(kernels, cell, proj, residual=True)
    x, h0, c0, weights = draw_stack(cell, 5, 3, 4, 5, L=3, D=2, proj=proj, seed=7)
    lengths = np.array([5, 1, 3])
    got = forward(kernels, cell, x, h0, c0, weights, True, lengths, residual=True)
    layer_input, h_n = x, []
    for layer in range(3):
        s = slice(2 * layer, 2 * layer + 2)
        out, h, _, _ = forward(reference, cell, layer_input, h0[s],
                               None if c0 is None else c0[s], weights[s], True, lengths)
        layer_input = out + layer_input if layer > 0 else out
        h_n.append(h)
    np.testing.assert_allclose(got[0], layer_input, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(got[1], np.concatenate(h_n), rtol=1e-13, atol=1e-14)
    assert not got[0][1:, 1].any()  # still zero past each sequence's end


def test_residual_does_nothing_to_one_layer(kernels):
    runs(kernels, "gru")
    x, h0, _, weights = draw_stack("gru", 5, 3, 4, 5, D=2, seed=8)
    assert_outputs_equal(forward(kernels, "gru", x, h0, None, weights, True, residual=True),
                         forward(reference, "gru", x, h0, None, weights, True), rtol=0)
