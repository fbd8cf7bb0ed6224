"""Backend dispatch: the C++ extension when it loads, else the NumPy reference.

The kernel contract
-------------------
Both backends (``pyrnn.reference`` and the extension ``pyrnn._core``) expose the same functions:
two that work on one whole stack of layers and directions, time-major, two for a dense layer and
one for an optimizer.

``stack_forward(cell, x, h0, c0, weights, bidirectional, lengths, dropout_masks, keep_tape,
packs=None)``
    cell           "rnn_tanh" | "rnn_relu" | "lstm" | "gru"
    x              (T, B, I) C-contiguous, float32 or float64 (every array below has x's dtype)
    h0             (L*D, B, H) C-contiguous, ordered l0-fwd, l0-bwd, l1-fwd, ...
    c0             (L*D, B, H) for "lstm", else None
    weights        list of L*D tuples (w_ih (G*H, I_k), w_hh (G*H, H), b_ih (G*H,), b_hh (G*H,)),
                   same order as h0; I_0 = I, I_k = D*H for k > 0; G = 1, 4, 3 for rnn, lstm, gru;
                   gate rows stacked as PyTorch stacks them (lstm i,f,g,o; gru r,z,n)
    bidirectional  bool: D = 2 if True else 1 (L*D entries alone cannot tell L from D)
    lengths        int64 (B,) with every value in [1, T], any order; or None (all T)
    dropout_masks  None, or a list of L-1 arrays (T, B, D*H), multiplied into the output of
                   layer k before layer k+1 reads it (already scaled by 1/(1-p))
    keep_tape      False: inference, tape is None
    packs          None, or (C++ only, inference only) a ``PackCache()`` of the backend (see
                   ``new_pack_cache``) to keep the weights packed between calls: it serves one
                   set of weight arrays, passed as the same C-contiguous arrays every call and
                   never changed (it would go on running the values it packed first)
    returns (out (T, B, D*H), h_n (L*D, B, H), c_n (L*D, B, H) or None, tape)

    Lengths follow PyTorch's packed sequences: out[t, b] = 0 for t >= lengths[b]; the forward
    direction's final state is its state after step lengths[b]-1; the reverse direction starts
    from h0 at step lengths[b]-1 and ends at step 0.

``stack_backward(tape, d_out, d_h_n, d_c_n, accumulate_into=None)``
    d_out (T, B, D*H); d_h_n (L*D, B, H); d_c_n (L*D, B, H) for "lstm", else None
    accumulate_into  None, or L*D tuples of 4 arrays shaped like weights, of the tape's dtype,
                   C-contiguous and writable, none sharing memory with another or with d_out,
                   d_h_n or d_c_n: the weight gradients are added into them in place (as a
                   module's gradients accumulate), with no arrays of their own
    returns (dx (T, B, I), dh0 (L*D, B, H), dc0 or None, d_weights), d_weights shaped like
    weights (a list of L*D tuples of 4 arrays; with accumulate_into, those arrays); gradients
    are summed over time steps.

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
"""

from __future__ import annotations

import numbers
import os
import warnings
from types import ModuleType
from typing import Any

import numpy as np

from . import reference

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


def resolve(backend: str) -> str:
    """Turn "auto" | "cpp" | "numpy" into the concrete backend name, or raise."""
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numpy":
        return "numpy"
    if cpp_available():
        return "cpp"
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


def kernels(backend: str) -> ModuleType:
    """The module implementing the kernel contract for a resolved backend name."""
    return _core if backend == "cpp" else reference  # type: ignore[return-value]


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
        if _core.batch_one_variant is not None:  # batches of one run another build (see _core)
            info["core_module_batch_one"] = _core.batch_one_variant
            info["codegen_flags_batch_one"] = _core._batch_one.build_info()["codegen_flags"]
    else:
        info["import_error"] = str(_IMPORT_ERROR)
    return info
