"""Shared fixtures: every module-level test runs once per kernel backend."""

from __future__ import annotations

import pytest

from pyrnn import _backend, reference

BACKEND_PARAMS = [
    pytest.param(
        "numpy",
        id="numpy",
        marks=pytest.mark.skipif(
            not hasattr(reference, "stack_forward"), reason="NumPy reference kernels missing"
        ),
    ),
    pytest.param(
        "cpp",
        id="cpp",
        marks=pytest.mark.skipif(not _backend.cpp_available(), reason="C++ core not built"),
    ),
]


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request: pytest.FixtureRequest) -> str:
    """"numpy" and "cpp" (skipped when the extension is not built)."""
    return request.param


@pytest.fixture(autouse=True, scope="session")
def _private_cache_folder(tmp_path_factory: pytest.TempPathFactory):
    """The apps write under $XDG_CACHE_HOME/pyrnn by default: in tests, never the tester's own."""
    import os

    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(autouse=True, scope="session")
def _fixed_thread_counts():
    """Tests that set a thread count check what that count does: on a loaded test machine the
    core would otherwise run some calls on fewer threads (see pyrnn.set_adaptive_threads).
    tests/test_team_cap.py checks the adaptation itself."""
    _backend.set_adaptive_threads(False)
    yield
    _backend.set_adaptive_threads(True)


@pytest.fixture
def default_threads(monkeypatch):
    """pyrnn's thread count as never set by the user (pyrnn.torch's operators then follow
    torch's); restored afterwards, as torch's. Skips without torch."""
    torch = pytest.importorskip("torch")
    core, torch_threads = _backend.get_num_threads(), torch.get_num_threads()
    monkeypatch.setattr(_backend, "_threads_set_by_user", False)
    yield
    torch.set_num_threads(torch_threads)
    _backend.set_core_threads(core)
