"""Scratch timer for the C++ core vs torch (developer tool, not the published benchmark).

Calls pyrnn._core directly and torch.nn.{RNN,GRU,LSTM} in the same process, interleaving rounds
so that background noise hits both alike, and prints the median time per call and the ratio
torch/pyrnn (> 1 means pyrnn is faster).

    python bench/_dev_speed.py                      # all cells and configs, 2 threads
    python bench/_dev_speed.py --cells gru --configs medium,large --modes train
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import numpy as np
import torch

import pyrnn
from pyrnn import _core

CONFIGS = {  # name: (T, B, n_in, H, L, D)
    "latency": (100, 1, 128, 128, 1, 1),
    "charrnn": (25, 1, 65, 100, 1, 1),
    "medium": (100, 32, 256, 256, 1, 1),
    "large": (100, 64, 512, 512, 1, 1),
    "deepbi": (100, 32, 256, 256, 2, 2),
    "db512": (25, 16, 512, 512, 1, 1),
    "db1024": (50, 32, 1024, 1024, 1, 1),
    "ragged": (200, 32, 128, 128, 1, 2),
}
LSTM_ONLY = {"db512", "db1024"}
TORCH_CLS = {"rnn_tanh": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}


def make_case(cell: str, cfg: str, seed: int = 0):
    T, B, n_in, H, L, D = CONFIGS[cfg]
    rng = np.random.default_rng(seed)
    net = TORCH_CLS[cell](n_in, H, num_layers=L, bidirectional=D == 2)
    weights = []
    for k in range(L * D):
        sfx = f"_l{k // D}" + ("_reverse" if k % D else "")
        weights.append(tuple(
            getattr(net, n + sfx).detach().numpy().copy()
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
    x = rng.standard_normal((T, B, n_in), dtype=np.float32)
    h0 = np.zeros((L * D, B, H), np.float32)
    c0 = h0.copy() if cell == "lstm" else None
    lengths = None
    if cfg == "ragged":
        lengths = rng.integers(10, T + 1, B)
        lengths[0] = T
    d_out = rng.standard_normal((T, B, D * H), dtype=np.float32)
    if lengths is not None:
        d_out *= (np.arange(T)[:, None] < lengths[None, :])[..., None]
    return net, weights, x, h0, c0, lengths, d_out


def pyrnn_fn(cell, mode, weights, x, h0, c0, lengths, d_out, bidir):
    if mode == "infer":
        return lambda: _core.stack_forward(cell, x, h0, c0, weights, bidir, lengths, None, False)

    def step():
        tape = _core.stack_forward(cell, x, h0, c0, weights, bidir, lengths, None, True)[3]
        return _core.stack_backward(tape, d_out, None, None)

    return step


def torch_fn(cell, mode, net, x, lengths, d_out):
    xt = torch.from_numpy(x)
    gt = torch.from_numpy(d_out)
    packed = lengths is not None
    lt = torch.from_numpy(lengths) if packed else None

    def run(inp):
        if not packed:
            return net(inp)[0]
        p = torch.nn.utils.rnn.pack_padded_sequence(inp, lt, enforce_sorted=False)
        return torch.nn.utils.rnn.pad_packed_sequence(net(p)[0], total_length=x.shape[0])[0]

    if mode == "infer":
        def infer():
            with torch.no_grad():
                return run(xt)
        return infer

    def step():
        inp = xt.detach().requires_grad_(True)
        for p in net.parameters():
            p.grad = None
        run(inp).backward(gt)
        return inp.grad

    return step


CLOCK = time.perf_counter


def time_calls(fn, budget_s: float) -> float:
    """Median seconds per call over as many calls as fit in budget_s (at least 3)."""
    times = []
    t_end = CLOCK() + budget_s
    while len(times) < 3 or (CLOCK() < t_end and len(times) < 500):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def load_core(path: str):
    """Another build of the core, e.g. an older commit's, for before/after figures in one run.

    Build it outside the package with its own module name and pybind11 internals, e.g.
    g++ -O3 -march=x86-64-v4 -fopenmp -fPIC -shared -DEIGEN_DONT_PARALLELIZE
    -DPYRNN_MODULE_NAME=_core_old -DPYBIND11_COMPILER_TYPE='"_old"' -I<old>/cpp/include
    -I<python, pybind11, eigen includes> <old>/cpp/bindings.cpp -o _core_old.so

    One such core per process: CPython hands back the module already loaded under a name for
    any later file that defines the same name, so two builds both named _core_old would time
    the first one twice (each build compared in one process needs a module name of its own).
    """
    spec = importlib.util.spec_from_file_location("_core_old", path)
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    return core


def core_fn(core, cell, mode, weights, x, h0, c0, lengths, d_out, bidir):
    """Like pyrnn_fn for any core; zero final-state gradients (old cores mishandled None)."""
    if mode == "infer":
        return lambda: core.stack_forward(cell, x, h0, c0, weights, bidir, lengths, None, False)
    d_h_n = np.zeros_like(h0)
    d_c_n = None if c0 is None else np.zeros_like(c0)

    def step():
        tape = core.stack_forward(cell, x, h0, c0, weights, bidir, lengths, None, True)[3]
        return core.stack_backward(tape, d_out, d_h_n, d_c_n)

    return step


def compare(cell, cfg, mode, rounds, budget, old=None):
    """Median ms of pyrnn and torch (and the old core), and median ratios torch/pyrnn (/old)."""
    net, weights, x, h0, c0, lengths, d_out = make_case(cell, cfg)
    bidir = CONFIGS[cfg][5] == 2
    fns = {"pyrnn": pyrnn_fn(cell, mode, weights, x, h0, c0, lengths, d_out, bidir),
           "torch": torch_fn(cell, mode, net, x, lengths, d_out)}
    if old is not None:
        fns["old"] = core_fn(old, cell, mode, weights, x, h0, c0, lengths, d_out, bidir)
    for _ in range(2):  # warm-up
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            times[k].append(time_calls(f, budget))
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratio = {k: statistics.median([t / p for t, p in zip(times["torch"], v, strict=True)])
             for k, v in times.items() if k != "torch"}
    return ms, ratio


def gflops(cell, cfg, mode, seconds):
    T, B, n_in, H, L, D = CONFIGS[cfg]
    G = {"rnn_tanh": 1, "gru": 3, "lstm": 4}[cell]
    flops = 0
    for layer in range(L):
        ik = n_in if layer == 0 else D * H
        flops += D * 2 * T * B * G * H * (ik + H)
    return (flops * (3 if mode == "train" else 1)) / seconds / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", default="rnn_tanh,gru,lstm")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--modes", default="infer,train")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.3, help="seconds per round per backend")
    ap.add_argument("--old", help="path of another compiled core to time alongside (see load_core)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time, robust to other load but only fair at 1 thread")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    pyrnn.set_num_threads(args.threads)
    old = load_core(args.old) if args.old else None
    if old is not None:
        old.set_num_threads(args.threads)
    head = ["cell", "config", "mode", "pyrnn ms", "torch ms", "ratio", "GF/s"]
    if old:
        head += ["old ms", "old ratio"]
    print("{:9} {:8} {:5} {:>9} {:>9} {:>6} {:>6}".format(*head[:7]) +
          ("  {:>9} {:>9}".format(*head[7:]) if old else ""))
    for cell in args.cells.split(","):
        for cfg in args.configs.split(","):
            if cfg in LSTM_ONLY and cell != "lstm":
                continue
            for mode in args.modes.split(","):
                ms, r = compare(cell, cfg, mode, args.rounds, args.budget, old)
                line = (f"{cell:9} {cfg:8} {mode:5} {ms['pyrnn']:9.3f} {ms['torch']:9.3f} "
                        f"{r['pyrnn']:6.2f} {gflops(cell, cfg, mode, ms['pyrnn'] / 1e3):6.1f}")
                if old:
                    line += f"  {ms['old']:9.3f} {r['old']:9.2f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
