"""The C++ kernels (pyrnn._core) against PyTorch and the NumPy reference, and their argument checks.

The kernels are called directly, through the kernel contract of pyrnn/_backend.py: this is what
every higher layer builds on, and what a caller bypassing the Python layer would reach.
"""

from __future__ import annotations

import numpy as np
import pytest

import pyrnn
from pyrnn import _backend, reference

if not _backend.cpp_available():
    pytest.skip("the C++ extension is not built", allow_module_level=True)

from pyrnn import _core  # noqa: E402
from pyrnn._cells import CELLS as CELL_TABLE  # noqa: E402
from pyrnn._cells import PLAIN_CELLS  # noqa: E402

CELLS = tuple(c for c in CELL_TABLE if c in _core.FEATURES)  # the cells this build runs
TORCH_CELLS = PLAIN_CELLS  # torch.nn has no variants
RTOL = {np.float32: 1e-4, np.float64: 1e-9}
DTYPES = (np.float32, np.float64)


# ---------------------------------------------------------------------------------------------
# Problems: random inputs, weights and upstream gradients for one configuration


class Problem:
    """One random call of the kernel contract and the upstream gradients for its backward."""

    def __init__(self, cell, T, B, n_in, H, L=1, D=1, lengths=False, bias=True, dtype=np.float64,
                 seed=0, masks=False, proj=0, residual=False):
        rng = np.random.default_rng(seed)
        self.cell, self.dtype, self.L, self.D, self.H = cell, dtype, L, D, H
        self.proj, self.residual = proj, residual
        spec = CELL_TABLE[cell]
        P = proj or H  # noqa: N806 - the width of h
        scale = 1.0 / np.sqrt(H)

        def rand(*shape, s=1.0):
            return (rng.uniform(-s, s, shape)).astype(dtype)

        self.x = rand(T, B, n_in)
        self.h0 = rand(L * D, B, P, s=0.5)
        self.c0 = rand(L * D, B, H, s=0.5) if spec.has_c else None
        self.weights = []
        for k in range(L * D):
            entry = []
            for part, shape in zip(spec.parts(bool(proj)),
                                   spec.shapes(n_in if k < D else D * P, H, proj), strict=True):
                if part is None:
                    entry.append(None)
                elif part.bias and not bias:
                    entry.append(np.zeros(shape, dtype))
                else:
                    entry.append(rand(*shape, s=scale))
            self.weights.append(tuple(entry))
        self.lengths = None
        if lengths:
            self.lengths = rng.integers(1, T + 1, B).astype(np.int64)
            self.lengths[rng.integers(B)] = T  # torch's packed path pads to the longest
        self.masks = None
        if masks and L > 1:
            keep = 0.7
            self.masks = [(rng.random((T, B, D * P)) < keep).astype(dtype) / dtype(keep)
                          for _ in range(L - 1)]
        self.d_out = rand(T, B, D * P)
        self.d_h_n = rand(L * D, B, P)
        self.d_c_n = rand(L * D, B, H) if spec.has_c else None

    @property
    def bidirectional(self):
        return self.D == 2

    def infer(self, kernels):
        """Forward without a tape: (out, h_n, c_n)."""
        return kernels.stack_forward(
            self.cell, self.x, self.h0, self.c0, self.weights, self.bidirectional, self.lengths,
            self.masks, False, **self.options)[:3]

    @property
    def options(self):
        """The keyword arguments of a variant stack (none for a plain one, as older cores)."""
        return {"residual": True} if self.residual else {}

    def run(self, kernels, d_h_n=True):
        """Forward with a tape, then backward: a dict of every output and gradient."""
        out, h_n, c_n, tape = kernels.stack_forward(
            self.cell, self.x, self.h0, self.c0, self.weights, self.bidirectional, self.lengths,
            self.masks, True, **self.options)
        dx, dh0, dc0, dw = kernels.stack_backward(
            tape, self.d_out, self.d_h_n if d_h_n else None, self.d_c_n if d_h_n else None)
        return {"out": out, "h_n": h_n, "c_n": c_n, "dx": dx, "dh0": dh0, "dc0": dc0, "dw": dw}


def assert_close(actual, expected, rtol, what):
    """Relative to the largest magnitude of the expected array (elementwise rtol fails near 0)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    err = float(np.abs(actual - expected).max(initial=0.0))
    assert err <= rtol * scale, f"{what}: max abs error {err:.3g} > {rtol:g} * {scale:.3g}"


def assert_results_close(got, want, rtol):
    for key in ("out", "h_n", "c_n", "dx", "dh0", "dc0"):
        if want[key] is None:
            assert got[key] is None, key
        else:
            assert_close(got[key], want[key], rtol, key)
    assert len(got["dw"]) == len(want["dw"])
    names = ("dw_ih", "dw_hh", "db_ih", "db_hh", "dw_peep", "dw_hr")
    for k, (g, w) in enumerate(zip(got["dw"], want["dw"], strict=True)):
        assert len(g) == len(w), f"d_weights[{k}] has {len(g)} parts, expected {len(w)}"
        for name, a, b in zip(names[:len(w)], g, w, strict=True):
            if b is None:
                assert a is None, f"{name}[{k}]"
            else:
                assert_close(a, b, rtol, f"{name}[{k}]")


# ---------------------------------------------------------------------------------------------
# PyTorch as the oracle


def torch_run(p: Problem):
    """The same call through torch.nn.RNN/LSTM/GRU with copied weights (packed when lengths)."""
    torch = pytest.importorskip("torch")
    T, B, n_in = p.x.shape
    tdtype = torch.float64 if p.dtype == np.float64 else torch.float32
    if p.masks is not None:
        return torch_run_layerwise(p, torch, tdtype)
    net = make_torch_net(torch, p.cell, n_in, p.H, p.L, p.bidirectional, tdtype)
    copy_weights(torch, net, p.weights, p.D, range(p.L))
    x = torch.tensor(p.x, requires_grad=True)
    h0 = torch.tensor(p.h0, requires_grad=True)
    c0 = torch.tensor(p.c0, requires_grad=True) if p.c0 is not None else None
    out, h_n, c_n = torch_forward(torch, net, x, h0, c0, p.lengths, T)
    loss = (out * torch.tensor(p.d_out)).sum() + (h_n * torch.tensor(p.d_h_n)).sum()
    if c_n is not None:
        loss = loss + (c_n * torch.tensor(p.d_c_n)).sum()
    loss.backward()
    return {
        "out": out.detach().numpy(), "h_n": h_n.detach().numpy(),
        "c_n": None if c_n is None else c_n.detach().numpy(),
        "dx": x.grad.numpy(), "dh0": h0.grad.numpy(),
        "dc0": None if c0 is None else c0.grad.numpy(),
        "dw": weight_grads(net, p.D, range(p.L)),
    }


def make_torch_net(torch, cell, n_in, H, L, bidirectional, tdtype):
    kw = {"num_layers": L, "bidirectional": bidirectional, "dtype": tdtype}
    if cell.startswith("rnn"):
        return torch.nn.RNN(n_in, H, nonlinearity=cell[4:], **kw)
    return {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](n_in, H, **kw)


def param_names(D, layers):
    for layer in layers:
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            yield [n + sfx for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


def copy_weights(torch, net, weights, D, layers, first=0):
    with torch.no_grad():
        for names, w in zip(param_names(D, layers), weights[first:], strict=True):
            for n, a in zip(names, w, strict=True):
                getattr(net, n).copy_(torch.from_numpy(a))


def weight_grads(net, D, layers):
    return [tuple(getattr(net, n).grad.numpy() for n in names) for names in param_names(D, layers)]


def torch_forward(torch, net, x, h0, c0, lengths, T):
    state = (h0, c0) if c0 is not None else h0
    if lengths is None:
        out, hn = net(x, state)
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            x, torch.from_numpy(lengths), enforce_sorted=False)
        out, hn = net(packed, state)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    h_n, c_n = hn if c0 is not None else (hn, None)
    return out, h_n, c_n


def torch_run_layerwise(p: Problem, torch, tdtype):
    """Layer by layer, multiplying each layer's output by its dropout mask before the next."""
    T, B, n_in = p.x.shape
    D = p.D
    x = torch.tensor(p.x, requires_grad=True)
    h0 = torch.tensor(p.h0, requires_grad=True)
    c0 = torch.tensor(p.c0, requires_grad=True) if p.c0 is not None else None
    nets, h_ns, c_ns = [], [], []
    inp = x
    for layer in range(p.L):
        net = make_torch_net(torch, p.cell, n_in if layer == 0 else D * p.H, p.H, 1,
                             p.bidirectional, tdtype)
        copy_weights(torch, net, p.weights[layer * D:(layer + 1) * D], D, [0])
        s = slice(layer * D, (layer + 1) * D)
        out, h_n, c_n = torch_forward(torch, net, inp, h0[s], None if c0 is None else c0[s],
                                      p.lengths, T)
        nets.append(net)
        h_ns.append(h_n)
        c_ns.append(c_n)
        inp = out * torch.from_numpy(p.masks[layer]) if layer + 1 < p.L else out
    h_n, out = torch.cat(h_ns), inp
    loss = (out * torch.tensor(p.d_out)).sum() + (h_n * torch.tensor(p.d_h_n)).sum()
    c_n = torch.cat(c_ns) if c0 is not None else None
    if c_n is not None:
        loss = loss + (c_n * torch.tensor(p.d_c_n)).sum()
    loss.backward()
    dw = [g for net in nets for g in weight_grads(net, D, [0])]
    return {
        "out": out.detach().numpy(), "h_n": h_n.detach().numpy(),
        "c_n": None if c_n is None else c_n.detach().numpy(),
        "dx": x.grad.numpy(), "dh0": h0.grad.numpy(),
        "dc0": None if c0 is None else c0.grad.numpy(), "dw": dw,
    }


# Named configurations: T, B, n_in, H and keyword arguments of Problem.
NAMED = {
    "basic": (5, 3, 4, 6, {}),
    "lengths": (7, 4, 3, 5, {"lengths": True}),
    "bidirectional": (6, 3, 4, 5, {"D": 2}),
    "bidirectional_lengths": (7, 5, 3, 4, {"D": 2, "lengths": True}),
    "three_layers": (5, 3, 4, 6, {"L": 3}),
    "three_layers_bidirectional_lengths": (6, 4, 3, 5, {"L": 3, "D": 2, "lengths": True}),
    "zero_bias": (5, 3, 4, 6, {"bias": False, "L": 2}),
    "batch_one": (6, 1, 3, 4, {"D": 2}),
    "one_step": (1, 3, 4, 5, {"L": 2, "D": 2}),
    "one_hidden_unit": (5, 3, 2, 1, {"L": 2, "D": 2, "lengths": True}),
    "all_ones": (1, 1, 1, 1, {}),
    # big enough for the per-step work to be shared by a team of threads: by hidden units (few
    # rows; H not a multiple of 16), and by batch rows (odd B, so the threads' shares differ)
    "threaded_steps": (4, 9, 5, 130, {"lengths": True}),
    "threaded_rows": (4, 19, 5, 100, {"lengths": True}),
}


def stable_seed(cell, config):
    return 10 * CELLS.index(cell) + 1000 * list(NAMED).index(config)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("config", list(NAMED))
@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_cpp_matches_torch(cell, config, dtype):
    T, B, n_in, H, kw = NAMED[config]
    p = Problem(cell, T, B, n_in, H, dtype=dtype, seed=stable_seed(cell, config), **kw)
    assert_results_close(p.run(_core), torch_run(p), RTOL[dtype])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_cpp_matches_torch_random_configs(cell, seed):
    rng = np.random.default_rng(100 + seed)
    T, B, n_in, H = (int(v) for v in rng.integers(1, [9, 6, 7, 10]))
    kw = {"L": int(rng.integers(1, 4)), "D": int(rng.integers(1, 3)),
          "lengths": bool(rng.integers(2)), "bias": bool(rng.integers(2))}
    for dtype in DTYPES:
        p = Problem(cell, T, B, n_in, H, dtype=dtype, seed=seed, **kw)
        assert_results_close(p.run(_core), torch_run(p), RTOL[dtype])


@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_cpp_dropout_masks_match_torch_layer_by_layer(cell):
    p = Problem(cell, 6, 4, 3, 5, L=3, D=2, lengths=True, masks=True, seed=7)
    assert_results_close(p.run(_core), torch_run(p), RTOL[np.float64])


@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_cpp_without_final_state_grads_matches_torch(cell):
    p = Problem(cell, 5, 3, 4, 6, L=2, D=2, lengths=True, seed=3)
    got = p.run(_core, d_h_n=False)
    p.d_h_n = np.zeros_like(p.d_h_n)
    if p.d_c_n is not None:
        p.d_c_n = np.zeros_like(p.d_c_n)
    assert_results_close(got, torch_run(p), RTOL[np.float64])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("cell", CELLS)
def test_cpp_inference_equals_training_forward(cell, dtype):
    p = Problem(cell, 6, 4, 3, 20, L=2, D=2, lengths=True, dtype=dtype, seed=5)
    args = (p.cell, p.x, p.h0, p.c0, p.weights, True, p.lengths, None)
    trained = _core.stack_forward(*args, True)
    inferred = _core.stack_forward(*args, False)
    assert inferred[3] is None
    for a, b in zip(trained[:3], inferred[:3], strict=True):
        if a is None:
            assert b is None
        else:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_cpp_outputs_past_each_length_are_zero(cell):
    p = Problem(cell, 8, 5, 3, 4, D=2, lengths=True, seed=11)
    r = p.run(_core)
    for b, n in enumerate(p.lengths):
        assert not r["out"][n:, b].any()
        assert not r["dx"][n:, b].any()


@pytest.mark.parametrize("lengths", [True, False], ids=["sorted_copy", "caller_order"])
def test_cpp_tape_survives_caller_changing_its_arrays(lengths):
    # Without lengths the tape keeps its own packed copy of x (no sorted copy exists).
    p = Problem("lstm", 5, 3, 4, 6, L=2, D=2, lengths=lengths, seed=2)
    want = p.run(_core)
    out, h_n, c_n, tape = _core.stack_forward(p.cell, p.x, p.h0, p.c0, p.weights, True,
                                              p.lengths, None, True)
    p.x[...] = 0
    for w in p.weights:
        for a in w:
            a[...] = 0
    del p.weights
    first = _core.stack_backward(tape, p.d_out, p.d_h_n, p.d_c_n)
    second = _core.stack_backward(tape, p.d_out, p.d_h_n, p.d_c_n)  # backward keeps the tape
    for got in (first, second):
        np.testing.assert_array_equal(got[0], want["dx"])
        for g, w in zip(got[3], want["dw"], strict=True):
            for a, b in zip(g, w, strict=True):
                np.testing.assert_array_equal(a, b)


def test_returned_arrays_are_not_reused_by_later_calls():
    # The core recycles buffers across calls; arrays it returned must keep their values.
    p = Problem("gru", 30, 8, 16, 64, D=2, dtype=np.float32, seed=9)
    first = p.run(_core)
    kept = {k: v.copy() for k, v in first.items() if isinstance(v, np.ndarray)}
    for seed in range(3):
        other = Problem("gru", 30, 8, 16, 64, D=2, dtype=np.float32, seed=20 + seed)
        other.run(_core)
    for key, value in kept.items():
        np.testing.assert_array_equal(first[key], value)


# ---------------------------------------------------------------------------------------------
# The NumPy reference as the oracle (once it implements the kernel contract)

needs_reference = pytest.mark.skipif(
    not hasattr(reference, "stack_forward"), reason="pyrnn.reference has no stack_forward yet")


@needs_reference
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("config", list(NAMED))
@pytest.mark.parametrize("cell", CELLS)
def test_cpp_matches_reference(cell, config, dtype):
    T, B, n_in, H, kw = NAMED[config]
    p = Problem(cell, T, B, n_in, H, dtype=dtype, seed=stable_seed(cell, config) + 1, **kw)
    assert_results_close(p.run(_core), p.run(reference), RTOL[dtype])


@needs_reference
@pytest.mark.parametrize("cell", CELLS)
def test_cpp_matches_reference_with_dropout_masks(cell):
    p = Problem(cell, 6, 4, 3, 5, L=3, D=2, lengths=True, masks=True, seed=8)
    assert_results_close(p.run(_core), p.run(reference), RTOL[np.float64])


# The options of issue 31 crossed with the stack's, against the reference, for every cell of the
# table; the cells and options this build has no kernels for yet are skipped.
VARIANT_NAMED = {
    "projected": (5, 3, 4, 6, {"proj": 3}),
    "projected_bidirectional_lengths": (7, 5, 3, 6, {"proj": 2, "L": 2, "D": 2, "lengths": True}),
    "projected_to_one": (5, 3, 2, 4, {"proj": 1, "L": 2, "D": 2, "lengths": True}),
    "projected_zero_bias_dropout": (5, 3, 4, 6, {"proj": 4, "L": 3, "bias": False,
                                                 "masks": True}),
    "residual": (5, 3, 4, 6, {"L": 3, "residual": True}),
    "residual_bidirectional_lengths_dropout": (6, 4, 3, 5, {"L": 3, "D": 2, "lengths": True,
                                                            "masks": True, "residual": True}),
    "residual_projected_bidirectional": (6, 4, 3, 5, {"L": 2, "D": 2, "proj": 3,
                                                      "residual": True, "lengths": True}),
    "threaded_projected": (4, 19, 5, 130, {"proj": 40, "lengths": True}),
}


@needs_reference
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("config", list(NAMED) + list(VARIANT_NAMED))
@pytest.mark.parametrize("cell", list(CELL_TABLE))
def test_cpp_matches_reference_every_cell_and_option(cell, config, dtype):
    T, B, n_in, H, kw = {**NAMED, **VARIANT_NAMED}[config]
    if kw.get("proj") and not CELL_TABLE[cell].can_project:
        pytest.skip("only the LSTM cells have a projection")
    if config in NAMED and cell in CELLS:
        pytest.skip("test_cpp_matches_reference runs it")
    missing = pyrnn._backend.missing_in_cpp(cell, bool(kw.get("proj")), kw.get("residual", False))
    if missing:
        pytest.skip(f"this build of the C++ core has no kernels for {missing} yet")
    seed = 10 * list(CELL_TABLE).index(cell) + 1000 * list({**NAMED, **VARIANT_NAMED}).index(config)
    p = Problem(cell, T, B, n_in, H, dtype=dtype, seed=seed + 2, **kw)
    assert_results_close(p.run(_core), p.run(reference), RTOL[dtype])


def test_cpp_refuses_what_it_has_no_kernels_for_naming_it():
    for cell in CELL_TABLE:
        if cell not in _core.FEATURES:
            p = Problem(cell, 3, 2, 3, 4)
            with pytest.raises(RuntimeError, match=f"no kernels for '{cell}'"):
                p.run(_core)
    if "residual" not in _core.FEATURES:
        p = Problem("gru", 3, 2, 3, 4, L=2, residual=True)
        with pytest.raises(RuntimeError, match="no kernels for 'residual'"):
            p.run(_core)


# ---------------------------------------------------------------------------------------------
# Direct calls with bad arguments raise Python exceptions (never crash)


def call(p: Problem, **changes):
    args = {"cell": p.cell, "x": p.x, "h0": p.h0, "c0": p.c0, "weights": p.weights,
            "bidirectional": p.bidirectional, "lengths": p.lengths, "dropout_masks": p.masks,
            "keep_tape": True}
    args.update(changes)
    return _core.stack_forward(**args)


@pytest.fixture
def lstm_problem():
    return Problem("lstm", 5, 3, 4, 6, L=2, D=2, lengths=True, masks=True, seed=1)


@pytest.fixture
def gru_problem():
    return Problem("gru", 5, 3, 4, 6, L=2, seed=1, dtype=np.float32)


def test_rejects_unknown_cell(lstm_problem):
    with pytest.raises(ValueError, match="cell must be one of"):
        call(lstm_problem, cell="vanilla")


@pytest.mark.parametrize("bad", [None, [[1.0]], 3.0])
def test_rejects_x_that_is_not_an_array(lstm_problem, bad):
    with pytest.raises(TypeError, match="x: expected a numpy array"):
        call(lstm_problem, x=bad)


@pytest.mark.parametrize("dtype", [np.int64, np.float16, np.complex128, np.bool_])
def test_rejects_x_of_unsupported_dtype(lstm_problem, dtype):
    with pytest.raises(TypeError, match="x: expected dtype float32 or float64"):
        call(lstm_problem, x=lstm_problem.x.astype(dtype))


@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 4, 1), (0, 3, 4), (5, 0, 4), (5, 3, 0)])
def test_rejects_x_of_bad_shape(lstm_problem, shape):
    with pytest.raises(ValueError, match="x: "):
        call(lstm_problem, x=np.zeros(shape))


def test_rejects_x_with_wrong_input_size(lstm_problem):
    with pytest.raises(ValueError, match=r"w_ih: expected shape \(24, 5\), got \(24, 4\)"):
        call(lstm_problem, x=np.zeros((5, 3, 5)))


@pytest.mark.parametrize("name", ["h0", "c0"])
def test_rejects_state_of_other_dtype(lstm_problem, name):
    bad = getattr(lstm_problem, name).astype(np.float32)
    with pytest.raises(TypeError, match=f"{name}: expected dtype float64"):
        call(lstm_problem, **{name: bad})


def test_rejects_weight_of_other_dtype(lstm_problem):
    w = list(lstm_problem.weights)
    w[1] = (w[1][0], w[1][1].astype(np.float32), w[1][2], w[1][3])
    with pytest.raises(TypeError, match=r"weights\[1\] w_hh: expected dtype float64"):
        call(lstm_problem, weights=w)


def test_rejects_float64_weights_with_float32_x(gru_problem):
    w = [tuple(a.astype(np.float64) for a in entry) for entry in gru_problem.weights]
    with pytest.raises(TypeError, match=r"weights\[0\] w_ih: expected dtype float32"):
        call(gru_problem, weights=w)


@pytest.mark.parametrize("name,shape", [("h0", (4, 2, 6)), ("h0", (4, 3, 6, 1)), ("h0", (4, 3)),
                                        ("c0", (4, 3, 5)), ("c0", (2, 3, 6))])
def test_rejects_state_of_wrong_shape(lstm_problem, name, shape):
    with pytest.raises(ValueError, match=f"{name}: expected"):
        call(lstm_problem, **{name: np.zeros(shape)})


def test_rejects_missing_h0(lstm_problem):
    with pytest.raises(ValueError, match="h0: required"):
        call(lstm_problem, h0=None)


def test_rejects_h0_that_is_not_an_array(lstm_problem):
    with pytest.raises(TypeError, match="h0: expected a numpy array"):
        call(lstm_problem, h0=lstm_problem.h0.tolist())


def test_rejects_missing_c0_for_lstm(lstm_problem):
    with pytest.raises(ValueError, match="c0: required"):
        call(lstm_problem, c0=None)


def test_rejects_c0_for_gru(gru_problem):
    with pytest.raises(ValueError, match="c0: only 'lstm'"):
        call(gru_problem, c0=gru_problem.h0)


def test_rejects_odd_state_count_when_bidirectional():
    p = Problem("gru", 5, 3, 4, 6, L=3, seed=1)
    with pytest.raises(ValueError, match="D = 2"):
        call(p, bidirectional=True)


@pytest.mark.parametrize("count", [0, 3, 5])
def test_rejects_wrong_weight_count(lstm_problem, count):
    w = (lstm_problem.weights * 2)[:count]
    with pytest.raises(ValueError, match=f"weights: expected 4 entries.*got {count}"):
        call(lstm_problem, weights=w)


def test_rejects_weight_entry_without_four_arrays(lstm_problem):
    w = list(lstm_problem.weights)
    w[2] = w[2][:3]
    with pytest.raises(ValueError, match=r"weights\[2\]: expected 4 entries"):
        call(lstm_problem, weights=w)


@pytest.mark.parametrize("bad", [None, "weights", 3])
def test_rejects_weights_that_are_not_a_list(lstm_problem, bad):
    with pytest.raises(TypeError, match="weights: expected a list"):
        call(lstm_problem, weights=bad)


@pytest.mark.parametrize("which,shape", [(0, (24, 3)), (1, (24, 5)), (1, (6, 24)), (2, (23,)),
                                         (3, (24, 1))])
def test_rejects_weight_of_wrong_shape(lstm_problem, which, shape):
    w = [list(entry) for entry in lstm_problem.weights]
    w[0][which] = np.zeros(shape)
    name = ("w_ih", "w_hh", "b_ih", "b_hh")[which]
    with pytest.raises(ValueError, match=rf"weights\[0\] {name}: expected shape"):
        call(lstm_problem, weights=w)


def test_rejects_upper_layer_weights_sized_for_the_input(lstm_problem):
    w = [list(entry) for entry in lstm_problem.weights]
    w[2][0] = np.zeros((24, 4))  # layer 1 reads D*H = 12 features, not I = 4
    with pytest.raises(ValueError, match=r"weights\[2\] w_ih: expected shape \(24, 12\)"):
        call(lstm_problem, weights=w)


@pytest.mark.parametrize("lengths,match", [
    ([0, 5, 5], r"lengths: every length must be in \[1, T\]"),
    ([6, 5, 5], r"lengths: every length must be in \[1, T\]"),
    ([-1, 5, 5], r"lengths: every length must be in \[1, T\]"),
    ([5, 5], r"lengths: expected shape \(3,\)"),
    ([5, 5, 5, 5], r"lengths: expected shape \(3,\)"),
    ([[5, 5, 5]], r"lengths: expected shape \(3,\)"),
])
def test_rejects_bad_lengths(lstm_problem, lengths, match):
    with pytest.raises(ValueError, match=match):
        call(lstm_problem, lengths=np.array(lengths))


@pytest.mark.parametrize("lengths", [[5.0, 4.0, 3.0], ["5", "4", "3"], [5, 4, None]])
def test_rejects_lengths_that_are_not_integers(lstm_problem, lengths):
    with pytest.raises(TypeError, match="lengths: expected integers"):
        call(lstm_problem, lengths=np.array(lengths))


def test_accepts_lengths_of_any_integer_dtype_and_plain_lists(lstm_problem):
    want = call(lstm_problem)[0]
    for lengths in (lstm_problem.lengths.astype(np.int32), lstm_problem.lengths.astype(np.uint8),
                    lstm_problem.lengths.tolist()):
        np.testing.assert_array_equal(call(lstm_problem, lengths=lengths)[0], want)


def test_rejects_wrong_number_of_dropout_masks(lstm_problem):
    with pytest.raises(ValueError, match="dropout_masks: expected 1 entries"):
        call(lstm_problem, dropout_masks=lstm_problem.masks * 2)


def test_rejects_dropout_mask_of_wrong_shape(lstm_problem):
    with pytest.raises(ValueError, match=r"dropout_masks\[0\]: expected shape \(5, 3, 12\)"):
        call(lstm_problem, dropout_masks=[np.ones((5, 3, 6))])


@pytest.mark.parametrize("layout", ["strided", "fortran", "byteswapped", "unaligned"])
def test_accepts_any_memory_layout_with_the_same_result(lstm_problem, layout):
    want = lstm_problem.run(_core)

    def relayout(a):
        if a is None:
            return None
        if layout == "strided":
            big = np.zeros(a.shape + (2,), a.dtype)
            big[..., 0] = a
            return big[..., 0]
        if layout == "fortran":
            return np.asfortranarray(a)
        if layout == "byteswapped":
            return a.astype(a.dtype.newbyteorder(">"))
        raw = np.zeros(a.nbytes + 1, np.uint8)[1:].view(a.dtype).reshape(a.shape)
        raw[...] = a
        return raw

    p = lstm_problem
    p.x, p.h0, p.c0 = relayout(p.x), relayout(p.h0), relayout(p.c0)
    p.weights = [tuple(relayout(a) for a in w) for w in p.weights]
    p.masks = [relayout(m) for m in p.masks]
    p.d_out, p.d_h_n, p.d_c_n = relayout(p.d_out), relayout(p.d_h_n), relayout(p.d_c_n)
    assert_results_close(p.run(_core), want, 0.0)


def forward_tape(p: Problem):
    return call(p)[3]


def test_backward_rejects_none_tape(lstm_problem):
    with pytest.raises(ValueError, match="tape: got None"):
        _core.stack_backward(None, lstm_problem.d_out, None, None)


@pytest.mark.parametrize("bad", [3, "tape", np.zeros(3)])
def test_backward_rejects_something_else_as_tape(lstm_problem, bad):
    with pytest.raises(TypeError, match="tape: expected the Tape"):
        _core.stack_backward(bad, lstm_problem.d_out, None, None)


def test_backward_rejects_d_out_of_other_dtype_than_tape(lstm_problem, gru_problem):
    with pytest.raises(TypeError, match="d_out: expected dtype float64"):
        _core.stack_backward(forward_tape(lstm_problem), lstm_problem.d_out.astype(np.float32),
                             None, None)
    with pytest.raises(TypeError, match="d_out: expected dtype float32"):
        _core.stack_backward(forward_tape(gru_problem), gru_problem.d_out.astype(np.float64),
                             None, None)


@pytest.mark.parametrize("shape", [(5, 3, 6), (4, 3, 12), (5, 3, 12, 1), (5, 36)])
def test_backward_rejects_d_out_of_wrong_shape(lstm_problem, shape):
    with pytest.raises(ValueError, match=r"d_out: expected shape \(5, 3, 12\)"):
        _core.stack_backward(forward_tape(lstm_problem), np.zeros(shape), None, None)


def test_backward_rejects_d_out_that_is_not_an_array(lstm_problem):
    with pytest.raises(TypeError, match="d_out: expected a numpy array"):
        _core.stack_backward(forward_tape(lstm_problem), lstm_problem.d_out.tolist(), None, None)


def test_backward_rejects_final_state_grads_of_wrong_shape(lstm_problem):
    tape = forward_tape(lstm_problem)
    with pytest.raises(ValueError, match="d_h_n: expected shape"):
        _core.stack_backward(tape, lstm_problem.d_out, np.zeros((4, 3, 5)), None)
    with pytest.raises(ValueError, match="d_c_n: expected shape"):
        _core.stack_backward(tape, lstm_problem.d_out, None, np.zeros((2, 3, 6)))


def test_backward_rejects_d_c_n_for_gru(gru_problem):
    with pytest.raises(ValueError, match="d_c_n: only 'lstm'"):
        _core.stack_backward(forward_tape(gru_problem), gru_problem.d_out, None, gru_problem.h0)


def test_inference_returns_no_tape(gru_problem):
    assert call(gru_problem, keep_tape=False)[3] is None


def test_tape_describes_itself(lstm_problem):
    tape = forward_tape(lstm_problem)
    assert tape.cell == "lstm" and tape.dtype == "float64"
    assert "T=5 B=3 I=4 H=6 L=2 D=2" in repr(tape)


# ---------------------------------------------------------------------------------------------
# Threads: deterministic for a given count, and the count does not change the numbers


@pytest.fixture
def threads():
    before = pyrnn.get_num_threads()
    yield pyrnn.set_num_threads
    pyrnn.set_num_threads(before)


# (B, H, lengths) whose steps a training team of two shares (sequence.hpp, plan_steps): 16 or 17
# rows share out by rows, every other row to each thread when lengths differ and a block of rows
# each when they do not; 9 rows (too few for two threads) and a batch of one by hidden units,
# which takes a W_hh of 128 KB or more (H = 190: 141 KB for the RNN); 24 rows by rows again with
# a W_hh past a core's L2 (H = 520: 1.03 MiB for the RNN), which takes 12 rows a thread
TEAM_SHAPES = {"by_rows_in_turn": (16, 96, True), "by_rows_in_blocks": (17, 96, False),
               "by_units": (9, 190, True), "batch_of_one": (1, 190, True),
               "by_rows_streaming_w_hh": (24, 520, False)}


@pytest.mark.parametrize("shape", list(TEAM_SHAPES))
@pytest.mark.parametrize("cell", CELLS)
def test_results_repeat_exactly_for_a_thread_count(cell, shape, threads):
    B, H, lengths = TEAM_SHAPES[shape]
    p = Problem(cell, 6, B, 8, H, L=2, lengths=lengths, dtype=np.float32, seed=4)
    for n in (1, 2):
        threads(n)
        first, second = p.run(_core), p.run(_core)
        assert_results_close(second, first, 0.0)


@pytest.mark.parametrize("shape", list(TEAM_SHAPES))
@pytest.mark.parametrize("cell", CELLS)
def test_one_and_two_threads_agree_exactly(cell, shape, threads):
    # every output element is the same sequence of operations whoever computes it
    B, H, lengths = TEAM_SHAPES[shape]
    p = Problem(cell, 6, B, 8, H, L=2, lengths=lengths, dtype=np.float32, seed=6)
    threads(1)
    one = p.run(_core)
    threads(2)
    assert_results_close(p.run(_core), one, 0.0)


@pytest.mark.parametrize("shape", list(TEAM_SHAPES))
@pytest.mark.parametrize("cell", CELLS)
def test_backward_on_another_thread_count_than_its_forward_agrees_exactly(cell, shape, threads):
    # The tape keeps W_hh packed whole and each backward thread reads its own columns of it,
    # whatever team the forward pass had.
    B, H, lengths = TEAM_SHAPES[shape]
    p = Problem(cell, 6, B, 8, H, L=2, lengths=lengths, dtype=np.float32, seed=8)
    threads(1)
    want = p.run(_core)
    for forward_threads, backward_threads in ((1, 2), (2, 1)):
        threads(forward_threads)
        out, h_n, c_n, tape = _core.stack_forward(p.cell, p.x, p.h0, p.c0, p.weights,
                                                  p.bidirectional, p.lengths, p.masks, True)
        threads(backward_threads)
        dx, dh0, dc0, dw = _core.stack_backward(tape, p.d_out, p.d_h_n, p.d_c_n)
        got = {"out": out, "h_n": h_n, "c_n": c_n, "dx": dx, "dh0": dh0, "dc0": dc0, "dw": dw}
        assert_results_close(got, want, 0.0)


@pytest.mark.parametrize("cell", CELLS)
def test_two_threads_agree_exactly_call_after_call(cell, threads):
    # A loop shared out by units runs on its team or, when that has been slower lately, on one
    # thread (threads.hpp, TeamChoice), and tries the other now and then: a new kind of loop at its
    # fifth call, so a dozen calls pass through a try. Every call must give the one-thread bits.
    B, H, _ = TEAM_SHAPES["batch_of_one"]
    p = Problem(cell, 6, B, 8, H, lengths=False, dtype=np.float32, seed=9)
    threads(1)
    one, one_infer = p.run(_core), p.infer(_core)
    threads(2)
    for _ in range(12):
        assert_results_close(p.run(_core), one, 0.0)
        for got, want in zip(p.infer(_core), one_infer, strict=True):
            if want is not None:
                np.testing.assert_array_equal(got, want)


# Unidirectional stacks whose layers run at once on two threads, each layer on a thread of its own
# (stack.hpp, layer_lanes), while one thread runs them one after another. Every call must give the
# bits of one thread, in both directions of a training pass, and its small time loops may run on
# their team or alone as TeamChoice learns (both give the same bits).
# (T, B, H, L): batches of one and nine, a single step, a four-layer stack; and steps wide enough
# (2^23 multiply-adds or more), or layers with enough weights (8 MiB or more), that two threads
# run the layers one after another, each with both threads (team_plan.hpp, kLanesMax*).
LAYER_SHAPES = {"batch_of_one": (9, 1, 190, 2), "batch_of_nine": (7, 9, 40, 2),
                "one_step": (1, 3, 24, 2), "four_layers": (6, 2, 24, 4),
                "wide_steps": (2, 64, 256, 2), "many_weights": (2, 1, 1024, 2)}


@pytest.mark.parametrize("shape", list(LAYER_SHAPES))
@pytest.mark.parametrize("cell", CELLS)
def test_layers_at_once_give_the_bits_of_one_thread_call_after_call(cell, shape, threads):
    T, B, H, L = LAYER_SHAPES[shape]  # noqa: N806
    p = Problem(cell, T, B, 8, H, L=L, lengths=B > 1, dtype=np.float32, seed=10, masks=True)
    cache_one, cache_two = _core.PackCache(), _core.PackCache()

    def infer(cache):
        return _core.stack_forward(p.cell, p.x, p.h0, p.c0, p.weights, False, p.lengths, p.masks,
                                   False, cache)[:3]

    threads(1)
    one, one_infer, one_cached = p.run(_core), p.infer(_core), infer(cache_one)
    threads(2)
    for _ in range(32):
        assert_results_close(p.run(_core), one, 0.0)
        for got in (p.infer(_core), infer(cache_two)):
            for a, b in zip(got, one_infer, strict=True):
                if b is not None:
                    np.testing.assert_array_equal(a, b)
    for a, b in zip(one_cached, one_infer, strict=True):
        if b is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_layers_at_once_on_more_threads_than_cores_agree_exactly(cell, threads):
    # four layers on four threads of this 2-core machine: a thread waiting for the layer below
    # must give its core up, not spin it away
    p = Problem(cell, 12, 3, 8, 32, L=4, lengths=True, dtype=np.float32, seed=11, masks=True)
    threads(1)
    one = p.run(_core)
    threads(4)
    for _ in range(8):
        assert_results_close(p.run(_core), one, 0.0)


@pytest.mark.parametrize("cell", CELLS)
def test_layers_at_once_match_the_reference(cell, threads):
    p = Problem(cell, 8, 4, 5, 20, L=2, lengths=True, seed=12, masks=True)
    want = p.run(reference)
    threads(2)
    for _ in range(32):
        assert_results_close(p.run(_core), want, 1e-9)


def replay_team_choice(choice, team_ns, alone_ns, calls, loop=0):
    """The options a TeamChoice picks for `calls` calls that take these times per step."""
    picks = []
    for _ in range(calls):
        option = choice.pick(loop)
        choice.record(loop, option, team_ns if option == "team" else alone_ns)
        picks.append(option)
    return picks


def test_team_choice_keeps_a_team_that_is_faster():
    picks = replay_team_choice(_core._impl._TeamChoice(), team_ns=60.0, alone_ns=100.0, calls=600)
    assert picks[:4] == ["team"] * 4 and picks[4] == "alone"  # the first try
    # later tries ever more rarely: 8, 16, ... 256 calls apart (at calls 13, 30, 63, 128, 257, 514)
    assert picks.count("alone") == 7
    assert picks[-200:].count("alone") <= 1


def test_team_choice_runs_alone_while_the_team_is_slower_and_comes_back():
    choice = _core._impl._TeamChoice()
    slow_team = replay_team_choice(choice, team_ns=100.0, alone_ns=60.0, calls=300)
    assert slow_team[4:6] == ["alone", "alone"]  # the first try wins and stays
    assert slow_team[-100:].count("alone") >= 99
    # the cores come near again: a later try of the team finds it faster and keeps it
    fast_team = replay_team_choice(choice, team_ns=40.0, alone_ns=60.0, calls=300)
    assert fast_team[-20:].count("team") >= 19
    assert fast_team.index("team") <= 256


def test_team_choice_needs_a_clear_win_to_switch():
    # within 5 %, a try does not move the loop off its team
    picks = replay_team_choice(_core._impl._TeamChoice(), team_ns=100.0, alone_ns=96.0, calls=300)
    assert picks.count("alone") == 6


def test_team_choice_learns_each_loop_apart():
    choice = _core._impl._TeamChoice()
    for _ in range(50):
        for loop, (team_ns, alone_ns) in enumerate([(100.0, 60.0), (60.0, 100.0)]):
            option = choice.pick(loop)
            choice.record(loop, option, team_ns if option == "team" else alone_ns)
    assert choice.pick(0) == "alone" and choice.pick(1) == "team"


@pytest.mark.parametrize("option,ns", [("both", 1.0), ("team", -1.0), ("alone", float("nan"))])
def test_team_choice_record_rejects_bad_arguments(option, ns):
    with pytest.raises(ValueError):
        _core._impl._TeamChoice().record(0, option, ns)


# Weights larger than a core's L2 with 12+ batch rows are streamed a chunk of panels at a time,
# the next chunk prefetched; depths of 300 and 530 run past one 256-deep block and end in a partial
# one (not a multiple of the SIMD width), and 530 columns end in a partial panel. On two threads
# each thread's share of W_hh is still larger than L2 for lstm and gru.
@pytest.mark.parametrize("threads_used", (1, 2))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_weights_streamed_past_l2_match_torch(cell, dtype, threads_used, threads):
    threads(threads_used)
    p = Problem(cell, 3, 13, 300, 530, lengths=True, dtype=dtype, seed=12)
    assert_results_close(p.run(_core), torch_run(p), RTOL[dtype])


# Inference shares out the units of a smaller W_hh than training does (112 KB against 128): with a
# batch of one and H = 176 (121 KB) the RNN's steps are shared only in inference.
INFERENCE_SHAPES = {**TEAM_SHAPES, "rnn_inference_only": (1, 176, True)}


@pytest.mark.parametrize("shape", list(INFERENCE_SHAPES))
@pytest.mark.parametrize("cell", CELLS)
def test_inference_agrees_exactly_on_one_and_two_threads(cell, shape, threads):
    B, H, lengths = INFERENCE_SHAPES[shape]
    p = Problem(cell, 7, B, 8, H, L=2, lengths=lengths and B > 1, dtype=np.float32, seed=8)
    threads(1)
    one = p.infer(_core)
    threads(2)
    for got, want in zip(p.infer(_core), one, strict=True):
        if want is not None:
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", list(TEAM_SHAPES))
@pytest.mark.parametrize("cell", CELLS)
def test_more_threads_than_a_direction_gets_agree_exactly(cell, shape, threads):
    # With 4 threads each direction of a bidirectional layer asks for a team of 2 inside the
    # region that runs the directions side by side, where OpenMP grants only 1: the time loop
    # must split its work by the team it is given, not the one it asked for.
    B, H, lengths = TEAM_SHAPES[shape]
    p = Problem(cell, 6, B, 8, H, L=2, D=2, lengths=lengths, dtype=np.float32, seed=7)
    threads(1)
    one = p.run(_core)
    for n in (3, 4):
        threads(n)
        assert_results_close(p.run(_core), one, 0.0)


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-3, ValueError), (1.5, TypeError),
                                       ("2", TypeError), (None, TypeError)])
def test_core_set_num_threads_rejects_bad_counts(bad, error):
    with pytest.raises(error):
        _core.set_num_threads(bad)


def test_core_set_num_threads_round_trips(threads):
    for n in (1, 3, 2):
        threads(n)
        assert _core.get_num_threads() == n == pyrnn.get_num_threads()


# Where pyrnn/_core.py loads two builds (AVX-512 for batches, AVX2 for a batch of one, on AMD),
# each call runs on one of them. They sum every output in the same order, so the choice must
# never change a bit: checked here by running the same calls through both builds directly.
both_builds = pytest.mark.skipif(
    getattr(_core, "_batch_one", None) is None, reason="a single build of the core is loaded")


@both_builds
@pytest.mark.parametrize("threads_used", (1, 2))
@pytest.mark.parametrize("B", (1, 5, 32))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("cell", CELLS)
def test_both_builds_return_the_same_bits(cell, dtype, B, threads_used, threads):
    threads(threads_used)
    # H = 100 is not a multiple of either build's panel width; I = 300 runs past one depth block.
    p = Problem(cell, 7, B, 300, 100, L=2, D=2, lengths=B > 1, dtype=dtype, seed=13)
    wide, narrow = p.run(_core._impl), p.run(_core._batch_one)
    assert_results_close(wide, narrow, 0.0)
    for got, want in zip(p.infer(_core._impl), p.infer(_core._batch_one), strict=True):
        if want is not None:
            np.testing.assert_array_equal(got, want)


@both_builds
def test_a_batch_of_one_runs_on_the_batch_one_build_and_its_tape_returns_there():
    one, three = (Problem("lstm", 5, B, 4, 8, dtype=np.float32) for B in (1, 3))
    tapes = [_core.stack_forward(p.cell, p.x, p.h0, p.c0, p.weights, False, None, None, True)[3]
             for p in (one, three)]
    assert isinstance(tapes[0], _core._batch_one.Tape)
    assert isinstance(tapes[1], _core._impl.Tape)
    for p in (one, three):  # through the dispatch, backward finds the build that made the tape
        assert_results_close(p.run(_core), p.run(_core._impl), 0.0)
    with pytest.raises(TypeError, match="tape: expected the Tape"):
        _core._impl.stack_backward(tapes[0], one.d_out, None, one.d_c_n)


# ---------------------------------------------------------------------------------------------
# accumulate_into, on both backends: the weight gradients are added into the caller's arrays in
# place (how a module's gradients accumulate), and bad targets are refused before any is written

ACCUMULATE_CELLS = ("rnn_tanh", "lstm", "gru")
ACCUMULATE_CONFIGS = {  # (T, B, I, H, Problem options)
    "basic": (5, 3, 4, 6, {}),
    "layers_bidirectional_lengths": (6, 4, 3, 5, {"L": 2, "D": 2, "lengths": True}),
    "team_of_threads": (4, 9, 5, 130, {"lengths": True}),
}


def kernels_of(backend):
    return _backend.kernels(backend)


def forward_with_tape(p: Problem, backend):
    return kernels_of(backend).stack_forward(p.cell, p.x, p.h0, p.c0, p.weights, p.bidirectional,
                                             p.lengths, p.masks, True)[3]


def like_weights(p: Problem, fill):
    """Arrays shaped like p's weights, from fill(shape)."""
    return [tuple(fill(a.shape).astype(p.dtype) for a in entry) for entry in p.weights]


@pytest.mark.parametrize("config", list(ACCUMULATE_CONFIGS))
@pytest.mark.parametrize("cell", ACCUMULATE_CELLS)
def test_weight_grads_are_added_to_what_the_targets_held(backend, cell, config):
    T, B, n_in, H, options = ACCUMULATE_CONFIGS[config]
    p = Problem(cell, T, B, n_in, H, seed=3, **options)
    tape = forward_with_tape(p, backend)
    fresh = kernels_of(backend).stack_backward(tape, p.d_out, p.d_h_n, p.d_c_n)
    rng = np.random.default_rng(1)
    start = like_weights(p, rng.standard_normal)
    targets = [tuple(a.copy() for a in entry) for entry in start]
    got = kernels_of(backend).stack_backward(tape, p.d_out, p.d_h_n, p.d_c_n, targets)
    for k, (returned, target, before, grads) in enumerate(
            zip(got[3], targets, start, fresh[3], strict=True)):
        for j, (r, t, b, g) in enumerate(zip(returned, target, before, grads, strict=True)):
            assert r is t, f"d_weights[{k}][{j}] is not the target array"
            assert_close(t, b + g, 1e-12, f"accumulate_into[{k}][{j}]")
    for key, a, b in zip(("dx", "dh0", "dc0"), got[:3], fresh[:3], strict=True):
        if b is None:
            assert a is None
        else:
            np.testing.assert_array_equal(a, b, err_msg=key)


@pytest.mark.parametrize("cell", ACCUMULATE_CELLS)
def test_adding_into_zeros_gives_the_bits_backward_returns(backend, cell):
    p = Problem(cell, 6, 4, 3, 5, L=2, D=2, lengths=True, dtype=np.float32, seed=5)
    tape = forward_with_tape(p, backend)
    fresh = kernels_of(backend).stack_backward(tape, p.d_out, p.d_h_n, p.d_c_n)[3]
    targets = like_weights(p, np.zeros)
    kernels_of(backend).stack_backward(tape, p.d_out, p.d_h_n, p.d_c_n, targets)
    for target, grads in zip(targets, fresh, strict=True):
        for t, g in zip(target, grads, strict=True):
            np.testing.assert_array_equal(t, g)


@pytest.mark.parametrize("shape", list(TEAM_SHAPES))
@pytest.mark.parametrize("cell", ACCUMULATE_CELLS)
def test_one_and_two_threads_add_the_same_bits(cell, shape, threads):
    B, H, lengths = TEAM_SHAPES[shape]
    p = Problem(cell, 6, B, 8, H, L=2, lengths=lengths, dtype=np.float32, seed=6)
    start = like_weights(p, np.random.default_rng(2).standard_normal)
    results = []
    for n in (1, 2):
        threads(n)
        targets = [tuple(a.copy() for a in entry) for entry in start]
        _core.stack_backward(forward_with_tape(p, "cpp"), p.d_out, p.d_h_n, p.d_c_n, targets)
        results.append(targets)
    for one, two in zip(*results, strict=True):
        for a, b in zip(one, two, strict=True):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------ refusals

@pytest.fixture
def stack_problem():
    return Problem("gru", 5, 3, 4, 6, L=2, D=2, seed=1)


def zero_targets(p: Problem):
    return [list(entry) for entry in like_weights(p, np.zeros)]


def backward_into(p: Problem, backend, targets, d_h_n=None):
    return kernels_of(backend).stack_backward(forward_with_tape(p, backend), p.d_out, d_h_n, None,
                                              targets)


def first_replaced(make):
    """Zero targets whose first array, dw_ih of layer 0, is make(that array)."""
    def targets(p: Problem):
        t = zero_targets(p)
        t[0][0] = make(t[0][0])
        return t
    return targets


REFUSALS = {  # (G*H, I) = (18, 4); L*D = 4
    "not a list": (lambda p: "targets", TypeError, "accumulate_into: expected a list"),
    "too few": (lambda p: zero_targets(p)[:3], ValueError, "accumulate_into: expected 4 entries"),
    "entry of three": (lambda p: [e[:3] for e in zero_targets(p)], ValueError,
                       r"accumulate_into\[0\]: expected 4 entries"),
    "not an array": (first_replaced(lambda a: a.tolist()), TypeError,
                     r"accumulate_into\[0\] dw_ih: expected a numpy array"),
    "other dtype": (first_replaced(lambda a: a.astype(np.float32)), TypeError,
                    r"accumulate_into\[0\] dw_ih: expected dtype float64"),
    "byte-swapped": (first_replaced(lambda a: a.astype(">f8")), TypeError,
                     r"accumulate_into\[0\] dw_ih: expected dtype float64 in native byte order"),
    "wrong shape": (first_replaced(lambda a: a[:, :-1].copy()), ValueError,
                    r"accumulate_into\[0\] dw_ih: expected shape \(18, 4\)"),
    "strided": (first_replaced(lambda a: np.zeros((18, 8))[:, ::2]), ValueError,
                r"accumulate_into\[0\] dw_ih: expected a C-contiguous, aligned, writable"),
    "read-only": (first_replaced(lambda a: np.broadcast_to(np.zeros(4), (18, 4))), ValueError,
                  r"accumulate_into\[0\] dw_ih: expected a C-contiguous, aligned, writable"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refuses_bad_targets_naming_them(backend, stack_problem, case):
    make, error, message = REFUSALS[case]
    with pytest.raises(error, match=message):
        backward_into(stack_problem, backend, make(stack_problem))


def test_refuses_one_array_twice_and_writes_nothing(backend, stack_problem):
    targets = zero_targets(stack_problem)
    targets[3][3] = targets[2][2]  # the same shape (G*H,), one array
    with pytest.raises(ValueError, match=r"accumulate_into\[3\] db_hh: shares memory with "
                                         r"accumulate_into\[2\] db_ih"):
        backward_into(stack_problem, backend, targets)
    assert not any(a.any() for entry in targets for a in entry)


def test_refuses_a_target_inside_the_upstream_gradient(backend, stack_problem):
    memory = np.zeros(4 * 3 * 6)
    targets = zero_targets(stack_problem)
    targets[1][2] = memory[:18]  # b_ih's shape, inside d_h_n
    with pytest.raises(ValueError, match=r"accumulate_into\[1\] db_ih: shares memory with d_h_n"):
        backward_into(stack_problem, backend, targets, d_h_n=memory.reshape(4, 3, 6))
