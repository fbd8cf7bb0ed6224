"""The compiled core, in the code-generation variant this CPU runs best.

The build makes one extension module per target: ``_core_avx2`` (x86-64-v3) and
``_core_avx512`` (x86-64-v4), or a single ``_core_custom`` when ``PYRNN_MARCH`` was set at
install time. Importing a module built for instructions the CPU lacks would crash the
interpreter, so the CPU's flags are read first. Where AVX-512 is present its build runs the
calls; on AMD (Zen 4 executes 512-bit vectors as two 256-bit halves) a batch of one runs the
AVX2 build instead. Measured on Zen 4 at 2 threads: AVX-512 2-15 % faster from batch 2 up
(its wider register tile streams the weights with fewer instructions), AVX2 1-13 % faster at
batch 1 (the narrower panels pad less and pack faster). Both builds sum in the same order, so
for finite inputs they return bitwise identical results and the choice never changes a number
(with an infinite input, a gradient entry can be -inf in one build and nan in the other).
``PYRNN_ISA=avx2|avx512`` forces one build for every call.
"""

from __future__ import annotations

import os
from importlib import import_module
from types import ModuleType
from typing import Any

from . import _checks
from ._cells import PLAIN_CELLS, features_needed

_V4_FLAGS = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi2"}
_V3_FLAGS = {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}


def _cpu() -> tuple[str, set[str]]:
    """(vendor, flags) from /proc/cpuinfo; empty when unreadable (then only safe variants load)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 16)
    except OSError:
        return "", set()
    vendor, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return vendor, flags


def _wanted_isa() -> str:
    wanted = os.environ.get("PYRNN_ISA", "").strip().lower()
    if wanted not in ("", "avx2", "avx512"):
        raise ImportError(f"PYRNN_ISA must be 'avx2' or 'avx512', got {wanted!r}")
    return wanted


def _variants(flags: set[str], wanted: str) -> list[str]:
    """Module names to try, best first, for a CPU with these flags and PYRNN_ISA=wanted."""
    order = ["_core_custom"]
    if _V4_FLAGS <= flags and wanted in ("", "avx512"):
        order.append("_core_avx512")
    if _V3_FLAGS <= flags:  # also the fallback when avx512 is asked for and cannot load
        order.append("_core_avx2")
    return order


def _batch_one_variant(primary: str, vendor: str, flags: set[str], wanted: str) -> str | None:
    """The module for batches of one, when not the primary one (see the module docstring)."""
    if primary == "_core_avx512" and vendor == "AuthenticAMD" and wanted == "":
        return "_core_avx2" if _V3_FLAGS <= flags else None
    return None


def _load(names: list[str]) -> tuple[ModuleType, str]:
    errors = []
    for name in names:
        try:
            return import_module(f"pyrnn.{name}"), name
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise ImportError("no compiled pyrnn core loads on this CPU (" + "; ".join(errors) + ")")


def _load_batch_one(name: str | None) -> tuple[ModuleType | None, str | None]:
    if name is None:
        return None, None
    try:
        return _load([name])
    except ImportError:  # a build without it: the primary module runs every batch
        return None, None


_vendor, _flags = _cpu()  # read once: both choices below depend on it
_isa = _wanted_isa()
_impl, variant = _load(_variants(_flags, _isa))
_batch_one, batch_one_variant = _load_batch_one(
    _batch_one_variant(variant, _vendor, _flags, _isa))
_by_tape = {_impl.Tape: _impl} | ({_batch_one.Tape: _batch_one} if _batch_one else {})

# What this build runs (see the kernel contract in pyrnn/_backend.py): cell names, and
# "projection" and "residual"; a build from before features() runs the plain cells alone.
FEATURES: frozenset[str] = frozenset(
    _impl.features() if hasattr(_impl, "features") else PLAIN_CELLS)

Tape = _impl.Tape
build_info = _impl.build_info
get_num_threads = _impl.get_num_threads
max_threads: int = _impl.max_threads
_TAPES = tuple(_by_tape)


def _for_input(x: object) -> ModuleType:
    """The module that runs a forward pass over x (T, B, I): see the module docstring."""
    shape = getattr(x, "shape", None)
    if _batch_one is not None and shape is not None and len(shape) == 3 and shape[1] == 1:
        return _batch_one
    return _impl


class PackCache:
    """Weights packed for inference, kept between ``stack_forward`` calls on the same weights
    (see pyrnn/_backend.py): a cache of the build that runs each call, as a batch of one may run
    another build than larger batches."""

    def __init__(self) -> None:
        self._by_module: dict[ModuleType, Any] = {}

    def of(self, module: ModuleType) -> Any:
        cache = self._by_module.get(module)
        if cache is None:  # setdefault: two threads making one at once keep the same
            cache = self._by_module.setdefault(module, module.PackCache())
        return cache

    def __repr__(self) -> str:
        held = sum(cache.entries for cache in self._by_module.values())
        return f"<pyrnn._core.PackCache entries={held}>"


# The kernel contract of pyrnn/_backend.py. Each function checks its arguments with
# pyrnn._checks, as the NumPy reference does, and hands them to its twin with a leading
# underscore, which takes them checked (what the functional layer calls, see
# _backend.prechecked); the compiled modules keep only guards against out-of-bounds access.


def stack_forward(cell: Any, x: Any, h0: Any, c0: Any, weights: Any, bidirectional: Any,
                  lengths: Any, dropout_masks: Any, keep_tape: Any, packs: Any = None,
                  residual: Any = False) -> Any:
    args = _checks.kernel_forward(cell, x, h0, c0, weights, bidirectional, lengths,
                                  dropout_masks, keep_tape, "cpp", residual)
    _require(args)
    return _stack_forward(*args[:-1], _checks.pack_cache(packs, PackCache, args.keep_tape),
                          args.residual)


def _require(args: _checks.StackArgs) -> None:
    """Refuse a stack this build has no kernels for, naming what it lacks."""
    projected = len(args.weights[0]) > 5 and args.weights[0][5] is not None
    missing = sorted(features_needed(args.cell, projected, _stacked(args.residual, args.weights,
                                                                    args.bidirectional))
                     - FEATURES)
    if missing:
        raise RuntimeError(f"pyrnn._core.stack_forward: this build of the C++ core has no "
                           f"kernels for {', '.join(map(repr, missing))} (it runs "
                           f"{', '.join(sorted(FEATURES))}); pyrnn.reference runs every cell")


def _stacked(residual: bool, weights: Any, bidirectional: bool) -> bool:
    """residual where it does something: with more than one layer."""
    return residual and len(weights) > (2 if bidirectional else 1)


def _stack_forward(cell: str, x: Any, h0: Any, c0: Any, weights: Any, bidirectional: bool,
                   lengths: Any, dropout_masks: Any, keep_tape: bool, packs: Any = None,
                   residual: bool = False) -> Any:
    """On checked arguments, by the build chosen for x's batch size. `residual` reaches the
    build only where it does something, so that a build from before it runs the rest."""
    module = _for_input(x)
    packs = None if packs is None else packs.of(module)
    options = {"residual": True} if _stacked(residual, weights, bidirectional) else {}
    return module.stack_forward(cell, x, h0, c0, weights, bidirectional, lengths,
                                dropout_masks, keep_tape, packs, **options)


def stack_backward(tape: Any, d_out: Any, d_h_n: Any, d_c_n: Any,
                   accumulate_into: Any = None) -> Any:
    _checks.tape(tape, _TAPES, "pyrnn._core.stack_forward")
    return _stack_backward(tape, *_checks.kernel_backward(tape_dims(tape), d_out, d_h_n, d_c_n,
                                                          accumulate_into, "cpp"))


def tape_dims(tape: Any) -> _checks.TapeDims:
    return _checks.tape_dims(tape.cell, tape.dtype, tape.dims, getattr(tape, "proj_size", 0))


def _stack_backward(tape: Any, d_out: Any, d_h_n: Any, d_c_n: Any,
                    accumulate_into: Any = None) -> Any:
    """On checked arguments, by the build whose forward pass recorded the tape."""
    return _by_tape[type(tape)].stack_backward(tape, d_out, d_h_n, d_c_n, accumulate_into)


# A dense layer's rows make a large GEMM whatever the batch: the primary build runs it.
def linear_forward(x: Any, weight: Any, bias: Any) -> Any:
    return _impl.linear_forward(*_checks.kernel_linear_forward(x, weight, bias))


def linear_backward(x: Any, weight: Any, d_y: Any, has_bias: Any,
                    accumulate_into: Any = None) -> Any:
    return _impl.linear_backward(*_checks.kernel_linear_backward(x, weight, d_y, has_bias,
                                                                 accumulate_into))


def adam_update(param: Any, grad: Any, exp_avg: Any, exp_avg_sq: Any, max_exp_avg_sq: Any,
                neg_step_size: float, lerp_weight: float, beta2: float,
                bias_correction2_sqrt: float, eps: float, weight_decay: float) -> None:
    _checks.kernel_adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq)
    _impl.adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, neg_step_size,
                      lerp_weight, beta2, bias_correction2_sqrt, eps, weight_decay)


_linear_forward = _impl.linear_forward
_linear_backward = _impl.linear_backward
_adam_update = _impl.adam_update


def set_num_threads(n: int) -> None:
    for module in _by_tape.values():
        module.set_num_threads(n)


def set_adaptive_threads(enabled: bool) -> None:
    for module in _by_tape.values():
        module.set_adaptive_threads(enabled)


# Each build has its own buffer pool: these act on all of them, and sum what they hold.
def memory_cache_info() -> dict[str, Any]:
    pools = [module.memory_cache_info() for module in _by_tape.values()]
    info = dict(pools[0])  # the bounds: every pool gets the same ones
    for key in ("cached_bytes", "cached_blocks", "allocations"):
        info[key] = sum(pool[key] for pool in pools)
    return info


def set_memory_cache_limit(limit_bytes: int, idle_seconds: float) -> None:
    for module in _by_tape.values():
        module.set_memory_cache_limit(limit_bytes, idle_seconds)


def release_memory() -> int:
    return sum(module.release_memory() for module in _by_tape.values())
