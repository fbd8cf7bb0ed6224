"""pyrnn's modules against torch.nn.RNN/LSTM/GRU, for both kernel backends.

Each configuration loads one torch module's state dict into the pyrnn module, runs both on the
same input and initial state (packed sequences on the torch side when lengths are used), and
back-propagates the same random upstream gradients of every output (out, h_n, c_n). Outputs,
final states, dx, dh0, dc0 and every parameter gradient must agree to 1e-9 (float64) or 1e-4
(float32), relative to the largest magnitude of the torch result.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import pytest

import pyrnn
from pyrnn import _backend, functional

torch = pytest.importorskip("torch")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

RTOL = {np.float32: 1e-4, np.float64: 1e-9}
CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")


@dataclass(frozen=True)
class Config:
    cell: str
    L: int
    bidirectional: bool
    batch_first: bool
    bias: bool
    init_state: bool
    packed: bool
    T: int
    B: int
    I: int  # noqa: E741
    H: int
    dtype: type
    seed: int
    proj: int = 0  # an LSTM's proj_size

    def __str__(self) -> str:
        flags = [
            self.cell, f"L{self.L}", "bi" if self.bidirectional else "uni",
            "bf" if self.batch_first else "tm", "bias" if self.bias else "nobias",
            "h0" if self.init_state else "noh0", "packed" if self.packed else "full",
            f"T{self.T}B{self.B}I{self.I}H{self.H}" + (f"P{self.proj}" if self.proj else ""),
            np.dtype(self.dtype).name,
        ]
        return "-".join(flags)


def random_configs(n: int, seed: int) -> list[Config]:
    rng = random.Random(seed)
    configs = []
    for k in range(n):
        configs.append(Config(
            cell=CELLS[k % 4],
            L=rng.randint(1, 3),
            bidirectional=rng.random() < 0.5,
            batch_first=rng.random() < 0.5,
            bias=rng.random() < 0.75,
            init_state=rng.random() < 0.5,
            packed=rng.random() < 0.5,
            T=rng.randint(1, 6),
            B=rng.randint(1, 4),
            I=rng.randint(1, 5),
            H=rng.randint(1, 5),
            dtype=(np.float64, np.float32)[(k // 4) % 2],  # every cell in both dtypes
            seed=1000 + k,
        ))
    return configs


def edge_configs() -> list[Config]:
    """The shapes the issue names explicitly, for every cell and both dtypes."""
    shapes = [
        # L, bi, batch_first, bias, init, packed, T, B, I, H
        (1, False, False, True, False, False, 1, 1, 1, 1),  # B = T = H = 1
        (3, True, True, False, True, True, 5, 4, 3, 2),  # everything at once
        (2, True, False, True, True, True, 6, 1, 2, 1),  # B = 1 packed, H = 1
        (3, False, False, True, True, False, 1, 3, 4, 3),  # T = 1, 3 layers
    ]
    configs = []
    for j, shape in enumerate(shapes):
        for cell in CELLS:
            for dtype in (np.float64, np.float32):
                configs.append(Config(cell, *shape, dtype=dtype, seed=100 * j + len(configs)))
    return configs


CONFIGS = edge_configs() + random_configs(48, seed=2024)


def projected_configs(n: int, seed: int) -> list[Config]:
    """LSTMs with proj_size (PyTorch's LSTMP), every option drawn as for the plain cells."""
    rng = random.Random(seed)
    configs = []
    for k, cfg in enumerate(random_configs(n, seed)):
        H = rng.randint(2, 6)  # noqa: N806 - 0 < proj_size < H
        configs.append(dataclasses.replace(cfg, cell="lstm", H=H, proj=rng.randint(1, H - 1),
                                           dtype=(np.float64, np.float32)[k % 2]))
    return configs


PROJECTED_CONFIGS = projected_configs(16, seed=31)


def make_modules(cfg: Config, backend: str, dropout: float = 0.0):
    """A torch module with its default init, and a pyrnn module loaded with its weights."""
    torch.manual_seed(cfg.seed)
    kwargs = dict(num_layers=cfg.L, bias=cfg.bias, batch_first=cfg.batch_first,
                  dropout=dropout, bidirectional=cfg.bidirectional)
    if cfg.cell.startswith("rnn"):
        nonlinearity = cfg.cell[4:]
        t_mod = torch.nn.RNN(cfg.I, cfg.H, nonlinearity=nonlinearity, **kwargs)
        p_mod = pyrnn.RNN(cfg.I, cfg.H, nonlinearity=nonlinearity, dtype=cfg.dtype,
                          backend=backend, **kwargs)
    else:
        t_cls, p_cls = {"lstm": (torch.nn.LSTM, pyrnn.LSTM), "gru": (torch.nn.GRU, pyrnn.GRU)}[
            cfg.cell
        ]
        if cfg.proj:
            kwargs["proj_size"] = cfg.proj
        t_mod = t_cls(cfg.I, cfg.H, **kwargs)
        p_mod = p_cls(cfg.I, cfg.H, dtype=cfg.dtype, backend=backend, **kwargs)
    t_mod = t_mod.to(torch.float64 if cfg.dtype == np.float64 else torch.float32)
    p_mod.load_state_dict({k: v.detach().numpy() for k, v in t_mod.state_dict().items()})
    return t_mod, p_mod


def make_data(cfg: Config) -> dict[str, np.ndarray | None]:
    rng = np.random.default_rng(cfg.seed)
    D = 2 if cfg.bidirectional else 1  # noqa: N806
    batch_major = (cfg.B, cfg.T) if cfg.batch_first else (cfg.T, cfg.B)
    state = (cfg.L * D, cfg.B, cfg.proj or cfg.H)  # h's; c's has H
    cell_state = (cfg.L * D, cfg.B, cfg.H)
    lengths = None
    if cfg.packed:
        lengths = rng.integers(1, cfg.T + 1, cfg.B)

    def draw(shape):
        return rng.standard_normal(shape).astype(cfg.dtype)

    lstm = cfg.cell == "lstm"
    return {
        "x": draw((*batch_major, cfg.I)),
        "h0": draw(state) if cfg.init_state else None,
        "c0": draw(cell_state) if cfg.init_state and lstm else None,
        "lengths": lengths,
        "d_out": draw((*batch_major, D * (cfg.proj or cfg.H))),
        "d_h_n": draw(state),
        "d_c_n": draw(cell_state) if lstm else None,
    }


def tensor(a: np.ndarray | None, grad: bool = False):
    return None if a is None else torch.tensor(a, requires_grad=grad)


def run_torch(cfg: Config, t_mod, data: dict) -> dict[str, np.ndarray]:
    x, h0, c0 = tensor(data["x"], True), tensor(data["h0"], True), tensor(data["c0"], True)
    hx = None
    if h0 is not None:
        hx = (h0, c0) if cfg.cell == "lstm" else h0
    inp = x
    if data["lengths"] is not None:
        inp = pack_padded_sequence(x, torch.tensor(data["lengths"]), batch_first=cfg.batch_first,
                                   enforce_sorted=False)
    out, state = t_mod(inp, hx)
    if data["lengths"] is not None:
        out, _ = pad_packed_sequence(out, batch_first=cfg.batch_first, total_length=cfg.T)
    h_n, c_n = state if cfg.cell == "lstm" else (state, None)
    loss = (out * tensor(data["d_out"])).sum() + (h_n * tensor(data["d_h_n"])).sum()
    if c_n is not None:
        loss = loss + (c_n * tensor(data["d_c_n"])).sum()
    loss.backward()
    result = {"out": out, "h_n": h_n, "c_n": c_n, "dx": x.grad}
    if h0 is not None:
        result["dh0"] = h0.grad
        result["dc0"] = c0.grad if c0 is not None else None
    result.update({f"grad {name}": p.grad for name, p in t_mod.named_parameters()})
    return {k: v.detach().numpy() for k, v in result.items() if v is not None}


def run_pyrnn(cfg: Config, p_mod, data: dict) -> dict[str, np.ndarray]:
    lstm = cfg.cell == "lstm"
    hx = (data["h0"], data["c0"]) if lstm else data["h0"]
    out, state = p_mod(data["x"], hx, lengths=data["lengths"])
    h_n, c_n = state if lstm else (state, None)
    d_hx = (data["d_h_n"], data["d_c_n"]) if lstm else data["d_h_n"]
    dx, d_state = p_mod.backward(data["d_out"], d_hx)
    dh0, dc0 = d_state if lstm else (d_state, None)
    result = {"out": out, "h_n": h_n, "c_n": c_n, "dx": dx}
    if cfg.init_state:
        result["dh0"], result["dc0"] = dh0, dc0
    result.update({f"grad {name}": grad for name, grad in p_mod.grads.items()})
    return {k: v for k, v in result.items() if v is not None}


def assert_close(name: str, got: np.ndarray, want: np.ndarray, dtype: type) -> None:
    """Max-norm relative agreement: |got - want| <= rtol * max|want| everywhere."""
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, torch {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {got.shape}, torch {want.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    scale = max(float(np.abs(want).max(initial=0)), 1e-2)
    err = float(np.abs(got.astype(np.float64) - want).max(initial=0))
    assert err <= RTOL[dtype] * scale, f"{name}: max error {err:.3g} (scale {scale:.3g})"


def assert_same_results(cfg: Config, got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert_close(name, got[name], want[name], cfg.dtype)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_module_matches_torch_outputs_states_and_every_gradient(cfg: Config, backend: str):
    t_mod, p_mod = make_modules(cfg, backend)
    data = make_data(cfg)
    assert_same_results(cfg, run_pyrnn(cfg, p_mod, data), run_torch(cfg, t_mod, data))


@pytest.mark.parametrize("cfg", PROJECTED_CONFIGS, ids=str)
def test_projected_lstm_matches_torch_outputs_states_and_every_gradient(cfg: Config,
                                                                       backend: str):
    if backend == "cpp" and _backend.missing_in_cpp("lstm", projected=True):
        pytest.skip("the C++ core has no projection kernels yet")
    t_mod, p_mod = make_modules(cfg, backend)
    data = make_data(cfg)
    want = run_torch(cfg, t_mod, data)
    assert any(name.startswith("grad weight_hr") for name in want)
    assert_same_results(cfg, run_pyrnn(cfg, p_mod, data), want)


def test_parity_configurations_cover_the_required_cases():
    """The random draw must keep covering what the issue asks for."""
    for cell in CELLS:
        mine = [c for c in CONFIGS if c.cell == cell]
        assert {c.L for c in mine} == {1, 2, 3}
        for attr in ("bidirectional", "batch_first", "bias", "init_state", "packed"):
            assert {getattr(c, attr) for c in mine} == {False, True}, (cell, attr)
        assert {c.dtype for c in mine} == {np.float32, np.float64}
    for attr in ("L", "bidirectional", "batch_first", "bias", "init_state", "packed", "dtype"):
        assert len({getattr(c, attr) for c in PROJECTED_CONFIGS}) > 1, attr
    for dim in ("T", "B", "H"):
        assert any(getattr(c, dim) == 1 for c in CONFIGS), dim


# ----------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_module_in_eval_mode_matches_torch_exactly(cell: str, backend: str):
    cfg = Config(cell, 3, True, False, True, True, True, 5, 3, 4, 3, np.float64, seed=7)
    t_mod, p_mod = make_modules(cfg, backend, dropout=0.5)
    t_mod.eval()
    p_mod.eval()
    data = make_data(cfg)
    with torch.no_grad():
        want = run_torch_forward_only(cfg, t_mod, data)
    out, state = p_mod(data["x"], (data["h0"], data["c0"]) if cell == "lstm" else data["h0"],
                       lengths=data["lengths"])
    assert_close("out", out, want["out"], np.float64)
    h_n = state[0] if cell == "lstm" else state
    assert_close("h_n", h_n, want["h_n"], np.float64)


def run_torch_forward_only(cfg: Config, t_mod, data: dict) -> dict[str, np.ndarray]:
    inp = tensor(data["x"])
    if data["lengths"] is not None:
        inp = pack_padded_sequence(inp, torch.tensor(data["lengths"]),
                                   batch_first=cfg.batch_first, enforce_sorted=False)
    hx = tensor(data["h0"])
    if cfg.cell == "lstm":
        hx = (hx, tensor(data["c0"]))
    out, state = t_mod(inp, hx)
    if data["lengths"] is not None:
        out, _ = pad_packed_sequence(out, batch_first=cfg.batch_first, total_length=cfg.T)
    h_n = state[0] if cfg.cell == "lstm" else state
    return {"out": out.numpy(), "h_n": h_n.numpy()}


def torch_layer_weights(t_mod, layer: int, D: int) -> dict[str, np.ndarray]:  # noqa: N803
    """The state dict of one layer of a stack, renamed as layer 0 of a one-layer module."""
    out = {}
    for name, value in t_mod.state_dict().items():
        if f"_l{layer}" in name:
            out[name.replace(f"_l{layer}", "_l0")] = value
    assert len(out) == 4 * D
    return out


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_in_training_equals_torch_layers_with_the_same_masks(cell: str, backend: str):
    """Training-mode dropout multiplies each layer's output (but the last) by its mask before
    the next layer reads it. Torch, run layer by layer with those masks applied by hand, must
    give the same outputs, states and gradients."""
    L, D, p = 3, 2, 0.4  # noqa: N806
    cfg = Config(cell, L, True, False, True, True, False, 5, 3, 4, 3, np.float64, seed=11)
    t_stack, _ = make_modules(cfg, backend)
    data = make_data(cfg)
    weights = [
        tuple(t_stack.state_dict()[f"{kind}_l{k // D}{'_reverse' if k % D else ''}"].numpy()
              for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        for k in range(L * D)
    ]
    out, h_n, c_n, tape = functional.rnn_forward(
        cell, data["x"], weights, data["h0"], data["c0"], bidirectional=True, dropout=p,
        training=True, rng=np.random.default_rng(5), backend=backend, keep_tape=True,
    )
    dx, dh0, dc0, d_weights = functional.rnn_backward(
        tape, data["d_out"], data["d_h_n"], data["d_c_n"]
    )
    masks = functional.dropout_masks(np.random.default_rng(5), L, (5, 3, D * 3), p, np.float64)

    # The same network in torch, one layer at a time.
    x = tensor(data["x"], True)
    h0, c0 = tensor(data["h0"], True), tensor(data["c0"], True)
    layer_in, h_parts, c_parts, layers = x, [], [], []
    for layer in range(L):
        one = Config(cell, 1, True, False, True, True, False, 5, 3, layer_in.shape[2], 3,
                     np.float64, seed=0)
        t_layer, _ = make_modules(one, backend)
        t_layer.load_state_dict(torch_layer_weights(t_stack, layer, D))
        states = slice(layer * D, (layer + 1) * D)
        hx = (h0[states], c0[states]) if cell == "lstm" else h0[states]
        layer_out, state = t_layer(layer_in, hx)
        h_parts.append(state[0] if cell == "lstm" else state)
        if cell == "lstm":
            c_parts.append(state[1])
        layers.append(t_layer)
        layer_in = layer_out * tensor(masks[layer]) if layer < L - 1 else layer_out
    t_h_n = torch.cat(h_parts)
    loss = (layer_in * tensor(data["d_out"])).sum() + (t_h_n * tensor(data["d_h_n"])).sum()
    if cell == "lstm":
        loss = loss + (torch.cat(c_parts) * tensor(data["d_c_n"])).sum()
    loss.backward()

    f64 = np.float64
    assert_close("out", out, layer_in.detach().numpy(), f64)
    assert_close("h_n", h_n, t_h_n.detach().numpy(), f64)
    assert_close("dx", dx, x.grad.numpy(), f64)
    assert_close("dh0", dh0, h0.grad.numpy(), f64)
    if cell == "lstm":
        assert_close("c_n", c_n, torch.cat(c_parts).detach().numpy(), f64)
        assert_close("dc0", dc0, c0.grad.numpy(), f64)
    for k in range(L * D):
        t_params = list(layers[k // D].parameters())[4 * (k % D): 4 * (k % D) + 4]
        for j in range(4):
            assert_close(f"d_weights[{k}][{j}]", d_weights[k][j], t_params[j].grad.numpy(), f64)


def test_dropout_masks_keep_1_minus_p_of_units_scaled_by_1_over_1_minus_p():
    p = 0.3
    masks = functional.dropout_masks(np.random.default_rng(0), 3, (50, 40, 30), p, np.float32)
    assert len(masks) == 2
    for mask in masks:
        assert mask.dtype == np.float32
        assert set(np.unique(mask)) == {np.float32(0), np.float32(1 / (1 - p))}
        kept = np.count_nonzero(mask) / mask.size
        assert abs(kept - (1 - p)) < 0.01  # 60000 draws: 5 standard deviations is 0.0094
        assert abs(mask.mean() - 1) < 0.015  # the expected activation is unchanged
    assert not np.array_equal(masks[0], masks[1])


def test_dropout_is_active_in_training_only_and_follows_the_seed(backend: str):
    x = np.random.default_rng(1).standard_normal((6, 4, 3))
    kwargs = dict(num_layers=2, dropout=0.5, dtype=np.float64, seed=3, backend=backend)
    first, second = pyrnn.GRU(3, 8, **kwargs), pyrnn.GRU(3, 8, **kwargs)
    train_a, _ = first(x)
    train_b, _ = second(x)
    np.testing.assert_array_equal(train_a, train_b)  # same seed, same masks
    train_c, _ = first(x)
    assert not np.allclose(train_a, train_c)  # a fresh mask on every call
    first.eval()
    eval_a, _ = first(x)
    eval_b, _ = first(x)
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(eval_a, train_a)
