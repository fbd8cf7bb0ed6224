"""Checkpoint files a user did not expect: flipped bytes, headers that lie about sizes, symbolic
links, the umask, temporary files left by killed saves."""

import json
import os
import signal
import stat
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from _child import child_env

from pyrnn import checkpoint
from pyrnn.layers import Linear
from pyrnn.module import Module
from pyrnn.optim import Adam

REPO = Path(__file__).resolve().parents[1]
LARGE = 1_500_000_000  # bytes a lying member declares: more than a test may allocate


class Head(Module):
    def __init__(self, seed=0):
        super().__init__()
        self.head = Linear(8, 4, seed=seed)


@pytest.fixture
def saved(tmp_path):
    model = Head()
    optimizer = Adam(model, lr=0.01)
    for _, _, grad in model.named_parameters():
        grad[...] = 0.5
    optimizer.step()
    path = tmp_path / "head.npz"
    checkpoint.save(path, model, optimizer, metadata={"size": 8})
    return path


def members(path):
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def write_members(path, contents, method=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        for name, data in contents.items():
            archive.writestr(name, data)
    return path


def npy_header(descr, shape):
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


def meta_member(header):
    text = json.dumps(header).encode()
    return npy_header("|u1", (len(text),)) + text


def assert_refused_without_allocating(path, match, model=None, optimizer=None):
    model = model or Head(seed=3)
    before = {name: value.copy() for name, value, _ in model.named_parameters()}
    tracemalloc.start()
    try:
        with pytest.raises((ValueError, KeyError), match=match):
            checkpoint.load(path, model, optimizer)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000, f"load allocated {peak:,} bytes before refusing"
    for name, value, _ in model.named_parameters():
        np.testing.assert_array_equal(value, before[name])


def test_flipped_byte_in_any_member_is_refused(saved, tmp_path):
    data = saved.read_bytes()
    with zipfile.ZipFile(saved) as archive:
        infos = archive.infolist()
    for info in infos:
        damaged = bytearray(data)
        last = info.header_offset + 30 + len(info.filename) + info.compress_size - 1
        damaged[last] ^= 0xFF  # the member's last data byte
        path = tmp_path / "flipped.npz"
        path.write_bytes(bytes(damaged))
        model = Head(seed=5)
        optimizer = Adam(model) if info.filename.startswith("optim/") else None
        with pytest.raises(ValueError, match=str(path)):
            checkpoint.load(path, model, optimizer)


def test_npy_header_declaring_a_huge_array_is_refused_before_reading(saved, tmp_path):
    contents = members(saved)
    contents["model/head.weight.npy"] = npy_header("<f4", (LARGE // 4,)) + bytes(128)
    path = write_members(tmp_path / "lying_npy.npz", contents)
    assert path.stat().st_size < 10_000
    assert_refused_without_allocating(path, "damaged array data.*head.weight.*declares")


def test_header_and_npy_agreeing_on_a_huge_array_are_refused_for_the_model(tmp_path):
    saved = tmp_path / "model_only.npz"
    checkpoint.save(saved, Head())
    header = checkpoint.read_metadata(saved)
    header["parameters"]["head.weight"]["shape"] = [LARGE // 4]
    contents = members(saved)
    contents["meta.json.npy"] = meta_member(header)
    contents["model/head.weight.npy"] = npy_header("<f4", (LARGE // 4,)) + bytes(128)
    path = write_members(tmp_path / "lying_both.npz", contents)
    assert_refused_without_allocating(path, r"parameter 'head.weight' is float32 \(375000000,\)")


def test_zip_directory_disagreeing_with_the_npy_header_is_refused(saved, tmp_path):
    contents = members(saved)
    contents["model/head.weight.npy"] += bytes(4096)  # 4 kB that the .npy header does not declare
    path = write_members(tmp_path / "padded.npz", contents)
    assert_refused_without_allocating(path, "holds .* bytes, but its .npy header declares")


def test_deflated_member_declaring_an_impossible_ratio_is_refused(saved, tmp_path):
    path = write_members(tmp_path / "deflated.npz", members(saved), method=zipfile.ZIP_DEFLATED)
    checkpoint.load(path, Head(seed=1))  # deflated members are fine while they tell the truth
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("model/head.weight.npy")
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:  # a central directory record: its uncompressed size at offset 24
        name_length = int.from_bytes(data[at + 28:at + 30], "little")
        if data[at + 46:at + 46 + name_length] == info.filename.encode():
            data[at + 24:at + 28] = (info.compress_size * 5000).to_bytes(4, "little")
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))
    assert_refused_without_allocating(path, "declares .* bytes in .* compressed ones")


def test_meta_json_declaring_a_huge_header_is_refused(saved, tmp_path):
    contents = members(saved)
    contents["meta.json.npy"] = npy_header("|u1", (LARGE,)) + bytes(64)
    path = write_members(tmp_path / "huge_meta.npz", contents)
    assert_refused_without_allocating(path, "unreadable meta.json .*declares")
    with pytest.raises(ValueError, match="unreadable meta.json"):
        checkpoint.read_metadata(path)


def test_optimizer_buffer_declared_unlike_its_parameter_is_refused(saved, tmp_path):
    header = checkpoint.read_metadata(saved)
    header["optimizer"]["buffers"]["head.bias"]["exp_avg"]["shape"] = [LARGE // 4]
    contents = members(saved)
    contents["meta.json.npy"] = meta_member(header)
    path = write_members(tmp_path / "buffer.npz", contents)
    model = Head(seed=2)
    assert_refused_without_allocating(path, "exp_avg is declared .* but its parameter",
                                      model, Adam(model))


def test_saving_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path):
    elsewhere = tmp_path / "store"
    elsewhere.mkdir()
    target = elsewhere / "real.npz"
    checkpoint.save(target, Head(seed=0))
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    model = Head(seed=9)
    checkpoint.save(link, model)
    assert link.is_symlink() and os.readlink(link) == str(target)
    restored = Head(seed=1)
    checkpoint.load(target, restored)
    np.testing.assert_array_equal(restored.head.weight, model.head.weight)
    assert sorted(os.listdir(tmp_path)) == ["link.npz", "store"]
    assert os.listdir(elsewhere) == ["real.npz"]


def test_saving_through_a_dangling_symlink_creates_its_target(tmp_path):
    target = tmp_path / "later.npz"
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    checkpoint.save(link, Head())
    assert link.is_symlink() and target.is_file()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_checkpoint_gets_the_mode_open_would_give_it(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        checkpoint.save(tmp_path / "m.npz", Head())
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "m.npz").stat().st_mode) == mode


def test_replacing_a_checkpoint_keeps_its_mode(tmp_path):
    path = tmp_path / "m.npz"
    checkpoint.save(path, Head())
    path.chmod(0o640)
    previous = os.umask(0o077)
    try:
        checkpoint.save(path, Head(seed=1))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_next_save_removes_temp_files_of_killed_saves_of_that_path_only(tmp_path):
    path = tmp_path / "m.npz"
    stale = [tmp_path / ".m.npz.k1ll3d_x.tmp", tmp_path / ".m.npz.0123abcd.tmp"]
    kept = [tmp_path / ".other.npz.0123abcd.tmp",  # another target's
            tmp_path / ".m.npz.notours.tmp",  # not a name pyrnn makes
            tmp_path / "m.npz.0123abcd.tmp"]
    for file in stale + kept:
        file.write_bytes(b"x" * 1000)
    checkpoint.save(path, Head())
    assert not any(file.exists() for file in stale)
    assert all(file.exists() for file in kept)


def test_a_save_killed_mid_write_leaves_a_temp_file_the_next_save_removes(tmp_path):
    child = (
        "import os, signal, sys\n"
        "from pyrnn import checkpoint\n"
        "checkpoint._locked_temp(sys.argv[1], 'm.npz')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = child_env()
    result = subprocess.run([sys.executable, "-c", child, str(tmp_path)], env=env, timeout=60)
    assert result.returncode == -signal.SIGKILL
    assert len(list(tmp_path.glob(".m.npz.*.tmp"))) == 1
    checkpoint.save(tmp_path / "m.npz", Head())
    assert os.listdir(tmp_path) == ["m.npz"]


@pytest.mark.skipif(checkpoint.fcntl is None, reason="temp files are locked with flock")
def test_a_save_in_progress_keeps_its_temp_file(tmp_path):
    handle, temp_path = checkpoint._locked_temp(str(tmp_path), "m.npz")
    try:
        checkpoint.save(tmp_path / "m.npz", Head())
        assert os.path.exists(temp_path)
    finally:
        os.close(handle)
    checkpoint.save(tmp_path / "m.npz", Head())
    assert not os.path.exists(temp_path)


def test_saving_into_a_missing_folder_names_the_path_not_a_temp_file(tmp_path):
    path = tmp_path / "missing" / "m.npz"
    with pytest.raises(FileNotFoundError, match=f"{path}: cannot save, no folder") as raised:
        checkpoint.save(path, Head())
    assert ".tmp" not in str(raised.value)
