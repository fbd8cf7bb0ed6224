"""The C++ core's buffer pool: bounded as documented, and memory the user can get back.

The pool keeps the blocks a call frees for the next calls (see cpp/include/pyrnn/workspace.hpp):
each at most ``idle_seconds`` unused, all together at most ``limit_bytes``.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
from _sanitizers import measures_rss

import pyrnn
from pyrnn import _backend

needs_cpp = pytest.mark.skipif(not _backend.cpp_available(), reason="C++ core not built")
MiB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def train_step(module: pyrnn.Module, x: np.ndarray) -> None:
    out, _ = module(x)
    module.backward(np.ones_like(out))


def large_step() -> None:
    """A training step whose blocks come to about 35 MiB."""
    train_step(pyrnn.LSTM(64, 256, seed=0), np.ones((60, 64, 64), np.float32))


@pytest.fixture
def default_bounds():
    """Each test starts from an empty pool with the default bounds, and leaves them so."""
    pyrnn.set_memory_cache_limit(1 << 30, idle_seconds=5.0)
    pyrnn.release_memory()
    yield
    pyrnn.set_memory_cache_limit(1 << 30, idle_seconds=5.0)
    pyrnn.release_memory()


@needs_cpp
def test_default_bounds_are_the_documented_ones(default_bounds):
    info = pyrnn.memory_info()
    assert info["limit_bytes"] == 1 << 30
    assert info["idle_seconds"] == 5.0
    assert info["cached_bytes"] == 0 and info["cached_blocks"] == 0


@measures_rss
@needs_cpp
def test_release_memory_frees_every_cached_block_and_returns_its_bytes(default_bounds):
    large_step()
    cached = pyrnn.memory_info()["cached_bytes"]
    assert cached > 24 * MiB
    before = rss_bytes()
    freed = pyrnn.release_memory()
    assert isinstance(freed, int) and freed == cached
    assert pyrnn.memory_info()["cached_bytes"] == 0
    assert pyrnn.memory_info()["cached_blocks"] == 0
    assert before - rss_bytes() > 0.8 * freed  # given back to the system, not to malloc's heap
    assert pyrnn.release_memory() == 0


@measures_rss
@needs_cpp
def test_cache_stays_under_its_limit_after_a_large_call(default_bounds):
    large_step()  # the first call also loads code and starts threads: not counted below
    pyrnn.release_memory()
    pyrnn.set_memory_cache_limit(8 * MiB)
    before = rss_bytes()
    large_step()
    info = pyrnn.memory_info()
    assert 0 < info["cached_bytes"] <= 8 * MiB
    assert rss_bytes() - before < 8 * MiB + 4 * MiB  # the rest went back to the system


@needs_cpp
def test_lowering_the_limit_frees_at_once(default_bounds):
    large_step()
    assert pyrnn.memory_info()["cached_bytes"] > 16 * MiB
    pyrnn.set_memory_cache_limit(16 * MiB)
    assert pyrnn.memory_info()["cached_bytes"] <= 16 * MiB
    pyrnn.set_memory_cache_limit(0)
    assert pyrnn.memory_info()["cached_bytes"] == 0
    large_step()  # a limit of 0 keeps nothing
    assert pyrnn.memory_info()["cached_bytes"] == 0


def small_step(module: pyrnn.Module) -> None:
    train_step(module, np.ones((20, 8, 32), np.float32))


@needs_cpp
def test_blocks_idle_too_long_are_freed_at_the_next_call(default_bounds):
    small = pyrnn.LSTM(32, 64, seed=0)
    small_step(small)
    kept_by_small = pyrnn.memory_info()["cached_bytes"]
    pyrnn.release_memory()
    pyrnn.set_memory_cache_limit(idle_seconds=0.2)
    large_step()
    assert pyrnn.memory_info()["cached_bytes"] > 24 * MiB
    time.sleep(0.3)
    small_step(small)  # the large call's blocks waited too long: freed, not kept for it
    assert pyrnn.memory_info()["cached_bytes"] <= 2 * kept_by_small < 4 * MiB


@measures_rss
@needs_cpp
def test_repeated_medium_calls_reuse_their_blocks(default_bounds):
    pyrnn.set_memory_cache_limit(idle_seconds=60.0)  # a slow machine must not make it fail
    module = pyrnn.GRU(32, 64, num_layers=2, seed=0)
    x = np.ones((40, 16, 32), np.float32)
    for _ in range(8):  # the first steps also try the thread team's two ways (see threads.hpp)
        train_step(module, x)
    settled = pyrnn.memory_info()
    assert settled["allocations"] >= 10  # about what one step takes from the pool
    before = rss_bytes()
    for _ in range(16):
        train_step(module, x)
        cached = pyrnn.memory_info()["cached_bytes"]
        assert settled["cached_bytes"] <= cached <= settled["cached_bytes"] + MiB
    # a later try of the other team may need a block more, never a step's worth
    assert pyrnn.memory_info()["allocations"] - settled["allocations"] <= 2
    assert rss_bytes() - before < 2 * MiB


@needs_cpp
def test_every_loaded_build_of_the_core_is_bounded_and_released(default_bounds):
    from pyrnn import _core

    module = pyrnn.LSTM(64, 256, seed=0)
    for batch in (1, 8):  # a batch of one may run another build (see pyrnn/_core.py)
        train_step(module, np.ones((200, batch, 64), np.float32))
    pools = [build.memory_cache_info() for build in _core._by_tape.values()]
    assert all(pool["cached_bytes"] > 0 for pool in pools)
    assert pyrnn.memory_info()["cached_bytes"] == sum(pool["cached_bytes"] for pool in pools)
    pyrnn.set_memory_cache_limit(3 * MiB, idle_seconds=1.0)
    for build in _core._by_tape.values():
        pool = build.memory_cache_info()
        assert pool["limit_bytes"] == 3 * MiB and pool["idle_seconds"] == 1.0
        assert pool["cached_bytes"] <= 3 * MiB
    pyrnn.release_memory()
    assert all(build.memory_cache_info()["cached_bytes"] == 0 for build in _core._by_tape.values())


@pytest.mark.parametrize("limit_bytes", [-1, 1.5, True, "1", 2**64, np.float64(8.0)])
def test_set_memory_cache_limit_rejects_a_bad_limit(limit_bytes):
    with pytest.raises(ValueError, match="limit_bytes"):
        pyrnn.set_memory_cache_limit(limit_bytes)


@pytest.mark.parametrize("idle_seconds", [-0.5, math.nan, True, "5", 1j])
def test_set_memory_cache_limit_rejects_a_bad_idle_time(idle_seconds):
    with pytest.raises(ValueError, match="idle_seconds"):
        pyrnn.set_memory_cache_limit(idle_seconds=idle_seconds)


@needs_cpp
def test_set_memory_cache_limit_accepts_numpy_ints_and_infinity(default_bounds):
    pyrnn.set_memory_cache_limit(np.int64(4 * MiB), idle_seconds=math.inf)
    info = pyrnn.memory_info()
    assert info["limit_bytes"] == 4 * MiB and info["idle_seconds"] == math.inf
    pyrnn.set_memory_cache_limit(idle_seconds=2)  # None leaves the other bound as it was
    info = pyrnn.memory_info()
    assert info["limit_bytes"] == 4 * MiB and info["idle_seconds"] == 2.0


def test_numpy_backend_keeps_nothing_and_releases_nothing(monkeypatch):
    monkeypatch.setattr(_backend, "_core", None)  # as when the extension does not load
    train_step(pyrnn.LSTM(8, 16, seed=0, backend="numpy"), np.ones((5, 2, 8), np.float32))
    assert pyrnn.release_memory() == 0
    info = pyrnn.memory_info()
    assert info["cached_bytes"] == 0 and info["cached_blocks"] == 0
    pyrnn.set_memory_cache_limit(0, idle_seconds=1.0)  # checked, then nothing to bound
    with pytest.raises(ValueError, match="limit_bytes"):
        pyrnn.set_memory_cache_limit(-1)


@needs_cpp
def test_numpy_backend_calls_leave_the_pool_alone(default_bounds):
    train_step(pyrnn.LSTM(16, 64, seed=0, backend="numpy"), np.ones((20, 16, 16), np.float32))
    assert pyrnn.memory_info()["cached_bytes"] == 0
