"""The benchmark runner end to end on tiny configurations (no timing claims are checked)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ lives at the repo root

from bench import across, backends, report, run  # noqa: E402
from bench import configs as cfg  # noqa: E402

TINY = {"name": "tiny", "T": 5, "B": 2, "I": 4, "H": 3, "L": 2, "D": 2,
        "cells": cfg.CELLS, "oracle": True}
TINY_RAGGED = {"name": "tiny-ragged", "T": 6, "B": 3, "I": 4, "H": 3, "L": 1, "D": 2,
               "cells": cfg.CELLS, "oracle": True, "lengths": {"low": 1, "high": 6, "seed": 3}}


def tiny_args(configs, backend_names=None):
    args = run.parse_args(["--rounds", "1", "--max-calls", "1", "--threads", "1",
                           "--round-s", "0.001", "--quiet-wait-s", "0", "--settle-s", "0"])
    args.configs, args.backends, args.warmup_s, args.argv = configs, backend_names, 0.0, []
    args.gemm_size = 256
    return args


def here() -> list[str]:
    return [n for n in cfg.BACKENDS if backends.BACKENDS[n].unavailable() is None]


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = run.run_suite(tiny_args([TINY, TINY_RAGGED]), out, progress=False)
    return results, out / "results.json"


def test_every_available_backend_runs_and_agrees_on_tiny_configs(tiny_results):
    results, _ = tiny_results
    assert len(results["rows"]) == 2 * 3 * 2
    for row in results["rows"]:
        expected = {n for n in here() if n != "onnxruntime" or row["mode"] == "infer"}
        assert set(row["backends"]) == expected, row["backends"]
        for name, entry in row["backends"].items():
            assert entry["status"] == "ok", (row["config"], row["cell"], name, entry)
            assert 0 < entry["min_ms"] <= entry["ms"] and entry["spread"] >= 1.0
            assert entry["cpu_ms"] >= 0
            assert entry["gflops"] > 0 and entry["pct_gemm"] > 0
            if name != row["reference"]:
                assert entry["max_rel_err"] <= run.TOLERANCE


def test_results_json_has_the_documented_schema(tiny_results):
    _, path = tiny_results
    saved = json.loads(path.read_text())
    for key in ("schema", "date", "command", "machine", "versions", "pyrnn_backend_info",
                "pyrnn_api", "gemm", "rows", "wall_s", "tolerance", "settings"):
        assert key in saved, key
    assert saved["gemm"]["1"]["gflops"] > 0
    assert {"cpu", "logical_cpus", "usable_cpus"} <= set(saved["machine"])
    row = saved["rows"][0]
    for key in ("config", "cell", "mode", "threads", "shape", "flops", "reference",
                "backends", "ratios", "cpu_ratios", "targets", "host_other_pct"):
        assert key in row, key
    ragged = [r for r in saved["rows"] if r["config"] == "tiny-ragged"]
    assert all(len(r["lengths"]) == 3 and max(r["lengths"]) <= 6 for r in ragged)


def test_report_renders_table_and_chart(tiny_results, tmp_path):
    _, path = tiny_results
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    text = report.write_report(path, md, png)
    assert md.read_text() == text
    assert "| config | cell | mode | thr |" in text and "| tiny-ragged | gru | train | 1 |" in text
    if _has_matplotlib():
        assert png.stat().st_size > 1000
    assert report.main([str(tmp_path / "missing.json")]) == 2


def test_report_keeps_the_introduction_of_an_existing_file(tiny_results, tmp_path):
    _, path = tiny_results
    md = tmp_path / "RESULTS.md"
    md.write_text("# Published results\n\nWritten by hand.\n\n## Machine and settings\n\nold\n")
    text = report.write_report(path, md, tmp_path / "r.png")
    assert md.read_text() == "# Published results\n\nWritten by hand.\n\n" + text
    md.write_text("not a report at all\n")                   # nothing generated: replaced whole
    report.write_report(path, md, tmp_path / "r.png")
    assert md.read_text() == text


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


class CorruptRunner(backends.Runner):
    """Wraps a runner and shifts its output by 0.01, as a buggy kernel would."""

    def __init__(self, inner):
        self.inner = inner

    def scope(self):
        return self.inner.scope()

    def call(self):
        return self.inner.call()

    def result(self, value):
        res = dict(self.inner.result(value))
        res["out"] = np.asarray(res["out"]) + 0.01
        return res


def test_agreement_check_fails_a_backend_with_wrong_outputs(monkeypatch, tmp_path):
    victim = "pyrnn-cpp" if "pyrnn-cpp" in here() else None
    if victim is None or len(here()) < 2:
        pytest.skip("needs the C++ extension and a second backend to compare with")
    original = backends.BACKENDS[victim].prepare
    monkeypatch.setattr(backends.BACKENDS[victim], "prepare",
                        lambda case, data: CorruptRunner(original(case, data)))
    tiny_lstm = {**TINY, "cells": ("lstm",)}
    results = run.run_suite(tiny_args([tiny_lstm], here()), tmp_path, progress=False)
    for row in results["rows"]:
        entry = row["backends"][victim]
        assert entry["status"] == "mismatch" and "out" in entry["error"]
        assert "ms" not in entry and victim not in str(row["ratios"])
    assert run.failed_rows(results)


def test_targets_apply_at_two_threads_with_the_issue_thresholds():
    ids = {r["id"] for r in cfg.rules_for("ragged", "gru", "train", 2)}
    assert ids == {"gru/rnn train >= 2x torch", "ragged train >= 3x torch"}
    assert cfg.rules_for("ragged", "gru", "train", 1) == []
    large = {r["id"] for r in cfg.rules_for("large", "lstm", "infer", 2)}
    assert large == {"lstm dense >= 1x torch", "infer >= 1x onnxruntime",
                     "large infer >= 85% GEMM"}


def test_ratios_and_verdicts_follow_peer_time_over_pyrnn_time():
    row = {"config": "medium", "cell": "gru", "mode": "infer", "threads": 2, "flops": 2e9,
           "backends": {"pyrnn-cpp": {"status": "ok", "ms": 10.0},
                        "torch": {"status": "ok", "ms": 12.0},
                        "onnxruntime": {"status": "ok", "ms": 30.0}}}
    run.derived(row, {"2": {"gflops": 400.0}})
    assert row["ratios"] == {"torch": 1.2, "onnxruntime": 3.0}
    assert row["backends"]["pyrnn-cpp"]["gflops"] == pytest.approx(200.0)
    assert row["backends"]["pyrnn-cpp"]["pct_gemm"] == pytest.approx(50.0)
    verdicts = {t["id"]: t["ok"] for t in row["targets"]}
    assert verdicts == {"gru/rnn infer >= 1.5x torch": False, "infer >= 1x onnxruntime": True}
    # 2 GFLOP at 400 GFLOP/s take 5 ms: torch's 12 ms allow at most 2.4x, ORT's 30 ms 6x.
    assert row["floor_ms"] == pytest.approx(5.0)
    ceilings = {t["id"]: t["ceiling"] for t in row["targets"]}
    assert ceilings == {"gru/rnn infer >= 1.5x torch": pytest.approx(2.4),
                        "infer >= 1x onnxruntime": pytest.approx(6.0)}


def test_target_summary_marks_targets_beyond_the_gemm_rate():
    row = {"config": "large", "cell": "gru", "mode": "train", "threads": 2, "flops": 6e10,
           "backends": {"pyrnn-cpp": {"status": "ok", "ms": 366.0},
                        "torch": {"status": "ok", "ms": 469.0}}}
    run.derived(row, {"2": {"gflops": 210.0}})
    summary = report.target_summary({"rows": [row]})
    assert "large/gru/train (1.28; ≤ 1.64 ⊘)" in summary
    row["backends"]["torch"]["ms"] = 700.0
    run.derived(row, {"2": {"gflops": 210.0}})
    assert "(1.91; ≤ 2.45)" in report.target_summary({"rows": [row]})


def made_run(commit: str, times: dict[tuple[str, str], tuple[float, float]]) -> dict:
    """A results dict as run_suite writes it: 2-thread training rows of (pyrnn ms, torch ms)."""
    gemm = {"2": {"gflops": 200.0}}
    rows = []
    for (config, cell), (mine, torch_ms) in times.items():
        row = {"config": config, "cell": cell, "mode": "train", "threads": 2, "flops": 2e9,
               "backends": {"pyrnn-cpp": {"status": "ok", "ms": mine},
                            "torch": {"status": "ok", "ms": torch_ms}}}
        run.derived(row, gemm)
        rows.append(row)
    return {"git_commit": commit + "0" * 33, "date": "2026-11-27T12:00:00", "gemm": gemm,
            "rows": rows}


# 2e9 FLOPs at 200 GFLOP/s take 10 ms: torch at 30 ms allows 3x, at 16 ms only 1.6x (⊘).
FIRST = {("medium", "gru"): (12.0, 30.0), ("medium", "rnn"): (14.0, 30.0),
         ("large", "gru"): (11.0, 16.0)}
SECOND = {("medium", "gru"): (12.0, 33.0), ("medium", "rnn"): (16.5, 33.0),
          ("large", "gru"): (11.0, 17.6)}


def test_across_runs_sorts_rows_by_the_runs_they_held_in():
    runs = [made_run("aaaaaaa", FIRST), made_run("bbbbbbb", SECOND)]
    text = across.markdown(runs)
    assert "| #1 aaaaaaa | 2026-11-27T12:00 | 1.000 | 2/3 |" in text
    assert "| #2 bbbbbbb | 2026-11-27T12:00 | 1.100 | 2/3 |" in text      # torch 10 % slower
    # medium gru held twice, medium rnn once (2.14, then 2.00 is not below 2), large gru never:
    assert "| gru/rnn train >= 2x torch | 3 | 2 | 0 | 1 | 1 |" in text
    assert "| gru/rnn train >= 2x torch | large/gru/train/2t | ✗ 1.45; ≤ 1.60 ⊘ | " \
           "✗ 1.60; ≤ 1.76 ⊘ | 0/2 |" in text
    assert "medium/gru" not in text and "medium/rnn" not in text           # no miss, not listed
    slower = {**SECOND, ("medium", "rnn"): (17.0, 33.0)}
    text = across.markdown([made_run("aaaaaaa", FIRST), made_run("bbbbbbb", slower)])
    assert "| medium/rnn/train/2t | 2.14; ≤ 3.00 | ✗ 1.94; ≤ 3.30 | 1/2 |" in text
    assert "| gru/rnn train >= 2x torch | 3 | 1 | 1 | 1 | 1 |" in text
    # a run without a row (a partial suite) shows a dash there and counts only the runs it was in
    partial = {key: v for key, v in slower.items() if key != ("large", "gru")}
    text = across.markdown([made_run("aaaaaaa", FIRST), made_run("bbbbbbb", partial)])
    assert "| large/gru/train/2t | ✗ 1.45; ≤ 1.60 ⊘ | — | 0/1 |" in text


def test_across_lists_later_runs_by_date_whatever_the_order_of_the_files():
    first, later, latest = (made_run(c, FIRST) for c in ("aaaaaaa", "bbbbbbb", "ccccccc"))
    later["date"], latest["date"] = "2026-11-27T13:00:00", "2026-11-27T14:00:00"
    first["date"] = "2026-11-28T09:00:00"  # the reference stays first even when run last
    runs = across.in_run_order([first, latest, later])
    assert [r["git_commit"][:7] for r in runs] == ["aaaaaaa", "bbbbbbb", "ccccccc"]


def test_across_reads_gzipped_runs_and_reports_bad_files(tmp_path, capsys):
    import gzip

    paths = []
    for k, times in enumerate((FIRST, SECOND)):
        path = tmp_path / f"run{k}.json.gz"
        path.write_bytes(gzip.compress(json.dumps(made_run(f"{k}" * 7, times)).encode()))
        paths.append(str(path))
    md = tmp_path / "across.md"
    assert across.main([*paths, "--md", str(md)]) == 0
    assert md.read_text() == capsys.readouterr().out
    assert "| #2 1111111 |" in md.read_text()
    (tmp_path / "bad.json").write_text("{}")
    assert across.main([paths[0], str(tmp_path / "bad.json")]) == 2
    assert "bad.json" in capsys.readouterr().err
    assert across.main([str(tmp_path / "missing.json")]) == 2


def test_forward_flops_count_every_layer_direction_and_real_steps():
    case = backends.Case({"name": "x", "T": 2, "B": 1, "I": 3, "H": 4, "L": 1, "D": 1},
                         "lstm", "infer", 1)
    assert run.forward_flops(case, None) == 2 * 2 * 1 * 16 * (3 + 4)
    deep = backends.Case({"name": "x", "T": 5, "B": 2, "I": 3, "H": 4, "L": 2, "D": 2},
                         "gru", "infer", 1)
    per_step = 2 * 2 * 12 * (3 + 4) + 2 * 2 * 12 * (8 + 4)
    assert run.forward_flops(deep, np.array([5, 1])) == 6 * per_step


def test_cli_rejects_bad_arguments(capsys):
    assert run.main(["--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
    assert run.main(["--configs", "no-such-config"]) == 2
    assert "no-such-config" in capsys.readouterr().err
    assert run.main(["--settle-s", "-1"]) == 2
    assert "--settle-s" in capsys.readouterr().err


TINY_CLI = ["--configs", "charrnn", "--cells", "rnn", "--modes", "infer", "--threads", "1",
            "--backends", "pyrnn-cpp", "pyrnn-numpy", "--rounds", "1", "--max-calls", "1",
            "--round-s", "0.001", "--quiet-wait-s", "0", "--settle-s", "0", "--no-report"]


def test_pyrnn_bench_runs_the_installed_runner_and_records_its_command(tmp_path):
    # The wheel ships bench/ as pyrnn.bench: failing to import it is a packaging bug.
    from pyrnn import bench as installed_bench
    from pyrnn import cli

    assert cli.main(["bench", *TINY_CLI, "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["command"].startswith("pyrnn bench --configs charrnn")
    [row] = saved["rows"]
    assert (row["config"], row["cell"], row["mode"]) == ("charrnn", "rnn", "infer")
    assert all(entry["status"] in ("ok", "unavailable") for entry in row["backends"].values())
    assert row["backends"]["pyrnn-numpy"]["status"] == "ok"
    assert "pyrnn bench" in installed_bench.__doc__


def test_pyrnn_bench_rejects_bad_arguments_with_status_2(capsys):
    from pyrnn import cli

    for bad, named in ((["--threads", "0"], "--threads"), (["--configs", "nope"], "nope"),
                       (["--rounds", "0"], "--rounds")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["bench", *bad])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "pyrnn bench: error:" in err and named in err


def test_round_plan_fills_round_s_and_cuts_rounds_to_the_budget():
    from types import SimpleNamespace

    from bench import timing

    args = SimpleNamespace(round_s=0.3, max_calls=200, rounds=5, budget_s=15.0)
    assert timing.plan_rounds(0.001, args) == (200, 5)     # capped at max_calls
    assert timing.plan_rounds(0.1, args) == (3, 5)
    assert timing.plan_rounds(2.0, args) == (1, 5)         # 10 s in all: within budget
    assert timing.plan_rounds(6.0, args) == (1, 2)         # 2 rounds fit in 15 s
    assert timing.plan_rounds(60.0, args) == (1, 1)        # always at least one round


def test_setup_notes_name_what_a_run_will_lack(monkeypatch):
    import importlib.util

    notes = run.setup_notes({"torch": "torch is not installed"})
    assert notes[0] == "torch will not be timed: torch is not installed"
    assert any("pyrnn[bench]" in note for note in notes)
    assert not any("pyrnn[bench]" in note for note in run.setup_notes({"pyrnn-numpy": "why"}))
    real_find_spec = importlib.util.find_spec

    def without_threadpoolctl(name, *args):
        return None if name == "threadpoolctl" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_threadpoolctl)
    assert any("threadpoolctl" in note for note in run.setup_notes({}))
