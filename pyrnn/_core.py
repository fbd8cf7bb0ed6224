"""The compiled core, in the code-generation variant this CPU runs best.

The build makes one extension module per target: ``_core_avx2`` (x86-64-v3) and
``_core_avx512`` (x86-64-v4), or a single ``_core_custom`` when ``PYRNN_MARCH`` was set at
install time. Importing a module built for instructions the CPU lacks would crash the
interpreter, so the CPU's flags are read first. AVX-512 is chosen on Intel CPUs only: on AMD
Zen 4, which executes 512-bit vectors as two 256-bit halves, the AVX2 build measured faster.
``PYRNN_ISA=avx2|avx512`` overrides the choice.
"""

from __future__ import annotations

import os
from importlib import import_module
from types import ModuleType

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


def _variants() -> list[str]:
    """Module names to try, best first."""
    vendor, flags = _cpu()
    wanted = os.environ.get("PYRNN_ISA", "").strip().lower()
    if wanted not in ("", "avx2", "avx512"):
        raise ImportError(f"PYRNN_ISA must be 'avx2' or 'avx512', got {wanted!r}")
    order = ["_core_custom"]
    has_v4, has_v3 = _V4_FLAGS <= flags, _V3_FLAGS <= flags
    if has_v4 and (wanted == "avx512" or (wanted == "" and vendor == "GenuineIntel")):
        order.append("_core_avx512")
    if has_v3:
        order.append("_core_avx2")
    return order


def _load() -> tuple[ModuleType, str]:
    errors = []
    for name in _variants():
        try:
            return import_module(f"pyrnn.{name}"), name
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise ImportError("no compiled pyrnn core loads on this CPU (" + "; ".join(errors) + ")")


_impl, variant = _load()

Tape = _impl.Tape
build_info = _impl.build_info
stack_forward = _impl.stack_forward
stack_backward = _impl.stack_backward
set_num_threads = _impl.set_num_threads
get_num_threads = _impl.get_num_threads
