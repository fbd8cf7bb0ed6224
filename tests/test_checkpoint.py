"""Checkpoints: round trips that resume training exactly, and damaged or mismatched files that
raise a clear error without touching the model or optimizer."""

import io
import json
import os
import zipfile

import numpy as np
import pytest

from pyrnn import checkpoint
from pyrnn.layers import Embedding, Linear
from pyrnn.module import Module
from pyrnn.optim import SGD, Adam


class TwoLayers(Module):
    def __init__(self, dtype=np.float64, seed=0, dim=4):
        super().__init__()
        self.embed = Embedding(6, dim, dtype=dtype, seed=seed)
        self.head = Linear(dim, 3, dtype=dtype, seed=seed + 1)


def train_steps(model, optimizer, steps, seed):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        for _, _, grad in model.named_parameters():
            grad[...] = rng.standard_normal(grad.shape)
        optimizer.step()


def snapshot(model, optimizer=None):
    params = model.state_dict()
    if optimizer is None:
        return params, None
    return params, optimizer.state_dict()


def assert_unchanged(model, optimizer, before):
    params, optimizer_state = before
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, params[name])
    if optimizer is not None:
        after = optimizer.state_dict()
        assert after["step"] == optimizer_state["step"]
        assert after["hyperparams"] == optimizer_state["hyperparams"]
        assert set(after["state"]) == set(optimizer_state["state"])
        for name, buffers in after["state"].items():
            assert set(buffers) == set(optimizer_state["state"][name])
            for buffer, array in buffers.items():
                np.testing.assert_array_equal(array, optimizer_state["state"][name][buffer])


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of a model and its Adam state after three steps."""
    model = TwoLayers()
    optimizer = Adam(model, lr=0.01, amsgrad=True)
    train_steps(model, optimizer, 3, seed=0)
    path = tmp_path / "model.npz"
    checkpoint.save(path, model, optimizer, metadata={"hidden_size": 4, "note": "unit test"})
    return path, model, optimizer


def test_round_trip_resumes_training_identically(saved):
    path, model, optimizer = saved
    restored = TwoLayers(seed=9)
    restored_optimizer = Adam(restored, lr=0.5)
    metadata = checkpoint.load(path, restored, restored_optimizer)
    assert metadata == {"hidden_size": 4, "note": "unit test"}
    assert restored_optimizer.lr == 0.01 and restored_optimizer.amsgrad is True
    train_steps(model, optimizer, 3, seed=1)
    train_steps(restored, restored_optimizer, 3, seed=1)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(restored.state_dict()[name], value)


def test_file_is_one_npz_with_pytorch_names_and_json_header(saved):
    path, model, _ = saved
    with np.load(path, allow_pickle=False) as npz:
        names = set(npz.files)
        header = json.loads(npz["meta.json"].tobytes().decode("utf-8"))
    assert {"model/embed.weight", "model/head.weight", "model/head.bias"} <= names
    assert "optim/head.bias/max_exp_avg_sq" in names
    assert header["format_version"] == checkpoint.FORMAT_VERSION
    assert header["model_class"] == "TwoLayers"
    assert header["parameters"]["head.weight"] == {"shape": [3, 4], "dtype": "<f8"}
    assert header["optimizer"]["type"] == "Adam" and header["optimizer"]["step"] == 3
    assert checkpoint.read_metadata(path) == header
    assert [entry.name for entry in os.scandir(path.parent)] == ["model.npz"]  # no temp file


def test_model_only_checkpoint_loads_without_optimizer(tmp_path):
    model = TwoLayers(dtype=np.float32)
    path = tmp_path / "weights.ckpt"
    checkpoint.save(str(path), model)
    assert path.exists()  # written at exactly the given path, no suffix added
    restored = TwoLayers(dtype=np.float32, seed=3)
    assert checkpoint.load(path, restored) == {}
    np.testing.assert_array_equal(restored.head.weight, model.head.weight)
    assert checkpoint.read_metadata(path)["optimizer"] is None


def test_checkpoint_with_optimizer_state_loads_into_model_alone(saved):
    path, model, _ = saved
    restored = TwoLayers(seed=4)
    checkpoint.load(path, restored)
    np.testing.assert_array_equal(restored.embed.weight, model.embed.weight)


def fresh_target():
    model = TwoLayers(seed=7)
    optimizer = Adam(model, lr=0.2)
    train_steps(model, optimizer, 1, seed=5)
    return model, optimizer


def expect_load_error(path, error, message, model=None, optimizer=None):
    if model is None:
        model, optimizer = fresh_target()
    before = snapshot(model, optimizer)
    with pytest.raises(error, match=message) as raised:
        checkpoint.load(path, model, optimizer)
    assert str(path) in str(raised.value)
    assert_unchanged(model, optimizer, before)


def test_random_bytes_raise_value_error(tmp_path):
    path = tmp_path / "random.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    expect_load_error(path, ValueError, "not a readable .npz checkpoint")


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.99])
def test_truncated_file_raises_value_error(saved, tmp_path, fraction):
    path, _, _ = saved
    data = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: int(len(data) * fraction)])
    expect_load_error(truncated, ValueError, "not a readable|damaged|unreadable")


def test_flipped_bytes_in_array_data_raise_value_error(saved, tmp_path):
    path, _, _ = saved
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = archive.getinfo("model/head.weight.npy")
    # Past the member's local header and .npy header: inside the float data.
    offset = member.header_offset + 30 + len(member.filename) + 128 + 8
    data[offset:offset + 4] = bytes(255 - byte for byte in data[offset:offset + 4])
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(bytes(data))
    expect_load_error(damaged, ValueError, "damaged array data")


def rewrite(source, target, drop=(), replace=None):
    """Copy the .npz at source to target without some members or with others replaced."""
    replace = replace or {}
    with np.load(source, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files if key not in drop}
    arrays.update(replace)
    np.savez(target, **arrays)
    return target


def edited_header(path, **changes):
    header = checkpoint.read_metadata(path)
    header.update(changes)
    return {"meta.json": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}


def test_missing_array_raises_key_error(saved, tmp_path):
    path, _, _ = saved
    broken = rewrite(path, tmp_path / "missing.npz", drop=("model/head.bias",))
    expect_load_error(broken, KeyError, r"missing \['model/head.bias'\]")


def test_array_disagreeing_with_header_raises_value_error(saved, tmp_path):
    path, _, _ = saved
    broken = rewrite(path, tmp_path / "shape.npz", replace={"model/head.bias": np.zeros(5)})
    expect_load_error(broken, ValueError, "model/head.bias.*declares")


def test_wrong_shape_model_raises_value_error(saved):
    path, _, _ = saved
    model = TwoLayers(dim=5)
    optimizer = Adam(model)
    expect_load_error(path, ValueError, r"parameter 'embed.weight' is float64 \(6, 4\)",
                      model, optimizer)


def test_wrong_dtype_model_raises_value_error(saved):
    path, _, _ = saved
    model = TwoLayers(dtype=np.float32)
    expect_load_error(path, ValueError, "float64 .* float32", model, None)


def test_wrong_model_class_raises_value_error(saved):
    path, _, _ = saved
    model = Linear(4, 3, dtype=np.float64)
    expect_load_error(path, ValueError, "holds a 'TwoLayers' model, not a 'Linear'", model, None)


def test_same_class_with_other_parameters_raises_key_error(tmp_path):
    path = tmp_path / "linear.npz"
    checkpoint.save(path, Linear(4, 3, dtype=np.float64, seed=0))
    model = Linear(4, 3, bias=False, dtype=np.float64, seed=1)
    expect_load_error(path, KeyError, r"unexpected \['bias'\]", model, None)


def test_wrong_optimizer_type_raises_value_error(saved):
    path, _, _ = saved
    model = TwoLayers(seed=2)
    optimizer = SGD(model, lr=0.1, momentum=0.9)
    expect_load_error(path, ValueError, "for 'Adam', not 'SGD'", model, optimizer)


def test_missing_optimizer_state_raises_key_error(tmp_path):
    model = TwoLayers()
    path = tmp_path / "model_only.npz"
    checkpoint.save(path, model)
    expect_load_error(path, KeyError, "no optimizer state")


def test_newer_format_version_raises_value_error(saved, tmp_path):
    path, _, _ = saved
    broken = rewrite(path, tmp_path / "future.npz", replace=edited_header(path, format_version=2))
    expect_load_error(broken, ValueError, "format version 2 is not supported")
    with pytest.raises(ValueError, match="format version 2"):
        checkpoint.read_metadata(broken)


def test_npz_without_header_raises_value_error(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, weights=np.zeros(3))
    expect_load_error(path, ValueError, "no 'meta.json' entry")


def test_pickled_object_array_is_refused(saved, tmp_path):
    path, _, _ = saved
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["model/head.bias"] = np.array([{"evil": 1}, None, 3], dtype=object)
    broken = tmp_path / "pickled.npz"
    np.savez(broken, **arrays)
    expect_load_error(broken, ValueError, "damaged array data")


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        checkpoint.load(tmp_path / "nothing.npz", TwoLayers())


def test_failed_save_keeps_the_previous_file_and_leaves_no_temp(saved, monkeypatch):
    path, model, optimizer = saved
    original = path.read_bytes()

    def failing_savez(file, **arrays):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, model, optimizer)
    assert path.read_bytes() == original
    assert [entry.name for entry in os.scandir(path.parent)] == ["model.npz"]


def test_save_rejects_bad_arguments(tmp_path):
    model = TwoLayers()
    with pytest.raises(TypeError, match="metadata must be JSON-serialisable"):
        checkpoint.save(tmp_path / "a.npz", model, metadata={"array": np.zeros(2)})
    with pytest.raises(TypeError, match="metadata must be a mapping"):
        checkpoint.save(tmp_path / "a.npz", model, metadata=[1])
    with pytest.raises(TypeError, match="model must be a pyrnn Module"):
        checkpoint.save(tmp_path / "a.npz", {"w": np.zeros(2)})
    with pytest.raises(TypeError, match="path must be a str"):
        checkpoint.save(io.BytesIO(), model)
    other = Adam(TwoLayers(seed=1))
    with pytest.raises(ValueError, match="not the model's parameter"):
        checkpoint.save(tmp_path / "a.npz", model, other)
    assert not any(tmp_path.iterdir())


def test_lstm_checkpoint_arrays_load_into_the_same_torch_model(tmp_path):
    """The file's model/<name> arrays are a valid strict state dict for the torch twin."""
    modules = pytest.importorskip("pyrnn.modules")
    torch = pytest.importorskip("torch")

    class Tagger(Module):
        def __init__(self, seed):
            super().__init__()
            self.rnn = modules.LSTM(3, 5, num_layers=2, bidirectional=True, seed=seed)
            self.head = Linear(10, 4, seed=seed + 1)

    model = Tagger(seed=0)
    path = tmp_path / "tagger.npz"
    checkpoint.save(path, model, Adam(model), metadata={"layers": 2})
    reference = torch.nn.ModuleDict({
        "rnn": torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True),
        "head": torch.nn.Linear(10, 4),
    })
    with np.load(path, allow_pickle=False) as npz:
        state = {key[len("model/"):]: torch.from_numpy(npz[key])
                 for key in npz.files if key.startswith("model/")}
    reference.load_state_dict(state, strict=True)
    restored = Tagger(seed=5)
    checkpoint.load(path, restored, Adam(restored))
    np.testing.assert_array_equal(restored.rnn.params["weight_hh_l1_reverse"],
                                  model.rnn.params["weight_hh_l1_reverse"])


def test_optimizer_of_another_model_is_refused_before_anything_is_read(saved):
    path, _, _ = saved
    model, _ = fresh_target()
    foreign = Adam(TwoLayers(seed=9))
    before = snapshot(model, foreign)
    with pytest.raises(ValueError, match="build the optimizer on this model"):
        checkpoint.load(path, model, foreign)
    assert_unchanged(model, foreign, before)


def zip_members(path):
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def test_zip_entries_claiming_unknown_compression_or_encryption_raise_value_error(saved, tmp_path):
    path, _, _ = saved
    data = path.read_bytes()
    # Each central-directory record ("PK\1\2") holds its flags at offset 8 and its method at 10.
    for label, offset, value in (("method", 10, 99), ("encrypted", 8, 1)):
        damaged = bytearray(data)
        at = damaged.find(b"PK\x01\x02")
        while at >= 0:
            damaged[at + offset:at + offset + 2] = value.to_bytes(2, "little")
            at = damaged.find(b"PK\x01\x02", at + 4)
        broken = tmp_path / f"{label}.npz"
        broken.write_bytes(bytes(damaged))
        expect_load_error(broken, ValueError, "unreadable meta.json")
        with pytest.raises(ValueError, match=str(broken)):
            checkpoint.read_metadata(broken)


def test_npy_header_with_an_impossible_shape_raises_value_error(saved, tmp_path):
    path, _, _ = saved
    members = zip_members(path)
    header = b"{'descr': '<f8', 'fortran_order': False, 'shape': (1099511627776,), }"
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    members["model/head.bias.npy"] = (b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little")
                                      + header + bytes(64))
    broken = tmp_path / "huge.npz"
    with zipfile.ZipFile(broken, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    expect_load_error(broken, ValueError, "damaged array data")


def test_save_refuses_a_directory_or_an_empty_path(tmp_path):
    for bad, what in ((tmp_path, "a directory"), ("", "an empty path")):
        with pytest.raises(ValueError, match=f"path must name a file, got {what}"):
            checkpoint.save(bad, TwoLayers())
    assert os.listdir(tmp_path) == []
