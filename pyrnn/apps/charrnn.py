"""Character-level language model (N -> N): read text, predict the next character at every step.

Model: Embedding -> RNN/LSTM/GRU -> Linear over the characters, softmax cross-entropy, Adam,
gradient clipping. The training text is cut into --batch parallel streams; each step trains on
the next --seq-len characters of every stream and carries the final state into the next step
without its history (truncated back-propagation through time). The last --val-fraction of the
text is held out and scored in bits per character.

With no --text, it trains on a fixed set of the Python standard library's own source files,
which exist on every machine: the samples it prints then look like Python.

The checkpoint (default: charrnn.npz in $XDG_CACHE_HOME/pyrnn, else ~/.cache/pyrnn) is saved at
every validation whose loss and weights are finite; training stops at the first loss that is
not, leaving the last good checkpoint in place.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator

import numpy as np

import pyrnn
from pyrnn import checkpoint, optim
from pyrnn.layers import Embedding, Linear
from pyrnn.losses import cross_entropy, softmax

from . import _common

CELLS = {"lstm": pyrnn.LSTM, "gru": pyrnn.GRU, "rnn": pyrnn.RNN}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
# The default corpus: standard-library modules present in every CPython 3.11+, in this order.
STDLIB_FILES = (
    "textwrap.py", "string.py", "bisect.py", "heapq.py", "copy.py", "contextlib.py",
    "functools.py", "fractions.py", "random.py", "calendar.py", "csv.py", "pprint.py",
    "json/decoder.py", "json/encoder.py", "tokenize.py", "weakref.py", "shutil.py",
    "dataclasses.py", "pathlib.py", "threading.py", "argparse.py", "ast.py", "difflib.py",
    "enum.py", "typing.py", "inspect.py", "os.py", "collections/__init__.py",
)
DEFAULT_CORPUS_CHARS = 1_000_000


# ---------------------------------------------------------------- data

def stdlib_corpus(max_chars: int = DEFAULT_CORPUS_CHARS) -> tuple[str, str]:
    """(text, description): the listed stdlib sources concatenated, cut at max_chars."""
    folder = os.path.dirname(os.__file__)
    parts, used = [], []
    for name in STDLIB_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                parts.append(f.read())
            used.append(name)
        if sum(map(len, parts)) >= max_chars:
            break
    if not parts:
        raise _common.AppError(f"no standard-library sources found in {folder}; use --text FILE")
    text = "\n\n".join(parts)[:max_chars]
    return text, f"{len(used)} Python stdlib files from {folder}"


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as error:
        raise _common.AppError(f"--text: cannot read {path!r}: {error.strerror}") from None


def split_text(text: str, vocab: str, val_fraction: float, seq_len: int) -> tuple[np.ndarray, ...]:
    """(train ids, validation ids): the validation ids are the text's tail."""
    char_id = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted(set(text) - set(char_id))
    if unknown:
        raise _common.AppError(f"the text has characters the model's vocabulary lacks: "
                               f"{''.join(unknown[:20])!r}")
    ids = np.array([char_id[ch] for ch in text], dtype=np.int64)
    n_val = int(len(ids) * val_fraction)
    if len(ids) - n_val < 2 * seq_len + 2 or n_val < seq_len + 1:
        raise _common.AppError(f"the text ({len(ids)} characters) is too short for "
                               f"--seq-len {seq_len} with --val-fraction {val_fraction}")
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


def streams(ids: np.ndarray, batch: int) -> np.ndarray:
    """(batch, n) rows: the text cut into `batch` contiguous pieces, read in parallel."""
    n = len(ids) // batch
    return ids[: batch * n].reshape(batch, n)


def chunk(rows: np.ndarray, start: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Time-major inputs (T, B) and their next characters, the targets."""
    return rows[:, start : start + seq_len].T, rows[:, start + 1 : start + seq_len + 1].T


# ---------------------------------------------------------------- model

class CharRNN(pyrnn.Module):
    def __init__(self, vocab_size: int, cell: str, embed: int, hidden: int, layers: int,
                 dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.embed = Embedding(vocab_size, embed, seed=seed)
        self.rnn = CELLS[cell](embed, hidden, num_layers=layers, dropout=dropout, seed=seed + 1)
        self.head = Linear(hidden, vocab_size, seed=seed + 2)

    def __call__(self, ids: np.ndarray, state: object = None,
                 rnn: pyrnn.FrozenRNN | None = None) -> tuple[np.ndarray, object]:
        """Logits (T, B, vocab) and the final state; `rnn` runs in place of self.rnn (sampling
        passes a frozen copy)."""
        out, state = (self.rnn if rnn is None else rnn)(self.embed(ids), state)
        return self.head(out), state

    def backward(self, d_logits: np.ndarray) -> None:
        d_x, _ = self.rnn.backward(self.head.backward(d_logits))  # the carried state: no history
        self.embed.backward(d_x)


def build_model(config: dict[str, object]) -> CharRNN:
    return CharRNN(len(config["vocab"]), config["cell"], config["embed"], config["hidden"],
                   config["layers"], config.get("dropout", 0.0), config.get("seed", 0))


def bits_per_char(model: CharRNN, ids: np.ndarray, seq_len: int, batch: int = 16) -> float:
    """Mean cross-entropy on held-out ids, in bits, with the state carried across chunks."""
    rows = streams(ids, min(batch, max(1, (len(ids) - 1) // seq_len)))
    total, count, state = 0.0, 0, None
    with _common.evaluating(model):
        for start in range(0, rows.shape[1] - 1, seq_len):
            inputs, targets = chunk(rows, start, seq_len)
            logits, state = model(inputs[: len(targets)], state)
            loss, _ = cross_entropy(logits, targets, reduction="sum")
            total, count = total + loss, count + targets.size
    return total / count / math.log(2)


def sample(model: CharRNN, vocab: str, prime: str, length: int, temperature: float,
           rng: np.random.Generator) -> str:
    """The prime (its characters the vocabulary has), then `length` drawn characters."""
    return "".join(generate(model, vocab, prime, length, temperature, rng))


def generate(model: CharRNN, vocab: str, prime: str, length: int, temperature: float,
             rng: np.random.Generator) -> Iterator[str]:
    """Yield the prime, then feed it and yield `length` characters drawn one at a time."""
    char_id = {ch: i for i, ch in enumerate(vocab)}
    prime = "".join(ch for ch in prime if ch in char_id) or vocab[0]
    yield prime
    with _common.evaluating(model):
        rnn = model.rnn.frozen()  # a call per character: its weights packed once, not per call
        logits, state = model(np.array([[char_id[ch]] for ch in prime]), rnn=rnn)
        for _ in range(length):
            token = draw(logits[-1, 0], temperature, rng)
            yield vocab[token]
            logits, state = model(np.array([[token]]), state, rnn=rnn)


def draw(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """A token from softmax(logits / temperature); the likeliest one when the temperature is so
    low that logits / temperature overflows (the limit as it goes to 0)."""
    if not np.isfinite(logits).all():
        raise _common.AppError("the model's outputs are not finite: its weights are damaged")
    with np.errstate(over="ignore"):
        scaled = logits.astype(np.float64) / temperature
    if not np.isfinite(scaled).all():
        return int(np.argmax(logits))
    probs = softmax(scaled)
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def cosine_lr(peak: float, step: int, steps: int) -> float:
    """Warm up over the first 2% of steps, then decay to 10% of the peak."""
    warmup = max(1, steps // 50)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------- train

# Bytes a character of training text takes while it becomes ids: the text, the list of ids
# split_text builds, the int64 array.
BYTES_PER_CHAR = 17


def load_corpus(args: argparse.Namespace) -> tuple[str, str]:
    if args.text:
        size = os.path.getsize(args.text)  # an upper bound on its characters
        _common.check_fits({f"--text {args.text} ({size:,} bytes): its characters": size},
                           BYTES_PER_CHAR)
        text = read_text(args.text)
        return text, f"{args.text} ({len(text):,} characters)"
    text, description = stdlib_corpus(args.corpus_chars)
    return text, f"{description} ({len(text):,} characters)"


def model_config(args: argparse.Namespace, text: str) -> dict[str, object]:
    if args.resume:
        return read_config("--resume", args.checkpoint)
    return {"app": "charrnn", "vocab": "".join(sorted(set(text))), "cell": args.cell,
            "embed": args.embed, "hidden": args.hidden, "layers": args.layers,
            "dropout": args.dropout, "seed": args.seed, "step": 0}


# What build_model and training read from a checkpoint's metadata: key -> (check, expected);
# the defaults stand in for keys that early checkpoints lack.
CONFIG_DEFAULTS = {"dropout": 0.0, "seed": 0}
CONFIG_CHECKS = {
    "vocab": (lambda v: isinstance(v, str) and len(v) == len(set(v)) > 0,
              "a non-empty string of distinct characters"),
    "cell": (lambda v: v in CELLS, f"one of {sorted(CELLS)}"),
    "embed": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "hidden": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "layers": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "dropout": (lambda v: type(v) in (int, float) and 0 <= v < 1, "a number in [0, 1)"),
    "seed": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "step": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
}


def read_config(flag: str, path: str) -> dict[str, object]:
    """The model configuration a charrnn checkpoint's metadata holds, checked: AppError names
    the flag and what is wrong with the file."""
    if not os.path.isfile(path):
        raise _common.AppError(f"{flag}: no checkpoint at {path}")
    try:
        config = {**CONFIG_DEFAULTS, **checkpoint.read_metadata(path)["metadata"]}
    except (OSError, KeyError, ValueError) as error:
        raise _common.AppError(f"{flag}: cannot read the checkpoint: {error}") from None
    if config.get("app") != "charrnn":
        raise _common.AppError(f"{flag}: {path} is not a charrnn checkpoint")
    for key, (valid, expected) in CONFIG_CHECKS.items():
        if key not in config or not valid(config[key]):
            found = f"{config[key]!r}" if key in config else "nothing"
            raise _common.AppError(f"{flag}: {path} is damaged: its metadata's {key!r} should be "
                                   f"{expected}, found {found}")
    return config


def load_weights(flag: str, path: str, model: CharRNN, adam: optim.Adam | None = None) -> None:
    """checkpoint.load, its errors (a damaged or mismatched file) as AppErrors naming flag."""
    try:
        checkpoint.load(path, model, adam)
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise _common.AppError(f"{flag}: cannot load the checkpoint: {error}") from None
    if not _common.weights_finite(model):
        raise _common.AppError(f"{flag}: {path} holds weights that are not finite (saved by a run "
                               "that diverged?)")


def memory_parts(config: dict[str, object], args: argparse.Namespace) -> dict[str, int]:
    """The float32 numbers a training run holds, by what sizes them (see _common.check_fits)."""
    V, E, H, L = len(config["vocab"]), config["embed"], config["hidden"], config["layers"]  # noqa: N806
    G, T, B = GATES[config["cell"]], args.seq_len, args.batch  # noqa: N806
    rnn = G * H * (E + H + 2) + (L - 1) * G * H * (2 * H + 2)
    params = V * E + rnn + H * V + V
    sizes = (f"--embed {E} --hidden {H} --layers {L}" if not args.resume
             else f"the checkpoint's embed {E}, hidden {H}, layers {L}")
    return {
        # weights, gradients, Adam's two moments, the copies a checkpoint save makes; the frozen
        # recurrent weights sampling packs
        f"{sizes} (vocabulary {V}): the weights": 7 * params + rnn,
        # a step's embeddings, each layer's tape, logits, probabilities and their gradients
        f"--batch {B} --seq-len {T}: a step's activations":
            2 * T * B * (E + L * (G + 3) * H + 3 * V),
    }


class Saver:
    """Saves the checkpoint at validation points, only weights that are finite; knows what the
    file holds, for the message of a run that diverges."""

    def __init__(self, path: str, resumed_step: int | None, lr: float) -> None:
        self.path, self.saved_step, self.resumed_step, self.lr = path, None, resumed_step, lr

    def save(self, model: CharRNN, adam: optim.Adam, config: dict[str, object], step: int,
             val_bits: float) -> None:
        if not (math.isfinite(val_bits) and _common.weights_finite(model)):
            raise _common.Diverged(f"training diverged by step {step}: the weights or the "
                                   f"validation loss are not finite; try a smaller --lr than "
                                   f"{self.lr:g}{self.kept()}")
        try:
            checkpoint.save(self.path, model, adam,
                            metadata={**config, "step": step, "val_bits_per_char": val_bits})
        except OSError as error:
            raise _common.AppError(f"--checkpoint {self.path}: cannot write it: "
                                   f"{error.strerror or error}") from None
        self.saved_step = step

    def kept(self) -> str:
        """What the checkpoint file holds now, as the end of a sentence."""
        if self.saved_step is not None:
            return f"; {self.path} keeps the weights of step {self.saved_step}"
        if self.resumed_step is not None:
            return f"; {self.path} keeps the weights of step {self.resumed_step}, as resumed"
        return "; nothing was saved"


def train(args: argparse.Namespace) -> dict[str, object]:
    backend = _common.setup_runtime(args)
    text, description = load_corpus(args)
    config = model_config(args, text)
    _common.check_fits(memory_parts(config, args), np.dtype(np.float32).itemsize)
    train_ids, val_ids = split_text(text, config["vocab"], args.val_fraction, args.seq_len)
    if len(train_ids) // args.batch < args.seq_len + 1:
        raise _common.AppError(f"--batch {args.batch}: the training text ({len(train_ids):,} "
                               f"characters) cut into {args.batch} streams leaves fewer than "
                               f"--seq-len {args.seq_len} + 1 characters in each")
    model = build_model(config)
    adam = optim.Adam(model, lr=args.lr)
    first_step = 0
    if args.resume:
        load_weights("--resume", args.checkpoint, model, adam)
        first_step = config["step"]
        print(f"resumed {args.checkpoint} at step {first_step}")
    print(f"charrnn: {description}, vocabulary {len(config['vocab'])}, "
          f"{config['cell']} {config['hidden']}x{config['layers']}, "
          f"{model.num_parameters():,} parameters, backend {backend}; checkpoint "
          f"{args.checkpoint}")

    rows = streams(train_ids, args.batch)
    chunks_per_pass = (rows.shape[1] - 1) // args.seq_len
    saver = Saver(args.checkpoint, first_step if args.resume else None, args.lr)
    clock, losses, val_curve, state = _common.Stopwatch(), [], [], None
    bar = _common.progress(range(first_step, args.steps), desc="training",
                           disable=args.no_progress)
    for step in bar:
        position = step % chunks_per_pass
        if position == 0:
            state = None  # a new pass over the streams starts from a zero state
        inputs, targets = chunk(rows, position * args.seq_len, args.seq_len)
        model.zero_grad()
        logits, state = model(inputs, state)
        loss, d_logits = cross_entropy(logits, targets)
        _common.check_finite_loss(loss, f"step {step + 1}", args, saver.kept())
        model.backward(d_logits)
        optim.clip_grad_norm(model, args.clip)
        adam.lr = cosine_lr(args.lr, step, args.steps)
        adam.step()
        losses.append(loss / math.log(2))
        bar.set_postfix(bits=f"{losses[-1]:.3f}", refresh=False)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_curve.append((step + 1, bits_per_char(model, val_ids, args.seq_len)))
            saver.save(model, adam, config, step + 1, val_curve[-1][1])
            bar.write(f"step {step + 1}: train {np.mean(losses[-50:]):.3f}, "
                      f"validation {val_curve[-1][1]:.3f} bits/char, {clock.seconds():.0f} s")

    config["step"] = max(args.steps, first_step)
    val_bits = val_curve[-1][1] if val_curve else bits_per_char(model, val_ids, args.seq_len)
    if saver.saved_step is not None:
        print(f"saved {args.checkpoint}")
    text_out = sample(model, config["vocab"], args.prime, args.sample_length, args.temperature,
                      np.random.default_rng(args.seed))
    print(f"\n--- sample (temperature {args.temperature}) ---\n{text_out}\n---")
    curves = {"training (smoothed)": (range(first_step + 1, first_step + 1 + len(losses)),
                                      _common.smooth(losses, 0.98))}
    if val_curve:
        curves["validation"] = tuple(zip(*val_curve, strict=True))
    _common.plot_curves(args.plot, curves, title="charrnn: bits per character",
                        xlabel="step", ylabel="bits / char")
    return {
        "val_bits_per_char": val_bits,
        "final_train_bits_per_char": float(np.mean(losses[-50:])) if losses else None,
        "steps": config["step"],
        "steps_this_run": len(losses),
        "wall_seconds": clock.seconds(),
        "seconds_per_step": clock.seconds() / max(1, len(losses)),
        "train_chars": len(train_ids),
        "val_chars": len(val_ids),
        "corpus": description,
        "parameters": model.num_parameters(),
        "sample": text_out,
        **{k: config[k] for k in ("cell", "embed", "hidden", "layers", "dropout")},
        **{k: getattr(args, k) for k in ("seq_len", "batch", "lr", "clip", "seed",
                                         "checkpoint")},
        **_common.runtime_figures(backend),
    }


def run_train(args: argparse.Namespace) -> int:
    if args.text and not os.path.isfile(args.text):
        what = "is a folder" if os.path.isdir(args.text) else "no such file"
        raise _common.AppError(f"--text {args.text}: {what}")
    if args.resume and not os.path.isfile(args.checkpoint):
        raise _common.AppError(f"--resume: no checkpoint at {args.checkpoint}")
    _common.check_common_arguments(args, "checkpoint")
    if not args.resume and os.path.exists(args.checkpoint):
        try:  # replacing an older checkpoint is what --checkpoint is for; any other file is not
            checkpoint.read_metadata(args.checkpoint)
        except (OSError, KeyError, ValueError):
            raise _common.AppError(f"--checkpoint {args.checkpoint}: the file exists and is not "
                                   "a pyrnn checkpoint; not overwriting it") from None
    figures = train(args)
    print(f"validation {figures['val_bits_per_char']:.3f} bits/char after {figures['steps']} "
          f"steps, {figures['wall_seconds']:.1f} s")
    _common.write_json(args.json, figures)
    return 0


def run_sample(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.checkpoint):
        raise _common.AppError(f"--checkpoint: no such file {args.checkpoint}")
    _common.check_common_arguments(args)
    _common.setup_runtime(args)
    config = read_config("--checkpoint", args.checkpoint)
    model = build_model(config)
    load_weights("--checkpoint", args.checkpoint, model)
    # Written as drawn and flushed at every line, so that a reader (`| head -3`) gets lines as
    # they come and, once it has what it wants, stops the sampling.
    for piece in generate(model, config["vocab"], args.prime, args.length, args.temperature,
                          np.random.default_rng(args.seed)):
        sys.stdout.write(piece)
        if "\n" in piece:
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------- command line

def default_checkpoint() -> str:
    """charrnn.npz in pyrnn's cache folder: not the working directory, which may be a source
    tree whose next sdist would ship it."""
    return os.path.join(_common.cache_dir(), "charrnn.npz")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("charrnn", help="character-level language model (train, sample)",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    _register_train(actions)
    _register_sample(actions)


def _add_sampling(parser: argparse.ArgumentParser, length_flag: str, length: int) -> None:
    parser.add_argument("--temperature", type=_common.positive_float, default=0.8,
                        help="below 1: safer, more repetitive; above 1: wilder (default: 0.8)")
    parser.add_argument("--prime", default="def ", help="text to start from (default: 'def ')")
    parser.add_argument(length_flag, type=_common.positive_int, default=length,
                        help=f"characters to generate (default: {length})")


def _register_train(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser("train", help="train on a text file (default: Python's stdlib)",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", metavar="FILE", help="UTF-8 training text (default: stdlib)")
    parser.add_argument("--corpus-chars", type=_common.positive_int, default=DEFAULT_CORPUS_CHARS,
                        help="size of the default stdlib corpus (default: %(default)s)")
    parser.add_argument("--cell", choices=sorted(CELLS), default="lstm", help="(default: lstm)")
    parser.add_argument("--embed", type=_common.positive_int, default=64, help="(default: 64)")
    parser.add_argument("--hidden", type=_common.positive_int, default=256, help="(default: 256)")
    parser.add_argument("--layers", type=_common.positive_int, default=1, help="(default: 1)")
    parser.add_argument("--dropout", type=_common.probability, default=0.0,
                        help="between stacked layers (default: 0)")
    parser.add_argument("--seq-len", type=_common.positive_int, default=64,
                        help="truncated-BPTT chunk length (default: 64)")
    parser.add_argument("--batch", type=_common.positive_int, default=32, help="(default: 32)")
    parser.add_argument("--steps", type=_common.positive_int, default=2000,
                        help="total training steps (default: 2000)")
    parser.add_argument("--lr", type=_common.positive_float, default=3e-3,
                        help="Adam peak learning rate, cosine-decayed (default: 3e-3)")
    parser.add_argument("--clip", type=_common.positive_float, default=1.0,
                        help="clip the gradient's global norm to this (default: 1.0)")
    parser.add_argument("--val-fraction", type=_common.fraction, default=0.1,
                        help="tail of the text held out for validation (default: 0.1)")
    parser.add_argument("--eval-every", type=_common.positive_int, default=500,
                        help="validate every N steps (default: 500)")
    parser.add_argument("--checkpoint", default=default_checkpoint(),
                        help="where to save the model, at every validation (default: "
                        "%(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from --checkpoint up to --steps total")
    _add_sampling(parser, "--sample-length", 500)
    _common.add_common_arguments(parser)
    parser.set_defaults(run=run_train, parser=parser)


def _register_sample(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser("sample", help="generate text from a trained checkpoint")
    parser.add_argument("--checkpoint", default=default_checkpoint(),
                        help="a checkpoint written by 'charrnn train' (default: %(default)s)")
    _add_sampling(parser, "--length", 1000)
    parser.add_argument("--seed", type=_common.non_negative_int, default=0, help="(default: 0)")
    parser.add_argument("--backend", choices=("auto", "cpp", "numpy"), default="auto")
    parser.add_argument("--threads", type=_common.positive_int, default=None)
    parser.set_defaults(run=run_sample, parser=parser)
