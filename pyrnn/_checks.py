"""Every argument check of pyrnn and its message, in one place.

Each public entry point checks its arguments here once, before any kernel runs: the functional
layer (``rnn_*``), the modules and layers (``module_input``, ``state_pair``, ``indices``, ...),
and the kernel contract of ``pyrnn/_backend.py``, which users may call directly on either
backend (``kernel_*``): the reference's public kernels and the Python face of the C++ core run
the same checks, so both backends refuse the same calls with the same words. What a call or a
constructor would allocate is weighed against the memory available before any of it is
(``*_fits``, ``fits_in_memory``). The compiled core keeps only guards against reading or
writing out of bounds (cpp/bindings.cpp).

Every failure raises ValueError (bad value or shape), TypeError (bad type or dtype),
RuntimeError (bad call order) or OutOfMemoryError, with a message naming the argument, what was
expected and what was given. Checks that accept an array return it in the form the kernels
need: native byte order, C-contiguous and aligned (copied only when it is not already so).
"""

from __future__ import annotations

import functools
import numbers
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ._cells import BASE_PARTS, CELLS, PARTS, Cell, gru_cell, lstm_cell

WITH_C = tuple(name for name, cell in CELLS.items() if cell.has_c)  # for messages

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FLOAT_CODES = frozenset(d.char for d in FLOAT_DTYPES)  # "f", "d"
_BY_NAME = {d.name: d for d in FLOAT_DTYPES}
Array = np.ndarray

# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


def float_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """np.float32 or np.float64 (in any spelling numpy understands) as a native np.dtype."""
    try:
        resolved = None if dtype is None else np.dtype(dtype)  # np.dtype(None) is float64
    except TypeError:
        resolved = None
    if resolved is None or resolved.newbyteorder("=") not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32 or float64, got {dtype!r}")
    return resolved.newbyteorder("=")


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


def cell(name: Any) -> Cell:
    """The cell of that name, for the functional layer."""
    return CELLS[choice("cell", name, tuple(CELLS))]


def lstm_variant(peephole: Any, coupled_gates: Any) -> str:
    """The cell of an LSTM with these flags (any combination is one)."""
    return lstm_cell(flag("peephole", peephole), flag("coupled_gates", coupled_gates))


def gru_variant(reset_after: Any) -> str:
    """The cell of a GRU with reset_after: True (PyTorch's), False (the original form)."""
    return gru_cell(flag("reset_after", reset_after))


def proj_size(value: Any, hidden_size: int) -> int:
    """0 (no projection), or an int in [1, hidden_size) as PyTorch requires."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(f"proj_size: expected an int, got {value!r}")
    if not 0 <= value < hidden_size:
        raise ValueError(f"proj_size: expected 0 (no projection) or 0 < proj_size < "
                         f"hidden_size = {hidden_size}, got {value}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------------------------


def native(a: Array) -> Array:
    """a as the kernels take it: an ndarray in native byte order, C-contiguous and aligned (a
    itself when it already is, else one copy)."""
    if type(a) is np.ndarray and a.dtype.isnative and a.flags.c_contiguous and a.flags.aligned:
        return a  # the common case, without a call into NumPy's conversion machinery
    return np.require(a, a.dtype.newbyteorder("="), ["C", "A", "E"])


def is_ready(a: Any, dtype: np.dtype, expected: tuple[int, ...]) -> bool:
    """True when `array` would pass `a` on unchanged (a plain C-contiguous aligned ndarray of
    the native `dtype` and the expected shape): a test for the hot path, which then need not
    build the names its messages would use."""
    return (type(a) is np.ndarray and a.dtype == dtype and a.shape == expected
            and a.flags.c_contiguous and a.flags.aligned)


def core_writable(a: Any, dtype: np.dtype) -> bool:
    """True when the C++ core can write into `a` in place: an ndarray of `dtype` (native byte
    order), C-contiguous, aligned and writable."""
    return (isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous
            and a.flags.aligned and a.flags.writeable)


def shape(name: str, a: Array, expected: tuple[int, ...], meaning: str | None = None) -> None:
    """a.shape == expected; `meaning` spells the dimensions, e.g. "(L*D, B, H)"."""
    if a.shape != expected:
        spelled = f"{meaning} = {expected}" if meaning else f"{expected}"
        raise ValueError(f"{name}: expected shape {spelled}, got {a.shape}")


def float_ndarray(name: str, a: Any, dtype: np.dtype | None = None,
                  expected: tuple[int, ...] | None = None, meaning: str | None = None) -> Array:
    """a itself, checked to be a float32/float64 ndarray (of `dtype`, x's, when given; of
    shape `expected` when given)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    # Compared by type code, which ignores byte order: building byte-swapped dtypes to compare
    # costs more than a small model's step.
    code = a.dtype.char
    if dtype is not None and code != dtype.char:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of x), got {a.dtype}")
    if code not in _FLOAT_CODES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {a.dtype}")
    if expected is not None:
        shape(name, a, expected, meaning)
    return a


def array(name: str, a: Any, dtype: np.dtype | None = None,
          expected: tuple[int, ...] | None = None, meaning: str | None = None) -> Array:
    """float_ndarray's array as the kernels take it (see native)."""
    return native(float_ndarray(name, a, dtype, expected, meaning))


def copies(a: Array) -> int:
    """1 when native(a) would copy a, else 0."""
    ready = (type(a) is np.ndarray and a.dtype.isnative and a.flags.c_contiguous
             and a.flags.aligned)
    return 0 if ready else 1


def written(name: str, a: Any, dtype: np.dtype, expected: tuple[int, ...],
            dtype_of: str = "the tape's") -> Array:
    """An array a kernel adds into in place: an ndarray of exactly `dtype` in native byte
    order and of shape `expected`, C-contiguous, aligned and writable. No copy can stand in
    for it: the caller goes on reading the array it passed."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} in native byte order ({dtype_of}), "
                        f"got {a.dtype}")
    shape(name, a, expected)
    if not (a.flags.c_contiguous and a.flags.aligned and a.flags.writeable):
        raise ValueError(f"{name}: expected a C-contiguous, aligned, writable array (the "
                         "gradients are added into it in place)")
    return a


def _owner(a: Array) -> int | None:
    """The id of the ndarray that owns a's memory, or None when some other object does."""
    base = a.base
    while isinstance(base, np.ndarray):
        a, base = base, base.base
    return id(a) if base is None else None


def disjoint(arrays: Sequence[tuple[str, Array | None]], first_written: int = 0) -> None:
    """Refuse any array from index first_written on (those a kernel writes) that shares memory
    with an array before it, naming both: each array written must be its own. None entries
    are skipped. Arrays whose memory two different ndarrays own cannot overlap: only pairs
    with one owner, or with an owner that is not an ndarray (a capsule, a buffer), are tested."""
    owners: set[int] = set()
    unknown = False  # an earlier array's owner is not an ndarray
    earlier: list[tuple[str, Array, int | None]] = []
    for i, (name, a) in enumerate(arrays):
        if a is None:
            continue
        owner = id(a) if a.base is None else _owner(a)
        if i >= first_written and (unknown or owner is None or owner in owners):
            _refuse_overlap(name, a, owner, earlier)
        earlier.append((name, a, owner))
        if owner is None:
            unknown = True
        else:
            owners.add(owner)


class Written(NamedTuple):
    """Arrays a kernel writes, checked to be disjoint (kept to check reads against later)."""

    named: list[tuple[str, Array]]
    owners: frozenset[int]  # of the arrays whose owner is an ndarray
    unknown: bool  # some array's owner is not an ndarray


def written_apart(named: list[tuple[str, Array]]) -> Written:
    """`disjoint` for arrays a kernel will write call after call (a module's gradients)."""
    disjoint(named)
    owners = [_owner(a) for _, a in named]
    return Written(named, frozenset(o for o in owners if o is not None), None in owners)


def reads_apart(reads: Sequence[tuple[str, Array | None]], written: Written) -> None:
    """Refuse any of `written` that shares memory with one of reads (None entries skipped)."""
    for name, a in reads:
        if a is None:
            continue
        owner = _owner(a)
        if owner is None or written.unknown or owner in written.owners:
            for target_name, target in written.named:
                if np.may_share_memory(a, target):
                    raise ValueError(f"{target_name}: shares memory with {name}; each array "
                                     "written must be its own")


def _refuse_overlap(name: str, a: Array, owner: int | None,
                    earlier: list[tuple[str, Array, int | None]]) -> None:
    """The pairwise test of disjoint, against the earlier arrays a may overlap."""
    for other_name, other, other_owner in earlier:
        if owner is not None and other_owner is not None and owner != other_owner:
            continue
        if np.may_share_memory(a, other):
            raise ValueError(f"{name}: shares memory with {other_name}; each array written must "
                             "be its own")


def entries(name: str, value: Any, n: int, what: str) -> Sequence[Any]:
    """A list or tuple of n entries (`what` says which)."""
    if not isinstance(value, list | tuple):
        raise TypeError(f"{name}: expected a list, got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"{name}: expected {n} entries ({what}), got {len(value)}")
    return value


def lengths(value: Any, T: int, B: int, spelled: str | None = None) -> Array | None:  # noqa: N803
    """None, or int64 (B,) with every value in [1, T] (PyTorch's packed-sequence lengths).
    `spelled` says what shape is expected (default: a 1-D array of B lengths)."""
    if value is None:
        return None
    a = np.asarray(value)
    if a.size == 0:  # an empty list is float64 to NumPy: say what is missing, not the dtype
        raise ValueError(f"lengths: expected B = {B} lengths (one per sequence), got none")
    if a.dtype.kind not in "iu":
        raise TypeError(f"lengths: expected integers (one per sequence), got dtype {a.dtype}")
    if a.shape != (B,):
        spelled = spelled or f"a 1-D array of B = {B} lengths"
        raise ValueError(f"lengths: expected {spelled} (one per sequence), got shape {a.shape}")
    bad = np.flatnonzero((a < 1) | (a > T))
    if bad.size:
        b = int(bad[0])
        raise ValueError(
            f"lengths: every length must be in [1, T] = [1, {T}], got {a[b]} at index {b}"
        )
    return np.ascontiguousarray(a, dtype=np.int64)


def tape(value: Any, types: type | tuple[type, ...], made_by: str) -> Any:
    """A tape of one of `types`, which `made_by` returns when asked to keep one."""
    if value is None:
        raise ValueError(f"tape: got None; run {made_by} with keep_tape=True to get one")
    if not isinstance(value, types):
        raise TypeError(f"tape: expected the Tape returned by {made_by}, got "
                        f"{type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# The kernel contract (pyrnn/_backend.py), as either backend's stack_forward, stack_backward,
# linear_forward, linear_backward and adam_update take it.
# ---------------------------------------------------------------------------------------------


class StackArgs(NamedTuple):
    """stack_forward's arguments, checked and in the kernels' form (packs aside)."""

    cell: str
    x: Array
    h0: Array
    c0: Array | None
    weights: list[tuple[Array | None, ...]]
    bidirectional: bool
    lengths: Array | None
    dropout_masks: list[Array] | None
    keep_tape: bool
    residual: bool


def kernel_cell(name: Any) -> Cell:
    if not isinstance(name, str) or name not in CELLS:
        raise ValueError(f"cell must be one of {tuple(CELLS)}, got {name!r}")
    return CELLS[name]


def kernel_forward(cell: Any, x: Any, h0: Any, c0: Any, weights: Any, bidirectional: Any,
                   lengths_: Any, dropout_masks: Any, keep_tape: Any, backend: str,
                   residual: Any = False) -> StackArgs:
    """stack_forward's arguments: h0 (L*D, B, P) sets L*D and P, the width of h; weights[0]'s
    w_hr (P, H) sets H for a projected stack (else H = P). The rest must match them. What the
    call will allocate on `backend` is weighed before x or h0 is copied."""
    spec = kernel_cell(cell)
    x = _kernel_x(x)
    T, B, I = x.shape  # noqa: N806, E741
    D = 2 if flag("bidirectional", bidirectional) else 1  # noqa: N806
    h0 = _kernel_h0(h0, B, D, x.dtype)
    LD, _, P = h0.shape  # noqa: N806
    entries("weights", weights, LD, "one tuple per layer and direction, as h0")
    H, proj = _kernel_hidden(spec, weights[0], P)  # noqa: N806
    keep_tape = flag("keep_tape", keep_tape)
    residual = flag("residual", residual)
    mode = "train" if keep_tape else "infer"
    extra = copies(x) * I + (lengths_ is not None) * I  # the core sorts rows by length
    call_fits("x", x.shape, stack_bytes(spec, (T, B, I, max(H, P), LD // D, D),
                                        x.dtype.itemsize, mode, backend, extra), STACK_CALL)
    x, h0 = native(x), native(h0)
    c0 = _kernel_c0(spec, c0, (LD, B, H), x.dtype)
    weights = _kernel_weights(spec, weights, D, I, H, proj, x.dtype)
    lengths_ = lengths(lengths_, T, B, spelled=f"shape ({B},)")
    masks = _kernel_masks(dropout_masks, LD // D, (T, B, D * P), x.dtype)
    return StackArgs(spec.name, x, h0, c0, weights, D == 2, lengths_, masks, keep_tape, residual)


def _kernel_x(x: Any) -> Array:
    x = float_ndarray("x", x)
    if x.ndim != 3 or 0 in x.shape:
        raise ValueError(f"x: expected a 3-D array (T, B, I) with every dimension >= 1, "
                         f"got shape {x.shape}")
    return x


def _kernel_h0(h0: Any, B: int, D: int, dtype: np.dtype) -> Array:  # noqa: N803
    if h0 is None:
        raise ValueError("h0: required, an array (L*D, B, P) (zeros for no initial state)")
    h0 = float_ndarray("h0", h0, dtype)
    if h0.ndim != 3 or h0.shape[0] < 1 or h0.shape[2] < 1 or h0.shape[0] % D:
        raise ValueError(f"h0: expected shape (L*D, B, P) with L >= 1, D = {D}, P >= 1, "
                         f"got {h0.shape}")
    shape("h0", h0, (h0.shape[0], B, h0.shape[2]), "(L*D, B, P)")
    return h0


def _kernel_hidden(spec: Cell, entry: Any, P: int) -> tuple[int, int]:  # noqa: N803
    """(H, proj) from weights[0]: a w_hr (P, H) makes the stack projected (proj = P), its
    absence unprojected (H = P, proj = 0). The entry's other faults are _kernel_weights'."""
    w_hr = _given_w_hr(entry)
    if w_hr is None:
        return P, 0
    _projection_allowed(spec, "weights[0] w_hr")
    if not isinstance(w_hr, np.ndarray) or w_hr.ndim != 2 or w_hr.shape[0] != P or (
            w_hr.shape[1] < 1):
        got = getattr(w_hr, "shape", type(w_hr).__name__)
        raise ValueError(f"weights[0] w_hr: expected shape (P, H) with P = {P} (the width of "
                         f"h0) and H >= 1, got {got}")
    return int(w_hr.shape[1]), P


def _given_w_hr(entry: Any) -> Any:
    """An entry's w_hr as given: None when it has no sixth part."""
    if isinstance(entry, list | tuple) and len(entry) == len(PARTS):
        return entry[len(PARTS) - 1]
    return None


def _projection_allowed(spec: Cell, name: str) -> None:
    if not spec.can_project:
        raise ValueError(f"{name}: cell {spec.name!r} has no projection (only the LSTM cells "
                         "do); expected None, or 4-part entries")


def _kernel_c0(spec: Cell, c0: Any, state_shape: tuple[int, ...], dtype: np.dtype) -> Any:
    if not spec.has_c:
        return no_cell_state("c0", c0, spec.name)
    if c0 is None:
        raise ValueError(f"c0: required for cell {spec.name!r}, got None")
    return array("c0", c0, dtype, state_shape, "(L*D, B, H)")


def no_cell_state(name: str, value: Any, cell_name: str) -> None:
    if value is not None:
        raise ValueError(f"{name}: only {WITH_C[0]!r} has a cell state (and its variants "
                         f"{', '.join(map(repr, WITH_C[1:]))}); expected None for {cell_name!r}")


def entry_form(spec: Cell, k: int, entry: Any, proj: int, what: str = "weights") -> None:
    """weights[k] must be a tuple of the cell's form (4 parts, or 6 for a cell with peepholes or
    a projected stack); the message names, not prints, it."""
    names = spec.part_names(bool(proj))
    if not isinstance(entry, list | tuple) or len(entry) != len(names):
        got = f"{len(entry)} items" if isinstance(entry, list | tuple) else type(entry).__name__
        form = f"cell {spec.name!r}" + (" with projection" if proj else "")
        raise ValueError(f"{what}[{k}]: expected {len(names)} entries ({', '.join(names)}) for "
                         f"{form}, got {got}")


def absent_part(spec: Cell, name: str, part: str, value: Any, proj: int) -> None:
    """A part the form leaves out (w_peep of a cell without peepholes, w_hr of a stack without
    projection) must be None."""
    if value is None:
        return
    if part == "w_hr":
        _projection_allowed(spec, name)
        why = "the stack is not projected (weights[0] has no w_hr)"
    else:
        why = f"cell {spec.name!r} has no peepholes"
    raise ValueError(f"{name}: expected None, as {why}")


def required_part(name: str, value: Any, spec: Cell) -> None:
    """w_peep and w_hr, where the form has them, may not be None."""
    if value is None:
        raise ValueError(f"{name}: required for cell {spec.name!r} here, got None")


def _kernel_weights(spec: Cell, weights: Sequence[Any], D: int, I: int, H: int,  # noqa: N803, E741
                    proj: int, dtype: np.dtype) -> list[tuple[Array | None, ...]]:
    checked = []
    for k, entry in enumerate(weights):
        entry_form(spec, k, entry, proj)
        shapes = spec.shapes(I if k < D else D * (proj or H), H, proj)
        arrays = []
        for part, a, s in zip(spec.part_names(bool(proj)), entry, shapes, strict=True):
            name = f"weights[{k}] {part}"
            if s is None:
                absent_part(spec, name, part, a, proj)
            elif not is_ready(a, dtype, s):
                required_part(name, a, spec)
                a = array(name, a, dtype, s)
            arrays.append(a)
        checked.append(tuple(arrays))
    return checked


def _kernel_masks(masks: Any, L: int, mask_shape: tuple[int, int, int],  # noqa: N803
                  dtype: np.dtype) -> list[Array] | None:
    if masks is None:
        return None
    entries("dropout_masks", masks, L - 1, "one per layer but the last")
    return [array(f"dropout_masks[{k}]", m, dtype, mask_shape) for k, m in enumerate(masks)]


class TapeDims(NamedTuple):
    """What a kernel tape records of its forward call."""

    cell: str
    dtype: np.dtype
    T: int
    B: int
    I: int  # noqa: E741 - the input size, named as in the contract
    H: int
    L: int
    D: int
    proj: int = 0  # the projection's width P, 0 without projection

    @property
    def P(self) -> int:  # noqa: N802 - the contract's name
        """The width of h and of each direction's output."""
        return self.proj or self.H

    def fan_in(self, k: int) -> int:
        """What the layer of weights[k] reads."""
        return self.I if k < self.D else self.D * self.P


def tape_dims(cell_name: str, dtype: Any, dims: Sequence[int], proj: int = 0) -> TapeDims:
    """TapeDims from a tape's cell, dtype (or its name), (T, B, I, H, L, D) and proj_size."""
    dtype = _BY_NAME[dtype] if isinstance(dtype, str) else dtype
    return TapeDims(cell_name, dtype, *dims, proj)


def kernel_backward(dims: TapeDims, d_out: Any, d_h_n: Any, d_c_n: Any,
                    accumulate_into: Any, backend: str) -> tuple[Array, Any, Any, Any]:
    """stack_backward's arguments after the tape: d_h_n and d_c_n may be None."""
    T, B, H, P, LD = dims.T, dims.B, dims.H, dims.P, dims.L * dims.D  # noqa: N806
    given = (d_out, d_h_n, d_c_n)
    d_out = float_ndarray("d_out", d_out, dims.dtype, (T, B, dims.D * P))
    call_fits("d_out", d_out.shape, backward_bytes(dims, backend, copies(d_out)), STACK_CALL)
    d_out = native(d_out)
    if d_h_n is not None:
        d_h_n = array("d_h_n", d_h_n, dims.dtype, (LD, B, P))
    if not CELLS[dims.cell].has_c:
        no_cell_state("d_c_n", d_c_n, dims.cell)
    elif d_c_n is not None:
        d_c_n = array("d_c_n", d_c_n, dims.dtype, (LD, B, H))
    if accumulate_into is not None:
        accumulate_into = weight_targets(accumulate_into, dims, given)
    return d_out, d_h_n, d_c_n, accumulate_into


def backward_bytes(dims: TapeDims, backend: str, d_out_copies: int) -> int:
    """About what stack_backward allocates for a tape of dims, d_out copied d_out_copies times."""
    sizes = (dims.T, dims.B, dims.I, max(dims.H, dims.P), dims.L, dims.D)
    return stack_bytes(CELLS[dims.cell], sizes, dims.dtype.itemsize, "backward", backend,
                       d_out_copies * dims.D * dims.P)


def weight_targets(targets: Any, dims: TapeDims, reads: Sequence[Any]
                   ) -> list[tuple[Array | None, ...]]:
    """accumulate_into: L*D tuples of arrays shaped like the weights (None where the weights
    have None), each one `written` and its own memory, none in the memory of reads (d_out,
    d_h_n, d_c_n as given)."""
    spec = CELLS[dims.cell]
    entries("accumulate_into", targets, dims.L * dims.D,
            "one tuple per layer and direction, as weights")
    parts = ["d" + part for part in spec.part_names(bool(dims.proj))]
    named: list[tuple[str, Array | None]] = list(zip(("d_out", "d_h_n", "d_c_n"), reads,
                                                     strict=True))
    checked = []
    for k, entry in enumerate(targets):
        name = f"accumulate_into[{k}]"
        entry_form(spec, k, entry, dims.proj, "accumulate_into")
        shapes = spec.shapes(dims.fan_in(k), dims.H, dims.proj)
        arrays = tuple(_target(f"{name} {part}", a, dims.dtype, s)
                       for part, a, s in zip(parts, entry, shapes, strict=True))
        named.extend((f"{name} {part}", a) for part, a in zip(parts, arrays, strict=True))
        checked.append(arrays)
    disjoint(named, first_written=3)
    return checked


def _target(name: str, a: Any, dtype: np.dtype, expected: tuple[int, ...] | None) -> Any:
    """One array of accumulate_into: `written`, or None where the weights had no such part."""
    if expected is None:
        if a is not None:
            raise ValueError(f"{name}: expected None, as the weights have no such part")
        return None
    return written(name, a, dtype, expected)


def kernel_linear(x: Any, weight: Any) -> tuple[Array, Array]:
    """x (N, K) and weight (M, K) of one float dtype."""
    x = array("x", x)
    if not isinstance(weight, np.ndarray):
        raise TypeError(f"weight: expected a numpy array, got {type(weight).__name__}")
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"x: expected shape (N, K) with K >= 1, got {x.shape}")
    if weight.ndim != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight: expected shape (M, K) with M >= 1, got {weight.shape}")
    return x, array("weight", weight, x.dtype, (weight.shape[0], x.shape[1]))


def kernel_linear_forward(x: Any, weight: Any, bias: Any) -> tuple[Array, Array, Array | None]:
    x, weight = kernel_linear(x, weight)
    if bias is not None:
        bias = array("bias", bias, x.dtype, (weight.shape[0],))
    return x, weight, bias


def kernel_linear_backward(x: Any, weight: Any, d_y: Any, has_bias: Any,
                           accumulate_into: Any) -> tuple[Array, Array, Array, bool, Any]:
    """linear_backward's arguments; accumulate_into: None or (d_weight, d_bias or None, None
    iff not has_bias), each `written` and its own memory."""
    has_bias = flag("has_bias", has_bias)
    reads = (("x", x), ("weight", weight), ("d_y", d_y))
    x, weight = kernel_linear(x, weight)
    (n, k), m = x.shape, weight.shape[0]
    d_y = array("d_y", d_y, x.dtype, (n, m))
    if accumulate_into is not None:
        entries("accumulate_into", accumulate_into, 2, "d_weight, d_bias")
        d_weight = written("accumulate_into[0] d_weight", accumulate_into[0], x.dtype, (m, k),
                           "x's")
        d_bias = accumulate_into[1]
        if has_bias:
            d_bias = written("accumulate_into[1] d_bias", d_bias, x.dtype, (m,), "x's")
        elif d_bias is not None:
            raise ValueError("accumulate_into[1] d_bias: expected None, as has_bias is False")
        disjoint([*reads, ("accumulate_into[0] d_weight", d_weight),
                  ("accumulate_into[1] d_bias", d_bias)], first_written=3)
        accumulate_into = (d_weight, d_bias)
    return x, weight, d_y, has_bias, accumulate_into


def kernel_adam(param: Any, grad: Any, exp_avg: Any, exp_avg_sq: Any,
                max_exp_avg_sq: Any) -> None:
    """Floating-point arrays of param's shape, those written (all but grad) writable and each
    its own memory. Any float type and layout: the NumPy reference updates them as they are
    (the C++ core's guards then ask for its own dtypes and layout). One pass, as an optimizer
    step calls this for every parameter; `disjoint` runs only where two arrays may overlap."""
    named = (("grad", grad), ("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
             ("max_exp_avg_sq", max_exp_avg_sq))
    expected = getattr(param, "shape", None)
    owners: set[int | None] = set()
    for name, a in named:
        if a is None and name == "max_exp_avg_sq":  # no amsgrad
            continue
        if not (type(a) is np.ndarray and a.dtype.kind == "f" and a.shape == expected
                and (a.flags.writeable or name == "grad")):
            _adam_array(name, a, param)
        owner = id(a) if a.base is None else _owner(a)
        if owner is None or owner in owners:
            disjoint(named, first_written=1)
            return
        owners.add(owner)


def _adam_array(name: str, a: Any, param: Any) -> None:
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise TypeError(f"{name}: expected a floating-point numpy array, got {got}")
    if not isinstance(param, np.ndarray):
        raise TypeError(f"param: expected a floating-point numpy array, got {type(param).__name__}")
    if a.shape != param.shape:
        raise ValueError(f"{name}: expected shape {param.shape} (param's), got {a.shape}")
    if name != "grad" and not a.flags.writeable:
        raise ValueError(f"{name}: expected a writable array (it is updated in place)")


def no_packs(packs: Any) -> None:
    if packs is not None:
        raise TypeError(f"packs: the NumPy reference keeps no packs; expected None, got {packs!r}")


def pack_cache(packs: Any, cache_type: type, keep_tape: bool) -> Any:
    """None, or a PackCache of the C++ core for an inference call."""
    if packs is None:
        return None
    if not isinstance(packs, cache_type):
        raise TypeError(f"packs: expected None or a pyrnn._core.PackCache, got "
                        f"{type(packs).__name__}")
    if keep_tape:
        raise ValueError("packs: only for inference (keep_tape=False); a tape packs its own")
    return packs


# ---------------------------------------------------------------------------------------------
# The functional layer: states may be None (zeros), biases None (zeros), x batch-first.
# ---------------------------------------------------------------------------------------------


def rnn_input(x: Any, batch_first: bool) -> Array:
    """x itself, checked: (T, B, I), or (B, T, I) when batch_first (see time_major)."""
    x = float_ndarray("x", x)
    layout = "(B, T, I)" if batch_first else "(T, B, I)"
    if x.ndim != 3 or 0 in x.shape:
        raise ValueError(
            f"x: expected a 3-D array {layout} with every dimension >= 1, got shape {x.shape}"
        )
    return x


def time_major(x: Array, batch_first: bool) -> Array:
    """A checked x in the kernels' form, time-major."""
    return np.ascontiguousarray(native(x).transpose(1, 0, 2)) if batch_first else native(x)


def rnn_call_fits(spec: Cell, x: Array, batch_first: bool, H: int, L: int, D: int,  # noqa: N803
                  backend: str, mode: str, masks: bool = False) -> None:
    """Refuse a forward call over the checked x (as given) that would not fit in memory."""
    T, B, I = (x.shape[1], x.shape[0], x.shape[2]) if batch_first else x.shape  # noqa: N806, E741
    extra = (copies(x) + batch_first) * I + (4 * (L - 1) * D * H if masks else 0)
    needed = stack_bytes(spec, (T, B, I, H, L, D), x.dtype.itemsize, mode, backend, extra)
    call_fits("x", x.shape, needed, STACK_CALL)


def rnn_backward_fits(dims: TapeDims, d_out: Any, batch_first: bool, backend: str) -> None:
    """Refuse a backward call that would not fit in memory, before making d_out's copies."""
    shape = (dims.B, dims.T) if batch_first else (dims.T, dims.B)
    ready = isinstance(d_out, np.ndarray) and not copies(d_out) and not batch_first
    call_fits("d_out", (*shape, dims.D * dims.P), backward_bytes(dims, backend, 1 - ready),
              STACK_CALL)


def state(name: str, value: Any, expected: tuple[int, int, int], dtype: np.dtype,
          meaning: str = "(L*D, B, H)") -> Array:
    """An initial state or upstream state gradient (L*D, B, H); None means zeros. `meaning`
    spells the shape (h of a projected LSTM: "(L*D, B, proj_size)")."""
    if value is None:
        return np.zeros(expected, dtype)
    if is_ready(value, dtype, expected):
        return value
    return array(name, value, dtype, expected, meaning)


def cell_state(name: str, value: Any, spec: Cell, expected: tuple[int, int, int],
               dtype: np.dtype) -> Array | None:
    """`state` for a cell with a c state, else None (and only None is accepted)."""
    if spec.has_c:
        return state(name, value, expected, dtype)
    return no_cell_state(name, value, spec.name)


def h_meaning(proj: int) -> str:
    """How a message spells the shape of h: its width is proj_size when projected."""
    return "(L*D, B, proj_size)" if proj else "(L*D, B, H)"


class RnnWeights(NamedTuple):
    """The functional layer's weights in kernel form, and what they imply."""

    weights: list[tuple[Array | None, ...]]  # zero arrays where a bias was None
    bias_given: tuple[tuple[bool, ...], ...]  # per entry, per part: not None
    L: int
    H: int
    proj: int  # P of a projected stack (w_hr (P, H)), else 0


def rnn_weights(spec: Cell, weights: Any, D: int, I: int, dtype: np.dtype) -> RnnWeights:  # noqa: N803, E741
    """L*D entries (w_ih, w_hh, b_ih or None, b_hh or None[, w_peep, w_hr]): the first w_hh
    (G*H, P) sets P and, with no w_hr, H = P; its w_hr (P, H) sets H."""
    if not isinstance(weights, list | tuple):
        raise TypeError(f"weights: expected a list of ({', '.join(spec.part_names())}) tuples, "
                        f"got {type(weights).__name__}")
    if len(weights) == 0 or len(weights) % D:
        raise ValueError(f"weights: expected L*D entries with L >= 1 and D = {D} (one per "
                         f"layer and direction), got {len(weights)}")
    H, proj = _hidden_size(spec, weights[0])  # noqa: N806
    kernel_weights, bias_given = [], []
    for k, entry in enumerate(weights):
        shapes = spec.shapes(I if k < D else D * (proj or H), H, proj)
        if type(entry) is tuple and len(entry) == len(shapes) and all(
                a is None if s is None else is_ready(a, dtype, s)
                for a, s in zip(entry, shapes)):  # noqa: B905 - same length
            kernel_weights.append(entry)  # the hot path: nothing to convert, no names to build
        else:
            entry_form(spec, k, entry, proj)
            kernel_weights.append(_kernel_entry(spec, k, entry, shapes, proj, dtype))
        bias_given.append(tuple(a is not None for a in entry))
    return RnnWeights(kernel_weights, tuple(bias_given), len(weights) // D, H, proj)


def _kernel_entry(spec: Cell, k: int, entry: Sequence[Any],
                  shapes: tuple[tuple[int, ...] | None, ...], proj: int,
                  dtype: np.dtype) -> tuple[Array | None, ...]:
    """weights[k] in kernel form: each array checked and converted, zeros for a None bias."""
    arrays = []
    for slot, part, a, s, meaning in zip(spec.part_names(bool(proj)), spec.parts(bool(proj)),
                                         entry, shapes, spec.spelled_shapes(bool(proj)),
                                         strict=True):
        name = f"weights[{k}] {slot}"
        if part is None:
            absent_part(spec, name, slot, a, proj)
        elif a is None and part.bias:
            a = np.zeros(s, dtype)
        elif not is_ready(a, dtype, s):
            required_part(name, a, spec)
            a = array(name, a, dtype, s, meaning)
        arrays.append(a)
    return tuple(arrays)


def _hidden_size(spec: Cell, entry: Any) -> tuple[int, int]:
    """(H, proj) from the first entry: w_hh (G*H, P), and w_hr (P, H) if projected."""
    if not isinstance(entry, list | tuple) or len(entry) not in (BASE_PARTS, len(PARTS)):
        entry_form(spec, 0, entry, 0)  # raises, naming the form
    w_hh = entry[1]
    if not isinstance(w_hh, np.ndarray) or w_hh.ndim != 2 or w_hh.shape[1] < 1:
        got = getattr(w_hh, "shape", type(w_hh).__name__)
        raise ValueError(f"weights[0] w_hh: expected a 2-D array (G*H, P), got {got}")
    P = int(w_hh.shape[1])  # noqa: N806
    if _given_w_hr(entry) is None:
        return P, 0
    return _kernel_hidden(spec, entry, P)


def rnn_d_out(d_out: Any, dims: TapeDims, batch_first: bool) -> Array:
    """The gradient of out, laid out as out was (None: zeros), returned time-major."""
    out_shape = (dims.T, dims.B, dims.D * dims.P)
    width = "D*proj_size" if dims.proj else "D*H"
    if d_out is None:
        return np.zeros(out_shape, dims.dtype)
    if not batch_first:
        return array("d_out", d_out, dims.dtype, out_shape, f"(T, B, {width})")
    d_out = array("d_out", d_out, dims.dtype, (dims.B, dims.T, dims.D * dims.P),
                  f"(B, T, {width})")
    return np.ascontiguousarray(d_out.transpose(1, 0, 2))


def rnn_targets(targets: Any, dims: TapeDims, bias_given: tuple[tuple[bool, ...], ...],
                reads: Sequence[Any]) -> list[tuple[Array | None, ...]]:
    """rnn_backward's accumulate_into: as the kernel's (weight_targets), with None where the
    forward pass had no bias, which becomes a zero array whose sum is dropped."""
    spec, n = CELLS[dims.cell], dims.L * dims.D
    parts = spec.parts(bool(dims.proj))
    if all(all(given[i] or p is None for i, p in enumerate(parts)) for given in bias_given):
        return weight_targets(targets, dims, reads)
    if not isinstance(targets, list | tuple):
        raise TypeError(f"accumulate_into: expected a list of {n} tuples (one per layer and "
                        f"direction, as d_weights), got {type(targets).__name__}")
    if len(targets) != n:
        raise ValueError(f"accumulate_into: expected {n} tuples (one per layer and direction, "
                         f"as d_weights), got {len(targets)}")
    filled = []
    for k, (entry, given) in enumerate(zip(targets, bias_given, strict=True)):
        name = f"accumulate_into[{k}]"
        entry_form(spec, k, entry, dims.proj, "accumulate_into")
        shapes = spec.shapes(dims.fan_in(k), dims.H, dims.proj)
        filled_entry = []
        for part, a, s, has in zip(parts, entry, shapes, given, strict=True):
            if part is not None and part.bias and not has:
                if a is not None:
                    raise ValueError(f"{name} d{part.name}: expected None, as the forward pass "
                                     "had no bias")
                a = np.zeros(s, dims.dtype)
            filled_entry.append(a)
        filled.append(tuple(filled_entry))
    return weight_targets(filled, dims, reads)


# ---------------------------------------------------------------------------------------------
# Modules and layers
# ---------------------------------------------------------------------------------------------


def module_input(x: Any, dtype: np.dtype, input_size: int) -> None:
    """x's dtype and input size against the module's: the functional layer would blame the
    weights, but the user's mistake is x's. Other faults of x are the functional layer's."""
    if not isinstance(x, np.ndarray):
        return
    x_dtype = x.dtype.newbyteorder("=")
    if x_dtype in FLOAT_DTYPES and x_dtype != dtype:
        raise TypeError(f"x: expected dtype {dtype} (the module's dtype), got {x.dtype}")
    if x.ndim == 3 and x.shape[2] != input_size:
        raise ValueError(
            f"x: expected input size {input_size} (last dimension), got shape {x.shape}"
        )


def single_state(name: str, value: Any) -> Array | None:
    """hx of RNN and GRU: one array or None."""
    if isinstance(value, tuple | list):
        raise TypeError(
            f"{name}: expected one array (L*D, B, H) or None, got a {type(value).__name__} "
            f"of {len(value)} (only LSTM takes an (h, c) pair)"
        )
    return value


def state_pair(name: str, spelled: str, value: Any) -> tuple[Array | None, Array | None]:
    """hx of LSTM: None or a pair, either part of which may be None."""
    if value is None:
        return None, None
    if not isinstance(value, tuple | list) or len(value) != 2:
        got = f"{type(value).__name__} of {len(value)}" if isinstance(value, tuple | list) else (
            type(value).__name__
        )
        raise TypeError(f"{name}: expected a pair {spelled} (either may be None), got {got}")
    return value[0], value[1]


def indices(name: str, value: Any, upper: int) -> Array:
    """An integer array with every entry in [0, upper)."""
    a = np.asarray(value)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= upper):
        bad = a[(a < 0) | (a >= upper)].flat[0]
        raise ValueError(f"{name} must lie in [0, {upper}), found {bad}")
    return a


def real_array(name: str, value: Any) -> Array:
    """Any floating-point array (the layers cast it to their dtype)."""
    a = np.asarray(value)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    return a


# ---------------------------------------------------------------------------------------------
# Memory: what a constructor or a call will allocate, weighed before any of it is allocated.
# ---------------------------------------------------------------------------------------------


class OutOfMemoryError(MemoryError, ValueError):
    """More memory asked for than is available, refused before any of it was allocated. Also a
    ValueError, which pyrnn raised for the constructors' sizes before it had this class."""


_CHEAP_BYTES = 64 << 20  # smaller allocations are not weighed (that would read /proc each call)
# What a parameter array costs besides its numbers: the ndarray, its allocation, its entries in
# params or grads and its name (1,135 bytes measured for an LSTM's layers, with some margin).
_ARRAY_BYTES = 1400


def _meminfo_bytes(*keys: str) -> int | None:
    """The sum of /proc/meminfo's fields `keys` in bytes, or None where there is no such file."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return sum(int(fields[key].split()[0]) * 1024 for key in keys)
    except (OSError, KeyError, ValueError):
        return None


def _cgroup_room() -> int | None:
    """What a cgroup memory limit (v2, else v1) leaves this process, or None without a limit."""
    for limit_file, usage_file in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
             "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file, encoding="ascii") as f:
                limit = f.read().strip()
            with open(usage_file, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's huge "no limit"
            return max(int(limit) - usage, 0)
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate: the kernel's estimate of memory available without
    swapping, plus free swap, within any cgroup limit; physical memory where /proc cannot tell
    (None where nothing can)."""
    room = _meminfo_bytes("MemAvailable", "SwapFree")
    if room is None:
        room = _memory_bytes()
    cgroup = _cgroup_room()
    if cgroup is not None:
        room = cgroup if room is None else min(room, cgroup)
    return room


@functools.cache
def _memory_bytes() -> int | None:
    """The machine's physical memory, or None where os.sysconf cannot tell (Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def fits_in_memory(what: str, count: int, itemsize: int, arrays: int = 0,
                   scratch: int = 0) -> None:
    """Refuse, naming `what`, to allocate `count` numbers in `arrays` arrays (with `scratch`
    bytes besides, drawn and freed on the way) when they need more than the memory available:
    NumPy's MemoryError would name no argument, and a loop allocating piece by piece (layer
    after layer, say) might run until the system kills the process."""
    needed = count * itemsize + arrays * _ARRAY_BYTES + scratch
    if needed <= _CHEAP_BYTES:
        return
    available = available_memory()
    if available is not None and needed > available:
        raise OutOfMemoryError(
            f"{what} would hold {count:,} numbers, {needed:,} bytes with their arrays, "
            f"{_gib(needed)}: more than this machine's {_gib(available)} of available memory "
            f"({available:,} bytes)"
        )


def call_fits(name: str, shape: tuple[int, ...], needed: int, what: str) -> None:
    """Refuse a call that would allocate `needed` bytes (`what` says for what) when they are
    more than the memory available, naming its input `name` of that shape."""
    if needed <= _CHEAP_BYTES:
        return
    available = available_memory()
    if available is not None and needed > available:
        raise OutOfMemoryError(
            f"{name} of shape {tuple(shape)}: this call would allocate about {needed:,} bytes "
            f"({_gib(needed)}) for {what}, but {available:,} bytes ({_gib(available)}) of "
            "memory are available"
        )


STACK_CALL = "copies of the input, the outputs, the tape and the kernels' workspace"


def stack_bytes(spec: Cell, dims: Sequence[int], itemsize: int, mode: str, backend: str,
                extra_per_row: int = 0) -> int:
    """About what one call on a stack of (T, B, I, H, L, D) allocates at its peak, from above:
    the outputs, the tape, the workspace, and extra_per_row numbers per (t, b) that the caller
    adds (copies of x, say). mode: "infer" (no tape), "train" (a forward pass keeping its
    tape) or "backward" (with new arrays for the weight gradients). Checked against both
    backends' peaks (RSS) on LSTM, GRU and RNN stacks: 1.1-3 times what they use, the C++
    inference up to 6 times where it projects the input chunk by chunk, not all at once."""
    T, B, I, H, L, D = dims  # noqa: N806, E741
    needed = T * B * (_row_bytes(spec, I, H, L, D, itemsize, mode, backend)
                      + itemsize * extra_per_row)
    if mode == "backward":  # new arrays for the weight gradients
        needed += itemsize * (D * spec.parameter_count(I, H)
                              + (L - 1) * D * spec.parameter_count(D * H, H))
    return needed


@functools.cache
def _row_bytes(spec: Cell, I: int, H: int, L: int, D: int, itemsize: int,  # noqa: N803, E741
               mode: str, backend: str) -> int:
    """stack_bytes per (t, b), states included (they are per b)."""
    G, DH, widest = spec.num_gates, D * H, max(I, D * H)  # noqa: N806
    if mode == "infer" and backend == "cpp":  # the input projection (up front), the outputs
        per_row = D * G * H + DH + (2 * DH if L > 1 else 0)
    elif mode == "infer":  # one layer and direction at a time
        per_row = 2 * I + widest + 2 * G * H + 4 * DH
    elif mode == "train":  # each layer's input, and each direction's saved gates and states
        inputs = D * (I + (L - 1) * DH)
        per_row = 2 * I + inputs + L * D * (2 * G + 3) * H + G * H + 2 * L * DH
    else:  # the gates' gradients of every layer at once (C++), or of one direction (NumPy)
        per_row = max(2 * I + 2 * DH + max(L, D) * (G + 1) * H, I + widest + 2 * G * H + DH)
    return itemsize * (per_row + 6 * L * D * H)
