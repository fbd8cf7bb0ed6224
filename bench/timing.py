"""Timing: warm-up, calls per round sized from the warm-up, interleaved rounds, GEMM rate.

Each backend runs n calls per round (n chosen so a round takes about ``round_s``), and within
a round the backends take turns in an order that rotates from round to round, so a burst of
noise on this shared machine hits all of them alike. Per backend we keep every call's time;
the figure of merit is the median of the round medians, with the fastest call and the spread
(slowest round median / fastest round median) beside it.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Limit NumPy's BLAS to n threads (no-op, with a note in the JSON, without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class HostLoad:
    """CPU share taken by other processes while a block runs (Linux /proc/stat; else None).

    A 2-thread timing is only meaningful when the machine's cores were ours: this is the
    disclosure that says how far they were not.
    """

    def __enter__(self) -> HostLoad:
        self.start = (busy_cpu_s(), time.process_time(), time.perf_counter())
        self.pct: float | None = None
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = busy_cpu_s(), time.process_time(), time.perf_counter()
        if busy is None or self.start[0] is None:
            return
        elapsed = (wall - self.start[2]) * (os.cpu_count() or 1)
        other = (busy - self.start[0]) - (own - self.start[1])
        self.pct = max(0.0, 100.0 * other / elapsed) if elapsed > 0 else None


def busy_cpu_s() -> float | None:
    """Seconds of CPU time all processes have used since boot (all cores summed)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def time_calls(fn: Callable[[], object], n: int) -> list[float]:
    """Seconds taken by each of n calls."""
    return [wall for wall, _ in time_calls_cpu(fn, n)]


def time_calls_cpu(fn: Callable[[], object], n: int) -> list[tuple[float, float]]:
    """(wall seconds, process CPU seconds) of each of n calls.

    CPU time is what the call cost whether or not another process held a core meanwhile; at
    1 thread it is the noise-free twin of wall time (at more threads it includes spin-waits).
    """
    times = []
    for _ in range(n):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    return times


def warm_up(runner, warmup_s: float) -> list[float]:
    """Call until warmup_s has passed (at least once: the agreement check already called it)."""
    times: list[float] = []
    with runner.scope():
        while not times or sum(times) < warmup_s:
            times += time_calls(runner.call, 1)
    return times


def plan_rounds(seconds_per_call: float, args) -> tuple[int, int]:
    """(calls per round, rounds): rounds of ~round_s, fewer rounds if over budget_s in all."""
    calls = max(1, min(args.max_calls, math.ceil(args.round_s / max(seconds_per_call, 1e-9))))
    affordable = math.floor(args.budget_s / (calls * max(seconds_per_call, 1e-9)))
    return calls, max(1, min(args.rounds, affordable))


def interleaved_rounds(runners: dict, calls: dict[str, int], rounds: dict[str, int],
                       settle_s: float = 0.0) -> dict:
    """Per backend, a list of rounds, each the list of its call times in seconds.

    Each backend's turn in a round starts settle_s after the previous turn ended. Thread pools
    keep spinning for a while after a call (ONNX Runtime's two intra-op threads burned ~47 ms
    of CPU in the half second after a call here, OpenMP's a few ms), which slows whichever
    backend runs next, and the rotation does not even that out: in a cyclic order the same
    backend nearly always follows the same neighbour. Measured at 2 threads without the pause,
    on the backend after ONNX Runtime: DeepBench h1024 LSTM inference pyrnn-cpp 172-180 ms
    (150-151 when ONNX Runtime does not spin), char-RNN LSTM 0.099-0.103 ms (0.070), and torch,
    which follows pyrnn-cpp, char-RNN 0.335-0.345 ms (0.197).
    """
    names = list(runners)
    times: dict[str, list] = {name: [] for name in names}
    with gc_paused():
        for r in range(max(rounds.values(), default=0)):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                if r < rounds[name]:
                    time.sleep(settle_s)
                    with runners[name].scope():
                        times[name].append(time_calls_cpu(runners[name].call, calls[name]))
    return times


def wait_for_quiet(max_other_pct: float, max_wait_s: float) -> tuple[float, float | None]:
    """Wait (up to max_wait_s) until other processes use under max_other_pct of the CPUs.

    Returns (seconds waited, last share seen). On a shared machine a burst of someone else's
    compiling makes every multi-threaded timing meaningless; waiting it out is cheaper.
    """
    if max_wait_s <= 0:
        return 0.0, None
    start = time.perf_counter()
    while True:
        with HostLoad() as load:
            time.sleep(0.25)
        waited = time.perf_counter() - start
        if load.pct is None or load.pct < max_other_pct or waited >= max_wait_s:
            return waited, load.pct


def summarise(rounds: list[list[tuple[float, float]]]) -> dict:
    """ms = median of round medians; min_ms = fastest call; spread = max/min round median.

    cpu_ms is the median of round medians of process CPU time per call.
    """
    walls = [[w for w, _ in r] for r in rounds]
    medians = [statistics.median(r) for r in walls]
    cpu_medians = [statistics.median(c for _, c in r) for r in rounds]
    return {
        "ms": 1e3 * statistics.median(medians),
        "min_ms": 1e3 * min(min(r) for r in walls),
        "spread": max(medians) / min(medians),
        "cpu_ms": 1e3 * statistics.median(cpu_medians),
        "round_medians_ms": [1e3 * m for m in medians],
        "calls_per_round": len(rounds[0]),
        "rounds": len(rounds),
    }


def gemm_rate(threads: int, size: int = 2048, rounds: int = 5) -> dict:
    """This machine's float32 GEMM rate (NumPy matmul, size x size) at a thread count.

    Reports the best round (noise only slows a GEMM down), so % of GEMM is not flattered.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    flops = 2.0 * size**3
    with blas_threads(threads):
        a @ b
        times = [min(time_calls(lambda: a @ b, 2)) for _ in range(rounds)]
    return {"size": size, "threads": threads, "best_ms": 1e3 * min(times),
            "median_ms": 1e3 * statistics.median(times),
            "gflops": flops / min(times) / 1e9,
            "gflops_median": flops / statistics.median(times) / 1e9}
