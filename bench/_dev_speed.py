"""Scratch timer for the C++ core vs torch (developer tool, not the published benchmark).

Calls pyrnn._core directly and torch.nn.{RNN,GRU,LSTM} in the same process, interleaving rounds
so that background noise hits both alike, and prints the median time per call and the ratio
torch/pyrnn (> 1 means pyrnn is faster).

    python bench/_dev_speed.py                      # all cells and configs, 2 threads
    python bench/_dev_speed.py --cells gru --configs medium,large --modes train
"""

from __future__ import annotations

import argparse
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


def compare(cell, cfg, mode, rounds, budget):
    net, weights, x, h0, c0, lengths, d_out = make_case(cell, cfg)
    bidir = CONFIGS[cfg][5] == 2
    fp = pyrnn_fn(cell, mode, weights, x, h0, c0, lengths, d_out, bidir)
    ft = torch_fn(cell, mode, net, x, lengths, d_out)
    fp(), ft(), fp(), ft()  # warm-up
    tp, tt = [], []
    for _ in range(rounds):
        tp.append(time_calls(fp, budget))
        tt.append(time_calls(ft, budget))
    ratios = [b / a for a, b in zip(tp, tt, strict=True)]
    return statistics.median(tp), statistics.median(tt), statistics.median(ratios)


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
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time, robust to other load but only fair at 1 thread")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    pyrnn.set_num_threads(args.threads)
    head = ("cell", "config", "mode", "pyrnn ms", "torch ms", "ratio", "GF/s")
    print("{:9} {:8} {:5} {:>9} {:>9} {:>6} {:>6}".format(*head))
    for cell in args.cells.split(","):
        for cfg in args.configs.split(","):
            if cfg in LSTM_ONLY and cell != "lstm":
                continue
            for mode in args.modes.split(","):
                tp, tt, r = compare(cell, cfg, mode, args.rounds, args.budget)
                print(f"{cell:9} {cfg:8} {mode:5} {tp * 1e3:9.3f} {tt * 1e3:9.3f} {r:6.2f} "
                      f"{gflops(cell, cfg, mode, tp):6.1f}", flush=True)


if __name__ == "__main__":
    main()
