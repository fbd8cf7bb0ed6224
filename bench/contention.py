"""Speed under load: ``pyrnn bench --contention`` (in a checkout: ``python -m bench --contention``).

Most machines are busy. Each row (configuration, cell, mode) is timed while ``--neighbours``
processes spin on the CPU beside the timed one: pyrnn at its default thread count, pyrnn at one
thread (and at any count named with ``--threads``), and PyTorch at its default, in interleaved
rounds as the runner times its rows, after checking that they agree (before each neighbour
count, the run waits for quiet as ``--quiet-pct`` and ``--quiet-wait-s`` say). The verdict of a
row is pyrnn's default time over the best time of its thread counts; issue 33's target is at
most ``LIMIT`` with one or two neighbours. Results go to ``contention.json`` in ``--out`` (rewritten
after every row), then the Markdown table to ``contention.md`` and standard output.

A neighbour runs in a session of its own, as another program would, and ends when stopped
(Ctrl-C and SIGTERM stop the run, which stops it) or on its own within milliseconds when the
process that started it is gone (killed included), so an interrupted run leaves no spinning
process.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyrnn

from . import report, run, timing
from .backends import BACKENDS, Case, make_data, pyrnn_api

SCHEMA_VERSION = 1
# Issue 33: with one or two busy neighbours, pyrnn's default may be at most this much slower
# than its best thread count.
LIMIT = 1.15
TARGET_NEIGHBOURS = (1, 2)
PEER = "torch"

# A neighbour: spins until its parent is no longer the process that started it (the parent was
# killed, and the neighbour adopted), until terminated, or until Ctrl-C (quietly). With a duty
# below 1 it spins that share of each 10 ms period and sleeps the rest, as a program that is busy
# now and then does; each inner loop takes a few milliseconds.
SPIN = """\
import os, sys, time
parent, duty = int(sys.argv[1]), float(sys.argv[2])
period = 0.010
try:
    while os.getppid() == parent:
        busy_until = time.monotonic() + duty * period
        while True:
            for _ in range(20_000):
                pass
            if duty >= 1 or time.monotonic() >= busy_until:
                break
        if duty < 1:
            time.sleep((1 - duty) * period)
except KeyboardInterrupt:
    pass
"""


class Neighbours:
    """``count`` processes spinning on the CPU while the block runs: ``with Neighbours(1): ...``.

    Each runs in a session of its own, as a program started elsewhere would (another terminal, a
    service): Linux's autogroup scheduling shares the CPUs between sessions first, so a spinner in
    the bench's own session would take its time from the bench alone. ``own_session=False`` puts
    them in the bench's session.
    """

    def __init__(self, count: int, ramp_s: float = 0.2, own_session: bool = True,
                 duty: float = 1.0):
        self.count, self.ramp_s, self.own_session, self.duty = count, ramp_s, own_session, duty
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Neighbours:
        try:
            for _ in range(self.count):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-S", "-c", SPIN, str(os.getpid()), str(self.duty)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    start_new_session=self.own_session))
            if self.procs:
                time.sleep(self.ramp_s)  # the interpreters start and reach their loops
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def cpu_s(self) -> float | None:
        """CPU seconds the neighbours have used (Linux /proc; None elsewhere)."""
        total = 0.0
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                return None
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit while the block runs, so that its cleanup (the neighbours) runs."""
    def leave(signum, frame):
        raise SystemExit(128 + signum)

    try:
        before = signal.signal(signal.SIGTERM, leave)
    except ValueError:  # not the main thread: signals cannot be caught here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


class OthersLoad:
    """CPU share of the machine used, while a block runs, by processes other than this one and
    its neighbours: the load nobody asked for (None where /proc is missing)."""

    def __init__(self, neighbours: Neighbours):
        self.neighbours = neighbours
        self.pct: float | None = None

    def sample(self) -> tuple:
        return (timing.busy_cpu_s(), time.process_time(), time.perf_counter(),
                self.neighbours.cpu_s())

    def __enter__(self) -> OthersLoad:
        self.start = self.sample()
        return self

    def __exit__(self, *exc) -> None:
        end = self.sample()
        if None in self.start or None in end:
            return
        busy, own, wall, theirs = (b - a for a, b in zip(self.start, end, strict=True))
        capacity = wall * (os.cpu_count() or 1)
        if capacity > 0:
            self.pct = max(0.0, 100.0 * (busy - own - theirs) / capacity)


# ---------------------------------------------------------------------------------- the rows

def default_threads() -> dict[str, int | None]:
    """The thread counts each library uses unless told otherwise (read before any row sets one)."""
    try:
        import torch

        torch_threads = torch.get_num_threads()
    except ImportError:
        torch_threads = None
    return {"pyrnn-cpp": pyrnn.get_num_threads(), PEER: torch_threads}


def contenders(pyrnn_counts: list[int], defaults: dict) -> dict[str, dict]:
    """Label -> {backend, threads, default}: pyrnn at each count (its default among them), the
    peer at its default when it can run here."""
    counts = sorted({*pyrnn_counts, defaults["pyrnn-cpp"]})
    found = {f"pyrnn-cpp {n}t": {"backend": "pyrnn-cpp", "threads": n,
                                 "default": n == defaults["pyrnn-cpp"]} for n in counts}
    if defaults[PEER] and BACKENDS[PEER].unavailable() is None:
        found[f"{PEER} {defaults[PEER]}t"] = {"backend": PEER, "threads": defaults[PEER],
                                              "default": True}
    return found


def plan(args: argparse.Namespace) -> list[tuple[dict, str, str]]:
    return [(config, cell, mode) for config in run.suite_of(args) for cell in config["cells"]
            if cell in (args.cells or run.cfg.CELLS) for mode in (args.modes or run.cfg.MODES)]


def run_row(config: dict, cell: str, mode: str, who: dict[str, dict], neighbours: Neighbours,
            args: argparse.Namespace) -> dict:
    """Build every contender from the same weights, check they agree, time them interleaved."""
    data = make_data(Case(config, cell, mode, 1))
    runners, entries = {}, {}
    for label, spec in who.items():
        try:
            runners[label] = BACKENDS[spec["backend"]].prepare(
                Case(config, cell, mode, spec["threads"]), data)
        except Exception as exc:  # noqa: BLE001 - any failure is reported, the run goes on
            entries[label] = run.failure("error", exc)
    order = [label for label, spec in who.items() if spec["backend"] == PEER] + list(who)
    reference = run.check_agreement(None, runners, entries, order)
    with OthersLoad(neighbours) as load:
        run.time_all(runners, entries, args)
    row = {"config": config["name"], "cell": cell, "mode": mode,
           "neighbours": neighbours.count, "neighbour_duty": neighbours.duty,
           "shape": {k: config[k] for k in ("T", "B", "I", "H", "L", "D")},
           "reference": reference, "others_pct": load.pct,
           "contenders": {label: {**who[label], **entries[label]} for label in who
                          if label in entries}}
    row["verdict"] = verdict(row)
    return row


def verdict(row: dict) -> dict | None:
    """pyrnn's default time over the best of its thread counts (None if either is missing); ok
    only where issue 33's target applies (one or two neighbours), else None."""
    times = {label: e["ms"] for label, e in row["contenders"].items()
             if e["backend"] == "pyrnn-cpp" and e.get("ms")}
    default = next((label for label, e in row["contenders"].items()
                    if e["backend"] == "pyrnn-cpp" and e["default"]), None)
    if default not in times:
        return None
    best = min(times, key=times.__getitem__)
    ratio = times[default] / times[best]
    peer = next((e for e in row["contenders"].values() if e["backend"] == PEER), {})
    applies = row["neighbours"] in TARGET_NEIGHBOURS
    return {"default": default, "best": best, "ratio": ratio, "limit": LIMIT,
            "ok": ratio <= LIMIT if applies else None,
            "peer_ratio": peer["ms"] / times[default] if peer.get("ms") else None}


# ------------------------------------------------------------------------------- the report

def fmt_ms(entry: dict | None) -> str:
    if entry is None:
        return "—"
    if entry["status"] != "ok":
        return f"**{entry['status'].upper()}**"
    return f"{entry['ms']:.3f}" if entry["ms"] < 10 else f"{entry['ms']:.1f}"


def fmt_verdict(v: dict | None) -> str:
    if v is None:
        return "—"
    if v["ok"] is None:
        return "(no target)"
    if v["ok"]:
        return "✓"
    return f"✗ > {v['limit']:.2f} (best: {v['best']})"


def table(results: dict) -> str:
    labels = list(dict.fromkeys(label for r in results["rows"] for label in r["contenders"]))
    defaults = {label for r in results["rows"] for label, e in r["contenders"].items()
                if e["default"]}
    names = [label + (" (default)" if label in defaults else "") for label in labels]
    head = (["config", "cell", "mode", "neighbours"] + [f"{n} ms" for n in names]
             + ["default / best", f"×{PEER}", "others %", f"≤ {LIMIT:.2f}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        v = r["verdict"] or {}
        cells = [r["config"], r["cell"], r["mode"], str(r["neighbours"])]
        cells += [fmt_ms(r["contenders"].get(label)) for label in labels]
        cells += [report.fmt_num(v.get("ratio")), report.fmt_num(v.get("peer_ratio")),
                  report.fmt_num(r.get("others_pct"), 0), fmt_verdict(r["verdict"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    judged = [r for r in results["rows"] if r["verdict"] and r["verdict"]["ok"] is not None]
    held = sum(r["verdict"]["ok"] for r in judged)
    return (f"Target (pyrnn's default at most {LIMIT:.2f}× its best thread count with "
            f"{' or '.join(map(str, TARGET_NEIGHBOURS))} busy neighbours): held on "
            f"{held}/{len(judged)} rows.")


LEGEND = (
    "Each row is timed with `neighbours` processes spinning on the CPU beside this one. ms = "
    "median of round medians per call (train = forward + backward of all parameters and the "
    "input), the contenders taking turns within each round. default / best = pyrnn's time at its "
    "default thread count over its best time at any thread count timed (1.00: the default was "
    f"the best). ×{PEER} = {PEER} ms / pyrnn's default ms. others % = CPU share used by processes "
    "other than this one and its neighbours while the row was timed."
)


def markdown(results: dict) -> str:
    m = results["machine"]
    head = [f"- date: {results['date']}, commit {(results.get('git_commit') or '?')[:10]}, "
            f"wall time {results.get('wall_s', 0):.0f} s",
            f"- machine: {m['cpu']}, {m['usable_cpus']} usable CPUs; default threads: "
            + ", ".join(f"{k} {v}" for k, v in results["default_threads"].items() if v),
            f"- settings: {results['settings']}",
            f"- command: `{results['command']}`"]
    parts = ["## Speed under load", "\n".join(head), LEGEND, table(results), summary(results)]
    bad = [f"- {r['config']}/{r['cell']}/{r['mode']} with {r['neighbours']} neighbour(s) "
           f"**{label}** {e['status']}: {e.get('error')}" for r in results["rows"]
           for label, e in r["contenders"].items() if e["status"] != "ok"]
    if bad:
        parts += ["## Failures", "\n".join(bad)]
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------ the command

def run_contention(args: argparse.Namespace, out_dir: Path, progress: bool = True) -> dict:
    """Every row at every neighbour count; contention.json rewritten after each row."""
    started = time.time()
    defaults = default_threads()
    who = contenders(args.threads, defaults)
    rows = plan(args)
    results = {
        "schema": SCHEMA_VERSION, "kind": "contention",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": args.command,
        "settings": {k: getattr(args, k) for k in
                     ("neighbours", "neighbour_duty", "threads", "rounds", "round_s",
                      "max_calls", "warmup_s", "budget_s", "quiet_pct", "quiet_wait_s",
                      "settle_s")},
        "limit": LIMIT, "default_threads": defaults, "contenders": who,
        "machine": run.machine_info(), "versions": run.versions(),
        "git_commit": run.git_commit(), "pyrnn_backend_info": pyrnn.backend_info(),
        "pyrnn_api": pyrnn_api(), "rows": [],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "contention.json"
    before = pyrnn.get_num_threads()
    try:
        with terminate_as_exit():
            for count in args.neighbours:
                timing.wait_for_quiet(args.quiet_pct, args.quiet_wait_s)
                with Neighbours(count, duty=args.neighbour_duty) as neighbours:
                    for config, cell, mode in rows:
                        if progress:
                            print(f"contention: {config['name']}/{cell}/{mode}, {count} "
                                  f"neighbour(s)", file=sys.stderr)
                        results["rows"].append(run_row(config, cell, mode, who, neighbours, args))
                        results["wall_s"] = time.time() - started
                        run.write_json(results, path)
    finally:
        pyrnn.set_num_threads(before)
    results["wall_s"] = time.time() - started
    run.write_json(results, path)
    return results


def write_report(results: dict, out_dir: Path) -> str:
    text = markdown(results)
    (out_dir / "contention.md").write_text(text)
    print(text)
    return text


def run_command(args: argparse.Namespace) -> int:
    """``--contention``: the rows, the JSON, then the table; 1 if a contender failed."""
    out_dir = Path(args.out)
    results = run_contention(args, out_dir)
    print(f"wrote {out_dir / 'contention.json'} ({results['wall_s']:.0f} s)", file=sys.stderr)
    if not args.no_report:
        write_report(results, out_dir)
    return 1 if any(e["status"] != "ok" for r in results["rows"]
                    for e in r["contenders"].values()) else 0
