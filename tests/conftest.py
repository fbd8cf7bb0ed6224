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
