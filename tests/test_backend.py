"""The installed package carries a working C++ core, and it describes its build."""

import os
import subprocess
import sys

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


def _import_core_in_subprocess(env_isa: str, cwd) -> subprocess.CompletedProcess:
    # Run outside the source tree, so that the installed package (with its cores) is imported.
    code = "import pyrnn._core as c; print(c.variant)"
    env = dict(os.environ, PYRNN_ISA=env_isa)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=cwd
    )


def test_core_variant_matches_the_cpu_and_is_reported():
    if not _backend.cpp_available():
        pytest.skip("no C++ core")
    from pyrnn import _core

    info = pyrnn.backend_info()
    assert info["core_module"] == _core.variant
    vendor, flags = _core._cpu()
    if _core.variant == "_core_avx512":
        assert {"avx512f", "avx512bw", "avx512vl"} <= flags
        assert "AVX512" in info["simd"]
    if _core.variant == "_core_avx2":
        assert "AVX2" in info["simd"]


def test_pyrnn_isa_avx2_forces_the_avx2_core(tmp_path):
    if not _backend.cpp_available():
        pytest.skip("no C++ core")
    from pyrnn import _core

    if _core.variant == "_core_custom":
        pytest.skip("built with PYRNN_MARCH: a single custom core")
    result = _import_core_in_subprocess("avx2", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "_core_avx2"


def test_pyrnn_isa_rejects_unknown_values(tmp_path):
    result = _import_core_in_subprocess("sse9", tmp_path)
    assert result.returncode != 0
    assert "PYRNN_ISA must be 'avx2' or 'avx512'" in result.stderr


V4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi1", "bmi2",
      "f16c", "movbe"}


@pytest.mark.parametrize(
    ("vendor", "flags", "isa", "want_order", "want_batch_one"),
    [
        ("AuthenticAMD", V4, "", ["_core_avx512", "_core_avx2"], "_core_avx2"),
        ("GenuineIntel", V4, "", ["_core_avx512", "_core_avx2"], None),
        ("AuthenticAMD", V4, "avx512", ["_core_avx512", "_core_avx2"], None),
        ("AuthenticAMD", V4, "avx2", ["_core_avx2"], None),
        ("AuthenticAMD", V4 - {"avx512f"}, "", ["_core_avx2"], None),
        ("", set(), "", [], None),
    ],
)
def test_which_builds_load_follows_the_cpu_and_pyrnn_isa(
    vendor, flags, isa, want_order, want_batch_one
):
    if not _backend.cpp_available():
        pytest.skip("no C++ core")
    from pyrnn import _core

    assert _core._variants(set(flags), isa) == ["_core_custom", *want_order]
    primary = want_order[0] if want_order else "_core_custom"
    assert _core._batch_one_variant(primary, vendor, set(flags), isa) == want_batch_one


def test_forcing_one_isa_loads_a_single_build(tmp_path):
    if not _backend.cpp_available():
        pytest.skip("no C++ core")
    code = "import pyrnn._core as c; print(c.variant, c.batch_one_variant)"
    for isa in ("avx2", "avx512"):
        result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYRNN_ISA=isa),
                                capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        variant, batch_one = result.stdout.split()
        assert batch_one == "None", variant
