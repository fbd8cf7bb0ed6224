"""Markdown table and bar chart from a results JSON: ``python -m bench.report results.json``.

Writes ``<stem>.md`` and ``<stem>.png`` beside the JSON (or where --md/--png say) and prints
the Markdown. The chart needs matplotlib; without it the PNG is skipped with a message.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

BACKEND_COLUMNS = ("pyrnn-cpp", "pyrnn-cpp-kernels", "pyrnn-numpy", "torch", "torch-nomkldnn",
                   "onnxruntime")
RATIO_PEERS = (("torch", "×torch"), ("torch-nomkldnn", "×nomkldnn"), ("onnxruntime", "×ORT"))


def load(path: Path) -> dict:
    """A results JSON, plain or gzipped (``.json.gz``, as runs kept for bench.across may be)."""
    raw = Path(path).read_bytes()
    results = json.loads(gzip.decompress(raw) if Path(path).suffix == ".gz" else raw)
    if not isinstance(results, dict) or "rows" not in results or "gemm" not in results:
        raise ValueError(f"{path}: not a bench results JSON (needs 'rows' and 'gemm')")
    return results


def fmt_ms(entry: dict | None, rounds: int) -> str:
    """ms with 4 significant-ish digits; † when the time budget allowed fewer rounds."""
    if entry is None:
        return "—"
    if entry["status"] != "ok":
        return f"**{entry['status'].upper()}**"
    ms = entry.get("ms")
    if ms is None:
        return "—"
    text = f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"
    return text + ("†" if entry.get("rounds", rounds) < rounds else "")


def fmt_targets(row: dict) -> str:
    if not row.get("targets"):
        return ""
    misses = [t for t in row["targets"] if not t["ok"]]
    if not misses:
        return "✓"
    return "✗ " + "; ".join(f"{t['id']} (got {fmt_num(t['got'])})" for t in misses)


def fmt_num(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def min_ratio(row: dict, peer: str) -> float | None:
    """Peer's fastest call / pyrnn-cpp's fastest call: the least disturbed view of each."""
    mine, theirs = (row["backends"].get(n, {}).get("min_ms") for n in ("pyrnn-cpp", peer))
    return theirs / mine if mine and theirs else None


def table(results: dict) -> str:
    rows = results["rows"]
    shown = [b for b in BACKEND_COLUMNS if any(b in r["backends"] for r in rows)]
    head = (["config", "cell", "mode", "thr"] + [f"{b} ms" for b in shown]
            + ["GFLOP/s", "% GEMM"] + [label for _, label in RATIO_PEERS]
            + ["×torch cpu", "×torch min", "bg %", "issue-4 targets"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mine = r["backends"].get("pyrnn-cpp", {})
        cells = [r["config"], r["cell"], r["mode"], str(r["threads"])]
        cells += [fmt_ms(r["backends"].get(b), results["settings"]["rounds"]) for b in shown]
        cells += [fmt_num(mine.get("gflops"), 1), fmt_num(mine.get("pct_gemm"), 1)]
        cells += [fmt_num(r["ratios"].get(peer)) for peer, _ in RATIO_PEERS]
        cells += [fmt_num(r.get("cpu_ratios", {}).get("torch")), fmt_num(min_ratio(r, "torch")),
                  fmt_num(r.get("host_other_pct"), 0), fmt_targets(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_summary(results: dict) -> str:
    """Per target: rows where it holds / rows it applies to, and the rows where it fails."""
    by_id: dict[str, list] = {}
    for r in results["rows"]:
        for t in r.get("targets", []):
            by_id.setdefault(t["id"], []).append((r, t))
    if not by_id:
        return "No issue-4 target applies to these rows (targets are stated at 2 threads)."
    lines = ["| target | holds | fails on (got; at most, at the GEMM rate) |", "|---|---|---|"]
    for tid, hits in by_id.items():
        held = sum(t["ok"] for _, t in hits)
        fails = ", ".join(f"{r['config']}/{r['cell']}/{r['mode']} ({fmt_got(t)})"
                          for r, t in hits if not t["ok"])
        lines.append(f"| {tid} | {held}/{len(hits)} | {fails or '—'} |")
    lines.append("\n\"At most\" is the peer's time over the time of the row's FLOPs at the "
                 "measured GEMM rate: the best ratio any implementation doing this arithmetic "
                 "could show here. Where it is below the target (marked ⊘), the target is out of "
                 "reach on this machine.")
    return "\n".join(lines)


def fmt_got(verdict: dict) -> str:
    """'1.28; ≤ 1.63', with ⊘ when even the ceiling misses the target."""
    ceiling = verdict.get("ceiling")
    if ceiling is None:
        return fmt_num(verdict["got"])
    mark = " ⊘" if out_of_reach(verdict) else ""
    return f"{fmt_num(verdict['got'])}; ≤ {fmt_num(ceiling)}{mark}"


def out_of_reach(verdict: dict) -> bool:
    """Whether even the GEMM rate would miss this target (the ceiling is below what it needs)."""
    return verdict.get("ceiling") is not None and verdict["ceiling"] < verdict["need"]


def agreement(results: dict) -> str:
    worst: dict[str, tuple[float, str]] = {}
    for r in results["rows"]:
        for name, e in r["backends"].items():
            if e.get("max_abs_err") is not None and e["max_abs_err"] >= worst.get(name, (-1,))[0]:
                worst[name] = (e["max_abs_err"], f"{r['config']}/{r['cell']}/{r['mode']}")
    parts = [f"{n} {err:.1e} ({where})" for n, (err, where) in sorted(worst.items())]
    return "Largest max-abs-error against the reference, per backend: " + (
        ", ".join(parts) if parts else "none measured") + "."


def failures(results: dict) -> str:
    bad = [f"- {r['config']}/{r['cell']}/{r['mode']}/{r['threads']}t **{n}** {e['status']}: "
           f"{e.get('error')}" for r in results["rows"] for n, e in r["backends"].items()
           if e["status"] != "ok"]
    return "\n".join(bad)


def batch_one_note(info: dict) -> str:
    """Which build ran the batch-1 rows, when it is not the one that ran the others."""
    flags = info.get("codegen_flags_batch_one")
    return f" (batch-1 rows: {flags})" if flags else ""


def frozen_note(results: dict) -> str:
    if results.get("pyrnn_api") != "module" or not results.get("pyrnn_infer_frozen"):
        return ""
    return " (inference: `net.frozen()`, the weights packed once, not on every call)"


def header(results: dict) -> str:
    m, v = results["machine"], results["versions"]
    gemm = ", ".join(f"{t} thr {g['gflops']:.0f} GFLOP/s" for t, g in results["gemm"].items())
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    info = results.get("pyrnn_backend_info", {})
    lines = [
        f"- date: {results['date']}, commit {(results.get('git_commit') or '?')[:10]}, "
        f"wall time {results.get('wall_s', 0):.0f} s",
        f"- machine: {m['cpu']}, {m['usable_cpus']} usable CPUs, {m['platform']}",
        f"- versions: {vers}",
        f"- pyrnn: {info.get('active')} backend, {info.get('codegen_flags', '')}, "
        f"{info.get('simd', '')}{batch_one_note(info)}; measured through the "
        f"{results.get('pyrnn_api')} API{frozen_note(results)}",
        f"- float32 GEMM rate (NumPy {next(iter(results['gemm'].values()))['size']}² matmul, "
        f"best of {sum(len(g.get('measurements', [1])) for g in results['gemm'].values())} "
        f"looks during the run): {gemm}",
        f"- settings: {results['settings']}; agreement tolerance {results['tolerance']} "
        f"(relative to max(1, max|ref|))",
        f"- command: `{results['command']}`",
    ]
    if results.get("unavailable"):
        lines.append(f"- not available here: {results['unavailable']}")
    return "\n".join(lines)


LEGEND = (
    "ms = median of round medians per call (train = forward + backward of all parameters and "
    "the input). GFLOP/s and % GEMM are pyrnn-cpp's (train counted as 3× forward FLOPs; ragged "
    "counts only the real steps). ×peer = peer ms / pyrnn-cpp ms: above 1 means pyrnn is faster. "
    "bg % = CPU share used by other processes while the row was timed (noise on a shared host). "
    "† = fewer rounds than asked (the per-row time budget ran out). ×torch cpu = the same ratio "
    "on process CPU time per call: immune to other processes at 1 thread, but at 2 threads it "
    "also counts OpenMP spin-waiting. ×torch min = torch's fastest call / pyrnn's fastest call "
    "(the calls least disturbed by other processes)."
)


def markdown(results: dict) -> str:
    parts = ["## Machine and settings", header(results), "## Results", LEGEND, table(results),
             "## Issue-4 targets", target_summary(results), agreement(results)]
    bad = failures(results)
    if bad:
        parts += ["## Failures", bad]
    return "\n\n".join(parts) + "\n"


def chart(results: dict, path: Path) -> bool:
    """Bar chart of the ratios pyrnn-cpp / peer per row; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: skipping the chart (pip install '.[plot]')",
              file=sys.stderr)
        return False
    rows = [r for r in results["rows"] if r["ratios"]]
    labels = [f"{r['config']} {r['cell']} {r['mode']} {r['threads']}t" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.32 * max(1, len(rows))))
    width = 0.8 / len(RATIO_PEERS)
    for k, (peer, label) in enumerate(RATIO_PEERS):
        ys = [i + (k - 1) * width for i in range(len(rows))]
        ax.barh(ys, [r["ratios"].get(peer, 0) for r in rows], height=width, label=label[1:])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of pyrnn-cpp (peer time / pyrnn time; > 1 = pyrnn faster)")
    ax.legend(title="vs", fontsize=8, loc="lower right")
    ax.set_title(f"pyrnn-cpp vs peers ({results['date'][:10]}, {results['machine']['cpu']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(path: Path, md: Path | None = None, png: Path | None = None) -> str:
    path = Path(path)
    results = load(path)
    text = markdown(results)
    md = md or path.with_suffix(".md")
    md.write_text(under_existing_header(md, text))
    png = png or path.with_suffix(".png")
    made = chart(results, png)
    print(text)
    print(f"wrote {md}" + (f" and {png}" if made else ""), file=sys.stderr)
    return text


def under_existing_header(md: Path, text: str) -> str:
    """text, kept under whatever md already holds above its first generated section.

    A published report (bench/RESULTS.md) is a hand-written introduction followed by this
    module's output; regenerating it from its JSON must not throw the introduction away.
    """
    if not md.exists():
        return text
    head, found, _ = md.read_text().partition(text.split("\n", 1)[0] + "\n")
    return head + text if found else text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report",
                                description="Markdown table and bar chart from bench results.")
    p.add_argument("results", type=Path, help="results JSON written by python -m bench")
    p.add_argument("--md", type=Path, help="Markdown output (default: beside the JSON); text "
                   "above its first generated section is kept")
    p.add_argument("--png", type=Path, help="chart output (default: beside the JSON)")
    args = p.parse_args(argv)
    try:
        write_report(args.results, args.md, args.png)
    except (OSError, ValueError) as exc:
        print(f"python -m bench.report: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
