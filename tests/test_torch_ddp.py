"""Data-parallel training with pyrnn.torch's layers: DistributedDataParallel over gloo with 2
processes of 1 thread each averages gradients equal to one process's on the combined batch; the
char-RNN application's --distributed mode trains and checkpoints."""

from __future__ import annotations

import json
import os
import socket
import sys

import numpy as np
import pytest

import pyrnn

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from pyrnn.apps import charrnn, charrnn_torch  # noqa: E402
from pyrnn.apps._common import AppError  # noqa: E402
from pyrnn.cli import build_parser, main  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not pyrnn.backend_info()["cpp_available"],
                       reason="pyrnn.torch runs the C++ core"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
]

CONFIG = {"app": "charrnn", "vocab": "abcdefghij", "cell": "lstm", "embed": 6, "hidden": 16,
          "layers": 2, "dropout": 0.0, "seed": 3, "step": 0}
T, B = 9, 4  # B streams in all, B / 2 per rank


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 10, (T + 1, B)))
    return ids[:-1], ids[1:]


def gradients(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor
              ) -> list[torch.Tensor]:
    logits, _ = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 10), targets.reshape(-1))
    loss.backward()
    return [p.grad for p in model.parameters()]


def _rank_gradients(rank: int, port: int, out: str) -> None:
    """One rank: its half of the streams through DistributedDataParallel; rank 0 saves the
    averaged gradients."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        model = charrnn_torch.torch_model(CONFIG)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ids, targets = batch()
        half = slice(rank * B // 2, (rank + 1) * B // 2)
        grads = gradients(ddp, ids[:, half], targets[:, half])
        if rank == 0:  # with whether this rank ran pyrnn's core, as the test process does
            torch.save({"grads": [g.clone() for g in grads],
                        "cpp": pyrnn.backend_info()["cpp_available"]}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without torch's teardown: freeing the DDP reducer joins gloo's worker threads while
    # holding the GIL, and a worker still freeing its last allreduce waits for the GIL (seen as
    # a hang in about one run in three here). Both ranks are past the barrier, the file is written.
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_averages_gradients_equal_to_one_process_on_the_combined_batch(tmp_path, monkeypatch):
    # The ranks start with this process's sys.path, where the bench tests put the repository
    # first; they must import the pyrnn this process imported (CI's clean clone has no compiled
    # core in its tree).
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(pyrnn.__file__)))
    monkeypatch.setattr(sys, "path", [package_parent, *sys.path])
    out = str(tmp_path / "grads.pt")
    mp.spawn(_rank_gradients, args=(free_port(), out), nprocs=2, join=True)
    saved = torch.load(out)
    assert saved["cpp"], "a rank imported a pyrnn without its C++ core"
    averaged = saved["grads"]
    model = charrnn_torch.torch_model(CONFIG)
    assert type(model.rnn).__module__ == "pyrnn.torch.modules"
    combined = gradients(model, *batch())
    names = [n for n, _ in model.named_parameters()]
    for name, got, want in zip(names, averaged, combined, strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), name


def test_torch_model_starts_from_charrnns_numpy_weights():
    model = charrnn_torch.torch_model(CONFIG)
    numpy_model = charrnn.build_model(CONFIG)
    ids, _ = batch()
    want, _ = numpy_model(ids.numpy())
    got, _ = model(ids)
    assert np.allclose(got.detach().numpy(), want, atol=1e-5)


def test_distributed_charrnn_trains_as_one_process_and_writes_charrnns_checkpoint(tmp_path,
                                                                                   capsys):
    """A world of one (no torchrun): the same numbers as the NumPy app, and a checkpoint that
    charrnn sample and the NumPy app's --resume read."""
    common = ["charrnn", "train", "--steps", "6", "--eval-every", "3", "--hidden", "16",
              "--embed", "8", "--corpus-chars", "20000", "--seq-len", "16", "--batch", "4",
              "--sample-length", "10", "--no-progress", "--threads", "1"]
    results = {}
    for mode in ("numpy", "distributed"):
        path = tmp_path / f"{mode}.npz"
        json_path = tmp_path / f"{mode}.json"
        flags = ["--distributed"] if mode == "distributed" else []
        assert main([*common, *flags, "--checkpoint", str(path), "--json", str(json_path)]) == 0
        results[mode] = json.loads(json_path.read_text())
    assert results["distributed"]["processes"] == 1
    assert results["distributed"]["rnn_layers"] == "pyrnn.torch"
    assert abs(results["distributed"]["val_bits_per_char"]
               - results["numpy"]["val_bits_per_char"]) < 1e-3
    assert main(["charrnn", "sample", "--checkpoint", str(tmp_path / "distributed.npz"),
                 "--length", "5"]) == 0
    assert main([*common[:3], "8", *common[4:], "--resume", "--checkpoint",
                 str(tmp_path / "distributed.npz")]) == 0
    capsys.readouterr()


def test_distributed_rejects_a_batch_the_ranks_cannot_share(monkeypatch):
    monkeypatch.setattr(charrnn_torch, "init_process_group", lambda: (0, 3))  # rank 0 of 3
    monkeypatch.setattr(charrnn_torch.dist, "destroy_process_group", lambda: None)
    args = build_parser().parse_args(["charrnn", "train", "--distributed", "--batch", "4"])
    with pytest.raises(AppError, match="--batch 4 must be divisible by the number of "
                                       "processes, 3"):
        charrnn_torch.train(args)


@pytest.fixture(autouse=True)
def _no_torchrun_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    yield
    assert "RANK" not in os.environ


def test_distributed_refuses_the_numpy_backend(tmp_path, capsys):
    assert main(["charrnn", "train", "--distributed", "--backend", "numpy", "--steps", "1",
                 "--checkpoint", str(tmp_path / "c.npz")]) == 2
    assert "--backend numpy: --distributed trains with pyrnn.torch's layers" in (
        capsys.readouterr().err)
    assert not (tmp_path / "c.npz").exists()
