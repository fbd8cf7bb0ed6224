"""The variant modules against ONNX Runtime with every option crossed.

pyrnn.LSTM(peephole=, coupled_gates=) and pyrnn.GRU(reset_after=False), with drawn layers,
directions, batch_first, bias, h0/c0, lengths, residual, dropout (in eval mode) and dtype, run
forward as the module, in eval mode and frozen(); ONNX Runtime runs the same weights one node
per layer (tests/onnx_models.py, which maps them onto ONNX's gate orders). ORT's LSTM and GRU
run float32 only: a float64 module is compared with ORT on its weights rounded to float32,
within what that rounding allows. Gradients of the same options: test_reference_gradients.py
(finite differences) and test_cpp_kernels.py (C++ against the reference).
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import numpy as np
import pytest

import pyrnn
from pyrnn import _backend

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx_models import ort_stack  # noqa: E402

VARIANTS = {  # cell: (class, keyword arguments)
    "lstm_peephole": (pyrnn.LSTM, {"peephole": True}),
    "lstm_coupled": (pyrnn.LSTM, {"coupled_gates": True}),
    "lstm_coupled_peephole": (pyrnn.LSTM, {"coupled_gates": True, "peephole": True}),
    "gru_reset_before": (pyrnn.GRU, {"reset_after": False}),
}
# max error per layer, relative to the largest value (at least 1): ORT's float32 against ours,
# in float32 or float64 (whose weights ORT reads rounded to float32)
TOLERANCE = 2e-6


@dataclass(frozen=True)
class Config:
    cell: str
    L: int
    bidirectional: bool
    batch_first: bool
    bias: bool
    init_state: bool
    lengths: bool
    residual: bool
    dropout: float
    T: int
    B: int
    I: int  # noqa: E741
    H: int
    dtype: type
    seed: int

    def __str__(self) -> str:
        flags = [self.cell, f"L{self.L}", "bi" if self.bidirectional else "uni",
                 "bf" if self.batch_first else "tm", "bias" if self.bias else "nobias",
                 "h0" if self.init_state else "noh0", "lengths" if self.lengths else "full",
                 "res" if self.residual else "plain", f"p{self.dropout}",
                 f"T{self.T}B{self.B}I{self.I}H{self.H}", np.dtype(self.dtype).name]
        return "-".join(flags)


def drawn_configs(per_cell: int, seed: int) -> list[Config]:
    rng = random.Random(seed)
    configs = []
    for cell in VARIANTS:
        for k in range(per_cell):
            L = rng.randint(1, 3)  # noqa: N806
            configs.append(Config(
                cell, L, rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.75,
                rng.random() < 0.5, rng.random() < 0.5, L > 1 and rng.random() < 0.5,
                rng.choice((0.0, 0.3)) if L > 1 else 0.0, rng.randint(1, 6), rng.randint(1, 4),
                rng.randint(1, 5), rng.randint(1, 6), (np.float32, np.float64)[k % 2],
                seed=len(configs)))
    return configs


CONFIGS = drawn_configs(10, seed=31)


def test_drawn_configurations_cross_every_option():
    for cell in VARIANTS:
        mine = [c for c in CONFIGS if c.cell == cell]
        assert {c.L for c in mine} == {1, 2, 3}, cell
        for attr in ("bidirectional", "batch_first", "bias", "init_state", "lengths",
                     "residual", "dtype"):
            assert len({getattr(c, attr) for c in mine}) == 2, (cell, attr)
        assert any(c.dropout for c in mine), cell


def make_module(cfg: Config, backend: str):
    cls, options = VARIANTS[cfg.cell]
    if backend == "cpp" and _backend.missing_in_cpp(cfg.cell, False, cfg.residual):
        pytest.skip(f"the C++ core has no kernels for {cfg.cell!r} with these options yet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # dropout with one layer says it does nothing
        module = cls(cfg.I, cfg.H, num_layers=cfg.L, bias=cfg.bias, batch_first=cfg.batch_first,
                     dropout=cfg.dropout, bidirectional=cfg.bidirectional, dtype=cfg.dtype,
                     seed=cfg.seed, backend=backend, residual=cfg.residual, **options)
    # larger weights than the init, so that gates saturate too
    for value in module.params.values():
        value *= 3
    return module.eval()


def ort_weights(module) -> list[tuple]:
    """The module's kernel weights in float32, zero biases where it has none."""
    entries = []
    for entry in module._weights():
        rows = entry[1].shape[0]
        entries.append(tuple(
            np.zeros(rows, np.float32) if (a is None and k in (2, 3))
            else None if a is None else a.astype(np.float32) for k, a in enumerate(entry)))
    return entries


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_module_matches_onnx_runtime(cfg: Config, backend: str):
    module = make_module(cfg, backend)
    rng = np.random.default_rng(cfg.seed)
    D = 2 if cfg.bidirectional else 1  # noqa: N806
    x = rng.standard_normal((cfg.T, cfg.B, cfg.I)).astype(cfg.dtype)
    state = (cfg.L * D, cfg.B, cfg.H)
    h0 = rng.uniform(-1, 1, state).astype(cfg.dtype) if cfg.init_state else None
    has_c = module._cell.has_c
    c0 = rng.uniform(-1, 1, state).astype(cfg.dtype) if cfg.init_state and has_c else None
    lengths = rng.integers(1, cfg.T + 1, cfg.B) if cfg.lengths else None

    want_out, want_h, want_c = ort_stack(
        cfg.cell, x.astype(np.float32),
        np.zeros(state, np.float32) if h0 is None else h0.astype(np.float32),
        None if not has_c else (np.zeros(state, np.float32) if c0 is None
                                else c0.astype(np.float32)),
        ort_weights(module), cfg.bidirectional, lengths, cfg.residual)
    x_user = x.transpose(1, 0, 2).copy() if cfg.batch_first else x
    hx = (h0, c0) if has_c else h0
    for run in (module, module.frozen()):
        out, final = run(x_user, hx, lengths=lengths)
        h_n, c_n = final if has_c else (final, None)
        if cfg.batch_first:
            out = out.transpose(1, 0, 2)
        pairs = [("out", out, want_out), ("h_n", h_n, want_h), ("c_n", c_n, want_c)]
        for name, got, want in pairs:
            if want is None:
                assert got is None
                continue
            assert got.dtype == cfg.dtype and got.shape == want.shape, name
            scale = max(1.0, float(np.abs(want).max(initial=0)))
            err = float(np.abs(got - want).max(initial=0))
            assert err <= TOLERANCE * scale * cfg.L, f"{name}: {err:.3g}"
