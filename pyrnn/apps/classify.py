"""Sequence classification (N -> 1): scikit-learn's bundled 8x8 handwritten digits, read row by
row as a sequence of 8 vectors of 8 pixels. The recurrent network's output at the last step goes
through a linear layer to 10 class scores. The data ships inside scikit-learn: no download.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

import pyrnn
from pyrnn import optim
from pyrnn.layers import Linear
from pyrnn.losses import cross_entropy

from . import _common

CELLS = {"lstm": pyrnn.LSTM, "gru": pyrnn.GRU, "rnn": pyrnn.RNN}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
DIGITS = 1797  # sequences in scikit-learn's digits; accuracy() runs all of a split at once


def load_digits(test_fraction: float, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """((x_train, y_train), (x_test, y_test)); x time-major (8 rows, N, 8 pixels) in [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise _common.AppError(
            "classify needs scikit-learn for its bundled digits data set: "
            "pip install 'pyrnn[apps]'") from None
    digits = sklearn_digits()
    images = (digits.images / 16.0).astype(np.float32)  # (N, 8, 8), pixel values 0..16
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = int(round(len(images) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    as_sequences = lambda idx: (images[idx].transpose(1, 0, 2).copy(), digits.target[idx])  # noqa: E731
    return as_sequences(train), as_sequences(test)


class Classifier(pyrnn.Module):
    def __init__(self, cell: str, hidden: int, layers: int, classes: int, seed: int) -> None:
        super().__init__()
        self.rnn = CELLS[cell](8, hidden, num_layers=layers, seed=seed)
        self.head = Linear(hidden, classes, seed=seed + 1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out, _ = self.rnn(x)
        self._out_shape = out.shape
        return self.head(out[-1])  # N -> 1: read the last step only

    def backward(self, d_logits: np.ndarray) -> None:
        d_out = np.zeros(self._out_shape, d_logits.dtype)
        d_out[-1] = self.head.backward(d_logits)
        self.rnn.backward(d_out)


def cosine_lr(peak: float, epoch: int, epochs: int) -> float:
    """Decay from peak to 5% of it over the run: the last epochs settle instead of jitter."""
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * epoch / epochs)))


def accuracy(model: Classifier, x: np.ndarray, y: np.ndarray) -> float:
    with _common.evaluating(model):
        return float((model(x).argmax(axis=-1) == y).mean())


def train(args: argparse.Namespace) -> dict[str, object]:
    (x_train, y_train), (x_test, y_test) = load_digits(args.test_fraction, args.seed)
    backend = _common.setup_runtime(args)
    model = Classifier(args.cell, args.hidden, args.layers, 10, args.seed)
    adam = optim.Adam(model, lr=args.lr)
    rng = np.random.default_rng(args.seed + 1)
    print(f"classify: digits, {x_train.shape[1]} train / {x_test.shape[1]} test sequences of "
          f"8 rows x 8 pixels, {args.cell} {args.hidden}x{args.layers}, "
          f"{model.num_parameters():,} parameters, backend {backend}")

    clock, losses, test_accuracy = _common.Stopwatch(), [], []
    bar = _common.progress(range(1, args.epochs + 1), desc="epochs", disable=args.no_progress)
    for epoch in bar:
        adam.lr = cosine_lr(args.lr, epoch - 1, args.epochs)
        order = rng.permutation(x_train.shape[1])
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            model.zero_grad()
            loss, d_logits = cross_entropy(model(x_train[:, idx]), y_train[idx])
            _common.check_finite_loss(loss, f"step {len(losses) + 1}", args)
            model.backward(d_logits)
            optim.clip_grad_norm(model, args.clip)
            adam.step()
            losses.append(loss)
        test_accuracy.append(accuracy(model, x_test, y_test))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", test=f"{test_accuracy[-1]:.4f}")
        if epoch % max(1, args.epochs // 10) == 0 or epoch == args.epochs:
            bar.write(f"epoch {epoch}: loss {np.mean(losses[-20:]):.4f}, "
                      f"test accuracy {test_accuracy[-1]:.4f}")

    _common.plot_curves(args.plot, {"training loss": (range(len(losses)), _common.smooth(losses))},
                        title="classify (digits): training loss", xlabel="step",
                        ylabel="cross-entropy", logy=True)
    return {
        "test_accuracy": test_accuracy[-1],
        "test_accuracy_per_epoch": test_accuracy,
        "train_accuracy": accuracy(model, x_train, y_train),
        "test_examples": int(x_test.shape[1]),
        "train_examples": int(x_train.shape[1]),
        "final_train_loss": float(np.mean(losses[-20:])),
        "wall_seconds": clock.seconds(),
        "parameters": model.num_parameters(),
        **{k: getattr(args, k) for k in ("cell", "hidden", "layers", "batch", "lr", "clip",
                                         "epochs", "test_fraction", "seed")},
        **_common.runtime_figures(backend),
    }


def memory_parts(args: argparse.Namespace) -> dict[str, int]:
    """The float32 numbers a run holds, by what sizes them (see _common.check_fits)."""
    H, L, G, B = args.hidden, args.layers, GATES[args.cell], args.batch  # noqa: N806
    rnn = G * H * (8 + H + 2) + (L - 1) * G * H * (2 * H + 2)
    return {
        # weights, gradients and Adam's two moments
        f"--hidden {H} --layers {L}: the weights": 4 * (rnn + 10 * H + 10),
        # a step's tape and gradients; accuracy() on every training digit at once
        f"--hidden {H} --layers {L} --batch {B}: the activations":
            2 * 8 * B * (8 + L * (G + 3) * H) + 8 * DIGITS * (8 + L * (G + 1) * H),
    }


def run(args: argparse.Namespace) -> int:
    _common.check_common_arguments(args)
    n_test = int(round(DIGITS * args.test_fraction))
    if not 1 <= n_test < DIGITS:
        raise _common.AppError(f"--test-fraction {args.test_fraction} of the {DIGITS} digits "
                               f"leaves {n_test} to test on and {DIGITS - n_test} to train on")
    _common.check_fits(memory_parts(args), np.dtype(np.float32).itemsize)
    figures = train(args)
    print(f"test accuracy {figures['test_accuracy']:.4f} on {figures['test_examples']} digits "
          f"in {figures['wall_seconds']:.1f} s")
    _common.write_json(args.json, figures)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "classify", help="N->1 classification of the 8x8 digits, read row by row",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", choices=sorted(CELLS), default="gru", help="(default: gru)")
    parser.add_argument("--hidden", type=_common.positive_int, default=128, help="(default: 128)")
    parser.add_argument("--layers", type=_common.positive_int, default=1, help="(default: 1)")
    parser.add_argument("--batch", type=_common.positive_int, default=32, help="(default: 32)")
    parser.add_argument("--lr", type=_common.positive_float, default=5e-3,
                        help="Adam peak learning rate, cosine-decayed (default: 5e-3)")
    parser.add_argument("--clip", type=_common.positive_float, default=1.0,
                        help="clip the gradient's global norm to this (default: 1.0)")
    parser.add_argument("--epochs", type=_common.positive_int, default=50, help="(default: 50)")
    parser.add_argument("--test-fraction", type=_common.fraction, default=0.2,
                        help="share of the 1797 digits held out for testing (default: 0.2)")
    _common.add_common_arguments(parser, threads_default=_common.SMALL_MODEL_THREADS)
    parser.set_defaults(run=run, parser=parser)
