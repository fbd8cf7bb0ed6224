"""The core's pack-once GEMM (cpp/include/pyrnn/gemm.hpp) against NumPy, through _gemm_for_tests.

C[:, :N] = A B (+ C, + bias) with B packed into column panels one SIMD packet wide, cut into
depth blocks of 256 rows; A's rows go in blocks of 6 and passes of 252. The shapes below cross
each of those edges: 1..13 rows and a second pass of rows, depths and widths that are not
multiples of the panel width or of the depth block, and a B larger than the 1 MB share of L2
past which it is streamed a chunk of panels at a time.
"""

from __future__ import annotations

import numpy as np
import pytest

from pyrnn import _core

pytestmark = pytest.mark.skipif(not hasattr(_core, "_impl"), reason="C++ core not built")

DTYPES = (np.float32, np.float64)
LAYOUTS = ("columns", "rows", "in_place")
# The builds loaded: the primary one and, on AMD, the AVX2 one that runs batches of one.
BUILDS = [_core._impl] + ([_core._batch_one] if getattr(_core, "_batch_one", None) else [])


def gemm(a, bs, cs, build=None, **kwargs):
    return (build or _core._impl)._gemm_for_tests(a, bs, cs, **kwargs)


def tolerance(dtype, K):  # noqa: N803
    """Rounding of K products summed in dtype, each of size about 1."""
    eps = float(np.finfo(dtype).eps)
    return {"rtol": 8 * eps * np.sqrt(K), "atol": 4 * eps * K}


def operands(n, K, N, dtype, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, K)).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    return a, b


def as_layout(b, layout):
    """B (K, N) as _gemm_for_tests takes it for `layout` ("columns": B^T, a weight matrix)."""
    return np.ascontiguousarray(b.T) if layout == "columns" else b


def product(a, b, layout="columns", **kwargs):
    c = np.full((a.shape[0], b.shape[1]), np.nan, a.dtype)
    gemm(a, [as_layout(b, layout)], [c], layout=layout, **kwargs)
    return c


def exact(a, b):
    return a.astype(np.float64) @ b.astype(np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", list(range(1, 14)) + [251, 253, 260])
def test_gemm_matches_numpy_for_every_row_count(n, dtype):
    # rows 1..13 take every register block height; 253 and 260 start a second pass of rows
    a, b = operands(n, 37, 45, dtype, seed=n)
    np.testing.assert_allclose(product(a, b), exact(a, b), **tolerance(dtype, 37))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N", [(1, 1), (3, 5), (16, 16), (17, 33), (255, 7), (256, 9),
                                 (257, 31), (300, 129), (530, 100)])
def test_gemm_matches_numpy_for_depths_and_widths_off_the_blocks(K, N, dtype):
    a, b = operands(7, K, N, dtype, seed=K + N)
    np.testing.assert_allclose(product(a, b), exact(a, b), **tolerance(dtype, K))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 12, 40])
def test_gemm_streams_a_b_larger_than_l2(n, dtype):
    # 530 x 530 float32 is 1.1 MB: from 12 rows it is read a chunk of panels at a time,
    # the next chunk prefetched, and its last panel and depth block are partial
    K, N = (530, 530) if dtype == np.float32 else (300, 530)  # noqa: N806
    a, b = operands(n, K, N, dtype, seed=n)
    np.testing.assert_allclose(product(a, b), exact(a, b), **tolerance(dtype, K))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gemm_gives_the_same_bits_whichever_way_b_is_laid_out(layout, dtype):
    # packed from a weight matrix's rows, packed by rows, or read in place: one sum per element
    a, b = operands(9, 300, 64, dtype, seed=3)
    want = product(a, b, "columns")
    np.testing.assert_allclose(want, exact(a, b), **tolerance(dtype, 300))
    np.testing.assert_array_equal(product(a, b, layout), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_rows_do_not_depend_on_the_other_rows(dtype):
    # each element is the same sequence of operations whatever the number of rows around it
    a, b = operands(29, 261, 70, dtype, seed=4)
    whole = product(a, b)
    for start, stop in [(0, 1), (3, 4), (5, 11), (13, 29)]:
        np.testing.assert_array_equal(product(a[start:stop], b), whole[start:stop])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_packed_on_two_threads_gives_the_bits_of_one(dtype):
    a, b = operands(5, 1000, 300, dtype, seed=5)
    np.testing.assert_array_equal(product(a, b, threads=2), product(a, b, threads=1))
    np.testing.assert_array_equal(product(a, b, "rows", threads=2), product(a, b, "rows"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_reads_a_transposed(dtype):
    # A^T stored (K, n), as the weight gradients read d_gates: (K, n) with its rows n apart
    a, b = operands(11, 70, 20, dtype, seed=6)
    c = np.zeros((11, 20), dtype)
    gemm(np.ascontiguousarray(a.T), [b], [c], layout="rows", a_transposed=True)
    np.testing.assert_allclose(c, exact(a, b), **tolerance(dtype, 70))
    np.testing.assert_array_equal(c, product(a, b, "rows"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [40, 300])
def test_gemm_accumulates_into_c(K, dtype):
    # with accumulate the sums start from C; without it C's old values are never read
    a, b = operands(8, K, 23, dtype, seed=7)
    c0 = np.random.default_rng(8).standard_normal((8, 23)).astype(dtype)
    c = c0.copy()
    gemm(a, [b.T.copy()], [c], accumulate=True)
    np.testing.assert_allclose(c, c0 + exact(a, b), **tolerance(dtype, K))
    c = np.full_like(c0, np.nan)
    gemm(a, [b.T.copy()], [c], accumulate=False)
    np.testing.assert_allclose(c, exact(a, b), **tolerance(dtype, K))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 16, 19])
def test_gemm_starts_from_a_bias_row(N, dtype):  # noqa: N803
    a, b = operands(7, 50, N, dtype, seed=9)
    bias = np.linspace(-1, 1, N).astype(dtype)
    c = np.full((7, N), np.nan, dtype)
    gemm(a, [b.T.copy()], [c], bias=bias)
    np.testing.assert_allclose(c, exact(a, b) + bias, **tolerance(dtype, 50))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_writes_only_the_first_n_columns_of_a_wider_c(dtype):
    # C with its rows further apart than N (a slice of a wider buffer): past N it is left alone,
    # also where the last panel is partial
    a, b = operands(7, 33, 21, dtype, seed=10)
    c = np.full((7, 40), 7.0, dtype)
    gemm(a, [b.T.copy()], [c], accumulate=False)
    np.testing.assert_allclose(c[:, :21], exact(a, b), **tolerance(dtype, 33))
    np.testing.assert_array_equal(c[:, 21:], 7.0)
    c[:, :21] = 1.0
    gemm(a, [b.T.copy()], [c], accumulate=True)
    np.testing.assert_allclose(c[:, :21], 1.0 + exact(a, b), **tolerance(dtype, 33))
    np.testing.assert_array_equal(c[:, 21:], 7.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemm_serves_several_targets_from_one_pass_of_a(accumulate, dtype):
    # the multi-target form (the weight gradients: d_gates^T x and d_gates^T h_prev at once)
    a, b1 = operands(260, 300, 35, dtype, seed=11)
    _, b2 = operands(260, 300, 64, dtype, seed=12)
    c1, c2 = np.ones((260, 35), dtype), np.ones((260, 64), dtype)
    gemm(np.ascontiguousarray(a.T), [b1, b2], [c1, c2], accumulate=accumulate, layout="rows",
         a_transposed=True)
    start = 1.0 if accumulate else 0.0
    np.testing.assert_allclose(c1, start + exact(a, b1), **tolerance(dtype, 300))
    np.testing.assert_allclose(c2, start + exact(a, b2), **tolerance(dtype, 300))
    one = np.ones((260, 35), dtype)
    gemm(np.ascontiguousarray(a.T), [b1], [one], accumulate=accumulate, layout="rows",
         a_transposed=True)
    np.testing.assert_array_equal(c1, one)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_transposed", [False, True])
def test_gemm_sums_the_rows_of_a_in_order(a_transposed, dtype):
    # the bias gradients: each row's sum taken in order of k, as a sequential cumulative sum is
    a, b = operands(13, 520, 10, dtype, seed=13)
    c = np.zeros((13, 10), dtype)
    given = np.ascontiguousarray(a.T) if a_transposed else a
    sums = gemm(given, [b], [c], layout="rows", a_transposed=a_transposed, row_sums=True)
    np.testing.assert_array_equal(sums, np.cumsum(a, axis=1)[:, -1])
    np.testing.assert_allclose(c, exact(a, b), **tolerance(dtype, 520))


@pytest.mark.skipif(len(BUILDS) < 2, reason="a single build of the core is loaded")
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_gives_the_same_bits_in_the_avx2_and_avx512_builds(dtype):
    a, b = operands(13, 300, 45, dtype, seed=14)
    got = []
    for build in BUILDS:
        c = np.zeros((13, 45), dtype)
        gemm(a, [b.T.copy()], [c], build=build)
        got.append(c)
    np.testing.assert_array_equal(got[0], got[1])


@pytest.mark.parametrize("call,error,match", [
    (lambda a, b, c: gemm(a, [b], [c], layout="diagonal"), ValueError, "layout"),
    (lambda a, b, c: gemm(a, [b[:, :-1]], [c]), ValueError, "depth"),
    (lambda a, b, c: gemm(a, [b], [c[:-1]]), ValueError, r"c\[0\]"),
    (lambda a, b, c: gemm(a, [b], [c[:, :2]]), ValueError, r"c\[0\]"),
    (lambda a, b, c: gemm(a, [b], [c.astype(np.float64)]), TypeError, r"c\[0\]"),
    (lambda a, b, c: gemm(a, [b.astype(np.float64)], [c]), TypeError, r"b\[0\]"),
    (lambda a, b, c: gemm(a, [b], [c.T]), ValueError, r"c\[0\]"),
    (lambda a, b, c: gemm(a, [b], [np.zeros((4, 5, 1), np.float32)]), ValueError, r"c\[0\]"),
    (lambda a, b, c: gemm(a, [b], []), ValueError, "same length|one length"),
    (lambda a, b, c: gemm(a, [b, b], [c, np.zeros_like(c)], bias=np.zeros(5, np.float32)),
     ValueError, "bias"),
    (lambda a, b, c: gemm(a, [b], [c], bias=np.zeros(4, np.float32)), ValueError, "bias"),
    (lambda a, b, c: gemm(a, [b.T.copy()], [c], layout="in_place"), ValueError, "multiple"),
    (lambda a, b, c: gemm(a, [b], [c], threads=0), ValueError, "threads"),
    (lambda a, b, c: gemm(a[0], [b], [c]), ValueError, "2-D"),
    (lambda a, b, c: gemm(a.astype(np.int32), [b], [c]), TypeError, "dtype"),
])
def test_gemm_entry_rejects_bad_arguments(call, error, match):
    a = np.ones((4, 3), np.float32)
    b = np.ones((5, 3), np.float32)  # layout "columns": B^T (N, K)
    c = np.zeros((4, 5), np.float32)
    with pytest.raises(error, match=match):
        call(a, b, c)


def test_gemm_entry_refuses_a_c_that_shares_memory_with_an_operand_or_another_c():
    a, b = np.zeros((4, 5), np.float32), np.ones((5, 5), np.float32)
    with pytest.raises(ValueError, match="shares memory with a"):
        gemm(a, [b], [a])
    with pytest.raises(ValueError, match="shares memory with b"):
        gemm(a, [b], [b[:4]])
    c = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match="shares memory with c"):
        gemm(a, [b, b], [c, c])
