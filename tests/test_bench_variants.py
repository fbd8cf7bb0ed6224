"""bench/variants.py: the cell family's rows run, agree with their peers and report a ratio."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pyrnn import _backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ lives at the repo root

from bench import configs as cfg  # noqa: E402
from bench import variants  # noqa: E402

TINY = {"name": "tiny", "T": 4, "B": 3, "I": 5, "H": 8}
QUICK = SimpleNamespace(**{**cfg.DEFAULTS, "rounds": 1, "round_s": 0.01, "max_calls": 2,
                           "budget_s": 0.1, "warmup_s": 0.0, "settle_s": 0.0})


@pytest.mark.parametrize("row", cfg.VARIANT_ROWS, ids=lambda r: r["name"])
@pytest.mark.parametrize("mode", cfg.MODES)
def test_a_variant_row_times_the_variant_beside_its_plain_cell(row, mode):
    if not _backend.cpp_available():
        pytest.skip("the C++ extension is not built")
    result = variants.run_row(row, TINY, mode, 1, QUICK)
    if variants.missing(row):
        assert "skipped" in result and "ms" not in result
        return
    assert set(result["ms"]) >= {"variant", "plain"}
    assert result["time_per_flop_vs_plain"] > 0
    for peer, diff in result["max_abs_diff"].items():
        assert diff < 1e-5, peer
    assert "variant" in variants.table([result])


def test_a_projection_adds_its_product_to_the_flops():
    assert variants.flops("lstm", TINY, proj=4) == 2.0 * 4 * 3 * (4 * 8 * (5 + 4) + 4 * 8)
    assert variants.flops("gru_reset_before", TINY) == 2.0 * 4 * 3 * 3 * 8 * (5 + 8)
