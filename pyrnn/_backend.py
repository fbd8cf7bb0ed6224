"""Backend dispatch: the C++ extension when it loads, else the NumPy reference.

The kernel contract
-------------------
Both backends (``pyrnn.reference`` and the extension ``pyrnn._core``) expose the same functions:
two that work on one whole stack of layers and directions, time-major, two for a dense layer and
one for an optimizer.

``stack_forward(cell, x, h0, c0, weights, bidirectional, lengths, dropout_masks, keep_tape,
packs=None, residual=False)``
    cell           a name from the cell table (pyrnn/_cells.py): "rnn_tanh" | "rnn_relu" |
                   "lstm" | "gru" | "lstm_peephole" | "lstm_coupled" | "lstm_coupled_peephole" |
                   "gru_reset_before" (the math of each: see pyrnn/reference.py)
    x              (T, B, I) C-contiguous, float32 or float64 (every array below has x's dtype)
    h0             (L*D, B, P) C-contiguous, ordered l0-fwd, l0-bwd, l1-fwd, ...; P is the width
                   of h: the projection's size for a projected LSTM, else P = H
    c0             (L*D, B, H) for the LSTM cells ("lstm*"), else None
    weights        list of L*D tuples, same order as h0, every one of the same form:
                   (w_ih (G*H, I_k), w_hh (G*H, P), b_ih (G*H,), b_hh (G*H,)) for a cell
                   without peepholes in a stack without projection; otherwise 6 parts,
                   (w_ih, w_hh, b_ih, b_hh, w_peep, w_hr), with
                     w_peep (K, H) the peephole vectors of the cell's K gates that see c, in
                            the order "lstm_peephole" (i, f, o), K = 3, and
                            "lstm_coupled_peephole" (f, o), K = 2; None for other cells
                     w_hr   (P, H), LSTM cells only: h = (o * tanh(c)) w_hr^T (PyTorch's
                            proj_size); None for a stack without projection
                   weights[0]'s w_hr decides whether the stack is projected (its shape gives H;
                   without it H = P), and every entry must agree. I_0 = I, I_k = D*P for k > 0;
                   G = 1 (rnn_*), 4 (lstm, lstm_peephole), 3 (gru, gru_reset_before,
                   lstm_coupled, lstm_coupled_peephole); gate rows stacked as PyTorch stacks
                   them (lstm* i,f,g,o; gru* r,z,n), the coupled cells' as f,g,o (i = 1 - f
                   has no rows)
    bidirectional  bool: D = 2 if True else 1 (L*D entries alone cannot tell L from D)
    lengths        int64 (B,) with every value in [1, T], any order; or None (all T)
    dropout_masks  None, or a list of L-1 arrays (T, B, D*P), multiplied into the output of
                   layer k before layer k+1 reads it (already scaled by 1/(1-p))
    keep_tape      False: inference, tape is None
    packs          None, or (C++ only, inference only) a ``PackCache()`` of the backend (see
                   ``new_pack_cache``) to keep the weights packed between calls: it serves one
                   set of weight arrays, passed as the same C-contiguous arrays every call and
                   never changed (it would go on running the values it packed first)
    residual       bool: layer k > 0 adds what it reads (layer k-1's output after its dropout
                   mask, (T, B, D*P)) to its own output; states are unchanged; no effect with
                   L = 1
    returns (out (T, B, D*P), h_n (L*D, B, P), c_n (L*D, B, H) or None, tape)

    Lengths follow PyTorch's packed sequences: out[t, b] = 0 for t >= lengths[b]; the forward
    direction's final state is its state after step lengths[b]-1; the reverse direction starts
    from h0 at step lengths[b]-1 and ends at step 0.

    The variants, per step (a_* = the gate's rows of x W_ih^T + b_ih + h_prev W_hh^T + b_hh):
      lstm_peephole     i = σ(a_i + w_ci c_prev), f = σ(a_f + w_cf c_prev), g = tanh(a_g),
                        c = f c_prev + i g, o = σ(a_o + w_co c), h = o tanh(c)   (ONNX's P)
      lstm_coupled*     f = σ(a_f [+ w_cf c_prev]), g = tanh(a_g), c = f c_prev + (1 - f) g,
                        o = σ(a_o [+ w_co c]), h = o tanh(c)
      projection        h = (o tanh(c)) w_hr^T; c keeps width H
      gru_reset_before  r = σ(a_r), z = σ(a_z), n = tanh(x W_in^T + b_in + (r h_prev) W_hn^T
                        + b_hn), h = (1 - z) n + z h_prev   (ONNX's linear_before_reset=0)

``stack_backward(tape, d_out, d_h_n, d_c_n, accumulate_into=None)``
    d_out (T, B, D*P); d_h_n (L*D, B, P); d_c_n (L*D, B, H) for the LSTM cells, else None
    accumulate_into  None, or L*D tuples shaped like weights (None where weights have None),
                   of the tape's dtype, C-contiguous and writable, none sharing memory with
                   another or with d_out, d_h_n or d_c_n: the weight gradients are added into
                   them in place (as a module's gradients accumulate), with no arrays of their own
    returns (dx (T, B, I), dh0 (L*D, B, P), dc0 or None, d_weights), d_weights shaped like
    weights (L*D tuples of the weights' form, None where they have None; with
    accumulate_into, those arrays); gradients are summed over time steps.

    The tape tells the Python checks its call: ``cell`` (str), ``dtype``, ``dims`` (T, B, I, H,
    L, D) and, on the C++ core's tape, ``proj_size`` (P of a projected stack, else 0; read as 0
    when absent).

What a build of the C++ core runs: ``_core.features()`` lists the cells it has kernels for and,
as "projection" and "residual", the options it supports (a build without that function runs the
four plain cells, no option: see ``supports``). ``backend="auto"`` runs anything else on the
NumPy reference; ``backend="cpp"`` refuses it.

The tape is opaque to callers and stays valid after the caller changes or drops its arrays.

The dense layer under ``pyrnn.Linear``, on rows:

``linear_forward(x, weight, bias)``
    x (N, K) float32 or float64, weight (M, K), bias (M,) or None, all of x's dtype
    returns y (N, M) = x weight^T + bias

``linear_backward(x, weight, d_y, has_bias, accumulate_into=None)``
    x and weight as in the forward, d_y (N, M)
    accumulate_into  None, or (d_weight (M, K), d_bias (M,) or None, None iff not has_bias),
                   C-contiguous writable arrays of x's dtype, none sharing memory with another
                   or with x, weight or d_y: the weight gradients are added into them in place
    returns (dx (N, K), d_weight, d_bias or None), d_bias summed over the rows

Adam's update under ``pyrnn.optim.Adam``:

``adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, neg_step_size, lerp_weight,
beta2, bias_correction2_sqrt, eps, weight_decay)``
    param, exp_avg, exp_avg_sq and max_exp_avg_sq (amsgrad, else None) are updated in place,
    grad is read: float32 or float64 arrays of param's shape and dtype in native byte order, the
    updated ones C-contiguous and writable, none sharing memory with another (the NumPy reference
    also takes other float types and layouts). The scalars as
    torch.optim.Adam derives them for the step: -lr / (1 - beta1^step), 1 - beta1, beta2,
    sqrt(1 - beta2^step), eps, weight_decay. Both backends give the same bits. Returns None.

Checks: on either backend these functions check every argument (``pyrnn._checks``, the same
checks and messages for both) before any work. ``prechecked(backend)`` gives the same functions
without those checks, for callers that have checked their arguments themselves and bring them
in the kernels' form (arrays native, C-contiguous and aligned, lengths int64): the functional
layer and the layers, so that a call is checked once.
"""

from __future__ import annotations

import numbers
import os
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from . import reference
from ._cells import features_needed

BACKENDS = ("auto", "cpp", "numpy")

try:
    from . import _core  # type: ignore[attr-defined]

    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # the extension did not build or does not load here
    _core = None
    _IMPORT_ERROR = exc

_warned_fallback = False


def cpp_available() -> bool:
    """True when the compiled extension loaded and provides the RNN kernels."""
    return _core is not None and hasattr(_core, "stack_forward")


def cpp_features() -> frozenset[str]:
    """What the loaded C++ core runs: the names of its cells, and "projection" and "residual"
    when it supports them (empty without the core)."""
    return _core.FEATURES if cpp_available() else frozenset()


def missing_in_cpp(cell: str, projected: bool = False, residual: bool = False) -> list[str]:
    """What the loaded C++ core lacks to run such a stack, in a stable order (empty: none)."""
    return sorted(features_needed(cell, projected, residual) - cpp_features())


def resolve(backend: str, cell: str | None = None, projected: bool = False,
            residual: bool = False) -> str:
    """Turn "auto" | "cpp" | "numpy" into the concrete backend name, or raise. Given a cell
    (and its options), "auto" picks the C++ core only if it runs them (else the NumPy reference,
    with one warning per missing feature), and "cpp" raises if it does not."""
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numpy":
        return "numpy"
    if cpp_available():
        missing = missing_in_cpp(cell, projected, residual) if cell is not None else []
        if not missing:
            return "cpp"
        if backend == "cpp":
            raise RuntimeError(f"backend='cpp' requested, but this build of the C++ core has no "
                               f"kernels for {', '.join(map(repr, missing))} yet; "
                               "backend='auto' runs them on the NumPy reference")
        _warn_missing(missing)
        return "numpy"
    if backend == "cpp":
        why = (
            f"it failed to import: {_IMPORT_ERROR}"
            if _core is None
            else "this build has no RNN kernels"
        )
        raise RuntimeError(f"backend='cpp' requested but the C++ extension is unavailable: {why}")
    if not _warned_fallback:
        warnings.warn(
            "pyrnn: C++ extension unavailable, using the (slower) NumPy reference backend",
            RuntimeWarning,
            stacklevel=3,
        )
        _warned_fallback = True
    return "numpy"


_warned_missing: set[str] = set()


def _warn_missing(missing: list[str]) -> None:
    """One warning per feature the C++ core lacks, the first time a stack needs it."""
    new = [m for m in missing if m not in _warned_missing]
    if new:
        _warned_missing.update(new)
        warnings.warn(f"pyrnn: the C++ core has no kernels for {', '.join(map(repr, new))} yet; "
                      "using the (slower) NumPy reference for them", RuntimeWarning, stacklevel=4)


def kernels(backend: str) -> ModuleType:
    """The module implementing the kernel contract for a resolved backend name."""
    return _core if backend == "cpp" else reference  # type: ignore[return-value]


class Kernels(NamedTuple):
    """The kernel contract's functions on arguments already checked (see the docstring)."""

    stack_forward: Callable[..., Any]
    stack_backward: Callable[..., Any]
    linear_forward: Callable[..., Any]
    linear_backward: Callable[..., Any]
    adam_update: Callable[..., Any]


def _prechecked(module: ModuleType) -> Kernels:
    return Kernels(module._stack_forward, module._stack_backward, module._linear_forward,
                   module._linear_backward, module._adam_update)


_PRECHECKED = {"numpy": _prechecked(reference)} | (
    {"cpp": _prechecked(_core)} if _core is not None else {})


def prechecked(backend: str) -> Kernels:
    """The kernel contract of a resolved backend name, minus the argument checks."""
    return _PRECHECKED[backend]


def new_pack_cache(backend: str) -> Any:
    """A PackCache for stack_forward's `packs` (C++), or None (NumPy has nothing to pack)."""
    return _core.PackCache() if backend == "cpp" else None


_threads_set_by_user = False  # pyrnn.torch's operators follow torch's thread count until then


def set_num_threads(n: int) -> None:
    """Set how many threads the C++ kernels use (the NumPy reference is unaffected), from 1 to
    the core's ``max_threads`` (1024)."""
    global _threads_set_by_user
    if isinstance(n, bool | np.bool_) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive int, got {n!r}")
    if _core is not None:
        if n > _core.max_threads:
            raise ValueError(f"set_num_threads: n must be at most {_core.max_threads}, got {n}")
        _core.set_num_threads(int(n))
    _threads_set_by_user = True


def set_adaptive_threads(enabled: bool) -> None:
    """Whether the C++ kernels may run a call on fewer threads than ``get_num_threads()`` while
    other programs keep them off their cores (on by default; results are the same either way).
    Turn it off to time a fixed thread count. Either way the core forgets what it has measured."""
    if not isinstance(enabled, bool | np.bool_):
        raise TypeError(f"set_adaptive_threads: enabled must be a bool, got {enabled!r}")
    if _core is not None:
        _core.set_adaptive_threads(bool(enabled))


def threads_set_by_user() -> bool:
    """Whether set_num_threads has been called in this process."""
    return _threads_set_by_user


def set_core_threads(n: int) -> None:
    """Set the core's thread count (1 <= n <= max_threads) as a default, not as the user's
    choice: pyrnn.torch keeps it equal to torch's until the user calls set_num_threads."""
    if _core is not None:
        _core.set_num_threads(min(max(1, int(n)), _core.max_threads))


def get_num_threads() -> int:
    if _core is not None and hasattr(_core, "get_num_threads"):
        return int(_core.get_num_threads())
    return 1


def backend_info() -> dict[str, Any]:
    """Which backend ``backend="auto"`` uses, and how the C++ core was built."""
    info: dict[str, Any] = {
        "active": "cpp" if cpp_available() else "numpy",
        "cpp_available": cpp_available(),
        "num_threads": get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
    }
    if _core is not None:
        info["core_module"] = _core.variant
        info.update(_core.build_info())
        # on a busy host: the cap on team sizes and what set it (cpp/include/pyrnn/busy_host.hpp)
        info["team_cap"] = _core._impl.team_cap_info()
        if _core.batch_one_variant is not None:  # batches of one run another build (see _core)
            info["core_module_batch_one"] = _core.batch_one_variant
            info["codegen_flags_batch_one"] = _core._batch_one.build_info()["codegen_flags"]
            info["team_cap_batch_one"] = _core._batch_one.team_cap_info()
    else:
        info["import_error"] = str(_IMPORT_ERROR)
    return info


def memory_info() -> dict[str, Any]:
    """What the C++ core keeps for reuse between calls (its buffer pool), and its bounds.

    ``cached_bytes``, ``cached_blocks``: memory held now for the next calls; ``limit_bytes``,
    ``idle_seconds``: the bounds (see ``set_memory_cache_limit``); ``allocations``: blocks of
    64 KiB or more taken from the system so far (a steady training loop stops adding to it
    after its first steps). All zero when the C++ core is not loaded.
    """
    if _core is None:
        return {"cached_bytes": 0, "cached_blocks": 0, "limit_bytes": 0, "idle_seconds": 0.0,
                "allocations": 0}
    return _core.memory_cache_info()


def set_memory_cache_limit(limit_bytes: int | None = None, *,
                           idle_seconds: float | None = None) -> None:
    """Bound the memory the C++ core keeps between calls; None leaves a bound as it is.

    The core keeps the blocks of 64 KiB or more that a call frees, to hand them to the next
    call without the page faults of fresh memory. A kept block goes back to the system once it
    has waited ``idle_seconds`` (default 5.0) without being reused, or when keeping it would
    put the total over ``limit_bytes`` (default 1 GiB; the oldest go first): at the core's next
    allocation or release, and at once for new bounds. ``0`` for either turns the cache off;
    ``idle_seconds=math.inf`` keeps blocks however long they wait. When two builds of the core
    are loaded (on AMD CPUs with AVX-512, batches of one run the AVX2 build), each has its own
    cache under these bounds. Does nothing (but check its arguments) without the C++ core.
    """
    info = memory_info()
    if limit_bytes is None:
        limit_bytes = info["limit_bytes"]
    elif not _is_int(limit_bytes) or not 0 <= limit_bytes <= sys.maxsize:
        raise ValueError(f"set_memory_cache_limit: limit_bytes must be an int in "
                         f"[0, {sys.maxsize}], got {limit_bytes!r}")
    if idle_seconds is None:
        idle_seconds = info["idle_seconds"]
    elif (isinstance(idle_seconds, bool | np.bool_) or not isinstance(idle_seconds, numbers.Real)
          or not idle_seconds >= 0):
        raise ValueError(f"set_memory_cache_limit: idle_seconds must be a number >= 0 "
                         f"(math.inf: no time bound), got {idle_seconds!r}")
    if _core is not None:
        _core.set_memory_cache_limit(int(limit_bytes), float(idle_seconds))


def _is_int(n: object) -> bool:
    return isinstance(n, numbers.Integral) and not isinstance(n, bool | np.bool_)


def release_memory() -> int:
    """Give every block the C++ core keeps for reuse back to the system now; return the bytes.

    What is still in use keeps its memory: arrays the core returned, a module's tape (kept from
    a training forward until its backward) and packed weights. The next calls allocate afresh
    (and take page faults once). Returns 0 when nothing is kept, as without the C++ core.
    """
    return int(_core.release_memory()) if _core is not None else 0
