// The small GEMM of every time step, C (n x N) = A (n x K) * B (K x N), against a B packed once.
//
// Eigen repacks both operands on every call, which for a time step's GEMM (a few rows times a
// weight matrix) costs about as much as the arithmetic. Here the weight side is packed once per
// call into column panels one SIMD packet wide, and a register-blocked kernel streams it: each
// step then only reads A and the panels. Every output element is the same sequential sum over k
// (in blocks of kKBlock) whatever the number of rows, so results do not depend on the batch.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <vector>

#include "pyrnn/types.hpp"
#include "pyrnn/workspace.hpp"

namespace pyrnn {

template <typename S>
using Packet = typename Eigen::internal::packet_traits<S>::type;
template <typename S>
constexpr Index kPacket = Eigen::internal::unpacket_traits<Packet<S>>::size;

// Accumulator registers the kernel may use: 16 vector registers (AVX2) or 32 (AVX-512).
#if defined(EIGEN_VECTORIZE_AVX512)
constexpr int kAccumulators = 24;
#else
constexpr int kAccumulators = 12;
#endif
constexpr int kRowBlock = 6;    // rows of A per kernel call
constexpr Index kKBlock = 256;  // depth per pass, so that a panel slice and A's rows stay in cache

// B as column panels of kPacket<S> columns: element (k, j) at data[(j / P) * K * P + k * P + j % P],
// with the columns past N zero.
template <typename S>
struct PackedB {
  Index K = 0, N = 0, panels = 0;
  Buffer<S> data;

  // b(k, j) gives B's element; called once per element.
  template <class F>
  void pack(Index k_dim, Index n_dim, F&& b) {
    constexpr Index P = kPacket<S>;
    K = k_dim;
    N = n_dim;
    panels = (N + P - 1) / P;
    data.allocate(panels * K * P);
    data.fill(S(0));
    for (Index q = 0; q < panels; ++q)
      for (Index k = 0; k < K; ++k)
        for (Index c = 0; c < P && q * P + c < N; ++c) data[(q * K + k) * P + c] = b(k, q * P + c);
  }
  Index padded_cols() const { return panels * kPacket<S>; }
};

// MR rows x NP panels of C, over depth [0, kc): C (=|+=) A B.
template <typename S, int MR, int NP, bool Accumulate>
EIGEN_STRONG_INLINE void gemm_kernel(const S* a, Index lda, const S* b, Index panel_stride, Index kc,
                                     S* c, Index ldc) {
  namespace ei = Eigen::internal;
  using P = Packet<S>;
  constexpr Index PS = kPacket<S>;
  P acc[MR][NP];
  for (int i = 0; i < MR; ++i)
    for (int p = 0; p < NP; ++p) acc[i][p] = Accumulate ? ei::ploadu<P>(c + i * ldc + p * PS) : ei::pset1<P>(S(0));
  for (Index k = 0; k < kc; ++k) {
    P bk[NP];
    for (int p = 0; p < NP; ++p) bk[p] = ei::ploadu<P>(b + p * panel_stride + k * PS);
    for (int i = 0; i < MR; ++i) {
      const P ai = ei::pset1<P>(a[i * lda + k]);
      for (int p = 0; p < NP; ++p) acc[i][p] = ei::pmadd(ai, bk[p], acc[i][p]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int p = 0; p < NP; ++p) ei::pstoreu(c + i * ldc + p * PS, acc[i][p]);
}

constexpr int panels_per_call(int rows) { return std::max(1, std::min(8, kAccumulators / rows)); }

// MR rows of C over all panels, for depth slice [k0, k0 + kc).
template <typename S, int MR, bool Accumulate>
void gemm_rows(const S* a, Index lda, const PackedB<S>& b, Index k0, Index kc, S* c, Index ldc) {
  constexpr Index PS = kPacket<S>;
  constexpr int NP = panels_per_call(MR);
  const Index stride = b.K * PS;
  const S* bk = b.data.data() + k0 * PS;
  Index q = 0;
  for (; q + NP <= b.panels; q += NP)
    gemm_kernel<S, MR, NP, Accumulate>(a, lda, bk + q * stride, stride, kc, c + q * PS, ldc);
  if constexpr (NP > 2)
    for (; q + 2 <= b.panels; q += 2)
      gemm_kernel<S, MR, 2, Accumulate>(a, lda, bk + q * stride, stride, kc, c + q * PS, ldc);
  for (; q < b.panels; ++q)
    gemm_kernel<S, MR, 1, Accumulate>(a, lda, bk + q * stride, stride, kc, c + q * PS, ldc);
}

template <typename S, int MR>
void gemm_rows_at(bool accumulate, const S* a, Index lda, const PackedB<S>& b, Index k0, Index kc, S* c,
                  Index ldc) {
  if (accumulate) gemm_rows<S, MR, true>(a, lda, b, k0, kc, c, ldc);
  else gemm_rows<S, MR, false>(a, lda, b, k0, kc, c, ldc);
}

// C (n x b.padded_cols(), row stride ldc) = A (n x b.K, row stride lda) * B, or += when accumulate.
// C's padding columns are written too (with zeros times A when not accumulating).
template <typename S>
void packed_gemm(Index n, const S* a, Index lda, const PackedB<S>& b, S* c, Index ldc, bool accumulate) {
  for (Index k0 = 0; k0 < b.K; k0 += kKBlock) {
    const Index kc = std::min(kKBlock, b.K - k0);
    const bool acc = accumulate || k0 > 0;
    const S* ak = a + k0;
    Index r = 0;
    for (; r + kRowBlock <= n; r += kRowBlock)
      gemm_rows_at<S, kRowBlock>(acc, ak + r * lda, lda, b, k0, kc, c + r * ldc, ldc);
    const S* ar = ak + r * lda;
    S* cr = c + r * ldc;
    switch (n - r) {
      case 1: gemm_rows_at<S, 1>(acc, ar, lda, b, k0, kc, cr, ldc); break;
      case 2: gemm_rows_at<S, 2>(acc, ar, lda, b, k0, kc, cr, ldc); break;
      case 3: gemm_rows_at<S, 3>(acc, ar, lda, b, k0, kc, cr, ldc); break;
      case 4: gemm_rows_at<S, 4>(acc, ar, lda, b, k0, kc, cr, ldc); break;
      case 5: gemm_rows_at<S, 5>(acc, ar, lda, b, k0, kc, cr, ldc); break;
      default: break;
    }
  }
}

}  // namespace pyrnn
