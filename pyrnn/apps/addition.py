"""Learning to add: an encoder-decoder reads "535+61" and writes "596" (N -> M).

The question is padded to 7 characters and fed reversed (" 16+535"), so the digits that
determine the first answer digits arrive last. The encoder's final state initialises the
decoder, which is trained with teacher forcing (it reads "=596" and predicts "596 ") and
evaluated by greedy decoding: it reads its own previous prediction. A question counts as
right only when all 4 answer characters are. ``--peephole`` and ``--coupled-gates`` train the
LSTM's textbook variants (peephole connections; i = 1 - f), alone or together.
"""

from __future__ import annotations

import argparse

import numpy as np

import pyrnn
from pyrnn import optim
from pyrnn.layers import Embedding, Linear
from pyrnn.losses import cross_entropy

from . import _common

VOCAB = "0123456789+ ="  # "=" is the decoder's start token
CHAR_ID = {ch: i for i, ch in enumerate(VOCAB)}
DIGITS = 3
QUESTION_LEN = 2 * DIGITS + 1  # "535+61 " -> 7
ANSWER_LEN = DIGITS + 1  # "596 " -> 4
CELLS = {"lstm": pyrnn.LSTM, "gru": pyrnn.GRU}
GATES = {"lstm": 4, "gru": 3}
EVAL_BATCH = 2500  # questions answered per call in exact_match


# ---------------------------------------------------------------- data

def make_dataset(size: int, seed: int) -> tuple[list[str], list[str]]:
    """``size`` distinct questions "a+b" (a, b of 1 to DIGITS digits) and their answers."""
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, int]] = set()
    questions, answers = [], []
    while len(questions) < size:
        a, b = (int(rng.integers(0, 10 ** int(rng.integers(1, DIGITS + 1)))) for _ in range(2))
        if (a, b) in seen:
            continue
        seen.add((a, b))
        questions.append(f"{a}+{b}")
        answers.append(str(a + b))
    return questions, answers


def encode(questions: list[str], answers: list[str]) -> tuple[np.ndarray, ...]:
    """Time-major ids: reversed padded questions (7, N), decoder inputs and targets (4, N)."""
    q = [qu.ljust(QUESTION_LEN)[::-1] for qu in questions]
    a = [an.ljust(ANSWER_LEN) for an in answers]
    ids = lambda strings: np.array([[CHAR_ID[c] for c in s] for s in strings], np.int64).T  # noqa: E731
    targets = ids(a)
    decoder_in = np.concatenate([np.full((1, len(a)), CHAR_ID["="]), targets[:-1]])
    return ids(q), decoder_in, targets


def split(size: int, held_out: float, seed: int) -> tuple[np.ndarray, ...]:
    """The encoded training and validation arrays: (q, dec_in, target) for each."""
    q, dec_in, target = encode(*make_dataset(size, seed))
    # Held out at random: the generator exhausts the few 1-digit pairs early, so the first
    # questions drawn would hold all of them and leave none to learn from.
    order = np.random.default_rng(seed + 1).permutation(size)
    n_val = int(round(size * held_out))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return ((q[:, train_idx], dec_in[:, train_idx], target[:, train_idx]),
            (q[:, val_idx], dec_in[:, val_idx], target[:, val_idx]))


def batch_order(n: int, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's shuffled mini-batches of example indices (the last may be smaller)."""
    order = rng.permutation(n)
    return [order[i : i + batch] for i in range(0, n, batch)]


# ---------------------------------------------------------------- model

class Seq2Seq(pyrnn.Module):
    def __init__(self, cell: str, embed: int, hidden: int, seed: int, layers: int = 1,
                 dropout: float = 0.0, variant: dict[str, bool] | None = None) -> None:
        """variant: the LSTM's keyword arguments peephole= and coupled_gates=, if any."""
        super().__init__()
        rnn, vocab = CELLS[cell], len(VOCAB)
        stack = {"num_layers": layers, "dropout": dropout if layers > 1 else 0.0,
                 **(variant or {})}
        self.enc_embed = Embedding(vocab, embed, seed=seed)
        self.encoder = rnn(embed, hidden, **stack, seed=seed + 1)
        self.dec_embed = Embedding(vocab, embed, seed=seed + 2)
        self.decoder = rnn(embed, hidden, **stack, seed=seed + 3)
        self.head = Linear(hidden, vocab, seed=seed + 4)
        self.p = dropout
        self.rng = np.random.default_rng(seed + 5)

    def drop(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Dropout on a non-recurrent connection (Zaremba et al., 2014): (x * mask, mask)."""
        keep = self.rng.random(x.shape) >= self.p
        mask = keep.astype(x.dtype) / x.dtype.type(1 - self.p)
        return x * mask, mask

    def loss(self, q: np.ndarray, dec_in: np.ndarray, target: np.ndarray) -> float:
        """Forward with teacher forcing, then backward: gradients land in the modules' grads."""
        enc_x, enc_mask = self.drop(self.enc_embed(q))
        _, state = self.encoder(enc_x)
        dec_x, dec_mask = self.drop(self.dec_embed(dec_in))
        dec_out, _ = self.decoder(dec_x, state)
        dec_out, out_mask = self.drop(dec_out)
        loss, d_logits = cross_entropy(self.head(dec_out), target)
        d_dec_x, d_state = self.decoder.backward(self.head.backward(d_logits) * out_mask)
        self.dec_embed.backward(d_dec_x * dec_mask)
        d_enc_x, _ = self.encoder.backward(None, d_state)  # only the final state was used
        self.enc_embed.backward(d_enc_x * enc_mask)
        return loss

    def answer(self, q: np.ndarray) -> np.ndarray:
        """Greedy decoding: (ANSWER_LEN, B) predicted ids, each step fed the previous one."""
        with _common.evaluating(self):
            _, state = self.encoder(self.enc_embed(q))
            token = np.full((1, q.shape[1]), CHAR_ID["="])
            predicted = []
            for _ in range(ANSWER_LEN):
                out, state = self.decoder(self.dec_embed(token), state)
                token = self.head(out).argmax(axis=-1)
                predicted.append(token[0])
        return np.stack(predicted)


def exact_match(model: Seq2Seq, val: tuple[np.ndarray, ...], batch: int = EVAL_BATCH) -> float:
    q, _, target = val
    right = 0
    for i in range(0, q.shape[1], batch):
        predicted = model.answer(q[:, i : i + batch])
        right += int((predicted == target[:, i : i + batch]).all(axis=0).sum())
    return right / q.shape[1]


def show(q: np.ndarray, predicted: np.ndarray) -> str:
    question = "".join(VOCAB[i] for i in q)[::-1].strip()
    return f"{question}={''.join(VOCAB[i] for i in predicted).strip()}"


# ---------------------------------------------------------------- training

def train(args: argparse.Namespace) -> dict[str, object]:
    backend = _common.setup_runtime(args)
    train_set, val = split(args.examples, args.held_out, args.seed)
    model = Seq2Seq(args.cell, args.embed, args.hidden, args.seed, args.layers, args.dropout,
                    variant(args))
    adam = optim.Adam(model, lr=args.lr)
    rng = np.random.default_rng(args.seed + 100)
    n_train = train_set[0].shape[1]
    print(f"addition: {n_train} training / {val[0].shape[1]} validation questions, "
          f"{cell_name(args)} {args.hidden}, {model.num_parameters():,} parameters, "
          f"backend {backend}")

    clock, losses, accuracy, seconds_to_target, epoch = _common.Stopwatch(), [], [], None, 0
    for epoch in range(1, args.epochs + 1):
        adam.lr = args.lr * args.lr_decay ** (epoch - 1)
        bar = _common.progress(batch_order(n_train, args.batch, rng), desc=f"epoch {epoch}",
                               disable=args.no_progress)
        for idx in bar:
            model.zero_grad()
            losses.append(model.loss(*(part[:, idx] for part in train_set)))
            _common.check_finite_loss(losses[-1], f"step {len(losses)}", args)
            optim.clip_grad_norm(model, args.clip)
            adam.step()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        accuracy.append(exact_match(model, val))
        bar.write(f"epoch {epoch}: loss {np.mean(losses[-len(bar):]):.4f}, "
                  f"validation exact match {accuracy[-1]:.4f}, {clock.seconds():.1f} s")
        if accuracy[-1] >= args.target:
            seconds_to_target = clock.seconds()
            break

    predicted = model.answer(val[0][:, :5])
    print("examples:", ", ".join(show(val[0][:, i], predicted[:, i]) for i in range(5)))
    _common.plot_curves(args.plot, {"training loss": (range(len(losses)), _common.smooth(losses))},
                        title="addition: training loss", xlabel="step", ylabel="cross-entropy",
                        logy=True)
    figures = {
        "val_exact_match": accuracy[-1],
        "val_exact_match_per_epoch": accuracy,
        "epochs_run": epoch,
        "target": args.target,
        "reached_target": seconds_to_target is not None,
        "seconds_to_target": seconds_to_target,
        "wall_seconds": clock.seconds(),
        "final_train_loss": float(np.mean(losses[-50:])),
        "parameters": model.num_parameters(),
        **{k: getattr(args, k) for k in CONFIG_KEYS},
        "peephole": args.peephole,
        "coupled_gates": args.coupled_gates,
        **_common.runtime_figures(backend),
    }
    return figures


def variant(args: argparse.Namespace) -> dict[str, bool]:
    """The LSTM variant's keyword arguments, for --cell lstm (run refuses them with a GRU)."""
    return {"peephole": args.peephole, "coupled_gates": args.coupled_gates} if (
        args.cell == "lstm") else {}


def cell_name(args: argparse.Namespace) -> str:
    """The cell as the summary line names it: "lstm", "lstm (peephole, coupled gates)"."""
    chosen = [name for name, on in (("peephole", args.peephole),
                                     ("coupled gates", args.coupled_gates)) if on]
    return args.cell + (f" ({', '.join(chosen)})" if chosen else "")


CONFIG_KEYS = ("cell", "hidden", "layers", "dropout", "embed", "batch", "lr", "lr_decay", "clip",
               "epochs", "examples", "held_out", "seed")


def memory_parts(args: argparse.Namespace) -> dict[str, int]:
    """The float32 numbers a run holds, by what sizes them (see _common.check_fits)."""
    V, E, H, L, G, B = (len(VOCAB), args.embed, args.hidden, args.layers,  # noqa: N806
                        GATES[args.cell] - args.coupled_gates, args.batch)
    stack = G * H * (E + H + 2) + (L - 1) * G * H * (2 * H + 2) + 3 * L * H * args.peephole
    params = 2 * V * E + 2 * stack + H * V + V
    steps = QUESTION_LEN + ANSWER_LEN
    return {
        # weights, gradients and Adam's two moments
        f"--embed {E} --hidden {H} --layers {L}: the weights": 4 * params,
        # a step's embeddings, tapes, logits and their gradients; answering EVAL_BATCH questions
        f"--batch {B} --embed {E} --hidden {H} --layers {L}: the activations":
            2 * steps * B * (E + L * (G + 3) * H + 3 * V)
            + steps * min(EVAL_BATCH, args.examples) * (E + L * (G + 1) * H + V),
        # the questions and answers, int64 (two float32s each), in order and split
        f"--examples {args.examples}: the data": 4 * steps * args.examples,
    }


def run(args: argparse.Namespace) -> int:
    _common.check_common_arguments(args)
    for flag, on in (("--peephole", args.peephole), ("--coupled-gates", args.coupled_gates)):
        if on and args.cell != "lstm":
            raise _common.AppError(f"{flag}: an LSTM variant, for --cell lstm only; got --cell "
                                   f"{args.cell}")
    if args.examples > 1000**2:
        raise _common.AppError(f"--examples: at most {1000**2} distinct questions exist, "
                               f"got {args.examples}")
    n_val = int(round(args.examples * args.held_out))
    if not 1 <= n_val < args.examples:
        raise _common.AppError(f"--held-out {args.held_out} of --examples {args.examples} leaves "
                               f"{n_val} validation and {args.examples - n_val} training "
                               "questions")
    _common.check_fits(memory_parts(args), np.dtype(np.float32).itemsize)
    figures = train(args)
    if figures["reached_target"]:
        print(f"reached {args.target:.2%} exact match after {figures['epochs_run']} epochs "
              f"in {figures['seconds_to_target']:.1f} s")
    else:
        print(f"stopped at {figures['val_exact_match']:.2%} exact match after {args.epochs} epochs "
              f"(target {args.target:.2%} not reached)")
    _common.write_json(args.json, figures)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "addition", help="encoder-decoder that learns to add (\"535+61\" -> \"596\")",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", choices=sorted(CELLS), default="lstm", help="(default: lstm)")
    parser.add_argument("--peephole", action="store_true",
                        help="LSTM with peephole connections: i and f see c_{t-1}, o sees c_t")
    parser.add_argument("--coupled-gates", action="store_true",
                        help="LSTM with coupled input and forget gates, i = 1 - f")
    parser.add_argument("--hidden", type=_common.positive_int, default=128,
                        help="hidden units of encoder and decoder (default: 128)")
    parser.add_argument("--layers", type=_common.positive_int, default=1,
                        help="stacked layers in encoder and decoder (default: 1)")
    parser.add_argument("--dropout", type=_common.probability, default=0.1,
                        help="dropout on the embeddings, the decoder's outputs and between "
                        "stacked layers, training only (default: 0.1)")
    parser.add_argument("--embed", type=_common.positive_int, default=32,
                        help="character embedding size (default: 32)")
    parser.add_argument("--batch", type=_common.positive_int, default=64, help="(default: 64)")
    parser.add_argument("--lr", type=_common.positive_float, default=3e-3,
                        help="Adam learning rate (default: 3e-3)")
    parser.add_argument("--lr-decay", type=_common.fraction, default=0.9,
                        help="multiply the learning rate by this after every epoch (default: 0.9)")
    parser.add_argument("--clip", type=_common.positive_float, default=1.0,
                        help="clip the gradient's global norm to this (default: 1.0)")
    parser.add_argument("--epochs", type=_common.positive_int, default=40,
                        help="at most this many epochs (default: 40)")
    parser.add_argument("--target", type=_common.fraction, default=0.99,
                        help="stop once validation exact match reaches this (default: 0.99)")
    parser.add_argument("--examples", type=_common.positive_int, default=50_000,
                        help="distinct generated questions (default: 50000)")
    parser.add_argument("--held-out", type=_common.fraction, default=0.1,
                        help="fraction kept for validation (default: 0.1)")
    _common.add_common_arguments(parser)
    parser.set_defaults(run=run, parser=parser)
