"""``pyrnn bench --contention`` end to end on a tiny configuration, and its neighbour processes:
started, stopped, and gone however the run ends (no timing claims are checked)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ lives at the repo root

from bench import contention, run  # noqa: E402

# GRU only: under load, torch's two-thread LSTM took 0.1-0.25 s a call even at this size.
TINY = {"name": "tiny", "T": 4, "B": 2, "I": 3, "H": 5, "L": 1, "D": 1, "cells": ("gru",),
        "oracle": True}


def tiny_args(neighbours: list[int]):
    args = run.parse_args(["--contention", "--neighbours", *map(str, neighbours), "--rounds", "2",
                           "--max-calls", "1", "--round-s", "0.001", "--quiet-wait-s", "0",
                           "--settle-s", "0"])
    args.configs, args.warmup_s = [TINY], 0.0
    return args


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie, ended but not yet reaped by whoever adopted it, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("contention")
    results = contention.run_contention(tiny_args([0, 1]), out, progress=False)
    return results, out


def test_contention_rows_time_pyrnn_defaults_one_thread_and_torch(tiny_results):
    results, _ = tiny_results
    rows = results["rows"]
    assert [(r["neighbours"], r["cell"], r["mode"]) for r in rows] == [
        (n, "gru", mode) for n in (0, 1) for mode in ("infer", "train")]
    default = results["default_threads"]["pyrnn-cpp"]
    for row in rows:
        pyrnn_counts = {e["threads"] for e in row["contenders"].values()
                        if e["backend"] == "pyrnn-cpp"}
        assert pyrnn_counts == {1, default}
        for label, entry in row["contenders"].items():
            assert entry["status"] == "ok", (label, entry)
            assert 0 < entry["min_ms"] <= entry["ms"] and entry["rounds"] == 2
        verdict = row["verdict"]
        assert verdict["ratio"] >= 1.0 and verdict["default"] == f"pyrnn-cpp {default}t"
        assert verdict["ok"] is (None if row["neighbours"] == 0 else verdict["ratio"] <= 1.15)
        if "torch" in {e["backend"] for e in row["contenders"].values()}:
            assert row["reference"].startswith("torch") and verdict["peer_ratio"] > 0


def test_contention_writes_json_then_the_table(tiny_results):
    results, out = tiny_results
    saved = json.loads((out / "contention.json").read_text())
    assert saved["kind"] == "contention" and len(saved["rows"]) == len(results["rows"])
    text = contention.write_report(saved, out)
    assert (out / "contention.md").read_text() == text
    assert "| config | cell | mode | neighbours | pyrnn-cpp 1t" in text
    assert "| tiny | gru | train | 1 |" in text and "held on" in text


def test_verdict_is_the_default_over_the_best_thread_count():
    row = {"neighbours": 2, "contenders": {
        "pyrnn-cpp 1t": {"backend": "pyrnn-cpp", "threads": 1, "default": False, "ms": 10.0},
        "pyrnn-cpp 2t": {"backend": "pyrnn-cpp", "threads": 2, "default": True, "ms": 12.0},
        "torch 2t": {"backend": "torch", "threads": 2, "default": True, "ms": 30.0}}}
    v = contention.verdict(row)
    assert (v["best"], v["ratio"], v["ok"], v["peer_ratio"]) == ("pyrnn-cpp 1t", 1.2, False, 2.5)
    row["contenders"]["pyrnn-cpp 2t"]["ms"] = 11.0
    assert contention.verdict(row)["ok"] is True
    row["neighbours"] = 3  # the target speaks of one or two neighbours
    assert contention.verdict(row)["ok"] is None


@needs_proc
def test_neighbours_spin_while_running_and_are_gone_after_an_error():
    with pytest.raises(RuntimeError), contention.Neighbours(2, ramp_s=0.1) as neighbours:
        pids = neighbours.pids
        assert len(pids) == 2 and all(alive(p) for p in pids)
        assert all(os.getsid(p) == p != os.getsid(0) for p in pids)  # as another program's
        cpu = neighbours.cpu_s()
        time.sleep(0.2)
        assert neighbours.cpu_s() > cpu  # they spin
        raise RuntimeError("the bench failed")
    assert gone_within(pids, 1.0)


@needs_proc
def test_a_neighbour_with_a_duty_below_one_sleeps_the_rest_of_the_time():
    with contention.Neighbours(1, ramp_s=0.1, duty=0.3) as neighbours:
        cpu, start = neighbours.cpu_s(), time.perf_counter()
        time.sleep(1.0)
        used, wall = neighbours.cpu_s() - cpu, time.perf_counter() - start
    assert 0 < used < 0.6 * wall  # it spins, but sleeps 70 % of each period whatever the load


# The child takes Python's own SIGINT handler: a test run started in the background (`cmd &` in a
# script) ignores SIGINT, and its children would inherit that.
START_AND_WAIT = """
import contextlib, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, sys.argv[1])
from bench import contention
with {guard}, contention.Neighbours(1, ramp_s=0.05) as neighbours:
    print(*neighbours.pids, flush=True)
    time.sleep(60)
"""


@needs_proc
@pytest.mark.parametrize("how, guard", [
    (signal.SIGKILL, "contextlib.nullcontext()"),       # no cleanup runs: the neighbour notices
    (signal.SIGINT, "contextlib.nullcontext()"),        # KeyboardInterrupt: the with-block stops it
    (signal.SIGTERM, "contention.terminate_as_exit()"),  # as the bench runs: SystemExit, cleanup
])
def test_no_neighbour_outlives_an_interrupted_run(how, guard):
    runner = subprocess.Popen([sys.executable, "-c", START_AND_WAIT.format(guard=guard), str(ROOT)],
                              stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in runner.stdout.readline().split()]
        assert pids and all(alive(p) for p in pids)
        os.kill(runner.pid, how)
        runner.wait(timeout=5)
        assert gone_within(pids, 2.0), f"neighbour {pids} outlived a run ended by {how!r}"
    finally:
        runner.kill()
        runner.wait()


def test_contention_arguments_are_checked(capsys):
    assert run.main(["--contention", "--neighbours", "-1"]) == 2
    assert "--neighbours" in capsys.readouterr().err
    assert run.main(["--neighbours", "1"]) == 2
    assert "--contention" in capsys.readouterr().err
    assert run.main(["--contention", "--neighbour-duty", "0"]) == 2
    assert "--neighbour-duty" in capsys.readouterr().err
    assert run.main(["--neighbour-duty", "0.5"]) == 2
    assert "--contention" in capsys.readouterr().err
    assert run.main(["--contention", "--backends", "torch"]) == 2
    assert "--backends" in capsys.readouterr().err
    args = run.parse_args(["--contention"])
    assert (args.configs, args.cells, args.threads, args.neighbours) == (
        ["latency", "medium"], ["lstm", "gru"], [1], [1])
