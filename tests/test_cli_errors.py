"""User errors on the command line: one line on stderr naming the argument, exit status 2 (3 for
a run that diverged), no traceback, checked before any training; nothing written where the user
did not ask, every file with the mode the umask gives."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from _child import child_env

from pyrnn import checkpoint
from pyrnn.apps import _common, charrnn
from pyrnn.cli import main

REPO = Path(__file__).resolve().parents[1]
HAS_MATPLOTLIB = _common.matplotlib_available()
TEXT = "\n".join(f"def f{i}(x, y):\n    return x * {i} + y  # line {i}\n" for i in range(60))
TINY = {
    "addition": ["addition", "--examples", "300", "--epochs", "1", "--hidden", "8", "--embed",
                 "4", "--no-progress"],
    "classify": ["classify", "--epochs", "1", "--hidden", "8", "--no-progress"],
    "gradflow": ["gradflow", "-T", "6", "--hidden", "4", "--batch", "4", "--train-steps", "3",
                 "--plot", "", "--no-progress"],
}


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty working directory, a text to train on, the cache folder under tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    (tmp_path / "text.py").write_text(TEXT, encoding="utf-8")
    return tmp_path


def train_argv(work, *extra):
    return ["charrnn", "train", "--text", str(work / "text.py"), "--hidden", "16", "--embed",
            "8", "--seq-len", "8", "--batch", "4", "--steps", "4", "--eval-every", "2",
            "--sample-length", "20", "--no-progress", *extra]


def status_and_error(argv, capsys):
    """(exit status, stderr) of one run, which must print at most one line on stderr."""
    try:
        status = main(argv)
    except SystemExit as exit_info:
        status = exit_info.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") <= 1, err
    return status, err


def assert_user_error(argv, capsys, *words, status=2):
    code, err = status_and_error(argv, capsys)
    assert code == status, err
    for word in words:
        assert word in err, err
    return err


@pytest.fixture
def trained(work, capsys):
    path = work / "good.npz"
    assert main(train_argv(work, "--checkpoint", str(path))) == 0
    capsys.readouterr()
    return path


def edited(path, target, metadata=None, **header_changes):
    """A copy of the checkpoint at path with its meta.json changed."""
    header = checkpoint.read_metadata(path)
    header.update(header_changes)
    if metadata is not None:
        header["metadata"] = metadata
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["meta.json"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(target, **arrays)
    return target


# ------------------------------------------------------------------ sizes and threads

@pytest.mark.parametrize("app", ["charrnn", "addition", "classify", "gradflow"])
def test_threads_beyond_the_core_limit_are_refused(work, capsys, app):
    argv = train_argv(work) if app == "charrnn" else TINY[app]
    assert_user_error([*argv, "--threads", "5000"], capsys, "--threads 5000", "at most")


def test_sample_refuses_threads_beyond_the_core_limit(trained, capsys):
    assert_user_error(["charrnn", "sample", "--checkpoint", str(trained), "--threads", "5000"],
                      capsys, "--threads 5000")


# Sizes no machine holds (a petabyte and more), so that the tests refuse them anywhere; on this
# 24 GB host the issue's --embed 10**9 (2.9 TiB) is refused the same way.
@pytest.mark.parametrize("argv, flag", [
    (["--hidden", "10000000"], "--hidden 10000000"),
    (["--embed", str(10**12)], "--embed 1000000000000"),
    (["--layers", str(10**9)], "--layers 1000000000"),
    (["--batch", str(10**12)], "--batch 1000000000000"),
])
def test_charrnn_sizes_that_cannot_fit_are_refused_naming_the_argument(work, capsys, argv, flag):
    assert_user_error(train_argv(work, *argv), capsys, flag, "GiB", "memory")
    assert not os.listdir(work / "work")


@pytest.mark.parametrize("app, argv, flag", [
    ("addition", ["--hidden", "10000000"], "--hidden 10000000"),
    ("addition", ["--embed", str(10**12)], "--embed 1000000000000"),
    ("classify", ["--hidden", "10000000"], "--hidden 10000000"),
    ("classify", ["--layers", str(10**10)], "--layers 10000000000"),
    ("gradflow", ["--hidden", "10000000"], "--hidden 10000000"),
    ("gradflow", ["-T", str(10**12)], "-T 1000000000000"),
    ("gradflow", ["--symbols", str(10**12)], "--symbols 1000000000000"),
])
def test_other_apps_refuse_sizes_that_cannot_fit(work, capsys, app, argv, flag):
    assert_user_error([*TINY[app], *argv], capsys, flag, "GiB")


def test_a_text_too_large_to_read_is_refused_before_reading(work, capsys):
    huge = work / "huge.txt"
    huge.touch()
    try:
        os.truncate(huge, 2**40)  # sparse: a terabyte that takes no disk
    except OSError:
        pytest.skip("this file system has no sparse terabyte files")
    assert_user_error(train_argv(work, "--text", str(huge)), capsys, "--text", "GiB")


def test_classify_refuses_a_test_fraction_leaving_no_digit_to_train_or_test(work, capsys):
    for fraction in ("1", "0.0001"):
        assert_user_error([*TINY["classify"], "--test-fraction", fraction], capsys,
                          "--test-fraction", "1797 digits")


# ------------------------------------------------------------------ output paths

@pytest.mark.parametrize("flag", ["--checkpoint", "--json", "--plot"])
def test_charrnn_output_into_a_missing_folder_is_refused_before_training(work, capsys, flag,
                                                                         monkeypatch):
    if flag == "--plot" and not HAS_MATPLOTLIB:
        pytest.skip("--plot needs matplotlib")
    monkeypatch.setattr(charrnn, "build_model", lambda config: pytest.fail("trained"))
    missing = work / "no" / "such" / "out.file"
    assert_user_error(train_argv(work, flag, str(missing)), capsys, flag, "does not exist")


@pytest.mark.parametrize("app", ["addition", "classify", "gradflow"])
@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_other_apps_check_output_paths_before_training(work, capsys, app, flag):
    if flag == "--plot" and not HAS_MATPLOTLIB:
        pytest.skip("--plot needs matplotlib")
    assert_user_error([*TINY[app], flag, str(work / "missing" / "x")], capsys, flag,
                      "does not exist")
    assert_user_error([*TINY[app], flag, str(work)], capsys, flag, "is a folder")


def test_two_outputs_naming_one_file_are_refused(work, capsys):
    same = str(work / "same.out")
    assert_user_error(train_argv(work, "--checkpoint", same, "--json", same), capsys,
                      "the same file as")


def test_a_file_that_is_no_checkpoint_is_not_overwritten(work, capsys):
    notes = work / "notes.txt"
    notes.write_text("a week of notes")
    assert_user_error(train_argv(work, "--checkpoint", str(notes)), capsys, "--checkpoint",
                      "not a pyrnn checkpoint")
    assert_user_error(train_argv(work, "--checkpoint", str(work / "text.py")), capsys,
                      "not overwriting")
    assert notes.read_text() == "a week of notes"


def test_text_that_is_a_folder_is_refused(work, capsys):
    assert_user_error(train_argv(work, "--text", str(work)), capsys, "--text", "is a folder")


# ------------------------------------------------------------------ damaged checkpoints

def flipped(path, target):
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("model/rnn.weight_hh_l0.npy")
    data[info.header_offset + 30 + len(info.filename) + info.compress_size - 1] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def test_sample_and_resume_of_a_checkpoint_with_a_flipped_byte_fail_clearly(trained, capsys):
    damaged = flipped(trained, trained.parent / "damaged.npz")
    assert_user_error(["charrnn", "sample", "--checkpoint", str(damaged)], capsys,
                      "--checkpoint", "damaged array data", "Bad CRC-32")
    before = damaged.read_bytes()
    assert_user_error(train_argv(trained.parent, "--resume", "--checkpoint", str(damaged),
                                 "--steps", "6"), capsys, "--resume", "Bad CRC-32")
    assert damaged.read_bytes() == before


def test_a_file_that_is_no_checkpoint_fails_clearly(work, capsys):
    junk = work / "junk.npz"
    junk.write_bytes(b"not a zip file at all" * 10)
    assert_user_error(["charrnn", "sample", "--checkpoint", str(junk)], capsys,
                      "--checkpoint", "not a readable .npz checkpoint")
    assert_user_error(train_argv(work, "--resume", "--checkpoint", str(junk)), capsys,
                      "--resume", "not a readable")


@pytest.mark.parametrize("change, words", [
    ({"drop": "vocab"}, ["'vocab'", "found nothing"]),
    ({"hidden": -5}, ["'hidden'", "positive integer", "-5"]),
    ({"cell": "transformer"}, ["'cell'", "'transformer'"]),
    ({"vocab": "aab"}, ["'vocab'", "distinct"]),
    ({"hidden": 17}, ["in the checkpoint, but", "in the model"]),  # unlike the stored weights
    ({"app": "addition"}, ["not a charrnn checkpoint"]),
])
def test_malformed_checkpoint_metadata_fails_clearly(trained, capsys, change, words):
    metadata = dict(checkpoint.read_metadata(trained)["metadata"])
    if "drop" in change:
        del metadata[change["drop"]]
    else:
        metadata.update(change)
    bad = edited(trained, trained.parent / "bad.npz", metadata)
    assert_user_error(["charrnn", "sample", "--checkpoint", str(bad)], capsys, "--checkpoint",
                      *words)
    assert_user_error(train_argv(trained.parent, "--resume", "--checkpoint", str(bad),
                                 "--steps", "6"), capsys, "--resume", *words)


def test_sample_refuses_a_checkpoint_with_non_finite_weights(trained, capsys):
    from pyrnn.module import Module

    model = charrnn.build_model(checkpoint.read_metadata(trained)["metadata"])
    checkpoint.load(trained, model)
    model.head.weight[0, 0] = np.nan
    nan_path = trained.parent / "nan.npz"
    checkpoint.save(nan_path, model, metadata=checkpoint.read_metadata(trained)["metadata"])
    assert isinstance(model, Module)
    assert_user_error(["charrnn", "sample", "--checkpoint", str(nan_path)], capsys,
                      "--checkpoint", "not finite")


# ------------------------------------------------------------------ divergence

def test_charrnn_lr_1e308_stops_with_status_3_and_saves_nothing(work, capsys):
    path = work / "c.npz"
    err = assert_user_error(train_argv(work, "--lr", "1e308", "--checkpoint", str(path)),
                            capsys, "diverged", "--lr", "nothing was saved", status=3)
    assert "not finite" in err or "nan" in err
    assert not path.exists()


def test_charrnn_diverging_after_resume_keeps_the_good_checkpoint(trained, capsys):
    before = trained.read_bytes()
    assert_user_error(train_argv(trained.parent, "--resume", "--checkpoint", str(trained),
                                 "--steps", "8", "--lr", "1e308"), capsys,
                      "diverged", "keeps the weights of step 4", status=3)
    assert trained.read_bytes() == before


def test_charrnn_diverging_mid_run_keeps_the_last_validated_checkpoint(work, capsys,
                                                                       monkeypatch):
    calls, real = [], charrnn.cross_entropy

    def nan_from_the_fifth_step(logits, targets, **kwargs):
        loss, d_logits = real(logits, targets, **kwargs)
        if kwargs:  # validation's call (reduction="sum")
            return loss, d_logits
        calls.append(1)
        return (float("nan") if len(calls) >= 5 else loss), d_logits

    monkeypatch.setattr(charrnn, "cross_entropy", nan_from_the_fifth_step)
    path = work / "c.npz"
    assert_user_error(train_argv(work, "--steps", "8", "--checkpoint", str(path)), capsys,
                      "step", "keeps the weights of step", status=3)
    saved = checkpoint.read_metadata(path)["metadata"]
    assert saved["step"] == 4  # validations at steps 2 and 4; the nan at step 5
    model = charrnn.build_model(saved)
    checkpoint.load(path, model)
    assert _common.weights_finite(model)


@pytest.mark.parametrize("app", ["addition", "classify", "gradflow"])
def test_other_apps_stop_at_a_non_finite_loss(work, capsys, app):
    json_path = work / "out.json"
    assert_user_error([*TINY[app], "--lr", "1e308", "--json", str(json_path)], capsys,
                      "diverged", "--lr", status=3)
    assert not json_path.exists()


# ------------------------------------------------------------------ where files go

def test_default_checkpoint_goes_to_the_cache_folder_and_sample_finds_it(work, capsys):
    assert main(train_argv(work)) == 0
    out = capsys.readouterr().out
    default = work / "cache" / "pyrnn" / "charrnn.npz"
    assert default.is_file() and str(default) in out
    assert os.listdir(work / "work") == []  # nothing in the working directory
    assert main(["charrnn", "sample", "--length", "10"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(train_argv(work, "--resume", "--steps", "6")) == 0
    assert "resumed" in capsys.readouterr().out
    assert checkpoint.read_metadata(default)["metadata"]["step"] == 6


def test_gradflow_default_plot_goes_to_the_cache_folder(work, capsys):
    if not HAS_MATPLOTLIB:
        pytest.skip("needs matplotlib")
    argv = [a for a in TINY["gradflow"] if a != "--plot"]
    argv.remove("")
    assert main(argv) == 0
    assert (work / "cache" / "pyrnn" / "gradflow.png").is_file()
    assert os.listdir(work / "work") == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_file_the_apps_write_follows_the_umask(work, capsys, umask, mode):
    outputs = ["c.npz", "c.json"] + (["c.png"] if HAS_MATPLOTLIB else [])
    flags = [f for name, flag in zip(outputs, ["--checkpoint", "--json", "--plot"], strict=False)
             for f in (flag, str(work / name))]
    previous = os.umask(umask)
    try:
        assert main(train_argv(work, *flags)) == 0
    finally:
        os.umask(previous)
    for name in outputs:
        assert stat.S_IMODE((work / name).stat().st_mode) == mode, name


# ------------------------------------------------------------------ sampling

def test_sample_into_a_closed_pipe_exits_quietly(trained):
    env = child_env()
    reader = subprocess.Popen(
        [sys.executable, "-m", "pyrnn", "charrnn", "sample", "--checkpoint", str(trained),
         "--length", "1000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first_line = reader.stdout.readline()
    reader.stdout.close()  # as `| head -1` does
    status = reader.wait(timeout=120)
    err = reader.stderr.read().decode()
    reader.stderr.close()
    assert first_line.startswith(b"def")
    assert err == "" and status == 141


def test_a_tiny_temperature_samples_the_likeliest_characters(trained, capsys):
    assert main(["charrnn", "sample", "--checkpoint", str(trained), "--length", "30",
                 "--temperature", "1e-300"]) == 0
    greedy = capsys.readouterr().out
    assert main(["charrnn", "sample", "--checkpoint", str(trained), "--length", "30",
                 "--temperature", "1e-300", "--seed", "5"]) == 0
    assert capsys.readouterr().out == greedy  # no draw left to chance


def test_help_lists_the_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "exit status" in out and "diverged" in out and "141" in out


# ------------------------------------------------------------------ bench

@pytest.mark.parametrize("argv, words", [
    (["--threads", "1", "5000"], ["--threads", "at most 1024", "5000"]),
    (["--out", "{file}"], ["--out", "is a file, not a folder"]),
    (["--out", "{file}/results"], ["--out", "is a file, not a folder"]),
])
def test_bench_refuses_thread_counts_and_out_folders_before_measuring(work, capsys, argv, words):
    sys.path.insert(0, str(REPO))
    try:
        from bench import run as bench_run
    finally:
        sys.path.remove(str(REPO))
    (work / "a_file").write_text("x")
    argv = [arg.format(file=work / "a_file") for arg in ["--quick", *argv]]
    assert bench_run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(word in err for word in words), err
