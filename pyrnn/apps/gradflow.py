"""Vanishing gradients, measured: how much of the loss's gradient reaches h_t, for every t.

Task: read T one-hot symbols and, at the end, name the first one (a marker channel flags it;
the other T-1 are random distractors), so the only useful gradient has to travel back through
all T steps. For a vanilla RNN, an LSTM, an LSTM with peepholes (its gates read the cell state
c, Gers and Schmidhuber), a GRU and the original GRU (reset gate before the recurrent product,
as ONNX and Keras have it), the network runs one step at a time through
``pyrnn.functional`` (one tape per step), and the backward pass walks those steps from T down
to 0: the dh0 each step returns is dLoss/dh_t, whose norm (mean over the batch) is recorded.
This is done at initialisation and again after --train-steps of training.

--init chrono (default) sets the LSTM forget-gate and GRU update-gate biases to log(u),
u ~ U(1, T-1) (Tallec & Ollivier, 2018), so some gated units start out keeping their state
for ~T steps; --init default keeps PyTorch's uniform init, under which all three cells start
with gates near 1/2 and vanishing gradients. A vanilla RNN has no gate to open either way.
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np

import pyrnn
from pyrnn import functional, optim
from pyrnn.layers import Linear, one_hot
from pyrnn.losses import cross_entropy

from . import _common

# name: the module and its keyword arguments
CELLS = {"rnn": (pyrnn.RNN, {}), "lstm": (pyrnn.LSTM, {}),
         "lstm_peephole": (pyrnn.LSTM, {"peephole": True}), "gru": (pyrnn.GRU, {}),
         "gru_reset_before": (pyrnn.GRU, {"reset_after": False})}
GATES = {"rnn": 1, "lstm": 4, "lstm_peephole": 4, "gru": 3, "gru_reset_before": 3}
TEST_BATCH = 1000  # sequences the trained models' accuracy is measured on
# Where the "keep the old state" gate's bias sits in the stacked (G*H,) bias: LSTM f, GRU z.
KEEP_GATE = {"lstm": 1, "lstm_peephole": 1, "gru": 1, "gru_reset_before": 1}


def recall_batch(rng: np.random.Generator, steps: int, symbols: int, batch: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(x (T, B, K+1), y (B,)): one-hot symbols plus a channel that marks t = 0; y is the
    symbol shown at t = 0 (the marker lets a gate learn when to write, not what to keep)."""
    ids = rng.integers(0, symbols, size=(steps, batch))
    x = np.zeros((steps, batch, symbols + 1))
    x[..., :symbols] = one_hot(ids, symbols, np.float64)
    x[0, :, symbols] = 1
    return x, ids[0]


class Recall(pyrnn.Module):
    def __init__(self, cell: str, symbols: int, hidden: int, seed: int,
                 backend: str = "auto") -> None:
        super().__init__()
        self.cell = cell
        # float64, so that gradients of 1e-30 and below are measured rather than lost to underflow
        module, options = CELLS[cell]
        self.rnn = module(symbols + 1, hidden, dtype=np.float64, seed=seed, backend=backend,
                          **options)
        self.head = Linear(hidden, symbols, dtype=np.float64, seed=seed + 1)

    def chrono_init(self, steps: int, rng: np.random.Generator) -> None:
        if self.cell not in KEEP_GATE:
            return
        H, gate = self.rnn.hidden_size, KEEP_GATE[self.cell]
        keep = np.log(rng.uniform(1, max(2, steps - 1), size=H))
        b_ih, b_hh = self.rnn.params["bias_ih_l0"], self.rnn.params["bias_hh_l0"]
        b_ih[gate * H : (gate + 1) * H], b_hh[gate * H : (gate + 1) * H] = keep, 0

    def loss(self, x: np.ndarray, y: np.ndarray) -> float:
        """Full BPTT over the whole sequence; gradients land in grads."""
        out, _ = self.rnn(x)
        loss, d_logits = cross_entropy(self.head(out[-1]), y)
        d_out = np.zeros_like(out)
        d_out[-1] = self.head.backward(d_logits)
        self.rnn.backward(d_out)
        return loss

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        with _common.evaluating(self):
            out, _ = self.rnn(x)
            return float((self.head(out[-1]).argmax(-1) == y).mean())

    def weights(self) -> list[tuple[np.ndarray | None, ...]]:
        """The recurrent layer's weights as the kernels take them (functional.rnn_forward)."""
        return self.rnn._weights()


def grad_norms(model: Recall, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """norms[t] = mean over the batch of ||dLoss/dh_t||, t = 0 (initial state) ... T."""
    kernel = model.rnn.cell  # "rnn_tanh", "lstm_peephole", ...
    weights, tapes = model.weights(), []
    h = np.zeros((1, x.shape[1], model.rnn.hidden_size), x.dtype)
    c = np.zeros_like(h) if model.rnn._cell.has_c else None
    for t in range(x.shape[0]):  # one step per call, so each step's tape is kept apart
        _, h, c, tape = functional.rnn_forward(kernel, x[t : t + 1], weights, h, c,
                                               backend=model.rnn.backend, keep_tape=True)
        tapes.append(tape)
    head = Linear(model.head.in_features, model.head.out_features, dtype=np.float64)
    head.load_state_dict(model.head.state_dict())
    _, d_logits = cross_entropy(head(h[0]), y)
    d_h, d_c = head.backward(d_logits)[None], (np.zeros_like(h) if c is not None else None)
    norms = [np.linalg.norm(d_h[0], axis=-1).mean()]
    for tape in reversed(tapes):
        _, d_h, d_c, _ = functional.rnn_backward(tape, None, d_h, d_c)
        norms.append(np.linalg.norm(d_h[0], axis=-1).mean())
    return np.array(norms[::-1])


def train_cell(cell: str, args: argparse.Namespace) -> dict[str, object]:
    rng = np.random.default_rng(args.seed)
    try:
        model = Recall(cell, args.symbols, args.hidden, args.seed, args.backend)
    except RuntimeError as error:  # --backend cpp, for a cell this build of the core lacks
        raise _common.AppError(f"--backend {args.backend}: {error}") from None
    if args.init == "chrono":
        model.chrono_init(args.T, rng)
    probe = recall_batch(np.random.default_rng(args.seed + 1), args.T, args.symbols, args.batch)
    before = grad_norms(model, *probe)
    adam, losses = optim.Adam(model, lr=args.lr), []
    bar = _common.progress(range(args.train_steps), desc=f"training {cell}",
                           disable=args.no_progress)
    for _ in bar:
        model.zero_grad()
        losses.append(model.loss(*recall_batch(rng, args.T, args.symbols, args.batch)))
        _common.check_finite_loss(losses[-1], f"{cell}'s step {len(losses)}", args)
        optim.clip_grad_norm(model, args.clip)
        adam.step()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    test = recall_batch(np.random.default_rng(args.seed + 2), args.T, args.symbols, TEST_BATCH)
    return {"init": before, "trained": grad_norms(model, *probe), "losses": losses,
            "accuracy": model.accuracy(*test)}


def table(results: dict[str, dict], T: int, rows: int = 11) -> str:
    """Norms at a few time steps, in scientific notation, for every cell and phase."""
    columns = [(cell, phase) for phase in ("init", "trained") for cell in results]
    widths = [max(11, len(cell) + len(phase) + 3) for cell, phase in columns]
    columns = list(zip(columns, widths, strict=True))
    lines = ["||dLoss/dh_t|| (mean over the batch), loss read at t = T",
             "   t " + "".join(f"{c + ' ' + p:>{w}}" for (c, p), w in columns)]
    for t in sorted({round(T * i / (rows - 1)) for i in range(rows)}, reverse=True):
        lines.append(f"{t:4d} " + "".join(f"{results[c][p][t]:{w}.2e}"
                                          for (c, p), w in columns))
    ratio = lambda v: v[0] / v[T] if v[T] > 0 else math.nan  # noqa: E731
    lines.append("h_0/h_T" + "".join(f"{ratio(results[c][p]):{w - 2}.1e}  "
                                     for (c, p), w in columns))
    return "\n".join(lines)


def plot(path: str | None, results: dict[str, dict]) -> None:
    if not path:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, phase in zip(axes, ("init", "trained"), strict=False):
        for cell, result in results.items():
            ax.semilogy(result[phase], label=cell)
        ax.set(title=f"||dLoss/dh_t||, {'at initialisation' if phase == 'init' else 'trained'}",
               xlabel="t (loss read at t = T)", ylabel="gradient norm")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    for cell, result in results.items():
        axes[2].plot(_common.smooth(result["losses"]), label=cell)
    axes[2].set(title="training loss", xlabel="step", ylabel="cross-entropy")
    axes[2].grid(True, alpha=0.3)
    axes[2].legend()
    fig.tight_layout()
    _common.save_figure(fig, path, dpi=110)


def memory_parts(args: argparse.Namespace) -> dict[str, int]:
    """The float64 numbers one cell's run holds, by what sizes them (see _common.check_fits)."""
    T, K, H, B = args.T, args.symbols, args.hidden, args.batch  # noqa: N806
    G = max(GATES[cell] for cell in args.cells)  # noqa: N806
    rnn = G * H * (K + 1 + H + 2)
    return {
        # weights, gradients, Adam's two moments
        f"--hidden {H} --symbols {K}: the weights": 4 * (rnn + H * K + K),
        # a training batch, the probe batch and the test batch, one-hot; the test's outputs
        f"-T {T} --symbols {K} --batch {B}: the sequences":
            T * (2 * B + TEST_BATCH) * (K + 1) + T * TEST_BATCH * H,
        # grad_norms keeps one tape per step, each with its own copy of the weights
        f"-T {T} --hidden {H}: one tape per step": T * (rnn + B * (G + 3) * H),
        # a training step's tape and gradients over the whole sequence
        f"-T {T} --batch {B} --hidden {H}: a step's activations":
            2 * T * B * (K + 1 + (G + 3) * H),
    }


def run(args: argparse.Namespace) -> int:
    if args.plot == default_plot() and not _common.matplotlib_available():
        print("matplotlib is not installed, so no plot (pip install 'pyrnn[plot]')")
        args.plot = None
    _common.check_common_arguments(args)
    _common.check_fits(memory_parts(args), np.dtype(np.float64).itemsize)
    backend = _common.setup_runtime(args)
    print(f"gradflow: recall the first of {args.T} symbols ({args.symbols} kinds), hidden "
          f"{args.hidden}, {args.init} init, backend {backend}")
    clock = _common.Stopwatch()
    results = {cell: train_cell(cell, args) for cell in args.cells}
    print(table(results, args.T))
    print(f"accuracy after training (chance {1 / args.symbols:.2f}): "
          + ", ".join(f"{cell} {r['accuracy']:.3f}" for cell, r in results.items()))
    plot(args.plot, results)
    figures: dict[str, object] = {"wall_seconds": clock.seconds(),
                                  **_common.runtime_figures(backend)}
    for cell, r in results.items():
        for phase in ("init", "trained"):
            figures[f"{cell}_{phase}_grad_norm_T"] = r[phase][args.T]
            figures[f"{cell}_{phase}_grad_norm_0"] = r[phase][0]
            figures[f"{cell}_{phase}_grad_norms"] = r[phase]
        figures[f"{cell}_accuracy"] = r["accuracy"]
        figures[f"{cell}_final_loss"] = float(np.mean(r["losses"][-20:])) if r["losses"] else None
    figures.update({k: getattr(args, k) for k in ("T", "symbols", "hidden", "batch", "lr",
                                                  "train_steps", "init", "seed")})
    _common.write_json(args.json, figures)
    return 0


def default_plot() -> str:
    """gradflow.png in pyrnn's cache folder, not in the working directory."""
    return os.path.join(_common.cache_dir(), "gradflow.png")



def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "gradflow", help="measure vanishing gradients: RNN vs LSTM (plain, peephole) vs GRU "
        "(reset after, before)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-T", "--steps", dest="T", type=_common.positive_int, default=100,
                        help="sequence length: how far back the answer lies (default: 100)")
    parser.add_argument("--symbols", type=_common.positive_int, default=8,
                        help="alphabet size K (default: 8)")
    parser.add_argument("--hidden", type=_common.positive_int, default=64, help="(default: 64)")
    parser.add_argument("--batch", type=_common.positive_int, default=32, help="(default: 32)")
    parser.add_argument("--lr", type=_common.positive_float, default=1e-3,
                        help="Adam learning rate (default: 1e-3)")
    parser.add_argument("--clip", type=_common.positive_float, default=1.0, help="(default: 1)")
    parser.add_argument("--train-steps", type=_common.non_negative_int, default=1000,
                        help="training steps per cell (default: 1000)")
    parser.add_argument("--init", choices=("chrono", "default"), default="chrono",
                        help="gate-bias initialisation for LSTM/GRU (default: chrono)")
    parser.add_argument("--cells", nargs="+", choices=tuple(CELLS), default=list(CELLS),
                        help="which cells to compare (default: all: "
                        f"{' '.join(CELLS)})")
    _common.add_common_arguments(parser, plot_default=default_plot())
    parser.set_defaults(run=run, parser=parser)
