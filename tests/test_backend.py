"""The installed package carries a working C++ core, and it describes its build."""

import os

import pytest

import pyrnn
from pyrnn import _backend


def test_backend_info_reports_build_facts():
    info = pyrnn.backend_info()
    assert info["active"] in ("cpp", "numpy")
    for key in ("cpp_available", "num_threads"):
        assert key in info
    if info["cpp_available"]:
        for key in ("compiler", "codegen_flags", "simd", "eigen_version", "max_threads"):
            assert info[key], key


@pytest.mark.skipif(
    os.environ.get("PYRNN_ALLOW_NUMPY_ONLY") == "1",
    reason="PYRNN_ALLOW_NUMPY_ONLY=1: testing a build without the extension",
)
def test_installed_package_has_cpp_kernels():
    # A test run that silently fell back to NumPy would prove nothing about the C++ core.
    assert _backend.cpp_available(), pyrnn.backend_info().get("import_error")


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        _backend.resolve("cuda")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_num_threads_rejects_non_positive_int(bad):
    with pytest.raises(ValueError, match="n must be a positive int"):
        pyrnn.set_num_threads(bad)


def test_set_num_threads_round_trips():
    if not _backend.cpp_available():
        pytest.skip("no C++ core")
    before = pyrnn.get_num_threads()
    try:
        pyrnn.set_num_threads(1)
        assert pyrnn.get_num_threads() == 1
    finally:
        pyrnn.set_num_threads(before)
