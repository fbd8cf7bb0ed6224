"""The benchmark suite, the presets and the issue-4 targets, as data.

A configuration is (T, B, I, H, L, D): time steps, batch, input size, hidden size, layers,
directions (2 = bidirectional). ``lengths`` makes it ragged: one length per sequence drawn
uniformly from [low, high] with a fixed seed. ``oracle`` marks configurations small enough for
the pure-NumPy backend to run by default (it is the oracle, not a contender).
"""

from __future__ import annotations

CELLS = ("lstm", "gru", "rnn")

SUITE: list[dict] = [
    {"name": "latency", "T": 100, "B": 1, "I": 128, "H": 128, "L": 1, "D": 1,
     "cells": CELLS, "oracle": True},
    {"name": "charrnn", "T": 25, "B": 1, "I": 65, "H": 100, "L": 1, "D": 1,
     "cells": CELLS, "oracle": True},
    {"name": "medium", "T": 100, "B": 32, "I": 256, "H": 256, "L": 1, "D": 1, "cells": CELLS},
    {"name": "large", "T": 100, "B": 64, "I": 512, "H": 512, "L": 1, "D": 1, "cells": CELLS},
    {"name": "deep-bi", "T": 100, "B": 32, "I": 256, "H": 256, "L": 2, "D": 2, "cells": CELLS},
    {"name": "deepbench-h512", "T": 25, "B": 16, "I": 512, "H": 512, "L": 1, "D": 1,
     "cells": ("lstm",)},
    {"name": "deepbench-h1024", "T": 50, "B": 32, "I": 1024, "H": 1024, "L": 1, "D": 1,
     "cells": ("lstm",)},
    {"name": "ragged", "T": 200, "B": 32, "I": 128, "H": 128, "L": 1, "D": 2, "cells": CELLS,
     "lengths": {"low": 10, "high": 200, "seed": 1234}},
    {"name": "long", "T": 1000, "B": 8, "I": 256, "H": 256, "L": 2, "D": 1, "cells": CELLS},
]

# The cell family's rows (bench/variants.py, ``--variants``): a variant of the LSTM or GRU by
# its module options, the suite configurations it runs on (with overrides), and the peers that
# have it. Each is timed beside its plain cell on the same configuration.
VARIANT_ROWS: list[dict] = [
    {"name": "peephole", "cell": "lstm_peephole", "options": {"peephole": True},
     "configs": ["medium", "large"], "peers": ["onnxruntime"]},
    {"name": "coupled", "cell": "lstm_coupled", "options": {"coupled_gates": True},
     "configs": ["medium", "large"]},
    {"name": "coupled-peephole", "cell": "lstm_coupled_peephole",
     "options": {"coupled_gates": True, "peephole": True}, "configs": ["medium", "large"]},
    {"name": "proj", "cell": "lstm", "options": {"proj_size": 128}, "configs": ["large"],
     "peers": ["torch"]},
    {"name": "reset-before", "cell": "gru_reset_before", "options": {"reset_after": False},
     "configs": ["medium", "large"], "peers": ["onnxruntime"]},
]

BACKENDS = ("pyrnn-cpp", "pyrnn-numpy", "torch", "torch-nomkldnn", "onnxruntime")
EXTRA_BACKENDS = ("pyrnn-cpp-kernels",)  # diagnostics, only when named with --backends
MODES = ("infer", "train")

# Defaults of a full run, and the --quick preset (finishes in under 2 minutes on 2 cores).
# budget_s caps one backend's timing of one row (slow rows get fewer rounds); before each row
# the runner waits up to quiet_wait_s for other processes to use under quiet_pct of the CPUs;
# settle_s is the pause before each backend's round (see bench/timing.py: interleaved_rounds).
DEFAULTS = {"threads": [2], "rounds": 5, "round_s": 0.3, "max_calls": 200, "warmup_s": 0.1,
            "gemm_size": 2048, "budget_s": 15.0, "quiet_pct": 25.0, "quiet_wait_s": 20.0,
            "settle_s": 0.1}
QUICK = {"configs": ["latency", "charrnn", "medium"], "threads": [2], "rounds": 3,
         "round_s": 0.1, "max_calls": 50, "warmup_s": 0.03, "budget_s": 3.0,
         "quiet_wait_s": 2.0, "settle_s": 0.05}

# The --contention preset (bench/contention.py): the rows, and pyrnn's thread counts timed
# beside its default; neighbours = spinning processes beside the timed one.
CONTENTION = {"configs": ["latency", "medium"], "cells": ["lstm", "gru"], "threads": [1],
              "neighbours": [1], "neighbour_duty": 1.0}

# Issue 4's targets. A rule applies to a row when every listed key matches (absent = any);
# "peer" rules need ratio = peer ms / pyrnn-cpp ms >= min, "pct_gemm" rules need pyrnn-cpp's
# share of the machine's GEMM rate >= min. Targets are stated at 2 threads.
LSTM_DENSE = ["medium", "large", "deep-bi", "deepbench-h512", "deepbench-h1024"]
TARGETS: list[dict] = [
    {"id": "gru/rnn train >= 2x torch", "cells": ["gru", "rnn"], "modes": ["train"],
     "peer": "torch", "min": 2.0},
    {"id": "gru/rnn infer >= 1.5x torch", "cells": ["gru", "rnn"], "modes": ["infer"],
     "peer": "torch", "min": 1.5},
    {"id": "lstm dense >= 1x torch", "cells": ["lstm"], "configs": LSTM_DENSE,
     "peer": "torch", "min": 1.0},
    {"id": "lstm small >= 2x torch", "cells": ["lstm"], "configs": ["latency", "charrnn"],
     "peer": "torch", "min": 2.0},
    {"id": "ragged train >= 3x torch", "configs": ["ragged"], "modes": ["train"],
     "peer": "torch", "min": 3.0},
    {"id": "infer >= 1x onnxruntime", "modes": ["infer"], "peer": "onnxruntime", "min": 1.0},
    {"id": "large infer >= 85% GEMM", "configs": ["large", "deepbench-h1024"],
     "modes": ["infer"], "metric": "pct_gemm", "min": 85.0},
]
TARGET_THREADS = 2


def select(names: list[str] | None) -> list[dict]:
    """The suite's configurations with these names (all when None), in suite order."""
    known = [c["name"] for c in SUITE]
    if names is None:
        return list(SUITE)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--configs: unknown configuration(s) {unknown}; known: {known}")
    return [c for c in SUITE if c["name"] in names]


def rules_for(config: str, cell: str, mode: str, threads: int) -> list[dict]:
    """The target rules that apply to one row."""
    if threads != TARGET_THREADS:
        return []
    row = {"configs": config, "cells": cell, "modes": mode}
    return [r for r in TARGETS if all(row[k] in r[k] for k in row if k in r)]


# ------------------------------------------------------------------- pyrnn.torch (torch_models)

# bench/torch_models.py: a whole PyTorch model, Embedding(vocab, E) -> RNN(E, H, num_layers=L)
# -> Linear(H, vocab) with cross-entropy and Adam, on time-major ids (T, B), timed as torch.nn
# builds it and after pyrnn.torch.convert; and the operator boundary at batch 1 (latency).
TORCH_MODELS: list[dict] = [
    {"name": "charrnn", "vocab": 96, "E": 64, "H": 256, "L": 2, "B": 32, "T": 64,
     "cells": ("lstm", "gru")},
    {"name": "medium", "vocab": 96, "E": 128, "H": 512, "L": 2, "B": 32, "T": 64,
     "cells": ("lstm", "gru")},
    # torch.nn.LSTM(proj_size=128) converted: a projected stack on pyrnn's C++ core
    {"name": "charrnn-proj", "vocab": 96, "E": 64, "H": 256, "L": 2, "B": 32, "T": 64,
     "proj_size": 128, "cells": ("lstm",)},
]
TORCH_LATENCY: dict = {"name": "latency", "T": 1, "B": 1, "I": 64, "H": 128, "L": 1,
                       "cells": ("lstm", "gru")}
TORCH_MODES = ("train", "infer")
# Issue 32's targets: "ratio" rules need torch.nn ms / pyrnn.torch ms >= min on a model row;
# the "overhead_us" rule needs the latency rows' operator boundary (a call of the operator less
# the same kernel call on NumPy arrays; in training, per operator call) <= max.
TORCH_TARGETS: list[dict] = [
    {"id": "lstm train >= 1.2x torch.nn", "cells": ["lstm"], "modes": ["train"], "min": 1.2},
    {"id": "gru train >= 1.6x torch.nn", "cells": ["gru"], "modes": ["train"], "min": 1.6},
    {"id": "lstm infer >= 1.1x torch.nn", "cells": ["lstm"], "modes": ["infer"], "min": 1.1},
    {"id": "gru infer >= 1.4x torch.nn", "cells": ["gru"], "modes": ["infer"], "min": 1.4},
    {"id": "op boundary <= 30 us", "metric": "overhead_us", "max": 30.0},
]
TORCH_DEFAULTS = {"threads": [2], "rounds": 7, "round_s": 0.4, "max_calls": 400,
                  "warmup_s": 0.3, "budget_s": 20.0, "quiet_pct": 25.0, "quiet_wait_s": 20.0,
                  "settle_s": 0.1}
TORCH_QUICK = {"threads": [2], "rounds": 3, "round_s": 0.15, "max_calls": 100,
               "warmup_s": 0.1, "budget_s": 4.0, "quiet_pct": 25.0, "quiet_wait_s": 2.0,
               "settle_s": 0.05}


def torch_rules_for(row: dict) -> list[dict]:
    """The TORCH_TARGETS rules that apply to a torch_models row (at TARGET_THREADS only)."""
    if row["threads"] != TARGET_THREADS:
        return []
    if "overhead_us" in row:
        return [r for r in TORCH_TARGETS if r.get("metric") == "overhead_us"]
    if row.get("shape", {}).get("proj_size"):  # the targets are the plain LSTM and GRU models'
        return []
    return [r for r in TORCH_TARGETS if "metric" not in r
            and row["cell"] in r["cells"] and row["mode"] in r["modes"]]
