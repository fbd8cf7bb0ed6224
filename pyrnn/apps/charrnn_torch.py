"""``pyrnn charrnn train --distributed``: the char-RNN of ``charrnn``, trained data-parallel in
PyTorch with pyrnn's torch modules, one process per rank, on ``torch.distributed`` (gloo).

    torchrun --nproc-per-node 2 -m pyrnn charrnn train --distributed          # 2 ranks here
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 -m pyrnn charrnn train --distributed  # on each machine

Every rank builds the same model as ``charrnn train`` (same initial weights, from the same seed)
and trains on its own contiguous share of the --batch text streams: ``DistributedDataParallel``
averages the gradients, so a step equals the single-process step on the whole batch (the same
loss, learning-rate schedule, clipping and Adam). Rank 0 alone logs, validates, writes the
checkpoint (the ``.npz`` format of ``charrnn train``: ``charrnn sample`` and ``--resume`` read it,
with or without --distributed) and prints the sample. Run without torchrun it trains as a world
of one process.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

import pyrnn.torch as pt

from .. import optim
from . import _common, charrnn

_LAYERS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


class TorchCharRNN(torch.nn.Module):
    """charrnn.CharRNN in torch, with its parameter names: Embedding -> pyrnn.torch's RNN, LSTM
    or GRU (torch.nn's with torch_rnn, for comparison) -> Linear, on time-major ids (T, B)."""

    def __init__(self, config: dict[str, object], torch_rnn: bool = False) -> None:
        super().__init__()
        vocab, layers = len(config["vocab"]), config["layers"]
        self.embed = torch.nn.Embedding(vocab, config["embed"])
        rnn = getattr(torch.nn if torch_rnn else pt, _LAYERS[config["cell"]])
        self.rnn = rnn(config["embed"], config["hidden"], num_layers=layers,
                       dropout=config.get("dropout", 0.0) if layers > 1 else 0.0)
        self.head = torch.nn.Linear(config["hidden"], vocab)

    def forward(self, ids: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        """Logits (T, B, vocab) and the final state."""
        out, state = self.rnn(self.embed(ids), state)
        return self.head(out), state


def torch_model(config: dict[str, object], torch_rnn: bool = False) -> TorchCharRNN:
    """The model charrnn.build_model(config) builds, with its initial weights, in torch."""
    model = TorchCharRNN(config, torch_rnn)
    numpy_model = charrnn.build_model(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in numpy_model.state_dict().items()})
    return model


# ---------------------------------------------------------------- process group

def init_process_group() -> tuple[int, int]:
    """(rank, world size): from torchrun's environment, else a world of one process."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def shard(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous share of the (batch, n) streams (batch divisible by world)."""
    per_rank = rows.shape[0] // world
    return rows[rank * per_rank:(rank + 1) * per_rank]


# ---------------------------------------------------------------- checkpoints

def to_numpy(model: torch.nn.Module, adam: torch.optim.Adam, config: dict[str, object]
             ) -> tuple[charrnn.CharRNN, optim.Adam]:
    """The torch model and its Adam as charrnn's NumPy model and pyrnn's Adam (copies)."""
    numpy_model = charrnn.build_model(config)
    numpy_model.load_state_dict({k: v.detach().numpy() for k, v in model.state_dict().items()})
    group = adam.param_groups[0]
    numpy_adam = optim.Adam(numpy_model, lr=group["lr"], betas=group["betas"], eps=group["eps"])
    names = dict(zip(map(id, model.parameters()),
                     (n for n, _ in model.named_parameters()), strict=True))
    state, step = {}, 0
    for param, buffers in adam.state.items():
        state[names[id(param)]] = {k: buffers[k].numpy().copy() for k in ("exp_avg",
                                                                           "exp_avg_sq")}
        step = int(buffers["step"])
    state = {name: state.get(name, {}) for name in numpy_adam.param_names}
    numpy_adam.load_state_dict({"type": "Adam", "hyperparams": numpy_adam.hyperparams,
                                "step": step, "state": state})
    return numpy_model, numpy_adam


def from_numpy(path: str, model: torch.nn.Module, adam: torch.optim.Adam,
               config: dict[str, object]) -> int:
    """Load a charrnn checkpoint (model and Adam) into the torch model and Adam; its step."""
    numpy_model = charrnn.build_model(config)
    numpy_adam = optim.Adam(numpy_model)
    charrnn.load_weights("--resume", path, numpy_model, numpy_adam)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in numpy_model.state_dict().items()})
    step = numpy_adam.step_count
    for name, param in model.named_parameters():
        buffers = numpy_adam.state[name]
        if step and buffers:
            adam.state[param] = {"step": torch.tensor(float(step)),
                                 **{k: torch.from_numpy(buffers[k].copy())
                                    for k in ("exp_avg", "exp_avg_sq")}}
    return int(config["step"])


# ---------------------------------------------------------------- training

def train(args: argparse.Namespace) -> dict[str, object] | None:
    """Train data-parallel; rank 0 returns the figures, the other ranks None."""
    rank, world = init_process_group()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.batch % world:
        raise _common.AppError(f"--batch {args.batch} must be divisible by the number of "
                               f"processes, {world}")
    # _train's DistributedDataParallel is freed as it returns, while the group is registered. Freed
    # after destroy_process_group, its reducer would drop the gloo group's last reference, whose
    # destructor joins gloo's threads holding the GIL that one of them may wait for (the hang that
    # tests/test_torch_ddp.py leaves by os._exit).
    try:
        return _train(args, rank, world)
    finally:
        dist.destroy_process_group()


WARMUP_STEPS = 3  # left out of the timing: DDP builds its buckets, the kernels their plans


def _train(args: argparse.Namespace, rank: int, world: int) -> dict[str, object] | None:
    text, description = charrnn.load_corpus(args)
    config = charrnn.model_config(args, text)
    _common.check_fits(charrnn.memory_parts(config, args), np.dtype(np.float32).itemsize)
    train_ids, val_ids = charrnn.split_text(text, config["vocab"], args.val_fraction,
                                            args.seq_len)
    torch.manual_seed(args.seed + rank)  # dropout masks differ between ranks, as their data
    model = torch_model(config, args.torch_rnn)
    adam = torch.optim.Adam(model.parameters(), lr=args.lr)
    first_step = from_numpy(args.checkpoint, model, adam, config) if args.resume else 0
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    lead = rank == 0
    if lead:
        print(f"charrnn --distributed: {world} process(es) x {torch.get_num_threads()} "
              f"thread(s), {description}, {config['cell']} {config['hidden']}x{config['layers']}"
              f", {'torch.nn' if args.torch_rnn else 'pyrnn.torch'} layers")
    rows = torch.from_numpy(shard(charrnn.streams(train_ids, args.batch), rank, world))
    saver = charrnn.Saver(args.checkpoint, first_step if args.resume else None, args.lr)
    clock = StepClock(first_step + min(WARMUP_STEPS, (args.steps - first_step) // 2))
    losses, val_curve, state = [], [], None
    bar = _common.progress(range(first_step, args.steps), desc="training",
                           disable=args.no_progress or not lead)
    for step in bar:
        with clock.timing(step):
            loss, state = train_step(ddp, adam, rows, step, state, args)
        losses.append(loss)
        if lead:
            bar.set_postfix(bits=f"{loss:.3f}", refresh=False)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            train_bits = mean_over_ranks(losses[-50:])  # every rank takes part
            if lead:
                numpy_model, numpy_adam = to_numpy(model, adam, config)
                val_curve.append((step + 1, charrnn.bits_per_char(numpy_model, val_ids,
                                                                  args.seq_len)))
                saver.save(numpy_model, numpy_adam, config, step + 1, val_curve[-1][1])
                bar.write(f"step {step + 1}: train {train_bits:.3f}, validation "
                          f"{val_curve[-1][1]:.3f} bits/char, {clock.wall():.0f} s")
    train_bits = mean_over_ranks(losses[-50:]) if losses else None
    if not lead:
        return None
    if saver.saved_step is not None:
        print(f"saved {args.checkpoint}")
    return _finish(args, model, adam, config, val_ids, val_curve, train_bits, len(losses),
                   clock, world, first_step, description)


def train_step(model: torch.nn.Module, adam: torch.optim.Adam, rows: torch.Tensor, step: int,
               state: object, args: argparse.Namespace) -> tuple[float, object]:
    """One step of truncated BPTT on the next --seq-len characters of this rank's streams:
    returns the loss in bits per character and the final state, without its history."""
    position = step % ((rows.shape[1] - 1) // args.seq_len)
    if position == 0:
        state = None  # a new pass over the streams starts from a zero state
    inputs, targets = charrnn.chunk(rows, position * args.seq_len, args.seq_len)
    logits, state = model(inputs, state)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1))
    adam.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    for group in adam.param_groups:
        group["lr"] = charrnn.cosine_lr(args.lr, step, args.steps)
    adam.step()
    detached = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
    return loss.item() / math.log(2), detached


class StepClock:
    """Seconds spent in training steps from step `first_timed` on (the warm-up steps and the
    validation between steps are left out), and the wall time since it was made."""

    def __init__(self, first_timed: int) -> None:
        self.first_timed, self.seconds, self.steps = first_timed, 0.0, 0
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def timing(self, step: int) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if step >= self.first_timed:
            self.seconds += time.perf_counter() - start
            self.steps += 1

    def wall(self) -> float:
        return time.perf_counter() - self.start


def mean_over_ranks(values: list[float]) -> float:
    """The mean of every rank's mean of its values (a collective: every rank must call it)."""
    total = torch.tensor([float(np.mean(values))], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total[0]) / dist.get_world_size()


def _finish(args: argparse.Namespace, model: torch.nn.Module, adam: torch.optim.Adam,
            config: dict[str, object], val_ids: np.ndarray, val_curve: list,
            train_bits: float | None, steps: int, clock: StepClock, world: int,
            first_step: int, description: str) -> dict[str, object]:
    """Rank 0: sample, figures."""
    numpy_model, _ = to_numpy(model, adam, config)
    config["step"] = max(args.steps, first_step)
    val_bits = val_curve[-1][1] if val_curve else charrnn.bits_per_char(numpy_model, val_ids,
                                                                        args.seq_len)
    text_out = charrnn.sample(numpy_model, config["vocab"], args.prime, args.sample_length,
                              args.temperature, np.random.default_rng(args.seed))
    print(f"\n--- sample (temperature {args.temperature}) ---\n{text_out}\n---")
    return {
        "val_bits_per_char": val_bits,
        "final_train_bits_per_char": train_bits,
        "steps": config["step"],
        "steps_this_run": steps,
        "wall_seconds": clock.wall(),
        "timed_steps": clock.steps,
        "seconds_per_step": clock.seconds / clock.steps if clock.steps else None,
        "sequences_per_second": clock.steps * args.batch / clock.seconds if clock.steps else None,
        "chars_per_second": (clock.steps * args.batch * args.seq_len / clock.seconds
                             if clock.steps else None),
        "processes": world,
        "threads_per_process": torch.get_num_threads(),
        "rnn_layers": "torch.nn" if args.torch_rnn else "pyrnn.torch",
        "corpus": description,
        "sample": text_out,
        **{k: config[k] for k in ("cell", "embed", "hidden", "layers", "dropout")},
        **{k: getattr(args, k) for k in ("seq_len", "batch", "lr", "clip", "seed",
                                         "checkpoint")},
    }


def run_train(args: argparse.Namespace) -> int:
    """``charrnn train --distributed`` (its arguments checked by charrnn.run_train): rank 0
    prints the result and writes --json."""
    if args.backend == "numpy":
        raise _common.AppError("--backend numpy: --distributed trains with pyrnn.torch's layers, "
                               "which run the C++ core (or torch's own, with --torch-rnn)")
    figures = train(args)
    if figures is not None:
        speed = figures["sequences_per_second"]
        print(f"validation {figures['val_bits_per_char']:.3f} bits/char after "
              f"{figures['steps']} steps, {figures['wall_seconds']:.1f} s"
              + (f", {speed:.1f} sequences/s" if speed else ""))
        _common.write_json(args.json, figures)
    return 0
