"""Smoke runs of every `pyrnn` command (tiny sizes, a few steps) and of every example script."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pyrnn
from pyrnn.apps import _common, addition, charrnn, gradflow
from pyrnn.cli import main

REPO = Path(__file__).resolve().parents[1]
HAS_MATPLOTLIB = _common.matplotlib_available()
COMMON = ["--no-progress", "--seed", "3"]
TEXT = "\n".join(
    f"def f{i}(x, y):\n    return x * {i} + y  # line {i}\n" for i in range(60)
)


def exit_status(argv):
    """main's status, whether argparse raised it (SystemExit) or main returned it."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def run_ok(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def plot_flags(tmp_path, name):
    return ["--plot", str(tmp_path / name)] if HAS_MATPLOTLIB else []


def assert_png(tmp_path, name):
    if HAS_MATPLOTLIB:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ the command line itself

@pytest.mark.parametrize("argv", [
    [], ["charrnn"], ["charrnn", "train"], ["charrnn", "sample"], ["addition"], ["classify"],
    ["gradflow"],
])
def test_help_works_for_every_command(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert "usage: pyrnn" in capsys.readouterr().out


def test_python_dash_m_pyrnn_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "pyrnn", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for command in ("charrnn", "addition", "classify", "gradflow"):
        assert command in result.stdout


@pytest.mark.parametrize("argv, words", [
    (["addition", "--hidden", "0"], ["--hidden", "positive integer"]),
    (["addition", "--target", "1.5"], ["--target", "(0, 1]"]),
    (["classify", "--lr", "fast"], ["--lr", "'fast'"]),
    (["addition", "--dropout", "1"], ["--dropout", "[0, 1)"]),
    (["charrnn", "train", "--cell", "transformer"], ["--cell", "invalid choice"]),
    (["gradflow", "--backend", "gpu"], ["--backend", "invalid choice"]),
    (["charrnn", "train", "--text", "/no/such/file.txt"], ["--text", "no such file"]),
    (["charrnn", "sample", "--checkpoint", "/no/such.npz"], ["--checkpoint", "no such file"]),
    (["addition", "--json", "/no/such/folder/a.json"], ["--json", "does not exist"]),
    (["nonsense"], ["invalid choice"]),
    ([], ["required"]),
])
def test_bad_arguments_exit_nonzero_with_a_message(argv, words, capsys):
    assert exit_status(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    for word in words:
        assert word in err


def test_a_run_leaves_the_thread_counts_as_it_found_them(capsys):
    before = pyrnn.get_num_threads()
    run_ok(["gradflow", "-T", "4", "--hidden", "4", "--train-steps", "1", "--plot", "",
            "--threads", "1", *COMMON], capsys)
    assert pyrnn.get_num_threads() == before


def test_apps_use_all_core_threads_by_default_but_classify():
    # Measured: two threads made charrnn, addition and gradflow 1.3-1.75x faster per training
    # step once nothing else used the cores; classify's model is too small to gain.
    from pyrnn.cli import build_parser

    parser = build_parser()
    for argv in (["charrnn", "train"], ["addition"], ["gradflow"]):
        assert parser.parse_args(argv).threads is None, argv
    assert parser.parse_args(["classify"]).threads == _common.SMALL_MODEL_THREADS


def test_plot_without_matplotlib_is_refused_clearly(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(_common, "matplotlib_available", lambda: False)
    assert exit_status(["addition", "--plot", str(tmp_path / "a.png")]) == 2
    assert "pip install" in capsys.readouterr().err


# ------------------------------------------------------------------ charrnn

def charrnn_train(tmp_path, *extra):
    text = tmp_path / "text.py"
    text.write_text(TEXT, encoding="utf-8")
    return ["charrnn", "train", "--text", str(text), "--hidden", "16", "--embed", "8",
            "--seq-len", "8", "--batch", "4", "--steps", "6", "--eval-every", "3",
            "--checkpoint", str(tmp_path / "c.npz"), "--sample-length", "40", *COMMON, *extra]


def test_charrnn_train_writes_json_plot_checkpoint_and_sample(tmp_path, capsys):
    out = run_ok(charrnn_train(tmp_path, "--json", str(tmp_path / "c.json"),
                               *plot_flags(tmp_path, "c.png")), capsys)
    figures = read_json(tmp_path / "c.json")
    assert 0 < figures["val_bits_per_char"] < 10
    assert figures["steps"] == 6 and figures["wall_seconds"] > 0
    assert figures["cell"] == "lstm" and figures["seq_len"] == 8
    assert "--- sample" in out and figures["sample"].startswith("def ")
    assert len(figures["sample"]) == len("def ") + 40
    assert (tmp_path / "c.npz").is_file()
    assert_png(tmp_path, "c.png")


def test_charrnn_is_deterministic_for_a_seed(tmp_path, capsys):
    run_ok(charrnn_train(tmp_path, "--json", str(tmp_path / "a.json")), capsys)
    run_ok(charrnn_train(tmp_path, "--json", str(tmp_path / "b.json")), capsys)
    a, b = read_json(tmp_path / "a.json"), read_json(tmp_path / "b.json")
    assert a["val_bits_per_char"] == b["val_bits_per_char"]
    assert a["sample"] == b["sample"]


def test_charrnn_resume_continues_from_the_checkpoint(tmp_path, capsys):
    run_ok(charrnn_train(tmp_path), capsys)
    out = run_ok(charrnn_train(tmp_path, "--resume", "--steps", "9", "--cell", "gru",
                               "--json", str(tmp_path / "r.json")), capsys)
    assert "resumed" in out and "at step 6" in out
    figures = read_json(tmp_path / "r.json")
    assert figures["steps"] == 9 and figures["steps_this_run"] == 3
    assert figures["cell"] == "lstm"  # the checkpoint's architecture wins over the flags
    meta = pyrnn.checkpoint.read_metadata(tmp_path / "c.npz")
    assert meta["metadata"]["step"] == 9 and meta["optimizer"]["type"] == "Adam"


def test_charrnn_resume_without_checkpoint_fails_clearly(tmp_path, capsys):
    assert main(charrnn_train(tmp_path, "--resume", "--checkpoint",
                              str(tmp_path / "none.npz"))) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_charrnn_sample_generates_from_the_prime(tmp_path, capsys):
    run_ok(charrnn_train(tmp_path), capsys)
    argv = ["charrnn", "sample", "--checkpoint", str(tmp_path / "c.npz"), "--length", "30",
            "--prime", "return", "--temperature", "0.5"]
    first = run_ok(argv, capsys)
    assert first.startswith("return") and len(first.rstrip("\n")) == len("return") + 30
    assert run_ok(argv, capsys) == first  # seeded


def test_charrnn_default_corpus_is_python_and_fixed():
    text, description = charrnn.stdlib_corpus(30_000)
    assert len(text) == 30_000 and "def " in text and "import " in text
    assert charrnn.stdlib_corpus(30_000)[0] == text
    assert "stdlib" in description


def test_charrnn_bits_per_char_of_a_uniform_model_is_log2_vocab():
    vocab = "abcd"
    model = charrnn.build_model({"vocab": vocab, "cell": "gru", "embed": 4, "hidden": 4,
                                 "layers": 1})
    for _, value, _ in model.head.named_parameters():
        value[...] = 0  # zero logits: every character has probability 1/4
    ids = np.random.default_rng(0).integers(0, 4, 200)
    assert charrnn.bits_per_char(model, ids, seq_len=10) == pytest.approx(2.0, rel=1e-6)


# ------------------------------------------------------------------ addition

def test_addition_data_is_reversed_padded_and_correct():
    questions, answers = addition.make_dataset(500, seed=1)
    assert len(set(questions)) == 500
    for q, a in zip(questions, answers, strict=True):
        left, right = q.split("+")
        assert int(left) + int(right) == int(a) and max(len(left), len(right)) <= 3
    q, dec_in, target = addition.encode(["535+61"], ["596"])
    as_text = lambda ids: "".join(addition.VOCAB[i] for i in ids[:, 0])  # noqa: E731
    assert as_text(q) == " 16+535"
    assert as_text(dec_in) == "=596" and as_text(target) == "596 "


def test_addition_holds_out_a_random_disjoint_tenth():
    train, val = addition.split(2000, 0.1, seed=0)
    assert train[0].shape == (7, 1800) and val[0].shape == (7, 200)
    as_set = lambda q: {tuple(column) for column in q.T}  # noqa: E731
    assert not as_set(train[0]) & as_set(val[0])
    short = lambda q: int((q[:4] == addition.CHAR_ID[" "]).all(axis=0).sum())  # noqa: E731
    assert short(train[0]) > 0  # the few 1-digit + 1-digit questions are not all held out


def test_addition_runs_and_writes_val_exact_match(tmp_path, capsys):
    out = run_ok(["addition", "--examples", "600", "--epochs", "2", "--hidden", "16",
                  "--embed", "8", "--batch", "64", "--layers", "2", "--dropout", "0.1",
                  "--json", str(tmp_path / "a.json"),
                  *plot_flags(tmp_path, "a.png"), *COMMON], capsys)
    figures = read_json(tmp_path / "a.json")
    assert 0 <= figures["val_exact_match"] <= 1
    assert len(figures["val_exact_match_per_epoch"]) == figures["epochs_run"] <= 2
    assert figures["hidden"] == 16 and figures["examples"] == 600 and figures["layers"] == 2
    assert "wall_seconds" in figures and "seconds_to_target" in figures
    assert "examples:" in out
    assert_png(tmp_path, "a.png")


def test_addition_trains_the_lstm_variants(tmp_path, capsys):
    out = run_ok(["addition", "--peephole", "--coupled-gates", "--examples", "300", "--epochs",
                  "1", "--hidden", "8", "--embed", "4", "--json", str(tmp_path / "a.json"),
                  "--plot", "", *COMMON], capsys)
    figures = read_json(tmp_path / "a.json")
    assert figures["peephole"] is True and figures["coupled_gates"] is True
    assert "lstm (peephole, coupled gates) 8" in out
    # 3 gate blocks and 2 peephole vectors per layer: encoder and decoder
    H, E = 8, 4  # noqa: N806
    rnn = 3 * H * (E + H + 2) + 2 * H
    V = len(addition.VOCAB)  # noqa: N806
    assert figures["parameters"] == 2 * V * E + 2 * rnn + H * V + V


@pytest.mark.parametrize("flag", ["--peephole", "--coupled-gates"])
def test_addition_refuses_an_lstm_variant_for_a_gru(flag, capsys):
    assert exit_status(["addition", "--cell", "gru", flag, "--examples", "300"]) == 2
    assert f"{flag}: an LSTM variant, for --cell lstm only; got --cell gru" in (
        capsys.readouterr().err)


def test_addition_gru_reaching_a_low_target_stops_early(tmp_path, capsys):
    run_ok(["addition", "--cell", "gru", "--examples", "300", "--epochs", "3", "--hidden", "8",
            "--embed", "4", "--target", "0.0001", "--json", str(tmp_path / "a.json"),
            *COMMON], capsys)
    figures = read_json(tmp_path / "a.json")
    if figures["val_exact_match"] >= 0.0001:  # any right answer at all stops the run
        assert figures["reached_target"] and figures["seconds_to_target"] > 0


def test_addition_bench_in_torch_runs_on_the_same_config(tmp_path, capsys):
    pytest.importorskip("torch")
    sys.path.insert(0, str(REPO))
    try:
        from bench import addition_torch
    finally:
        sys.path.remove(str(REPO))
    run_ok(["addition", "--examples", "300", "--epochs", "1", "--hidden", "8", "--embed", "4",
            "--json", str(tmp_path / "a.json"), *COMMON], capsys)
    assert addition_torch.main(["--pyrnn-json", str(tmp_path / "a.json"),
                                "--out", str(tmp_path / "t.json")]) == 0
    figures = read_json(tmp_path / "t.json")
    assert figures["torch_epochs"] == 1 and 0 <= figures["torch_val_exact_match"] <= 1


# ------------------------------------------------------------------ classify

def test_classify_runs_and_writes_test_accuracy(tmp_path, capsys):
    pytest.importorskip("sklearn")
    run_ok(["classify", "--epochs", "2", "--hidden", "16", "--json", str(tmp_path / "c.json"),
            *plot_flags(tmp_path, "c.png"), *COMMON], capsys)
    figures = read_json(tmp_path / "c.json")
    assert 0.1 < figures["test_accuracy"] <= 1  # two epochs already beat chance
    assert figures["test_examples"] + figures["train_examples"] == 1797
    assert_png(tmp_path, "c.png")


def test_classify_without_scikit_learn_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    assert main(["classify", "--epochs", "1", "--no-progress"]) == 2
    assert "pip install 'pyrnn[apps]'" in capsys.readouterr().err


# ------------------------------------------------------------------ gradflow

def test_gradflow_writes_table_json_and_plot(tmp_path, capsys):
    out = run_ok(["gradflow", "-T", "12", "--hidden", "8", "--batch", "4", "--train-steps", "2",
                  "--json", str(tmp_path / "g.json"), *plot_flags(tmp_path, "g.png"), *COMMON],
                 capsys)
    figures = read_json(tmp_path / "g.json")
    for cell in ("rnn", "lstm", "lstm_peephole", "gru", "gru_reset_before"):
        for phase in ("init", "trained"):
            norms = figures[f"{cell}_{phase}_grad_norms"]
            assert len(norms) == 13 and all(v > 0 for v in norms)
        assert 0 <= figures[f"{cell}_accuracy"] <= 1
    assert "||dLoss/dh_t||" in out
    assert_png(tmp_path, "g.png")


@pytest.mark.parametrize("cell", list(gradflow.CELLS))
def test_gradflow_step_by_step_norms_match_full_bptt(cell):
    """The chained one-step backward must give the same dLoss/dh_0 as BPTT over the sequence."""
    model = gradflow.Recall(cell, symbols=4, hidden=6, seed=0)
    model.chrono_init(10, np.random.default_rng(0))
    x, y = gradflow.recall_batch(np.random.default_rng(1), 10, 4, 5)
    norms = gradflow.grad_norms(model, x, y)
    initial = np.zeros((1, 5, 6))
    lstm = cell.startswith("lstm")
    hx = (initial, initial) if lstm else initial
    out, _ = model.rnn(x, hx)
    from pyrnn.losses import cross_entropy
    _, d_logits = cross_entropy(model.head(out[-1]), y)
    d_out = np.zeros_like(out)
    d_out[-1] = model.head.backward(d_logits)
    _, d_hx = model.rnn.backward(d_out)
    d_h0 = d_hx[0] if lstm else d_hx
    assert norms[0] == pytest.approx(np.linalg.norm(d_h0[0], axis=-1).mean(), rel=1e-9)
    assert math.isclose(norms[-1], np.linalg.norm(d_out[-1], axis=-1).mean(), rel_tol=1e-9)


# ------------------------------------------------------------------ examples

@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "examples").glob("*.py")))
def test_example_script_runs(script):
    # One thread each for the core and BLAS: on a busy 2-core machine more only adds contention.
    # No PYTHONPATH: the scripts must import the installed package, compiled core included.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "examples" / script)], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "C++ extension unavailable" not in result.stderr
    assert "held-out" in result.stdout
