"""pyrnn inside PyTorch, timed: ``python -m bench.torch_models [--quick] [--scaling] ...``.

Three parts, configurations in ``bench/configs.py`` (TORCH_*):

* model rows: a PyTorch char-RNN-like model (Embedding -> 2-layer LSTM or GRU -> Linear,
  cross-entropy, Adam) timed as torch.nn builds it and after ``pyrnn.torch.convert``: a whole
  training step, and inference under ``torch.no_grad``. Both start from the same weights; their
  logits and gradients are compared before timing.
* latency rows (batch 1, one step): the C++ kernel on NumPy arrays, the same call as the operator
  on tensors (through ``pyrnn.torch._ops.rnn_forward``, as the modules call it: in eager mode it
  skips the dispatcher's crossing into C++ and back), pyrnn.torch's module and torch.nn's. The
  operator boundary is the operator's time less the kernel's (in training, per operator call:
  the forward and the backward operator).
* ``--scaling``: ``charrnn train --distributed`` as 1 process of 2 threads and as 2 processes
  (torchrun) of 1 thread, with pyrnn.torch's layers and with torch.nn's: sequences per second.

Results go to ``torch_results.json`` (rewritten after every row), then ``torch_results.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import pyrnn
import pyrnn.torch as pt
from pyrnn import _backend
from pyrnn.torch import _ops

from . import configs as cfg
from . import timing
from .run import git_commit, machine_info, versions, write_json

TORCH_NN = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
TOLERANCE = 1e-3  # largest gradient or logit difference, relative to max(1, |torch.nn's|)


# ---------------------------------------------------------------------------- model rows

class CharModel(torch.nn.Module):
    def __init__(self, config: dict, cell: str) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(config["vocab"], config["E"])
        proj = {"proj_size": config["proj_size"]} if config.get("proj_size") else {}
        self.rnn = TORCH_NN[cell](config["E"], config["H"], num_layers=config["L"], **proj)
        self.head = torch.nn.Linear(config.get("proj_size") or config["H"], config["vocab"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(ids))
        return self.head(out)


class ModelRunner:
    """One model, torch.nn's or converted; call() is a training step or an inference pass."""

    def __init__(self, config: dict, cell: str, mode: str, threads: int, converted: bool):
        torch.manual_seed(0)
        self.model = CharModel(config, cell)
        if converted:
            pt.convert(self.model)
        self.adam = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        ids = torch.from_numpy(np.random.default_rng(1).integers(
            0, config["vocab"], (config["T"] + 1, config["B"])))
        self.inputs, self.targets = ids[:-1], ids[1:].reshape(-1)
        self.mode, self.threads = mode, threads

    def scope(self) -> contextlib.AbstractContextManager:
        torch.set_num_threads(self.threads)  # pyrnn's core follows torch's count
        return contextlib.nullcontext()

    def loss(self) -> torch.Tensor:
        logits = self.model(self.inputs)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 self.targets)

    def call(self) -> object:
        if self.mode == "infer":
            with torch.no_grad():
                return self.model(self.inputs)
        self.adam.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.adam.step()
        return loss


def disagreement(runners: dict[str, ModelRunner]) -> float:
    """The largest logit or gradient difference between the two models (before any step),
    relative to max(1, |torch.nn's value|)."""
    found = []
    for runner in runners.values():
        runner.model.zero_grad()
        loss = runner.loss()
        loss.backward()
        found.append([runner.model(runner.inputs).detach()]
                     + [p.grad.clone() for p in runner.model.parameters()])
        runner.model.zero_grad(set_to_none=True)
    worst = 0.0
    for mine, theirs in zip(found[1], found[0], strict=True):
        scale = max(1.0, float(theirs.abs().max()))
        worst = max(worst, float((mine - theirs).abs().max()) / scale)
    return worst


def model_row(config: dict, cell: str, mode: str, threads: int, args) -> dict:
    runners = {"torch.nn": ModelRunner(config, cell, mode, threads, converted=False),
               "pyrnn.torch": ModelRunner(config, cell, mode, threads, converted=True)}
    with runners["torch.nn"].scope():
        error = disagreement(runners)
    row = {"config": config["name"], "cell": cell, "mode": mode, "threads": threads,
           "shape": {k: config[k] for k in ("vocab", "E", "H", "proj_size", "L", "B", "T")
                     if k in config},
           "max_rel_err": error}
    if not error <= TOLERANCE:
        row["status"] = f"mismatch: relative difference {error:.3g} > {TOLERANCE}"
        return row
    row.update(time_runners(runners, args))
    backends = row["backends"]
    row["ratio"] = backends["torch.nn"]["ms"] / backends["pyrnn.torch"]["ms"]
    row["cpu_ratio"] = backends["torch.nn"]["cpu_ms"] / backends["pyrnn.torch"]["cpu_ms"]
    row["targets"] = [{"id": r["id"], "need": r["min"], "got": row["ratio"],
                       "ok": row["ratio"] >= r["min"]} for r in cfg.torch_rules_for(row)]
    return row


def time_runners(runners: dict, args) -> dict:
    """Warm up, then interleaved rounds (bench/timing.py); the summaries and the host's load."""
    calls, rounds = {}, {}
    for name, runner in runners.items():
        warm = timing.warm_up(runner, args.warmup_s)
        calls[name], rounds[name] = timing.plan_rounds(float(np.median(warm)), args)
    waited, before = timing.wait_for_quiet(args.quiet_pct, args.quiet_wait_s)
    with timing.HostLoad() as load:
        times = timing.interleaved_rounds(runners, calls, rounds, args.settle_s)
    return {"backends": {name: timing.summarise(t) for name, t in times.items()},
            "host_other_pct": load.pct,
            "quiet_wait": {"waited_s": waited, "other_pct_before": before}}


# -------------------------------------------------------------------------- latency rows

class LatencyRunner:
    """One recurrent call at batch 1 through one layer of the stack: "kernel" (pyrnn's C++ on
    NumPy arrays), "op" (torch.ops.pyrnn on tensors), "pyrnn.torch" or "torch.nn" (modules),
    or, in inference, "frozen" (the pyrnn.torch layer's frozen() snapshot). In training a call
    is the forward pass and the backward pass."""

    def __init__(self, config: dict, cell: str, mode: str, threads: int, layer: str):
        T, B, I, H = (config[k] for k in ("T", "B", "I", "H"))  # noqa: N806, E741
        torch.manual_seed(0)
        module = torch.nn if layer == "torch.nn" else pt
        self.module = getattr(module, cell.upper())(I, H)
        self.fast = self.module.frozen() if layer == "frozen" else None
        self.x = torch.randn(T, B, I, requires_grad=mode == "train")
        self.h0 = torch.zeros(1, B, H)
        self.c0 = torch.zeros(1, B, H) if cell == "lstm" else None
        self.d_out = torch.randn(T, B, H)
        self.weights = list(self.module._flat_weights)
        self.arrays = [tuple(w.detach().numpy() for w in self.weights)]
        self.kernels = _backend.prechecked("cpp")  # as the operators call them
        self.cell, self.mode, self.threads, self.layer = cell, mode, threads, layer

    def scope(self) -> contextlib.AbstractContextManager:
        torch.set_num_threads(self.threads)
        _backend.set_core_threads(self.threads)  # as the operators would (kernel runs none)
        return contextlib.nullcontext()

    def call_op(self, keep_tape: bool) -> tuple[torch.Tensor, ...]:
        return _ops.rnn_forward(self.cell, self.x, self.h0, self.c0, self.weights, True, False,
                                None, [], keep_tape)

    def call(self) -> object:
        train = self.mode == "train"
        if self.layer == "kernel":
            c0 = None if self.c0 is None else self.c0.numpy()
            out, _, _, tape = self.kernels.stack_forward(
                self.cell, self.x.detach().numpy(), self.h0.numpy(), c0, self.arrays, False,
                None, None, train)
            if train:
                self.kernels.stack_backward(tape, self.d_out.numpy(), None, None)
            return out
        if self.layer == "frozen":
            with torch.no_grad():
                return self.fast(self.x)[0]
        if self.layer == "op":
            with contextlib.nullcontext() if train else torch.no_grad():
                out = self.call_op(keep_tape=False)[0]
        else:
            with contextlib.nullcontext() if train else torch.no_grad():
                out = self.module(self.x)[0]
        if train:
            out.backward(self.d_out)
        return out


class _NoWork(torch.autograd.Function):
    """The operator's autograd bookkeeping without its work: the same tensor inputs, a saved
    tensor, outputs shaped like the operator's and gradients for every input (made once)."""

    @staticmethod
    def forward(ctx, outputs, grads, x, h0, c0, *weights):
        ctx.save_for_backward(outputs[3])
        ctx.mark_non_differentiable(outputs[3])
        ctx.grads = grads
        return tuple(t.new_empty(t.shape) for t in outputs)

    @staticmethod
    def backward(ctx, *d_outputs):
        return (None, None, *ctx.grads)


class AutogradFloor:
    """What torch's autograd costs around any operator with these inputs: _NoWork forward and
    backward. Subtracted from the operator's time, it leaves what pyrnn's boundary adds."""

    def __init__(self, config: dict, cell: str, mode: str, threads: int, layer: str):
        self.op = LatencyRunner(config, cell, mode, threads, "op")
        tensors = [self.op.x, self.op.h0, self.op.c0, *self.op.weights]
        self.grads = [torch.zeros_like(t) if t is not None else None for t in tensors]
        self.outputs = [t.detach() for t in self.op.call_op(keep_tape=False)]
        self.outputs[3] = torch.zeros(1, dtype=torch.int64)
        self.scope = self.op.scope

    def call(self) -> object:
        out = _NoWork.apply(self.outputs, self.grads, self.op.x, self.op.h0, self.op.c0,
                            *self.op.weights)[0]
        out.backward(self.op.d_out)
        return out


LATENCY_LAYERS = ("kernel", "op", "pyrnn.torch", "torch.nn")
INFERENCE_LAYERS = ("frozen",)  # inference only: no backward


def latency_row(config: dict, cell: str, mode: str, threads: int, args) -> dict:
    layers = LATENCY_LAYERS + (INFERENCE_LAYERS if mode == "infer" else ())
    runners = {layer: LatencyRunner(config, cell, mode, threads, layer) for layer in layers}
    if mode == "train":
        runners["autograd floor"] = AutogradFloor(config, cell, mode, threads, "op")
    row = {"config": config["name"], "cell": cell, "mode": mode, "threads": threads,
           "shape": {k: config[k] for k in ("T", "B", "I", "H", "L")}}
    row.update(time_runners(runners, args))
    us = {name: 1e3 * entry["ms"] for name, entry in row["backends"].items()}
    calls = 2 if mode == "train" else 1  # operator calls: forward, and backward in training
    row["overhead_us"] = (us["op"] - us["kernel"]) / calls
    row["module_overhead_us"] = (us["pyrnn.torch"] - us["kernel"]) / calls
    if mode == "train":  # what pyrnn adds beyond torch's autograd around any such operator
        row["overhead_beyond_autograd_us"] = (us["op"] - us["kernel"]
                                              - us["autograd floor"]) / calls
    row["targets"] = [{"id": r["id"], "need": r["max"], "got": row["overhead_us"],
                       "ok": row["overhead_us"] <= r["max"]} for r in cfg.torch_rules_for(row)]
    return row


# ------------------------------------------------------------------------------- scaling

SCALING_STEPS = 60
SCALING = [  # charrnn train --distributed's defaults otherwise: LSTM 256, B=32, T=64
    {"processes": 1, "threads": 2, "torch_rnn": False},
    {"processes": 2, "threads": 1, "torch_rnn": False},
    {"processes": 1, "threads": 2, "torch_rnn": True},
    {"processes": 2, "threads": 1, "torch_rnn": True},
]


def scaling_command(setup: dict, folder: str) -> list[str]:
    app = ["-m", "pyrnn", "charrnn", "train", "--distributed", "--threads",
           str(setup["threads"]), "--steps", str(SCALING_STEPS), "--eval-every", "100000",
           "--sample-length", "1", "--no-progress", "--checkpoint", f"{folder}/c.npz",
           "--json", f"{folder}/figures.json"] + (["--torch-rnn"] if setup["torch_rnn"] else [])
    if setup["processes"] == 1:
        return [sys.executable, *app]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
            str(setup["processes"]), *app]


def scaling_rows(rounds: int) -> list[dict]:
    """Sequences per second of every setup, in interleaved rounds; the median is the figure."""
    speeds: list[list[float]] = [[] for _ in SCALING]
    for _ in range(rounds):
        for k, setup in enumerate(SCALING):
            with tempfile.TemporaryDirectory() as folder:
                subprocess.run(scaling_command(setup, folder), check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                figures = json.loads(Path(folder, "figures.json").read_text())
            speeds[k].append(figures["sequences_per_second"])
    return [{**setup, "layers": "torch.nn" if setup["torch_rnn"] else "pyrnn.torch",
             "command": " ".join(scaling_command(setup, "DIR")[1:]),
             "sequences_per_second": statistics.median(s), "runs": s}
            for setup, s in zip(SCALING, speeds, strict=True)]


# ---------------------------------------------------------------------------- the runner

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.torch_models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"short rounds: {cfg.TORCH_QUICK}")
    p.add_argument("--configs", nargs="+", choices=[c["name"] for c in cfg.TORCH_MODELS]
                   + [cfg.TORCH_LATENCY["name"]])
    p.add_argument("--cells", nargs="+", choices=list(TORCH_NN))
    p.add_argument("--modes", nargs="+", choices=cfg.TORCH_MODES)
    p.add_argument("--threads", nargs="+", type=int)
    p.add_argument("--scaling", action="store_true",
                   help="also time charrnn train --distributed as 1x2 and 2x1 processes x "
                   "threads (a few minutes)")
    p.add_argument("--scaling-rounds", type=int, default=3)
    p.add_argument("--out", default="bench/results", help="output folder")
    args = p.parse_args(argv)
    preset = cfg.TORCH_QUICK if args.quick else cfg.TORCH_DEFAULTS
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.command = " ".join(["python -m bench.torch_models", *argv])
    return args


def plan(args: argparse.Namespace) -> list[tuple]:
    """(config, cell, mode, threads) rows; configurations by name, or dicts (tests use tiny
    ones): a model when it has a vocabulary, else a latency configuration."""
    known = [*cfg.TORCH_MODELS, cfg.TORCH_LATENCY]
    if args.configs and all(isinstance(c, dict) for c in args.configs):
        configs = list(args.configs)
    else:
        configs = [c for c in known if not args.configs or c["name"] in args.configs]
    return [(config, cell, mode, threads) for threads in args.threads for config in configs
            for cell in config["cells"] if not args.cells or cell in args.cells
            for mode in args.modes or cfg.TORCH_MODES]


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "torch_results.json"
    results = {"schema": 1, "command": args.command, "git_commit": git_commit(),
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "settings": {k: getattr(args, k) for k in cfg.TORCH_DEFAULTS},
               "tolerance": TOLERANCE, "machine": machine_info(), "versions": versions(),
               "pyrnn_backend_info": pyrnn.backend_info(), "rows": [], "scaling": None}
    for config, cell, mode, threads in plan(args):
        print(f"{config['name']}/{cell}/{mode}/{threads}t", file=sys.stderr, flush=True)
        if "vocab" in config:
            row = model_row(config, cell, mode, threads, args)
        else:
            row = latency_row(config, cell, mode, threads, args)
        results["rows"].append(row)
        write_json(results, path)
    if args.scaling:
        print("scaling: charrnn train --distributed", file=sys.stderr, flush=True)
        results["scaling"] = scaling_rows(args.scaling_rounds)
        write_json(results, path)
    (out / "torch_results.md").write_text(report(results))
    print(f"wrote {path} and torch_results.md", file=sys.stderr)
    return results


# ---------------------------------------------------------------------------- the report

def _num(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _verdict(row: dict) -> str:
    misses = [t["id"] for t in row.get("targets", []) if not t["ok"]]
    return ("✗ " + "; ".join(misses)) if misses else ("✓" if row.get("targets") else "")


def report(results: dict) -> str:
    """Markdown tables from a torch_results JSON."""
    models = [r for r in results["rows"] if "ratio" in r or "status" in r]
    latency = [r for r in results["rows"] if "overhead_us" in r]
    lines = ["| config | cell | mode | thr | torch.nn ms | pyrnn.torch ms | ×torch.nn | ×cpu "
             "| bg % | target |", "|" + "---|" * 10]
    for r in models:
        if "status" in r:
            lines.append(f"| {r['config']} | {r['cell']} | {r['mode']} | {r['threads']} | "
                         f"**{r['status']}** | | | | | |")
            continue
        b = r["backends"]
        lines.append(f"| {r['config']} | {r['cell']} | {r['mode']} | {r['threads']} | "
                     f"{b['torch.nn']['ms']:.2f} | {b['pyrnn.torch']['ms']:.2f} | "
                     f"{_num(r['ratio'])} | {_num(r['cpu_ratio'])} | "
                     f"{_num(r['host_other_pct'], 0)} | {_verdict(r)} |")
    lines += ["", "| latency | mode | thr | kernel µs | op µs | pyrnn.torch µs | torch.nn µs | "
              "frozen µs | autograd floor µs | op boundary µs/call | beyond autograd µs/call | "
              "module overhead µs/call | target |", "|" + "---|" * 14]
    for r in latency:
        us = {n: 1e3 * e["ms"] for n, e in r["backends"].items()}
        lines.append(f"| {r['cell']} T={r['shape']['T']} B={r['shape']['B']} "
                     f"H={r['shape']['H']} | {r['mode']} | {r['threads']} | "
                     + " | ".join(f"{us[n]:.1f}" for n in LATENCY_LAYERS)
                     + f" | {_num(us.get('frozen'), 1)} | {_num(us.get('autograd floor'), 1)} | "
                     f"{r['overhead_us']:.1f} | "
                     f"{_num(r.get('overhead_beyond_autograd_us'), 1)} | "
                     f"{r['module_overhead_us']:.1f} | {_verdict(r)} |")
    if results.get("scaling"):
        lines += ["", "| processes × threads | layers | sequences/s | runs |", "|---|---|---|---|"]
        for s in results["scaling"]:
            runs = ", ".join(f"{v:.0f}" for v in s["runs"])
            lines.append(f"| {s['processes']} × {s['threads']} | {s['layers']} | "
                         f"{s['sequences_per_second']:.1f} | {runs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not _backend.cpp_available():
        print("python -m bench.torch_models: pyrnn's C++ core is not available", file=sys.stderr)
        return 2
    results = run(args)
    print(report(results))
    bad = [r for r in results["rows"] if "status" in r]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
