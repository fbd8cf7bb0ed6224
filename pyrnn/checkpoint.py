"""Checkpoints: a model (and optionally its optimizer) in one ``.npz`` file, never pickled.

The file holds ``model/<parameter name>`` arrays (PyTorch's names, e.g.
``model/rnn.weight_ih_l0``), ``optim/<parameter name>/<buffer>`` arrays, and ``meta.json``: a
UTF-8 JSON document stored as a uint8 array with the format version, the model's class name,
every parameter's shape and dtype, the optimizer's class, hyper-parameters and step count, and
the caller's own ``metadata`` (for example the sizes needed to rebuild the model).

``save`` writes a temporary file next to the target and renames it over the target, so a
crash never leaves a half-written checkpoint. A path that is a symbolic link is followed: the
file it points to is replaced, in that file's directory, and the link stays. The new file gets
the mode ``open()`` would give it: the existing file's mode, or ``0o666`` less the umask.
Temporary files that a killed save left behind for the same target (``.<name>.<8 chars>.tmp``,
not locked by a save in progress) are removed by the next save of that target.

``load`` reads with ``allow_pickle=False`` and checks everything against the file's own header
and against the model and optimizer before copying anything in: every member's declared shape,
dtype and size (the .npy header and the zip directory) is checked against ``meta.json`` and the
model before any array is read, so a file cannot make ``load`` allocate more than the model
holds. A corrupt, truncated or mismatched file raises ValueError or KeyError naming the path and
the problem, and leaves the model and optimizer untouched.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import zipfile
import zlib
from collections.abc import Callable, Mapping

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: a file open for writing cannot be removed there anyway
    fcntl = None

from .module import Module
from .optim import Optimizer

FORMAT = "pyrnn-checkpoint"
FORMAT_VERSION = 1
META_KEY = "meta.json"
_HEADER_KEYS = {"format", "format_version", "model_class", "parameters", "optimizer", "metadata"}
_OPTIMIZER_KEYS = {"type", "hyperparams", "step", "buffers"}
# meta.json is read before anything is known about the model: a bound on what it may declare.
_MAX_META_BYTES = 64 * 2**20
# Deflate codes at best 258 repeated bytes in about 2 bits: a member declaring more than this many
# bytes per compressed byte is lying about its size.
_DEFLATE_MAX_RATIO = 1032


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

    Returns the ``metadata`` mapping given to ``save``. Everything is checked first, the arrays'
    declared shapes and dtypes before any array is read; on any error nothing is changed.
    """
    path = _check_path(path)
    params = _parameters(model)
    if optimizer is not None:  # as save requires: restoring another model's optimizer is a mix-up
        _check_optimizer_owns(optimizer, params)
    header, arrays = _read(path, model, optimizer)
    try:
        model_state = {name: arrays[f"model/{name}"] for name in params}
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
    with _open_archive(path) as archive:
        return _header(path, archive, _members(path, archive))


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
    """Write the .npz to a temporary file beside the target, then rename it over the target.

    The target is the file a symbolic link at `path` points to (the link stays a link). The
    temporary file is locked while it exists, so that another save of the same target can tell
    a save in progress from one that was killed."""
    target = os.path.realpath(path)
    directory, name = os.path.split(target)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{path}: cannot save, no folder {directory}")
    _remove_abandoned_temps(directory, name)
    try:
        handle, temp_path = _locked_temp(directory, name)
    except OSError as error:  # named by the target, not by the temporary file's name
        raise type(error)(f"{path}: cannot save in {directory}: {error.strerror}") from error
    try:
        _copy_mode(handle, target)
        with os.fdopen(handle, "wb", closefd=False) as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        if fcntl is None:  # Windows renames no open file; there the temp file is not locked
            os.close(handle)
            handle = None
        os.replace(temp_path, target)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise
    finally:
        if handle is not None:
            os.close(handle)  # releases the lock
    _fsync_directory(directory)


def _temp_pattern(name: str) -> re.Pattern:
    """The names of this target's temporary files (tempfile.mkstemp's 8 characters, which older
    versions used, and the hex digits this one uses)."""
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp")


def _locked_temp(directory: str, name: str) -> tuple[int, str]:
    """A new temporary file for the target `name`: created with mode 0o666 so that the umask
    applies as open() applies it, and locked (where flock exists) before anything is written."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    while True:
        temp_path = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            handle = os.open(temp_path, flags, 0o666)
        except FileExistsError:
            continue
        if fcntl is None:
            return handle, temp_path
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: no save there removes another's temps
            return handle, temp_path
        if os.fstat(handle).st_nlink > 0:
            return handle, temp_path
        os.close(handle)  # another save took it for abandoned before the lock: make another


def _remove_abandoned_temps(directory: str, name: str) -> None:
    """Remove the temporary files of earlier saves of `name` that were killed: those no save in
    progress holds locked. Only names made by _locked_temp (or older pyrnn's mkstemp) match."""
    pattern = _temp_pattern(name)
    try:
        entries = [entry.path for entry in os.scandir(directory)
                   if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)]
    except OSError:
        return
    for temp_path in entries:
        _remove_if_abandoned(temp_path)


def _remove_if_abandoned(temp_path: str) -> None:
    if fcntl is None:
        try:
            os.remove(temp_path)  # fails while the save writing it has it open
        except OSError:
            pass
        return
    try:
        handle = os.open(temp_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.remove(temp_path)
    except OSError:
        pass  # locked: a save in progress; or already gone
    finally:
        os.close(handle)


def _copy_mode(handle: int, target: str) -> None:
    """Give a file replacing `target` the target's permission bits, as writing it in place
    would have kept them; a new target keeps what the umask made of 0o666."""
    try:
        mode = os.stat(target).st_mode & 0o777
    except OSError:
        return
    if hasattr(os, "fchmod"):
        os.fchmod(handle, mode)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (POSIX; elsewhere a directory cannot be opened)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


# Errors a damaged .npz can raise while reading it: besides broken data, a zip entry may claim an
# unknown compression (NotImplementedError) or encryption (RuntimeError).
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError,
                NotImplementedError, RuntimeError, MemoryError)


def _open_archive(path: str) -> zipfile.ZipFile:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return zipfile.ZipFile(path)
    except _READ_ERRORS as error:
        raise ValueError(f"{path}: not a readable .npz checkpoint ({error})") from error


def _members(path: str, archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Array key ("model/head.weight", as np.load names it) -> its zip entry."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        key = info.filename.removesuffix(".npy")
        if key in members:
            raise ValueError(f"{path}: not a readable .npz checkpoint ({key!r} is stored twice)")
        members[key] = info
    return members


def _read(path: str, model: Module, optimizer: Optimizer | None
          ) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and every array, each array read only after its declared shape and dtype
    were found to be what the header and the model expect; read eagerly so that damage shows
    up here."""
    with _open_archive(path) as archive:
        members = _members(path, archive)
        header = _header(path, archive, members)
        try:
            expected = _expected_arrays(header)
            _check_members(expected, members)
            _check_model(header, model)
            if optimizer is not None:
                _check_optimizer_header(header, optimizer)
        except (KeyError, ValueError) as error:
            raise type(error)(f"{path}: {_message(error)}") from error
        file_size = os.path.getsize(path)
        arrays = {}
        for key, (shape, dtype) in expected.items():
            try:
                arrays[key] = _member_array(archive, members[key], file_size,
                                            _exactly(key, shape, dtype))
            except _READ_ERRORS as error:
                raise ValueError(f"{path}: damaged array data ({_message(error)})") from error
    return header, arrays


def _header(path: str, archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo]) -> dict:
    if META_KEY not in members:
        raise ValueError(f"{path}: not a pyrnn checkpoint (no {META_KEY!r} entry)")
    try:
        raw = _member_array(archive, members[META_KEY], os.path.getsize(path), _meta_layout)
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (*_READ_ERRORS, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: unreadable {META_KEY} ({error})") from error
    try:
        _check_header(header)
    except (KeyError, ValueError) as error:
        raise type(error)(f"{path}: {_message(error)}") from error
    return header


def _meta_layout(shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype != np.uint8 or len(shape) != 1:
        raise ValueError(f"{META_KEY} must be a 1-D uint8 array, got {dtype} {shape}")
    if shape[0] > _MAX_META_BYTES:
        raise ValueError(f"{META_KEY} declares {shape[0]:,} bytes; a header holds at most "
                         f"{_MAX_META_BYTES:,}")


def _exactly(key: str, shape: tuple[int, ...], dtype: np.dtype
             ) -> Callable[[tuple[int, ...], np.dtype], None]:
    def check(declared_shape: tuple[int, ...], declared_dtype: np.dtype) -> None:
        if declared_shape != shape or declared_dtype != dtype:
            raise ValueError(
                f"array {key!r} is {declared_dtype.str} {list(declared_shape)}, but {META_KEY} "
                f"declares {dtype.str} {list(shape)}"
            )
    return check


def _member_array(archive: zipfile.ZipFile, info: zipfile.ZipInfo, file_size: int,
                  check: Callable[[tuple[int, ...], np.dtype], None]) -> np.ndarray:
    """The array in one zip member, read only after `check(shape, dtype)` accepted what its .npy
    header declares and the zip directory's sizes were found to agree with that header."""
    _check_zip_entry(info, file_size)
    with archive.open(info) as member:
        shape, dtype, header_bytes = _npy_header(member)
    check(shape, dtype)
    declared = header_bytes + math.prod(shape) * dtype.itemsize
    if info.file_size != declared:
        raise ValueError(f"member {info.filename!r} holds {info.file_size:,} bytes, but its .npy "
                         f"header declares {declared:,}")
    with archive.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _check_zip_entry(info: zipfile.ZipInfo, file_size: int) -> None:
    """The zip directory's sizes for a member must be possible for a file of file_size bytes."""
    if info.compress_type == zipfile.ZIP_STORED:
        plausible = info.compress_size == info.file_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        plausible = info.compress_size * _DEFLATE_MAX_RATIO >= info.file_size
    else:
        raise ValueError(f"member {info.filename!r} uses zip compression method "
                         f"{info.compress_type}; pyrnn reads stored or deflated members")
    if not plausible or info.header_offset + info.compress_size > file_size:
        raise ValueError(f"member {info.filename!r} declares {info.file_size:,} bytes in "
                         f"{info.compress_size:,} compressed ones, in a file of {file_size:,}")


def _npy_header(member) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes before the data) from the .npy header at the stream's start."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    return tuple(shape), dtype, member.tell()


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


def _expected_arrays(header: dict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Array key -> (shape, dtype), as the header declares them; every optimizer buffer must be
    declared as its parameter is."""
    parameters = header["parameters"]
    expected = {f"model/{name}": _spec(f"model/{name}", spec)
                for name, spec in parameters.items()}
    if header["optimizer"] is not None:
        for name, buffers in header["optimizer"]["buffers"].items():
            if name not in parameters:
                raise ValueError(f"{META_KEY} declares optimizer buffers for {name!r}, which is "
                                 "not among its parameters")
            for buffer, spec in buffers.items():
                key = f"optim/{name}/{buffer}"
                expected[key] = _spec(key, spec)
                if expected[key] != expected[f"model/{name}"]:
                    shape, dtype = expected[f"model/{name}"]
                    raise ValueError(
                        f"optimizer buffer {name}/{buffer} is declared {spec['dtype']} "
                        f"{spec['shape']}, but its parameter has {dtype.str} {list(shape)}"
                    )
    return expected


def _spec(key: str, spec: object) -> tuple[tuple[int, ...], np.dtype]:
    """A header's {shape, dtype} entry as (shape, floating dtype), or ValueError."""
    if not isinstance(spec, dict) or {"shape", "dtype"} - set(spec):
        raise ValueError(f"{META_KEY} entry for {key!r} lacks shape/dtype")
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(
            type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"{META_KEY} entry for {key!r}: shape must be a list of integers >= 0, "
                         f"got {shape!r}")
    try:
        dtype = np.dtype(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    except TypeError:
        dtype = None
    if dtype is None or not np.issubdtype(dtype, np.floating):
        raise ValueError(f"array {key!r} has dtype {spec['dtype']!r}, expected floating point")
    return tuple(shape), dtype


def _check_members(expected: dict[str, object], members: dict[str, zipfile.ZipInfo]) -> None:
    stored = set(members) - {META_KEY}
    missing = sorted(set(expected) - stored)
    unexpected = sorted(stored - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"arrays do not match {META_KEY}: missing {missing}, unexpected {unexpected}"
        )


def _check_model(header: dict, model: Module) -> None:
    """The header's parameters must be the model's, by name, shape and dtype."""
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
    for name, target in own.items():
        shape, dtype = _spec(f"model/{name}", saved[name])
        if shape != target.shape or dtype != target.dtype:
            raise ValueError(
                f"parameter {name!r} is {dtype} {shape} in the checkpoint, but "
                f"{target.dtype} {target.shape} in the model"
            )


def _check_optimizer_header(header: dict, optimizer: Optimizer) -> None:
    saved = header["optimizer"]
    if saved is None:
        raise KeyError("checkpoint holds no optimizer state (saved without an optimizer)")
    kind = type(optimizer).__name__
    if saved["type"] != kind:
        raise ValueError(f"the checkpoint's optimizer state is for {saved['type']!r}, "
                         f"not {kind!r}")


def _optimizer_state(header: dict, arrays: dict[str, np.ndarray]) -> dict[str, object]:
    optimizer = header["optimizer"]
    state = {
        name: {buffer: arrays[f"optim/{name}/{buffer}"] for buffer in buffers}
        for name, buffers in optimizer["buffers"].items()
    }
    return {key: optimizer[key] for key in ("type", "hyperparams", "step")} | {"state": state}
