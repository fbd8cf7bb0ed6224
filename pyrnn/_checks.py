"""Argument checks shared by the functional layer and the modules.

Every failure raises ValueError (bad value or shape), TypeError (bad type or dtype) or
RuntimeError (bad call order) with a message naming the argument, what was expected and what
was given. Checks that accept an array return it in the form the kernels need: native byte
order and C-contiguous (copied only when it is not already so).
"""

from __future__ import annotations

import functools
import numbers
import os
from typing import Any

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FLOAT_CODES = frozenset(d.char for d in FLOAT_DTYPES)  # "f", "d"


def float_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """np.float32 or np.float64 (in any spelling numpy understands) as a native np.dtype."""
    try:
        resolved = None if dtype is None else np.dtype(dtype)  # np.dtype(None) is float64
    except TypeError:
        resolved = None
    if resolved is None or resolved.newbyteorder("=") not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32 or float64, got {dtype!r}")
    return resolved.newbyteorder("=")


def native(a: np.ndarray) -> np.ndarray:
    """a in native byte order and C-contiguous; a itself when it already is."""
    if type(a) is np.ndarray and a.dtype.isnative and a.flags.c_contiguous:
        return a  # the common case, without a call into NumPy's conversion machinery
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return np.ascontiguousarray(a)


def float_array(name: str, a: Any, dtype: np.dtype | None = None) -> np.ndarray:
    """A float32/float64 ndarray (of `dtype` when given), made native and contiguous."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    # Compared by type code, which ignores byte order: this runs for every weight of every call,
    # and building byte-swapped dtypes to compare cost more than a small model's step.
    code = a.dtype.char
    if code not in _FLOAT_CODES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {a.dtype}")
    if dtype is not None and code != dtype.char:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of x), got {a.dtype}")
    return native(a)


def is_ready(a: Any, dtype: np.dtype, expected: tuple[int, ...]) -> bool:
    """True when float_array and shape would pass `a` on unchanged (a plain C-contiguous ndarray
    of the native `dtype` and the expected shape): a test for the hot path, which then need not
    build the names its messages would use."""
    return (type(a) is np.ndarray and a.dtype == dtype and a.shape == expected
            and a.flags.c_contiguous)


def core_writable(a: Any, dtype: np.dtype) -> bool:
    """True when the C++ core can write into `a` in place: an ndarray of `dtype` (native byte
    order), C-contiguous, aligned and writable."""
    return (isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous
            and a.flags.aligned and a.flags.writeable)


def shape(name: str, a: np.ndarray, expected: tuple[int, ...], meaning: str) -> None:
    """a.shape == expected; `meaning` spells the dimensions, e.g. "(L*D, B, H)"."""
    if a.shape != expected:
        raise ValueError(f"{name}: expected shape {meaning} = {expected}, got {a.shape}")


def lengths(value: Any, T: int, B: int) -> np.ndarray | None:  # noqa: N803 - contract names
    """None, or int64 (B,) with every value in [1, T] (PyTorch's packed-sequence lengths)."""
    if value is None:
        return None
    a = np.asarray(value)
    if a.size == 0:  # an empty list is float64 to NumPy: say what is missing, not the dtype
        raise ValueError(f"lengths: expected B = {B} lengths (one per sequence), got none")
    if a.dtype.kind not in "iu":
        raise TypeError(
            f"lengths: expected integers (one per sequence), got dtype {a.dtype}"
        )
    if a.ndim != 1 or a.shape[0] != B:
        raise ValueError(
            f"lengths: expected a 1-D array of B = {B} lengths (one per sequence), "
            f"got shape {a.shape}"
        )
    bad = np.flatnonzero((a < 1) | (a > T))
    if bad.size:
        b = int(bad[0])
        raise ValueError(
            f"lengths: every length must be in [1, T] = [1, {T}], got {a[b]} at index {b}"
        )
    return np.ascontiguousarray(a, dtype=np.int64)


def flag(name: str, value: Any) -> bool:
    if value is True or value is False:
        return value
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return bool(value)


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def dropout(value: Any, name: str = "dropout") -> float:
    """A probability in [0, 1): p = 1 would scale the kept units by 1/0."""
    if type(value) is float and 0 <= value < 1:  # the common case, without the ABC check
        return value
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float in [0, 1), got {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"{name}: expected a float in [0, 1), got {value}")
    return float(value)


def choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")
    return value


def seed(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(f"seed: expected None or a non-negative int, got {value!r}")
    if value < 0:
        raise ValueError(f"seed: expected None or a non-negative int, got {value}")
    return int(value)


def generator(rng: Any) -> np.random.Generator:
    """A numpy Generator; None means a fresh, unseeded one."""
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng: expected a numpy.random.Generator or None, got {type(rng).__name__}"
        )
    return rng


@functools.cache
def _memory_bytes() -> int | None:
    """The machine's physical memory, or None where os.sysconf cannot tell (Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def fits_in_memory(what: str, count: int, itemsize: int) -> None:
    """Refuse, naming `what`, an allocation of `count` numbers larger than the machine's memory:
    NumPy's MemoryError would name no argument, and a loop allocating piece by piece (layer after
    layer, say) might never end."""
    memory = _memory_bytes()
    if memory is not None and count * itemsize > memory:
        raise ValueError(
            f"{what} would hold {count:,} numbers, {count * itemsize / 2**30:,.1f} GiB: more than "
            f"this machine's {memory / 2**30:,.1f} GiB of memory"
        )
