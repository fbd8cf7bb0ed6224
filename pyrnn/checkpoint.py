"""Checkpoints: a model (and optionally its optimizer) in one ``.npz`` file, never pickled.

The file holds ``model/<parameter name>`` arrays (PyTorch's names, e.g.
``model/rnn.weight_ih_l0``), ``optim/<parameter name>/<buffer>`` arrays, and ``meta.json``: a
UTF-8 JSON document stored as a uint8 array with the format version, the model's class name,
every parameter's shape and dtype, the optimizer's class, hyper-parameters and step count, and
the caller's own ``metadata`` (for example the sizes needed to rebuild the model).

``save`` writes a temporary file next to the target and renames it over the target, so a
crash never leaves a half-written checkpoint. ``load`` reads with ``allow_pickle=False`` and
checks everything against the file's own header and against the model and optimizer before
copying anything in: a corrupt, truncated or mismatched file raises ValueError or KeyError
naming the path and the problem, and leaves the model and optimizer untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np

from .module import Module
from .optim import Optimizer

FORMAT = "pyrnn-checkpoint"
FORMAT_VERSION = 1
META_KEY = "meta.json"
_HEADER_KEYS = {"format", "format_version", "model_class", "parameters", "optimizer", "metadata"}
_OPTIMIZER_KEYS = {"type", "hyperparams", "step", "buffers"}


def save(path: str | os.PathLike, model: Module, optimizer: Optimizer | None = None,
         metadata: Mapping[str, object] | None = None) -> None:
    """Write ``model``'s parameters (and ``optimizer``'s state) to ``path`` atomically.

    ``metadata`` is any JSON-serialisable mapping, returned by ``load`` and ``read_metadata``.
    The file is written exactly at ``path`` (no suffix is added).
    """
    path = _check_path(path)
    if path == "" or os.path.isdir(path):
        what = "a directory" if path else "an empty path"
        raise ValueError(f"path must name a file, got {what}: {path!r}")
    params = _parameters(model)
    arrays = {f"model/{name}": value for name, value in params.items()}
    optimizer_header = None
    if optimizer is not None:
        _check_optimizer_owns(optimizer, params)
        optimizer_header, buffers = _optimizer_entries(optimizer)
        arrays.update(buffers)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "parameters": {name: _describe(value) for name, value in params.items()},
        "optimizer": optimizer_header,
        "metadata": _check_metadata(metadata),
    }
    arrays[META_KEY] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    _write_atomically(path, arrays)


def load(path: str | os.PathLike, model: Module, optimizer: Optimizer | None = None
         ) -> dict[str, object]:
    """Restore ``model`` (and ``optimizer``, which the file must then hold) from ``path``.

    Returns the ``metadata`` mapping given to ``save``. Everything is checked first; on any
    error nothing is changed.
    """
    path = _check_path(path)
    params = _parameters(model)
    if optimizer is not None:  # as save requires: restoring another model's optimizer is a mix-up
        _check_optimizer_owns(optimizer, params)
    header, arrays = _read(path)
    try:
        model_state = _model_state(header, arrays, model)
        optimizer_state = None
        if optimizer is not None:
            optimizer_state = _optimizer_state(header, arrays)
            optimizer.check_state_dict(optimizer_state)
    except (KeyError, ValueError, TypeError) as error:
        raise type(error)(f"{path}: {_message(error)}") from error
    model.load_state_dict(model_state)
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    return header["metadata"]


def read_metadata(path: str | os.PathLike) -> dict[str, object]:
    """The checkpoint's header: ``format_version``, ``model_class``, ``parameters`` (name ->
    shape and dtype), ``optimizer`` (type, hyper-parameters, step, or None) and ``metadata``
    (what the caller passed to ``save``). Reads only the header, not the arrays."""
    path = _check_path(path)
    with _open_npz(path) as npz:
        return _header(path, npz)


def _check_path(path: object) -> str:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _parameters(model: object) -> dict[str, np.ndarray]:
    if not isinstance(model, Module):
        raise TypeError(f"model must be a pyrnn Module, got {type(model).__name__}")
    return {name: value for name, value, _ in model.named_parameters()}


def _message(error: Exception) -> str:
    return str(error.args[0]) if error.args else type(error).__name__


def _describe(array: np.ndarray) -> dict[str, object]:
    return {"shape": list(array.shape), "dtype": array.dtype.str}


def _check_metadata(metadata: object) -> dict[str, object]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping or None, got {type(metadata).__name__}")
    try:
        return json.loads(json.dumps(dict(metadata)))
    except (TypeError, ValueError) as error:
        raise TypeError(f"metadata must be JSON-serialisable: {error}") from error


def _check_optimizer_owns(optimizer: object, params: dict[str, np.ndarray]) -> None:
    """The optimizer must update exactly this model's arrays, under the same names."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a pyrnn Optimizer, got {type(optimizer).__name__}")
    for name, param, _ in optimizer._entries:
        if params.get(name) is not param:
            raise ValueError(
                f"optimizer parameter {name!r} is not the model's parameter of that name; "
                "build the optimizer on this model"
            )
    if len(optimizer._entries) != len(params):
        raise ValueError("optimizer does not cover every parameter of the model")


def _optimizer_entries(optimizer: Optimizer) -> tuple[dict, dict[str, np.ndarray]]:
    state = optimizer.state_dict()
    header = {key: state[key] for key in ("type", "hyperparams", "step")}
    header["buffers"] = {
        name: {buffer: _describe(array) for buffer, array in buffers.items()}
        for name, buffers in state["state"].items()
    }
    arrays = {
        f"optim/{name}/{buffer}": array
        for name, buffers in state["state"].items()
        for buffer, array in buffers.items()
    }
    return header, arrays


def _write_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    handle, temp_path = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


# Errors a damaged .npz can raise from np.load or while reading a member: besides broken data, a
# zip entry may claim an unknown compression (NotImplementedError) or encryption (RuntimeError),
# and an .npy header a shape too large to allocate (MemoryError).
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError,
                NotImplementedError, RuntimeError, MemoryError)


def _open_npz(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        npz = np.load(path, allow_pickle=False)
    except _READ_ERRORS as error:
        raise ValueError(f"{path}: not a readable .npz checkpoint ({error})") from error
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single .npy array, not a pyrnn .npz checkpoint")
    return npz


def _read(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and every array, read eagerly so that damage shows up here."""
    with _open_npz(path) as npz:
        header = _header(path, npz)
        try:
            arrays = {key: npz[key] for key in npz.files if key != META_KEY}
        except _READ_ERRORS as error:
            raise ValueError(f"{path}: damaged array data ({error})") from error
    try:
        _check_arrays_match_header(header, arrays)
    except (KeyError, ValueError) as error:
        raise type(error)(f"{path}: {_message(error)}") from error
    return header, arrays


def _header(path: str, npz) -> dict:
    if META_KEY not in npz.files:
        raise ValueError(f"{path}: not a pyrnn checkpoint (no {META_KEY!r} entry)")
    try:
        raw = npz[META_KEY]
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError(f"{META_KEY} must be a 1-D uint8 array, got {raw.dtype} {raw.shape}")
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (*_READ_ERRORS, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: unreadable {META_KEY} ({error})") from error
    try:
        _check_header(header)
    except (KeyError, ValueError) as error:
        raise type(error)(f"{path}: {_message(error)}") from error
    return header


def _check_header(header: object) -> None:
    if not isinstance(header, dict):
        raise ValueError(f"{META_KEY} must hold a JSON object, got {type(header).__name__}")
    if header.get("format") != FORMAT:
        raise ValueError(f"not a pyrnn checkpoint (format {header.get('format')!r})")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint format version {version!r} is not supported (this pyrnn reads "
            f"version {FORMAT_VERSION})"
        )
    missing = sorted(_HEADER_KEYS - set(header))
    if missing:
        raise KeyError(f"{META_KEY} lacks {missing}")
    if not isinstance(header["parameters"], dict) or not isinstance(header["metadata"], dict):
        raise ValueError(f"{META_KEY} 'parameters' and 'metadata' must be JSON objects")
    optimizer = header["optimizer"]
    if optimizer is not None:
        if not isinstance(optimizer, dict) or set(optimizer) != _OPTIMIZER_KEYS:
            raise ValueError(
                f"{META_KEY} 'optimizer' must be null or an object with keys "
                f"{sorted(_OPTIMIZER_KEYS)}"
            )
        if not isinstance(optimizer["buffers"], dict) or not all(
            isinstance(entry, dict) for entry in optimizer["buffers"].values()
        ):
            raise ValueError(f"{META_KEY} 'optimizer.buffers' must map names to objects")


def _expected_arrays(header: dict) -> dict[str, object]:
    """Array key -> its {shape, dtype} description, as the header declares them."""
    expected = {f"model/{name}": spec for name, spec in header["parameters"].items()}
    if header["optimizer"] is not None:
        for name, buffers in header["optimizer"]["buffers"].items():
            for buffer, spec in buffers.items():
                expected[f"optim/{name}/{buffer}"] = spec
    return expected


def _check_arrays_match_header(header: dict, arrays: dict[str, np.ndarray]) -> None:
    expected = _expected_arrays(header)
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"arrays do not match {META_KEY}: missing {missing}, unexpected {unexpected}"
        )
    for key, spec in expected.items():
        if not isinstance(spec, dict) or {"shape", "dtype"} - set(spec):
            raise ValueError(f"{META_KEY} entry for {key!r} lacks shape/dtype")
        array = arrays[key]
        if list(array.shape) != spec["shape"] or array.dtype.str != spec["dtype"]:
            raise ValueError(
                f"array {key!r} is {array.dtype.str} {list(array.shape)}, but {META_KEY} "
                f"declares {spec['dtype']} {spec['shape']}"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"array {key!r} has dtype {array.dtype}, expected floating point")


def _model_state(header: dict, arrays: dict[str, np.ndarray], model: Module
                 ) -> dict[str, np.ndarray]:
    if header["model_class"] != type(model).__name__:
        raise ValueError(
            f"checkpoint holds a {header['model_class']!r} model, not a {type(model).__name__!r}"
        )
    own = {name: value for name, value, _ in model.named_parameters()}
    saved = header["parameters"]
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    if missing or unexpected:
        raise KeyError(
            f"checkpoint parameters do not match the {type(model).__name__}: "
            f"missing {missing}, unexpected {unexpected}"
        )
    state = {}
    for name, target in own.items():
        array = arrays[f"model/{name}"]
        if array.shape != target.shape or array.dtype != target.dtype:
            raise ValueError(
                f"parameter {name!r} is {array.dtype} {array.shape} in the checkpoint, but "
                f"{target.dtype} {target.shape} in the model"
            )
        state[name] = array
    return state


def _optimizer_state(header: dict, arrays: dict[str, np.ndarray]) -> dict[str, object]:
    optimizer = header["optimizer"]
    if optimizer is None:
        raise KeyError("checkpoint holds no optimizer state (saved without an optimizer)")
    state = {
        name: {buffer: arrays[f"optim/{name}/{buffer}"] for buffer in buffers}
        for name, buffers in optimizer["buffers"].items()
    }
    for name, buffers in state.items():
        for buffer, array in buffers.items():
            declared = header["parameters"].get(name, {}).get("dtype")
            if array.dtype.str != declared:
                raise ValueError(
                    f"optimizer buffer {name}/{buffer} has dtype {array.dtype.str}, "
                    f"but its parameter has {declared}"
                )
    return {key: optimizer[key] for key in ("type", "hyperparams", "step")} | {"state": state}
