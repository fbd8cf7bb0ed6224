"""Issue-4 targets across several full runs: ``python -m bench.across A.json B.json ...``.

On a shared host one run's 2-thread ratios move 10-30 %, so a target a few per cent from its
threshold holds in one run and misses in the next, and a single run cannot say which. This
reads the results JSONs of several runs (plain, or gzipped as ``.json.gz``) and prints, as
Markdown:

- per run: its commit, how fast its peers ran against the first run's (the geometric mean of
  peer time over peer time on the rows both timed: below 1 = a quieter host than the first's),
  and how many rows held each target; the first run stays first, the others follow in the order
  they were run (a shell sorts ``runs/10-*.json`` before ``runs/2-*.json``);
- per target: on how many rows it held in every run, in some runs, in none;
- every row that missed a target in some run: its ratio in each run, with ⊘ where even the
  run's GEMM rate would have missed (see report.fmt_got).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from . import report

PEERS = tuple(peer for peer, _ in report.RATIO_PEERS)
RowKey = tuple[str, str, str, int]


def row_key(row: dict) -> RowKey:
    return row["config"], row["cell"], row["mode"], row["threads"]


def run_label(results: dict, k: int) -> str:
    """'#2 24b252a': runs of the same commit told apart by their place on the command line."""
    return f"#{k + 1} {(results.get('git_commit') or '?')[:7]}"


def in_run_order(runs: list[dict]) -> list[dict]:
    """The first run (the one peer times are compared with), then the others by their date."""
    return runs[:1] + sorted(runs[1:], key=lambda results: results.get("date", ""))


def peer_time_index(first: dict, later: dict) -> float | None:
    """Geometric mean of later's peer times over first's, on the rows and peers both timed."""
    before = {row_key(r): r for r in first["rows"]}
    logs = []
    for row in later["rows"]:
        old = before.get(row_key(row))
        if old is None:
            continue
        for peer in PEERS:
            a, b = old["backends"].get(peer, {}), row["backends"].get(peer, {})
            if a.get("status") == "ok" and b.get("status") == "ok" and a.get("ms") and b.get("ms"):
                logs.append(math.log(b["ms"] / a["ms"]))
    return math.exp(sum(logs) / len(logs)) if logs else None


def verdicts_by_row(runs: list[dict]) -> dict[tuple[str, RowKey], list[dict | None]]:
    """(target id, row) -> that row's verdict in each run (None where the run lacks the row)."""
    table: dict[tuple[str, RowKey], list[dict | None]] = {}
    for k, results in enumerate(runs):
        for row in results["rows"]:
            for verdict in row.get("targets", []):
                slots = table.setdefault((verdict["id"], row_key(row)), [None] * len(runs))
                slots[k] = verdict
    return table


def runs_table(runs: list[dict], table: dict, targets: list[str]) -> str:
    lines = ["| run | date | peers' time (× first run) | " + " | ".join(targets) + " |",
             "|" + "---|" * (3 + len(targets))]
    for k, results in enumerate(runs):
        held = []
        for tid in targets:
            verdicts = [v[k] for (t, _), v in table.items() if t == tid and v[k] is not None]
            held.append(f"{sum(v['ok'] for v in verdicts)}/{len(verdicts)}")
        index = peer_time_index(runs[0], results)
        lines.append(f"| {run_label(results, k)} | {results.get('date', '?')[:16]} | "
                     f"{report.fmt_num(index, 3)} | " + " | ".join(held) + " |")
    return "\n".join(lines)


def target_totals(table: dict, targets: list[str]) -> str:
    """Per target, its rows by how many runs they held in; of those that ever missed, how many
    were out of reach (⊘) in every run where they missed."""
    lines = ["| target | rows | held in every run | in some | in none | missed only where ⊘ |",
             "|---|---|---|---|---|---|"]
    for tid in targets:
        counts, beyond = [0, 0, 0], 0
        for (t, _), verdicts in table.items():
            if t != tid:
                continue
            present = [v for v in verdicts if v is not None]
            held = sum(v["ok"] for v in present)
            counts[0 if held == len(present) else 1 if held else 2] += 1
            misses = [v for v in present if not v["ok"]]
            beyond += bool(misses) and all(report.out_of_reach(v) for v in misses)
        row = [tid, sum(counts), *counts, beyond]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def misses_table(runs: list[dict], table: dict) -> str:
    missed = {key: v for key, v in table.items() if any(x is not None and not x["ok"] for x in v)}
    if not missed:
        return "Every row held its targets in every run."
    labels = [run_label(r, k) for k, r in enumerate(runs)]
    lines = ["| target | row | " + " | ".join(labels) + " | held |", "|" + "---|" * (3 + len(runs))]
    for (tid, (config, cell, mode, threads)), verdicts in missed.items():
        cells = ["—" if v is None else ("" if v["ok"] else "✗ ") + report.fmt_got(v)
                 for v in verdicts]
        present = [v for v in verdicts if v is not None]
        lines.append(f"| {tid} | {config}/{cell}/{mode}/{threads}t | " + " | ".join(cells)
                     + f" | {sum(v['ok'] for v in present)}/{len(present)} |")
    return "\n".join(lines)


def markdown(runs: list[dict]) -> str:
    table = verdicts_by_row(runs)
    targets = list(dict.fromkeys(tid for tid, _ in table))
    if not targets:
        return "No issue-4 target applies to these runs' rows (targets are stated at 2 threads).\n"
    return "\n\n".join([
        runs_table(runs, table, targets),
        target_totals(table, targets),
        misses_table(runs, table),
        "Ratios are peer time / pyrnn time in that run (✗: below the target); \"≤\" is the best "
        "ratio the run's GEMM rate allows, marked ⊘ where even that misses the target.",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.across",
                                description="Issue-4 targets across several bench runs.")
    p.add_argument("results", type=Path, nargs="+",
                   help="results JSONs written by python -m bench (.json or .json.gz), first = "
                        "the run the others' peer times are compared with; the others are "
                        "listed by the date they were run")
    p.add_argument("--md", type=Path, help="also write the Markdown here")
    args = p.parse_args(argv)
    try:
        text = markdown(in_run_order([report.load(path) for path in args.results]))
        if args.md:
            args.md.write_text(text)
    except (OSError, ValueError) as exc:
        print(f"python -m bench.across: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
