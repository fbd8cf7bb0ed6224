// The dense layer on rows, y = x W^T + b (a model's Linear head), forward and backward.
//
// It runs on the core's own threads. A head multiplied by NumPy runs on the BLAS library's pool,
// whose idle threads keep spinning for a while after each product, on the very cores the next
// time loop needs.
#pragma once

#include <algorithm>
#include <vector>

#include "pyrnn/gemm.hpp"
#include "pyrnn/threads.hpp"
#include "pyrnn/types.hpp"
#include "pyrnn/workspace.hpp"

namespace pyrnn {

// y (n, m) = x (n, k) W^T + b, W (m, k) row-major; b (m,) or null (no bias).
template <typename S>
void dense_forward(Index n, Index k, Index m, const S* x, const S* w, const S* b, S* y, int threads) {
  if (n == 0) return;
  PackedB<S> w_t;  // W^T (k, m): column j is row j of W
  w_t.pack(k, m, 1, [&](Index j) { return w + j * k; }, threads);
  const Buffer<S> bias = b ? padded_row(b, m, w_t.padded_cols()) : Buffer<S>();
  parallel_for_blocks(n, threads, kMinGemmRowsPerThread, kRowBlock, [&](Range r) {
    packed_gemm(r.size(), x + r.begin * k, k, w_t, y + r.begin * m, m, false, b ? bias.data() : nullptr);
  });
}

// dx (n, k) = d_y (n, m) W; dW (m, k) = d_y^T x and db (m,) = the column sums of d_y, added to
// what dw and db hold when `accumulate` (db null: no bias). Each sum over rows runs in one order.
template <typename S>
void dense_backward(Index n, Index k, Index m, const S* x, const S* w, const S* d_y, S* dx, S* dw, S* db,
                    bool accumulate, int threads) {
  if (n == 0) {
    if (!accumulate) {
      std::fill(dw, dw + m * k, S(0));
      if (db) std::fill(db, db + m, S(0));
    }
    return;
  }
  PackedB<S> w_rows;  // W (m, k) as the right operand of d_y
  w_rows.pack_rows(m, k, k, [&](Index r) { return w + r * k; }, threads);
  parallel_for_blocks(n, threads, kMinGemmRowsPerThread, kRowBlock, [&](Range r) {
    packed_gemm(r.size(), d_y + r.begin * m, m, w_rows, dx + r.begin * k, k, false);
  });
  PackedB<S> x_rows;  // x (n, k) as the right operand of d_y^T
  x_rows.pack_rows(n, k, k, [&](Index r) { return x + r * k; }, threads);
  // Threads split the rows of dW; d_y is read transposed in place, its column sums taken as it is.
  parallel_for_blocks(m, threads, kMinGradRowsPerThread, kRowBlock, [&](Range g) {
    std::vector<S> sums(g.size());
    packed_gemm_strided<S>(g.size(), d_y + g.begin, 1, m, x_rows, dw + g.begin * k, k, accumulate, nullptr,
                           sums.data());
    if (db) store_sums(db + g.begin, sums.data(), g.size(), accumulate);
  });
}

}  // namespace pyrnn
