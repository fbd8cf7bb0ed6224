"""bench/torch_models.py end to end on tiny configurations (no timing claims are checked)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import pyrnn

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ lives at the repo root

from bench import configs as cfg  # noqa: E402
from bench import torch_models  # noqa: E402

pytestmark = pytest.mark.skipif(not pyrnn.backend_info()["cpp_available"],
                                reason="pyrnn.torch runs the C++ core")

TINY_MODEL = {"name": "tiny", "vocab": 7, "E": 3, "H": 5, "L": 2, "B": 2, "T": 4,
              "cells": ("lstm", "gru")}
TINY_LATENCY = {"name": "tiny-latency", "T": 1, "B": 1, "I": 3, "H": 4, "L": 1,
                "cells": ("gru",)}


def test_runner_writes_json_then_the_tables(tmp_path):
    args = torch_models.parse_args(["--quick", "--threads", "1", "--out", str(tmp_path)])
    args.configs = [TINY_MODEL, TINY_LATENCY]
    args.warmup_s, args.round_s, args.rounds, args.max_calls = 0.0, 0.001, 1, 2
    args.quiet_wait_s, args.settle_s = 0.0, 0.0
    results = torch_models.run(args)
    saved = json.loads((tmp_path / "torch_results.json").read_text())
    assert [(r["config"], r["cell"], r["mode"]) for r in saved["rows"]] == [
        ("tiny", "lstm", "train"), ("tiny", "lstm", "infer"), ("tiny", "gru", "train"),
        ("tiny", "gru", "infer"), ("tiny-latency", "gru", "train"),
        ("tiny-latency", "gru", "infer")]
    for row in results["rows"][:4]:
        assert row["max_rel_err"] <= torch_models.TOLERANCE
        assert set(row["backends"]) == {"torch.nn", "pyrnn.torch"} and row["ratio"] > 0
        assert row["targets"] == []  # targets apply at 2 threads only
    latency = results["rows"][4]  # training: the forward and the backward operator
    ms = {name: entry["ms"] for name, entry in latency["backends"].items()}
    assert set(ms) == {*torch_models.LATENCY_LAYERS, "autograd floor"}
    assert latency["overhead_us"] == pytest.approx((ms["op"] - ms["kernel"]) * 1e3 / 2)
    assert latency["overhead_beyond_autograd_us"] == pytest.approx(
        (ms["op"] - ms["kernel"] - ms["autograd floor"]) * 1e3 / 2)
    assert set(results["rows"][5]["backends"]) == {*torch_models.LATENCY_LAYERS, "frozen"}
    table = (tmp_path / "torch_results.md").read_text()
    assert "| tiny | gru | infer | 1 |" in table and "op boundary µs/call" in table


def test_targets_apply_at_two_threads_to_their_rows():
    rules = cfg.torch_rules_for({"threads": 2, "cell": "gru", "mode": "train"})
    assert [r["id"] for r in rules] == ["gru train >= 1.6x torch.nn"]
    rules = cfg.torch_rules_for({"threads": 2, "cell": "lstm", "mode": "infer",
                                 "overhead_us": 10.0})
    assert [r["id"] for r in rules] == ["op boundary <= 30 us"]
