"""The runner: ``pyrnn bench [--quick] [--configs ...] [--cells ...] ...``.

Installed with pyrnn as ``pyrnn.bench``; from a checkout's root it also runs as ``python -m bench``.

For each row (configuration, cell, mode, thread count) it builds every backend from the same
weights, checks each backend's outputs (and, in training, input and weight gradients) against
PyTorch's, then times the backends that agree, interleaved. Results go to ``results.json``
(rewritten after every row, so an interrupted run keeps what it measured), then the report
(``bench.report``) renders the Markdown table and the chart from that JSON.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from tqdm import tqdm

import pyrnn

from . import configs as cfg
from . import timing
from .backends import BACKENDS, Case, make_data, num_gates, pyrnn_api

SCHEMA_VERSION = 1
# An output differing from the reference by more than this (relative to the array's scale,
# max(1, max |ref|)) marks the backend's row as failed.
TOLERANCE = 1e-3
# Preferred reference for the agreement check, first available wins.
REFERENCE_ORDER = ("torch", "pyrnn-numpy", "torch-nomkldnn", "onnxruntime", "pyrnn-cpp",
                   "pyrnn-cpp-kernels")
PYRNN = "pyrnn-cpp"
PEERS = ("torch", "torch-nomkldnn", "onnxruntime")
DESCRIPTION = ("Time pyrnn against PyTorch and ONNX Runtime on the standard suite, after checking "
               "every backend's outputs agree; writes JSON, Markdown and a chart. The peers need "
               "the bench extra: pip install \"pyrnn[bench]\" (from a checkout: \".[bench]\").")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help=f"a subset that finishes in under 2 minutes: {cfg.QUICK}")
    p.add_argument("--configs", nargs="+",
                   help=f"configuration names (default: all): {[c['name'] for c in cfg.SUITE]}")
    p.add_argument("--cells", nargs="+", choices=cfg.CELLS)
    p.add_argument("--backends", nargs="+", choices=cfg.BACKENDS + cfg.EXTRA_BACKENDS,
                   help="naming pyrnn-numpy here runs it on every configuration; "
                        "pyrnn-cpp-kernels (the C++ kernels without the modules) runs only "
                        "when named")
    p.add_argument("--modes", nargs="+", choices=cfg.MODES)
    p.add_argument("--threads", nargs="+", type=int,
                   help="thread counts of every backend (default: 2); with --contention, "
                        "pyrnn's thread counts timed beside its default (default: 1)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--round-s", type=float, help="target seconds per backend per round")
    p.add_argument("--max-calls", type=int, help="cap on calls per round")
    p.add_argument("--budget-s", type=float,
                   help="seconds per backend per row; slow rows get fewer rounds")
    p.add_argument("--quiet-pct", type=float,
                   help="before each row, wait while other processes use more than this %% "
                        "of the CPUs ...")
    p.add_argument("--quiet-wait-s", type=float, help="... but at most this long")
    p.add_argument("--settle-s", type=float,
                   help="pause before each backend's round, so that the previous backend's idle "
                        "threads have stopped spinning")
    p.add_argument("--out", default="bench/results",
                   help="output directory (default: bench/results)")
    p.add_argument("--no-report", action="store_true", help="write the JSON only")
    p.add_argument("--variants", action="store_true",
                   help="the cell family's rows (configs.VARIANT_ROWS): each variant beside its "
                        "plain cell and its peers; see bench/variants.py")
    p.add_argument("--contention", action="store_true",
                   help="speed under load instead of the suite: each row (default: "
                        f"{cfg.CONTENTION['configs']}, cells {cfg.CONTENTION['cells']}, both "
                        "modes) timed while busy processes (each in a session of its own, as "
                        "another program's) spin beside this one, pyrnn at its "
                        "default thread count and at one thread against torch at its default; "
                        "the verdict per row is pyrnn's default time over its best thread "
                        "count's (issue 33: at most 1.15 with one or two neighbours). Waits for "
                        "quiet (--quiet-pct) before starting each count of neighbours; writes "
                        "contention.json, then contention.md, in --out")
    p.add_argument("--neighbours", nargs="+", type=int,
                   help="with --contention: how many spinning processes to run beside the "
                        "timed one; several counts run one after another, 0 = none "
                        f"(default: {cfg.CONTENTION['neighbours']})")
    p.add_argument("--neighbour-duty", type=float,
                   help="with --contention: the share of time each neighbour is busy, in "
                        "(0, 1]; below 1 it spins that share of every 10 ms and sleeps the rest "
                        f"(default: {cfg.CONTENTION['neighbour_duty']})")


def parse_args(argv: list[str], prog: str = "python -m bench") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(p)
    args = p.parse_args(argv)
    args.command = " ".join([prog, *argv])
    return with_presets(args)


def with_presets(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what the command line left unset from the full-run defaults or --quick; check it."""
    contention = getattr(args, "contention", False)
    preset = {**cfg.DEFAULTS, **(cfg.QUICK if args.quick else {}),
              **(cfg.CONTENTION if contention else {})}
    for key in ("configs", "cells", "threads", "rounds", "round_s", "max_calls", "warmup_s",
                "gemm_size", "budget_s", "quiet_pct", "quiet_wait_s", "settle_s", "neighbours",
                "neighbour_duty"):
        if getattr(args, key, None) is None:
            setattr(args, key, preset.get(key))
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    if any(t < 1 for t in args.threads):
        raise ValueError(f"--threads: every value must be >= 1, got {args.threads}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    if args.round_s <= 0 or args.max_calls < 1 or args.budget_s <= 0:
        raise ValueError(f"--round-s and --budget-s must be > 0 and --max-calls >= 1, got "
                         f"{args.round_s}, {args.budget_s} and {args.max_calls}")
    if args.quiet_wait_s < 0:
        raise ValueError(f"--quiet-wait-s must be >= 0, got {args.quiet_wait_s}")
    if args.settle_s < 0:
        raise ValueError(f"--settle-s must be >= 0, got {args.settle_s}")
    check_contention_args(args)
    check_thread_counts(args.threads)
    check_out_folder(args.out)
    suite_of(args)  # raises on unknown names


def check_contention_args(args: argparse.Namespace) -> None:
    if not getattr(args, "contention", False):
        if args.neighbours is not None or args.neighbour_duty is not None:
            raise ValueError("--neighbours and --neighbour-duty apply only with --contention")
        return
    if args.backends:
        raise ValueError("--backends does not apply with --contention (its contenders are pyrnn "
                         "at its thread counts and torch at its default)")
    if any(n < 0 for n in args.neighbours):
        raise ValueError(f"--neighbours: every value must be >= 0, got {args.neighbours}")
    if not 0 < args.neighbour_duty <= 1:
        raise ValueError(f"--neighbour-duty must be in (0, 1], got {args.neighbour_duty}")


def check_thread_counts(threads: list[int]) -> None:
    """Each count must be one the core can run (pyrnn.set_num_threads says), found before the
    first row rather than at the row that uses it."""
    before = pyrnn.get_num_threads()
    try:
        for n in threads:
            pyrnn.set_num_threads(n)
    except ValueError as exc:
        raise ValueError(f"--threads: {exc}") from None
    finally:
        pyrnn.set_num_threads(before)


def check_out_folder(out: str) -> None:
    """--out must be a folder, or one that can be made, before anything is measured."""
    path = Path(out)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")


# ------------------------------------------------------------------------------------ rows

def forward_flops(case: Case, lengths: np.ndarray | None) -> float:
    """2*steps*G*H*(I_k+H) per layer and direction; steps = sum of lengths (real work)."""
    steps = case.T * case.B if lengths is None else int(lengths.sum())
    total = 0.0
    for k in range(case.L):
        fan_in = case.I if k == 0 else case.D * case.H
        total += case.D * 2.0 * steps * num_gates(case.cell) * case.H * (fan_in + case.H)
    return total


def max_error(ref: dict, got: dict) -> tuple[float, float, str]:
    """(largest abs error, largest error relative to max(1, |ref|), worst array name)."""
    missing = sorted(set(ref) - set(got))
    if missing:
        raise RuntimeError(f"backend output lacks {missing}")
    worst = (0.0, 0.0, "")
    for key, want in ref.items():
        have = np.asarray(got[key])
        if have.shape != want.shape:
            raise RuntimeError(f"{key}: shape {have.shape}, reference has {want.shape}")
        err = float(np.max(np.abs(have.astype(np.float64) - want), initial=0.0))
        rel = err / max(1.0, float(np.max(np.abs(want), initial=0.0)))
        if not np.isfinite(err):
            err = rel = float("inf")
        if rel >= worst[1]:
            worst = (err, rel, key)
    return worst


def prepare_all(case: Case, names: list[str], entries: dict) -> dict:
    """Build a runner per backend; failures and unsupported cases become entries."""
    data = make_data(case)
    runners = {}
    for name in names:
        why = BACKENDS[name].unsupported(case)
        if why:
            continue  # e.g. onnxruntime in training: no row entry at all
        try:
            runners[name] = BACKENDS[name].prepare(case, data)
        except Exception as exc:  # noqa: BLE001 - any failure is reported, the run goes on
            entries[name] = failure("error", exc)
    return runners


def failure(status: str, exc: BaseException) -> dict:
    return {"status": status, "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=4)}


def check_agreement(case: Case | None, runners: dict, entries: dict,
                    reference_order: tuple | list = REFERENCE_ORDER) -> str | None:
    """Run each backend once, compare with the reference (the first of reference_order that
    ran); drop the ones that disagree."""
    outputs = {}
    for name in list(runners):
        try:
            with runners[name].scope():
                outputs[name] = runners[name].result(runners[name].call())
                outputs[name] = {k: np.array(v, dtype=np.float64) for k, v in outputs[name].items()}
        except Exception as exc:  # noqa: BLE001
            entries[name] = failure("error", exc)
            del runners[name]
    ref = next((n for n in reference_order if n in outputs), None)
    for name in list(runners):
        entries[name] = {"status": "ok", "reference": ref}
        if name == ref:
            continue
        try:
            err, rel, key = max_error(outputs[ref], outputs[name])
        except RuntimeError as exc:
            entries[name] = failure("mismatch", exc)
            del runners[name]
            continue
        entries[name].update(max_abs_err=err, max_rel_err=rel, worst=key)
        if not rel <= TOLERANCE:
            entries[name]["status"] = "mismatch"
            entries[name]["error"] = (f"{key} differs from {ref} by {err:.3g} "
                                      f"(relative {rel:.3g} > {TOLERANCE})")
            del runners[name]
    return ref


def time_all(runners: dict, entries: dict, args: argparse.Namespace) -> None:
    calls, rounds = {}, {}
    for name, runner in list(runners.items()):
        try:
            warm = timing.warm_up(runner, args.warmup_s)
        except Exception as exc:  # noqa: BLE001
            entries[name] = failure("error", exc)
            del runners[name]
            continue
        calls[name], rounds[name] = timing.plan_rounds(float(np.median(warm)), args)
    if runners:
        for name, times in timing.interleaved_rounds(runners, calls, rounds, args.settle_s).items():
            entries[name].update(timing.summarise(times))


def derived(row: dict, gemm: dict) -> None:
    """GFLOP/s, % of GEMM rate per backend; ratios peer/pyrnn; target verdicts."""
    flops = row["flops"]
    # The time of this row's arithmetic at the machine's GEMM rate: no implementation doing
    # these FLOPs runs faster here, so peer ms / floor_ms bounds any ratio against that peer.
    row["floor_ms"] = flops / (gemm[str(row["threads"])]["gflops"] * 1e9) * 1e3
    for entry in row["backends"].values():
        if entry.get("ms"):
            entry["gflops"] = flops / (entry["ms"] * 1e-3) / 1e9
            entry["pct_gemm"] = 100.0 * entry["gflops"] / gemm[str(row["threads"])]["gflops"]
    mine = row["backends"].get(PYRNN, {}).get("ms")
    row["ratios"] = {p: row["backends"][p]["ms"] / mine for p in PEERS
                     if mine and row["backends"].get(p, {}).get("ms")}
    mine_cpu = row["backends"].get(PYRNN, {}).get("cpu_ms")
    row["cpu_ratios"] = {p: row["backends"][p]["cpu_ms"] / mine_cpu for p in PEERS
                         if mine_cpu and row["backends"].get(p, {}).get("cpu_ms")}
    row["targets"] = [verdict(rule, row) for rule in
                      cfg.rules_for(row["config"], row["cell"], row["mode"], row["threads"])]
    row["targets"] = [t for t in row["targets"] if t is not None]


def verdict(rule: dict, row: dict) -> dict | None:
    """{id, need, got, ok, ceiling}; None when the row lacks the peer (e.g. no ORT for training).

    ceiling is the ratio a peer rule would show with pyrnn at the measured GEMM rate (None for
    the GEMM-rate rule itself): a target above it cannot be met by doing this row's FLOPs faster.
    """
    ceiling = None
    if rule.get("metric") == "pct_gemm":
        got = row["backends"].get(PYRNN, {}).get("pct_gemm")
    else:
        if rule["peer"] not in row["backends"]:
            return None
        got = row["ratios"].get(rule["peer"])
        peer_ms = row["backends"][rule["peer"]].get("ms")
        ceiling = peer_ms / row["floor_ms"] if peer_ms and row.get("floor_ms") else None
    ok = got is not None and got >= rule["min"]
    return {"id": rule["id"], "need": rule["min"], "got": got, "ok": ok, "ceiling": ceiling}


def run_case(case: Case, names: list[str], args: argparse.Namespace, gemm: dict) -> dict:
    entries: dict[str, dict] = {}
    runners = prepare_all(case, names, entries)
    ref = check_agreement(case, runners, entries)
    waited, before = timing.wait_for_quiet(args.quiet_pct, args.quiet_wait_s)
    with timing.HostLoad() as load:
        time_all(runners, entries, args)
    data_lengths = make_data(case).lengths if case.config.get("lengths") else None
    mult = 3.0 if case.mode == "train" else 1.0
    row = {
        "config": case.config["name"], "cell": case.cell, "mode": case.mode,
        "threads": case.threads,
        "shape": {k: case.config[k] for k in ("T", "B", "I", "H", "L", "D")},
        "lengths": None if data_lengths is None else data_lengths.tolist(),
        "flops": mult * forward_flops(case, data_lengths),
        "reference": ref,
        "host_other_pct": load.pct,
        "quiet_wait": {"waited_s": waited, "other_pct_before": before},
        "backends": {n: entries[n] for n in names if n in entries},
    }
    derived(row, gemm)
    return row


# ------------------------------------------------------------------------------- the suite

def backends_for(config: dict, args: argparse.Namespace) -> list[str]:
    """Requested backends; pyrnn-numpy only on oracle-sized configs unless asked for."""
    if args.backends:
        return list(args.backends)
    return [b for b in cfg.BACKENDS if b != "pyrnn-numpy" or config.get("oracle")]


def suite_of(args: argparse.Namespace) -> list[dict]:
    """Configurations by name from the suite; dicts pass through (tests use tiny ones)."""
    if args.configs and all(isinstance(c, dict) for c in args.configs):
        return list(args.configs)
    return cfg.select(args.configs)


def plan(args: argparse.Namespace) -> list[tuple[Case, list[str]]]:
    cases = []
    for threads in args.threads:
        for config in suite_of(args):
            for cell in config["cells"]:
                if args.cells and cell not in args.cells:
                    continue
                for mode in args.modes or cfg.MODES:
                    cases.append((Case(config, cell, mode, threads), backends_for(config, args)))
    return cases


def available(names: set[str]) -> dict[str, str]:
    """Backends that cannot run on this machine, with why."""
    return {n: why for n in sorted(names) if (why := BACKENDS[n].unavailable())}


def setup_notes(missing: dict[str, str]) -> list[str]:
    """What a run will lack here, said before it starts rather than found in the JSON after."""
    notes = [f"{name} will not be timed: {why}" for name, why in missing.items()]
    if missing.keys() & set(PEERS):
        notes.append('the peers come with the bench extra: pip install "pyrnn[bench]"')
    if importlib.util.find_spec("threadpoolctl") is None:
        notes.append("threadpoolctl is not installed: NumPy's GEMM rate (% GEMM) is measured on "
                     "all cores whatever the thread count (pip install threadpoolctl)")
    return notes


def versions() -> dict:
    found = {"python": platform.python_version(), "numpy": np.__version__,
             "pyrnn": getattr(pyrnn, "__version__", "?")}
    for mod in ("torch", "onnx", "onnxruntime", "threadpoolctl"):
        try:
            found[mod] = __import__(mod).__version__
        except ImportError:
            found[mod] = None
    return found


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "platform": platform.platform(),
            "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    try:
        import torch

        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["torch_mkldnn_available"] = torch.backends.mkldnn.is_available()
    except ImportError:
        pass
    return info


def run_suite(args: argparse.Namespace, out_dir: Path, progress: bool = True) -> dict:
    """Run every planned row; write results.json after each; return the results dict."""
    started = time.time()
    cases = plan(args)
    missing = available({n for _, names in cases for n in names})
    for note in setup_notes(missing):
        print(f"note: {note}", file=sys.stderr)
    results = {
        "schema": SCHEMA_VERSION,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": args.command,
        "settings": {k: getattr(args, k) for k in
                     ("threads", "rounds", "round_s", "max_calls", "warmup_s", "gemm_size",
                      "budget_s", "quiet_pct", "quiet_wait_s", "settle_s")},
        "tolerance": TOLERANCE, "machine": machine_info(), "versions": versions(),
        "git_commit": git_commit(), "pyrnn_backend_info": pyrnn.backend_info(),
        "pyrnn_api": pyrnn_api(), "pyrnn_infer_frozen": True, "unavailable": missing,
        "gemm": {}, "rows": [],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    measure_gemm(results["gemm"], args)
    bar = tqdm(cases, desc="bench", unit="row", disable=not progress, file=sys.stderr)
    for case, names in bar:
        bar.set_postfix_str(case.label)
        names = [n for n in names if n not in missing]
        with timing.blas_threads(case.threads):
            row = run_case(case, names, args, results["gemm"])
        shout_failures(row, bar)
        probe_gemm(results["gemm"], case.threads, args)
        results["rows"].append(row)
        results["wall_s"] = time.time() - started
        write_json(results, path)
    results["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    measure_gemm(results["gemm"], args)
    for row in results["rows"]:
        derived(row, results["gemm"])  # % GEMM against the best rate seen
    write_json(results, path)
    return results


def measure_gemm(gemm: dict, args: argparse.Namespace) -> None:
    """GEMM rate per thread count, kept at its best over the run (start, after each row, end).

    Noise only slows a GEMM down, so the best is the machine's rate; every measurement is kept.
    """
    for threads in args.threads:
        now = timing.gemm_rate(threads, args.gemm_size, rounds=3 if args.quick else 5)
        before = gemm.get(str(threads))
        if before is None or now["gflops"] > before["gflops"]:
            gemm[str(threads)] = now | {"measurements": (before or {}).get("measurements", [])}
        gemm[str(threads)].setdefault("measurements", []).append(now["gflops"])


def probe_gemm(gemm: dict, threads: int, args: argparse.Namespace) -> None:
    """One more short GEMM look after each row: on a busy host some moment is quiet."""
    now = timing.gemm_rate(threads, args.gemm_size, rounds=1)
    best = gemm[str(threads)]
    best["measurements"].append(now["gflops"])
    if now["gflops"] > best["gflops"]:
        gemm[str(threads)] = now | {"measurements": best["measurements"]}


def shout_failures(row: dict, bar) -> None:
    for name, entry in row["backends"].items():
        if entry["status"] != "ok":
            bar.write(f"!!! FAILED {row['config']}/{row['cell']}/{row['mode']}/"
                      f"{row['threads']}t {name}: {entry['status']}: {entry.get('error')}",
                      file=sys.stderr)


def write_json(results: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float))
    tmp.replace(path)


def failed_rows(results: dict) -> list[str]:
    return [f"{r['config']}/{r['cell']}/{r['mode']}/{r['threads']}t {n}: {e['status']}"
            for r in results["rows"] for n, e in r["backends"].items() if e["status"] != "ok"]


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv, prog)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run the suite as the parsed arguments say, write the report; 1 if a backend failed."""
    if args.contention:
        from . import contention

        return contention.run_command(args)
    if args.variants:
        from . import variants

        return variants.run(args)
    out_dir = Path(args.out)
    results = run_suite(args, out_dir)
    print(f"wrote {out_dir / 'results.json'} ({results['wall_s']:.0f} s)", file=sys.stderr)
    if not args.no_report:
        from . import report

        report.write_report(out_dir / "results.json")
    bad = failed_rows(results)
    if bad:
        print(f"!!! {len(bad)} backend row(s) FAILED:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------ pyrnn bench

def register(commands: argparse._SubParsersAction) -> None:
    """The ``pyrnn bench`` subcommand: this runner, installed with pyrnn as ``pyrnn.bench``."""
    parser = commands.add_parser("bench", help="time pyrnn against PyTorch and ONNX Runtime",
                                 description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(run=run_command, parser=parser)


def run_command(args: argparse.Namespace) -> int:
    try:
        with_presets(args)
    except ValueError as exc:
        args.parser.error(str(exc))  # exits with status 2, as argparse's own errors do
    args.command = " ".join(["pyrnn", *args.argv])
    return run(args)
