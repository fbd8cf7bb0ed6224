"""The cell family's rows (issue 31): each variant beside its plain cell, and beside its peers.

``python -m bench --variants [--out DIR]``: for every row of ``configs.VARIANT_ROWS`` on the
configurations it names, in inference (a frozen module) and a training step (forward and
backward), pyrnn's C++ core runs the variant and its plain cell, interleaved with the peers
that have the variant (PyTorch: LSTM proj_size; ONNX Runtime: LSTM peepholes, GRU
linear_before_reset=0, inference). The figure of merit is the variant's time per FLOP over the
plain cell's, measured in the same rounds (1.0: the variant costs only its extra arithmetic),
and the peers' time over pyrnn's. A row the loaded core has no kernels for is reported, not
timed on the NumPy reference. Results go to DIR/variants.json, a table to stdout.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import pyrnn
from pyrnn import _backend
from pyrnn._cells import CELLS, features_needed

from . import configs as cfg
from . import timing

MODULES = {"lstm": pyrnn.LSTM, "gru": pyrnn.GRU}


def flops(cell: str, c: dict, proj: int = 0) -> float:
    """Forward multiply-adds x 2 of one layer and direction: the GEMMs, per step and row."""
    G, H, P = CELLS[cell].num_gates, c["H"], proj or c["H"]  # noqa: N806
    return 2.0 * c["T"] * c["B"] * (G * H * (c["I"] + P) + P * H * bool(proj))


def row_options(row: dict, c: dict) -> dict:
    """A row's module options in config c: its proj_size, or H // 4 where c's H is not wider."""
    options = dict(row.get("options", {}))
    if options.get("proj_size", 0) >= c["H"]:
        options["proj_size"] = max(1, c["H"] // 4)
    return options


def module(row: dict, c: dict, plain: bool = False):
    """The pyrnn module of a row (or of its plain cell), float32, seeded, on the C++ core."""
    kind = "gru" if row["cell"].startswith("gru") else "lstm"
    options = {} if plain else row_options(row, c)
    return MODULES[kind](c["I"], c["H"], dtype=np.float32, seed=0, backend="cpp", **options)


class PyrnnRunner:
    def __init__(self, net, x: np.ndarray, mode: str, threads: int):
        self.net, self.x, self.mode, self.threads = net, x, mode, threads
        self.run = net.frozen() if mode == "infer" else net
        self.d_out = np.ones_like(net(x)[0])

    def scope(self):
        pyrnn.set_num_threads(self.threads)
        return contextlib.nullcontext()

    def call(self):
        if self.mode == "infer":
            return self.run(self.x)[0]
        self.net.zero_grad()
        out, _ = self.net(self.x)
        self.net.backward(self.d_out)
        return out


class TorchRunner:
    """torch.nn.LSTM(proj_size=P) with pyrnn's weights (state_dict names are PyTorch's)."""

    def __init__(self, net, x: np.ndarray, mode: str, threads: int):
        import torch

        self.torch, self.mode, self.threads = torch, mode, threads
        self.net = torch.nn.LSTM(net.input_size, net.hidden_size, proj_size=net.proj_size)
        self.net.load_state_dict({k: torch.from_numpy(np.array(v))
                                  for k, v in net.state_dict().items()})
        self.x = torch.from_numpy(x).requires_grad_(mode == "train")

    def scope(self):
        before = self.torch.get_num_threads()
        self.torch.set_num_threads(self.threads)
        return _restore(self.torch, before)

    def call(self):
        if self.mode == "infer":
            with self.torch.no_grad():
                return self.net(self.x)[0].numpy()
        self.net.zero_grad()
        out, _ = self.net(self.x)
        out.sum().backward()
        return out.detach().numpy()


@contextlib.contextmanager
def _restore(torch, threads: int):
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class OrtRunner:
    """One ONNX LSTM (with P) or GRU (linear_before_reset=0) node of pyrnn's weights."""

    def __init__(self, net, x: np.ndarray, mode: str, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(onnx_node(net, x.shape).SerializeToString(), opts,
                                            providers=["CPUExecutionProvider"])
        self.feed = {"x": x}

    def scope(self):
        return contextlib.nullcontext()

    def call(self):
        return self.session.run(["out"], self.feed)[0][:, 0]


def onnx_node(net, x_shape):
    """The ONNX graph x -> out (T, 1, B, H) of a one-layer pyrnn LSTM or GRU."""
    from onnx import TensorProto, helper, numpy_helper

    sd = net.state_dict()
    lstm = isinstance(net, pyrnn.LSTM)
    order = [0, 3, 1, 2] if lstm else [1, 0, 2]  # ONNX: LSTM i,o,f,c; GRU z,r,h

    def reorder(w):
        blocks = np.split(np.asarray(w), len(order), axis=0)
        return np.concatenate([blocks[i] for i in order])[None]

    inits = [numpy_helper.from_array(reorder(sd["weight_ih_l0"]), "W"),
             numpy_helper.from_array(reorder(sd["weight_hh_l0"]), "R"),
             numpy_helper.from_array(np.concatenate([reorder(sd["bias_ih_l0"]),
                                                     reorder(sd["bias_hh_l0"])], axis=1), "B")]
    inputs = ["x", "W", "R", "B"]
    if lstm and "weight_ci_l0" in sd:
        p = np.concatenate([sd["weight_ci_l0"], sd["weight_co_l0"], sd["weight_cf_l0"]])[None]
        inits.append(numpy_helper.from_array(np.asarray(p), "P"))
        inputs += ["", "", "", "P"]
    attrs = {"hidden_size": net.hidden_size}
    if not lstm:
        attrs["linear_before_reset"] = 0
    node = helper.make_node("LSTM" if lstm else "GRU", inputs, ["out"], **attrs)
    f32 = TensorProto.FLOAT
    graph = helper.make_graph([node], "variant", [helper.make_tensor_value_info("x", f32, x_shape)],
                              [helper.make_tensor_value_info("out", f32, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


PEERS = {"torch": TorchRunner, "onnxruntime": OrtRunner}


def missing(row: dict) -> list[str]:
    """What the loaded core lacks to run the row's variant."""
    return sorted(features_needed(row["cell"], bool(row.get("options", {}).get("proj_size")))
                  - _backend.cpp_features())


def time_row(runners: dict, timing_args) -> dict:
    """Median ms of each runner, interleaved rounds (see bench/timing.py)."""
    calls, rounds = {}, {}
    for name, runner in runners.items():
        warm = timing.warm_up(runner, timing_args.warmup_s)
        calls[name], rounds[name] = timing.plan_rounds(float(np.median(warm)), timing_args)
    times = timing.interleaved_rounds(runners, calls, rounds, timing_args.settle_s)
    return {name: timing.summarise(r) for name, r in times.items()}


def run_row(row: dict, c: dict, mode: str, threads: int, timing_args) -> dict:
    result = {"row": row["name"], "config": c["name"], "mode": mode, "threads": threads}
    lacks = missing(row)
    if lacks:
        return result | {"skipped": f"the C++ core has no kernels for {lacks}"}
    x = np.random.default_rng(0).uniform(-1, 1, (c["T"], c["B"], c["I"])).astype(np.float32)
    variant = module(row, c)
    runners = {"variant": PyrnnRunner(variant, x, mode, threads),
               "plain": PyrnnRunner(module(row, c, plain=True), x, mode, threads)}
    for peer in row.get("peers", ()):
        if peer == "onnxruntime" and mode != "infer":
            continue
        runners[peer] = PEERS[peer](variant, x, mode, threads)
    with runners["variant"].scope():
        ours = runners["variant"].call()
    agreement = {p: float(np.max(np.abs(r.call() - ours))) for p, r in runners.items()
                 if p not in ("variant", "plain")}
    stats = time_row(runners, timing_args)
    ms = {name: s["ms"] for name, s in stats.items()}
    proj = row_options(row, c).get("proj_size", 0)
    per_flop = (ms["variant"] / flops(row["cell"], c, proj)) / (ms["plain"] / flops(
        "gru" if row["cell"].startswith("gru") else "lstm", c))
    return result | {"ms": ms, "spread": {n: s["spread"] for n, s in stats.items()},
                     "time_per_flop_vs_plain": per_flop, "max_abs_diff": agreement,
                     "peer_over_pyrnn": {p: ms[p] / ms["variant"] for p in ms
                                         if p not in ("variant", "plain")}}


def rows_to_run() -> list[tuple[dict, dict]]:
    by_name = {c["name"]: c for c in cfg.SUITE}
    return [(row, {**by_name[name], **row.get("config", {})})
            for row in cfg.VARIANT_ROWS for name in row["configs"]]


def table(results: list[dict]) -> str:
    lines = ["| row | config | mode | variant ms | plain ms | time/FLOP vs plain | peers / pyrnn |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['row']} | {r['config']} | {r['mode']} | {r['skipped']} ||||")
            continue
        peers = ", ".join(f"{p} {v:.2f}x (max diff {r['max_abs_diff'][p]:.1e})"
                          for p, v in r["peer_over_pyrnn"].items()) or "-"
        lines.append(f"| {r['row']} | {r['config']} | {r['mode']} | {r['ms']['variant']:.2f} | "
                     f"{r['ms']['plain']:.2f} | {r['time_per_flop_vs_plain']:.3f} | {peers} |")
    return "\n".join(lines)


def run(args) -> int:
    """Every variant row at the first of args.threads (2 by default); JSON to args.out."""
    timing_args = SimpleNamespace(**{**cfg.DEFAULTS, **{k: v for k, v in vars(args).items()
                                                       if k in cfg.DEFAULTS and v is not None}})
    threads = (args.threads or cfg.DEFAULTS["threads"])[0]
    results = []
    for row, c in rows_to_run():
        for mode in args.modes or cfg.MODES:
            results.append(run_row(row, c, mode, threads, timing_args))
            print(table(results[-1:]).splitlines()[-1], file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "variants.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0
