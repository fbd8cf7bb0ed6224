"""The addition task in PyTorch: the same model, initial weights, data, batch order and
hyper-parameters as ``pyrnn addition``, timed to the same target, for a time-to-accuracy ratio.

    pyrnn addition --json add.json
    python -m bench.addition_torch --pyrnn-json add.json     # same config, prints both times

Without --pyrnn-json it uses ``pyrnn addition``'s defaults (or the flags given here). The
initial weights are pyrnn's, copied by name, so both runs start from the same point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from pyrnn.apps import addition as A

TORCH_CELLS = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}


class TorchSeq2Seq(torch.nn.Module):
    """pyrnn.apps.addition.Seq2Seq in torch, with the same attribute (and so parameter) names."""

    def __init__(self, cell: str, embed: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        rnn, vocab = TORCH_CELLS[cell], len(A.VOCAB)
        stack = {"num_layers": layers, "dropout": dropout if layers > 1 else 0.0}
        self.enc_embed = torch.nn.Embedding(vocab, embed)
        self.encoder = rnn(embed, hidden, **stack)
        self.dec_embed = torch.nn.Embedding(vocab, embed)
        self.decoder = rnn(embed, hidden, **stack)
        self.head = torch.nn.Linear(hidden, vocab)
        self.drop = torch.nn.Dropout(dropout)  # the same non-recurrent places as pyrnn's model

    def forward(self, q: torch.Tensor, dec_in: torch.Tensor) -> torch.Tensor:
        _, state = self.encoder(self.drop(self.enc_embed(q)))
        out, _ = self.decoder(self.drop(self.dec_embed(dec_in)), state)
        return self.head(self.drop(out))

    @torch.no_grad()
    def answer(self, q: torch.Tensor) -> torch.Tensor:
        _, state = self.encoder(self.enc_embed(q))
        token = torch.full((1, q.shape[1]), A.CHAR_ID["="])
        predicted = []
        for _ in range(A.ANSWER_LEN):
            out, state = self.decoder(self.dec_embed(token), state)
            token = self.head(out).argmax(-1)
            predicted.append(token[0])
        return torch.stack(predicted)


def exact_match(model: TorchSeq2Seq, val: tuple[np.ndarray, ...]) -> float:
    q, _, target = (torch.from_numpy(part) for part in val)
    model.eval()
    right = float((model.answer(q) == target).all(dim=0).double().mean())
    model.train()
    return right


def train(config: argparse.Namespace, threads: int) -> dict[str, object]:
    torch.set_num_threads(threads)
    train_set, val = A.split(config.examples, config.held_out, config.seed)
    model = TorchSeq2Seq(config.cell, config.embed, config.hidden, config.layers, config.dropout)
    same_start = A.Seq2Seq(config.cell, config.embed, config.hidden, config.seed, config.layers,
                           config.dropout).state_dict()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in same_start.items()})
    adam = torch.optim.Adam(model.parameters(), lr=config.lr)
    rng = np.random.default_rng(config.seed + 100)  # the batch order pyrnn addition uses
    parts = [torch.from_numpy(part) for part in train_set]

    start, accuracy, seconds_to_target = time.perf_counter(), [], None
    for epoch in range(1, config.epochs + 1):
        for group in adam.param_groups:
            group["lr"] = config.lr * config.lr_decay ** (epoch - 1)
        for idx in A.batch_order(parts[0].shape[1], config.batch, rng):
            q, dec_in, target = (part[:, idx] for part in parts)
            adam.zero_grad()
            logits = model(q, dec_in)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     target.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            adam.step()
        accuracy.append(exact_match(model, val))
        elapsed = time.perf_counter() - start
        print(f"epoch {epoch}: validation exact match {accuracy[-1]:.4f}, {elapsed:.1f} s",
              flush=True)
        if accuracy[-1] >= config.target:
            seconds_to_target = elapsed
            break
    return {"torch_val_exact_match": accuracy[-1], "torch_epochs": len(accuracy),
            "torch_seconds_to_target": seconds_to_target,
            "torch_wall_seconds": time.perf_counter() - start, "torch_threads": threads,
            "torch_version": torch.__version__, "target": config.target}


def addition_defaults(argv: list[str]) -> argparse.Namespace:
    """pyrnn addition's own parser, so flags and defaults are the same by construction."""
    parser = argparse.ArgumentParser(prog="python -m bench.addition_torch")
    commands = parser.add_subparsers(dest="command")
    A.register(commands)
    return parser.parse_args(["addition", *argv])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.addition_torch", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyrnn-json", metavar="PATH",
                        help="the --json of a 'pyrnn addition' run: reuse its configuration and "
                        "print the time ratio")
    parser.add_argument("--out", metavar="PATH", help="write this run's figures as JSON")
    args, rest = parser.parse_known_args(argv)
    config = addition_defaults(rest)
    pyrnn_figures = None
    if args.pyrnn_json:
        with open(args.pyrnn_json, encoding="utf-8") as f:
            pyrnn_figures = json.load(f)
        for key in A.CONFIG_KEYS + ("target",):
            setattr(config, key, pyrnn_figures[key])
    threads = config.threads or (pyrnn_figures or {}).get("threads") or torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads: {config.cell} {config.hidden}x"
          f"{config.layers}, batch "
          f"{config.batch}, lr {config.lr}, target {config.target}")
    figures = train(config, threads)
    if pyrnn_figures is not None:
        figures["pyrnn_seconds_to_target"] = pyrnn_figures["seconds_to_target"]
        figures["pyrnn_epochs"] = pyrnn_figures["epochs_run"]
        if figures["pyrnn_seconds_to_target"] and figures["torch_seconds_to_target"]:
            figures["torch_over_pyrnn"] = (figures["torch_seconds_to_target"]
                                           / figures["pyrnn_seconds_to_target"])
    _report(figures)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2, sort_keys=True)
    return 0


def _seconds(value: float | None) -> str:
    return f"{value:.1f} s" if value else "target not reached"


def _report(figures: dict[str, object]) -> None:
    print(f"torch: {_seconds(figures['torch_seconds_to_target'])} to "
          f"{figures['target']:.0%} ({figures['torch_epochs']} epochs)")
    if "pyrnn_seconds_to_target" in figures:
        print(f"pyrnn: {_seconds(figures['pyrnn_seconds_to_target'])} "
              f"({figures['pyrnn_epochs']} epochs)")
    if "torch_over_pyrnn" in figures:
        print(f"time to target, torch / pyrnn = {figures['torch_over_pyrnn']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
