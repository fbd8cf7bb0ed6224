// C (n x N) = A (n x K) B (+ C, + a bias row), B packed once into panels (PackedB) and read by
// many calls. Every element of C is one sequential sum over k, whatever n: results never depend on the batch.
//
// Eigen repacks both operands on every call, which for a time step's GEMM (a few rows against a
// weight matrix) costs about as much as the arithmetic. Here the weight side is packed once into
// column panels one SIMD packet wide, and a register-blocked kernel streams it.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "pyrnn/threads.hpp"
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
constexpr Index kCacheLine = 64;  // bytes
constexpr size_t kL2Bytes = size_t(1) << 20;  // the share of a core's L2 that B may fill
constexpr Index kKBlock = 256;  // depth per pass, so that a panel slice and A's rows stay in cache
constexpr Index kRowsPerPass = 42 * kRowBlock;  // rows of A kept in L2 while a large B streams past
constexpr Index kMinRowsToChunkB = 2 * kRowBlock;  // rows of A from which a B past L2 is read in chunks
constexpr Index kMinPackPerThread = Index(1) << 15;  // elements: less is packed faster by one thread
constexpr Index kPackAhead = 8;  // depth rows of a transposed A requested ahead of its copy
constexpr Index kPackRowTile = 16;  // rows of a B stored by rows packed together (see pack_row_tile)
// Rows of C each thread needs before a large GEMM is split by rows: an input projection, dx or a
// dense layer (A's rows), a weight gradient (its output rows, A read transposed).
constexpr Index kMinGemmRowsPerThread = 32;
constexpr Index kMinGradRowsPerThread = 8;

// B as column panels of kPacket<S> columns, cut into depth blocks of kKBlock rows: block k0 holds
// every panel's rows [k0, k0 + kc) one panel after another, each panel taking panel_rows(kc) rows
// (kc and, where kc would make it an even number of cache lines, one line more), so element (k, j)
// is at data[(k0 / kKBlock) * block_values + (j / P) * panel_rows(kc) * P + (k - k0) * P + j % P].
// A pass over one depth block then reads one sequential run, and what follows a chunk of panels is
// the next chunk, which the kernel can prefetch while it computes this one (see gemm_pass).
// Columns past N are zero; the rows that pad a panel are never read.
//
// The padding: a kernel reads its panels side by side, a depth row of each at a time. Panels an
// even number of lines apart share L1 sets, and at a power of two (128 rows of 64-byte lines: 8 KB)
// all of them fall in one set, whose 8 ways they fill; an odd number of lines spreads them.
//
// A B already stored by rows, with whole panels (N a multiple of kPacket<S>), can also be read in
// place (in_place): its panels are then one packet apart and its depth rows `rows_ld` apart.
template <typename S>
struct PackedB {
  Index K = 0, N = 0, panels = 0;
  Buffer<S> data;
  // Readers find the panels through these: where depth block 0 starts, the values a full depth
  // block of all its panels takes, and which of them is this B's first. They describe `data` once
  // packed; a view (columns(), in_place()) owns no data and points into other memory.
  const S* origin = nullptr;
  Index block_values = 0, first_panel = 0;
  Index rows_ld = 0;  // nonzero for a B read in place: its row stride

  // Rows of the depth block holding row k: kKBlock, or fewer in the last block.
  Index block_depth(Index k) const { return std::min(kKBlock, K - (k - k % kKBlock)); }
  // Rows each panel of a depth block of kc rows takes: kc, padded to an odd number of lines.
  static Index panel_rows(Index kc) {
    constexpr Index per_line = std::max<Index>(1, kCacheLine / (kPacket<S> * Index(sizeof(S))));
    return ((kc + per_line - 1) / per_line | 1) * per_line;
  }
  // Row k of panel q (kPacket<S> values).
  S* at(Index k, Index q) {
    const Index k0 = k - k % kKBlock;
    return data.data() + (k0 / kKBlock) * block_values + q * panel_stride(block_depth(k0)) + (k - k0) * kPacket<S>;
  }
  // Depth block k0's first panel; the panels follow panel_stride(kc) apart, and in each the depth
  // rows row_stride() apart.
  const S* block(Index k0) const {
    if (rows_ld) return origin + k0 * rows_ld + first_panel * kPacket<S>;
    return origin + (k0 / kKBlock) * block_values + first_panel * panel_stride(block_depth(k0));
  }
  Index panel_stride(Index kc) const { return rows_ld ? kPacket<S> : panel_rows(kc) * kPacket<S>; }
  Index row_stride() const { return rows_ld ? rows_ld : kPacket<S>; }
  // B's own values (whether it fits a cache), not counting the rows that pad its panels.
  Index bytes() const { return K * padded_cols() * Index(sizeof(S)); }

  // Panels [q0, q1) as a B of n columns, reading this one's memory (valid while this lives).
  PackedB columns(Index q0, Index q1, Index n) const {
    PackedB view;
    view.K = K;
    view.N = n;
    view.panels = q1 - q0;
    view.origin = origin;
    view.block_values = block_values;
    view.first_panel = first_panel + q0;
    view.rows_ld = rows_ld;
    return view;
  }

  // B (k_dim x n_dim) stored by rows ld apart at b, read where it is (valid while b is).
  static PackedB in_place(const S* b, Index k_dim, Index n_dim, Index ld) {
    eigen_assert(n_dim % kPacket<S> == 0 && "a B read in place must have whole panels");
    PackedB view;
    view.K = k_dim;
    view.N = n_dim;
    view.panels = n_dim / kPacket<S>;
    view.origin = b;
    view.rows_ld = ld;
    return view;
  }

  // Column j of B is column(j)[k * k_stride] for k in [0, K), or all zero when column(j) is null.
  // Up to `threads` threads share the panels.
  template <class F>
  void pack(Index k_dim, Index n_dim, Index k_stride, F&& column, int threads = 1) {
    constexpr Index P = kPacket<S>;
    K = k_dim;
    N = n_dim;
    panels = (N + P - 1) / P;
    allocate();
    const Index min_panels = std::max<Index>(1, kMinPackPerThread / std::max<Index>(1, K * P));
    parallel_for_blocks(panels, threads, min_panels, 1, [&](Range qs) {
      for (Index q = qs.begin; q < qs.end; ++q) pack_panel(q, k_stride, column);
    });
  }
  // Panel q of B (columns [q * P, q * P + P)), one depth block at a time.
  template <class F>
  void pack_panel(Index q, Index k_stride, F&& column) {
    constexpr Index P = kPacket<S>;
    const S* cols[P];
    bool contiguous = k_stride == 1;
    for (Index p = 0; p < P; ++p) {
      cols[p] = q * P + p < N ? column(q * P + p) : nullptr;
      contiguous = contiguous && cols[p];
    }
    for (Index k0 = 0; k0 < K; k0 += kKBlock) {
      const Index kc = block_depth(k0);
      S* panel = at(k0, q);
      const S* from[P];
      for (Index p = 0; p < P; ++p) from[p] = cols[p] ? cols[p] + k0 * k_stride : nullptr;
      // Element by element this is a scattered store per value, which for the small weights of
      // a short sequence cost as much as the GEMMs; whole blocks go through a register transpose.
      const Index k_done = contiguous ? transpose_into_panel(from, kc, panel) : 0;
      for (Index p = 0; p < P; ++p)
        for (Index k = k_done; k < kc; ++k) panel[k * P + p] = from[p] ? from[p][k * k_stride] : S(0);
    }
  }
  // Panel rows [0, rows - rows % P) from kPacket<S> contiguous columns, a square block at a time;
  // returns how many rows it filled.
  static Index transpose_into_panel(const S* const* cols, Index rows, S* panel) {
    namespace ei = Eigen::internal;
    constexpr Index P = kPacket<S>;
    // A vector type as a template argument loses its alignment attribute, which g++ reports;
    // Eigen's own uses of PacketBlock silence the same warning inside its headers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
    ei::PacketBlock<Packet<S>, static_cast<int>(P)> block;
#pragma GCC diagnostic pop
    Index k = 0;
    for (; k + P <= rows; k += P) {
      for (Index p = 0; p < P; ++p) block.packet[p] = ei::ploadu<Packet<S>>(cols[p] + k);
      ei::ptranspose(block);
      for (Index p = 0; p < P; ++p) ei::pstoreu(panel + (k + p) * P, block.packet[p]);
    }
    return k;
  }
  // Row k of B is row(k)[0, valid) followed by zeros up to n_dim columns: copies whole runs of a
  // panel's width (for B stored by rows). Up to `threads` threads share the rows.
  template <class F>
  void pack_rows(Index k_dim, Index valid, Index n_dim, F&& row, int threads = 1) {
    K = k_dim;
    N = n_dim;
    panels = (N + kPacket<S> - 1) / kPacket<S>;
    allocate();
    const Index min_rows = std::max<Index>(1, kMinPackPerThread / std::max<Index>(1, padded_cols()));
    parallel_for_blocks(K, threads, min_rows, 1, [&](Range ks) {
      for (Index k0 = ks.begin; k0 < ks.end;) {
        const Index k1 = std::min(ks.end, (k0 / kPackRowTile + 1) * kPackRowTile);
        pack_row_tile(k0, k1, valid, row);
        k0 = k1;
      }
    });
  }
  // Rows [k0, k1) of one depth block, panel by panel. Row by row, each row's packets would go to
  // every panel, a block's depth times a packet apart (8 KB for float32): all to one cache set,
  // each half-written line evicted before the next row completed it. A panel's run of a tile's
  // rows is whole lines, written at once.
  template <class F>
  void pack_row_tile(Index k0, Index k1, Index valid, F&& row) {
    constexpr Index P = kPacket<S>;
    static_assert(kKBlock % kPackRowTile == 0, "a tile of rows must not cross a depth block");
    const S* src[kPackRowTile];
    const Index rows = k1 - k0;
    for (Index i = 0; i < rows; ++i) src[i] = row(k0 + i);
    S* const tile = at(k0, 0);
    const Index stride = panel_stride(block_depth(k0)), full = std::min(panels, valid / P);
    for (Index q = 0; q < full; ++q) {
      S* const dst = tile + q * stride;
      // A whole panel row is one packet (a run-time length would cost a memmove call per packet).
      for (Index i = 0; i < rows; ++i)
        Eigen::internal::pstoreu(dst + i * P, Eigen::internal::ploadu<Packet<S>>(src[i] + q * P));
    }
    for (Index q = full; q < panels; ++q) {
      const Index n = std::max<Index>(0, std::min(P, valid - q * P));
      S* const dst = tile + q * stride;
      for (Index i = 0; i < rows; ++i) {
        std::copy_n(src[i] + q * P, n, dst + i * P);
        std::fill(dst + i * P + n, dst + i * P + P, S(0));
      }
    }
  }
  Index padded_cols() const { return panels * kPacket<S>; }

 private:
  void allocate() {
    const Index full_blocks = K / kKBlock, rest = K % kKBlock;
    block_values = panels * panel_rows(kKBlock) * kPacket<S>;
    data.allocate(full_blocks * block_values + (rest ? panels * panel_rows(rest) * kPacket<S> : 0));
    origin = data.data();
    first_panel = 0;
  }
};

// A (1 x N) row added to every row of C, padded like B's panels.
template <typename S>
Buffer<S> padded_row(const S* row, Index n, Index padded) {
  Buffer<S> r(padded);
  std::fill(std::copy_n(row, n, r.data()), r.data() + padded, S(0));
  return r;
}

// How a kernel call starts its sums: from zero, from C (accumulate), or from a bias row.
enum class Start { zero, c, bias };

// Sum (i, p) of a kernel call as `start` says: zero, C, or the bias row. Of a partial panel only
// the first `last_cols` columns of C are read, through `tile` (a packet). Sums go in and out of
// these two by value: a kernel's array of sums passed by reference was kept in memory (AVX2).
template <typename S, Start start>
EIGEN_ALWAYS_INLINE Packet<S> start_sum(const S* c, Index ldc, const S* bias, int i, int p, bool partial,
                                        Index last_cols, S* tile) {
  namespace ei = Eigen::internal;
  constexpr Index PS = kPacket<S>;
  if constexpr (start == Start::c) {
    const S* from = c + i * ldc + p * PS;
    if (!partial) return ei::ploadu<Packet<S>>(from);
    std::fill(std::copy_n(from, last_cols, tile), tile + PS, S(0));
    return ei::ploadu<Packet<S>>(tile);
  } else if constexpr (start == Start::bias) {
    return ei::ploadu<Packet<S>>(bias + p * PS);
  } else {
    return ei::pset1<Packet<S>>(S(0));
  }
}

// Sum (i, p) into C; of a partial panel only its first `last_cols` columns, through `tile`.
template <typename S>
EIGEN_ALWAYS_INLINE void write_sum(Packet<S> sum, S* c, Index ldc, int i, int p, bool partial, Index last_cols,
                                   S* tile) {
  namespace ei = Eigen::internal;
  constexpr Index PS = kPacket<S>;
  if (!partial) {
    ei::pstoreu(c + i * ldc + p * PS, sum);
    return;
  }
  ei::pstore(tile, sum);
  std::copy_n(tile, last_cols, c + i * ldc + p * PS);
}

// MR rows x NP panels of C, over depth [0, kc): C = start + A B, B's panels panel_stride apart and
// its depth rows b_k apart in each. With a bias start, `bias` points at the bias of these panels'
// first column. Of the last panel only the first `last_cols` columns of C are read and written
// (B's panels are zero-padded, a bias row padded like them). With `ahead`, also prefetches into
// L2, a line for each line of B read, the NP * kc * kPacket<S> values from `ahead` on (for a B
// read in place, NP * kPacket<S> values of each depth row): the B that a later call will read.
template <typename S, int MR, int NP, Start start>
EIGEN_STRONG_INLINE void gemm_kernel(const S* a, Index lda, Index a_k, const S* b, Index panel_stride, Index b_k,
                                     Index kc, S* c, Index ldc, const S* bias, const S* ahead = nullptr,
                                     Index last_cols = kPacket<S>) {
  namespace ei = Eigen::internal;
  using P = Packet<S>;
  constexpr Index PS = kPacket<S>;
  constexpr Index kLineValues = kCacheLine / sizeof(S);
  // Values ahead per depth row: packed, the next panels are one run (read in place with rows one
  // packet apart, B has a single panel, and both agree).
  const Index ahead_k = b_k == PS ? NP * PS : b_k;
  const bool partial = last_cols < PS;  // of the last panel
  alignas(kCacheLine) S tile[MR * PS];
  P acc[MR][NP];
  for (int i = 0; i < MR; ++i)
    for (int p = 0; p < NP; ++p)
      acc[i][p] = start_sum<S, start>(c, ldc, bias, i, p, partial && p == NP - 1, last_cols, tile + i * PS);
  auto step = [&](Index k) __attribute__((always_inline)) {
    P bk[NP];
    for (int p = 0; p < NP; ++p) bk[p] = ei::ploadu<P>(b + p * panel_stride + k * b_k);
    for (int i = 0; i < MR; ++i) {
      const P ai = ei::pset1<P>(a[i * lda + k * a_k]);
      for (int p = 0; p < NP; ++p) acc[i][p] = ei::pmadd(ai, bk[p], acc[i][p]);
    }
  };
  if (ahead) {
    for (Index k = 0; k < kc; ++k) {
      for (Index v = 0; v < NP * PS; v += kLineValues) __builtin_prefetch(ahead + k * ahead_k + v, 0, 2);
      step(k);
    }
  } else {
    for (Index k = 0; k < kc; ++k) step(k);
  }
  for (int i = 0; i < MR; ++i)
    for (int p = 0; p < NP; ++p)
      write_sum<S>(acc[i][p], c, ldc, i, p, partial && p == NP - 1, last_cols, tile + i * PS);
}

constexpr int panels_per_call(int rows) { return std::max(1, std::min(8, kAccumulators / rows)); }

// The kernel over the `panels` (1 to NP) panels left after the calls of NP panels each, in one
// call: each panel is another sum in flight, where two calls of one and two panels would leave a
// single row's sums waiting on the FMA's latency.
template <typename S, int MR, int NP, Start start>
void gemm_rest(Index panels, const S* a, Index lda, Index a_k, const S* b, Index panel_stride, Index b_k, Index kc,
               S* c, Index ldc, const S* bias, const S* ahead, Index last_cols) {
  if (panels == NP) {
    gemm_kernel<S, MR, NP, start>(a, lda, a_k, b, panel_stride, b_k, kc, c, ldc, bias, ahead, last_cols);
  } else if constexpr (NP > 1) {
    gemm_rest<S, MR, NP - 1, start>(panels, a, lda, a_k, b, panel_stride, b_k, kc, c, ldc, bias, ahead, last_cols);
  }
}

// MR rows of C over B's panels [q0, q1), for B's depth block [k0, k0 + kc). With `ahead`, the
// kernels also prefetch as many values of B as they read, from there on.
template <typename S, int MR, Start start>
void gemm_rows(const S* a, Index lda, Index a_k, const PackedB<S>& b, Index q0, Index q1, Index k0,
               Index kc, S* c, Index ldc, const S* bias, const S* ahead_q0) {
  constexpr Index PS = kPacket<S>;
  constexpr int NP = panels_per_call(MR);
  const Index stride = b.panel_stride(kc), b_k = b.row_stride(), full = std::min(q1, b.N / PS);
  const S* bk = b.block(k0);
  auto at = [&](Index q) { return bias ? bias + q * PS : nullptr; };
  auto ahead = [&](Index q) { return ahead_q0 ? ahead_q0 + (q - q0) * stride : nullptr; };
  Index q = q0;
  for (; q + NP <= full; q += NP)
    gemm_kernel<S, MR, NP, start>(a, lda, a_k, bk + q * stride, stride, b_k, kc, c + q * PS, ldc, at(q), ahead(q));
  // The rest: fewer than NP whole panels, and B's last, partial panel if it is among these.
  const Index last_cols = full < q1 ? b.N - full * PS : PS;
  if (q < q1)
    gemm_rest<S, MR, NP, start>(q1 - q, a, lda, a_k, bk + q * stride, stride, b_k, kc, c + q * PS, ldc, at(q),
                                ahead(q), last_cols);
}

template <typename S, int MR>
void gemm_rows_at(Start start, const S* a, Index lda, Index a_k, const PackedB<S>& b, Index q0, Index q1,
                  Index k0, Index kc, S* c, Index ldc, const S* bias, const S* ahead) {
  switch (start) {
    case Start::zero: gemm_rows<S, MR, Start::zero>(a, lda, a_k, b, q0, q1, k0, kc, c, ldc, bias, ahead); break;
    case Start::c: gemm_rows<S, MR, Start::c>(a, lda, a_k, b, q0, q1, k0, kc, c, ldc, bias, ahead); break;
    case Start::bias: gemm_rows<S, MR, Start::bias>(a, lda, a_k, b, q0, q1, k0, kc, c, ldc, bias, ahead); break;
  }
}

// The same for the mr < kRowBlock rows left below a pass's last whole row block.
template <typename S>
void gemm_last_rows(Index mr, Start start, const S* a, Index lda, Index a_k, const PackedB<S>& b, Index q0,
                    Index q1, Index k0, Index kc, S* c, Index ldc, const S* bias, const S* ahead) {
  static_assert(kRowBlock == 6, "one case per row count below a row block");
  switch (mr) {
    case 1: gemm_rows_at<S, 1>(start, a, lda, a_k, b, q0, q1, k0, kc, c, ldc, bias, ahead); break;
    case 2: gemm_rows_at<S, 2>(start, a, lda, a_k, b, q0, q1, k0, kc, c, ldc, bias, ahead); break;
    case 3: gemm_rows_at<S, 3>(start, a, lda, a_k, b, q0, q1, k0, kc, c, ldc, bias, ahead); break;
    case 4: gemm_rows_at<S, 4>(start, a, lda, a_k, b, q0, q1, k0, kc, c, ldc, bias, ahead); break;
    case 5: gemm_rows_at<S, 5>(start, a, lda, a_k, b, q0, q1, k0, kc, c, ldc, bias, ahead); break;
    default: break;
  }
}

// Rows [0, rows) x depth [0, kc) of A, element (i, k) at a[i * lda + k * a_k], copied into row
// blocks of kRowBlock rows (the last may be shorter, mr rows) stored depth-major: element (i, k)
// of the block starting at row r lands at dst[r * kc + k * mr + i - r]. Each row's elements are
// also added to row_sums[i] in order of k, when row_sums is given.
template <typename S>
void pack_a_blocks(const S* a, Index lda, Index a_k, Index rows, Index kc, S* dst, S* row_sums) {
  const Index full = rows / kRowBlock * kRowBlock, tail = rows - full;
  // Depth outer, so that with lda == 1 (A read transposed) each k reads one contiguous run. That
  // case is compiled apart with a constant stride, which the compiler makes vector moves and
  // adds (the generic loops make a memmove call per block, and scalar sums). Its runs lie GH
  // values apart, too far for the hardware prefetcher: they are asked for ahead.
  auto copy = [&](auto row_stride) {
    for (Index k = 0; k < kc; ++k) {
      const S* from = a + k * a_k;
      if (row_stride == 1 && k + kPackAhead < kc)
        for (Index i = 0; i < rows; i += kCacheLine / Index(sizeof(S)))
          __builtin_prefetch(from + kPackAhead * a_k + i, 0, 3);
      for (Index r = 0; r < full; r += kRowBlock)
        for (Index i = 0; i < kRowBlock; ++i) dst[r * kc + k * kRowBlock + i] = from[(r + i) * row_stride];
      for (Index i = 0; i < tail; ++i) dst[full * kc + k * tail + i] = from[(full + i) * row_stride];
      if (row_sums)
        for (Index i = 0; i < rows; ++i) row_sums[i] += from[i * row_stride];
    }
  };
  if (lda == 1) copy(std::integral_constant<Index, 1>{});
  else copy(lda);
}

// One product of packed_gemm_targets: C (n x b->N, row stride ldc) = A * B.
template <typename S>
struct GemmTarget {
  const PackedB<S>* b;
  S* c;
  Index ldc;
};

// A pass of rows [r0, r1) of A over one depth block of kc: as the caller stored it (row block r
// at base + r * lda, depth a_k apart), or copied by pack_a_blocks (at base + (r - r0) * kc, its
// rows one apart and its depth rows mr apart).
template <typename S>
struct APass {
  const S* base;
  Index r0, r1, kc, lda, a_k;
  bool packed;
  const S* at(Index r) const { return packed ? base + (r - r0) * kc : base + r * lda; }
  Index ld() const { return packed ? 1 : lda; }
  Index depth_step(Index mr) const { return packed ? mr : a_k; }
};

// One pass of A's rows against one target's B, for B's depth block k0. Each row block goes against
// all of B while B stays in L2. A B too large for that goes a few panels at a time against the
// whole pass, whose depth slice stays in L2, so that each chunk of B is fetched from memory once
// per pass and A's slice once per depth block; the pass's first row block prefetches the next
// chunk, which the hardware prefetcher alone fetches too late. `n`: all rows of A (the rule).
template <typename S>
void gemm_pass(const APass<S>& a, Index n, const GemmTarget<S>& target, Index k0, Start start, const S* bias) {
  const PackedB<S>& b = *target.b;
  const bool b_in_l2 = b.bytes() <= static_cast<Index>(kL2Bytes);
  const Index chunk = (n >= kMinRowsToChunkB && !b_in_l2) ? panels_per_call(kRowBlock) : b.panels;
  for (Index q0 = 0; q0 < b.panels; q0 += chunk) {
    const Index q1 = std::min(b.panels, q0 + chunk);
    const S* ahead = q1 < b.panels ? b.block(k0) + q1 * b.panel_stride(a.kc) : nullptr;
    Index r = a.r0;
    for (; r + kRowBlock <= a.r1; r += kRowBlock, ahead = nullptr)
      gemm_rows_at<S, kRowBlock>(start, a.at(r), a.ld(), a.depth_step(kRowBlock), b, q0, q1, k0, a.kc,
                                 target.c + r * target.ldc, target.ldc, bias, ahead);
    gemm_last_rows<S>(a.r1 - r, start, a.at(r), a.ld(), a.depth_step(a.r1 - r), b, q0, q1, k0, a.kc,
                      target.c + r * target.ldc, target.ldc, bias, ahead);
  }
}

// C = A * B for each target (every B of the same depth b->K), plus C itself when accumulate, plus
// the row `bias` (padded to b->padded_cols(); one target only) when given. A (n x K) has element
// (i, k) at a[i * lda + k * a_k]. With a_row_sums, also a_row_sums[i] = sum over k of A(i, k),
// added in order of k (the bias gradients, from the pass that already reads every element of A
// once). Each pass of A serves every target: an A that has to be copied is copied once for all.
template <typename S>
void packed_gemm_targets(Index n, const S* a, Index lda, Index a_k, const GemmTarget<S>* targets,
                         size_t count, bool accumulate, const S* bias = nullptr, S* a_row_sums = nullptr) {
  const Index K = targets[0].b->K;
  // An A read across its rows (a_k != 1: d_gates read transposed) has each k of a row block in
  // another cache line, GH elements on, which for a power-of-two GH maps them all to one L1 set;
  // each pass of such an A is copied once into blocks that the kernel reads contiguously.
  const bool pack_a = a_k != 1 || a_row_sums;
  if (a_row_sums) std::fill(a_row_sums, a_row_sums + n, S(0));
  Buffer<S> a_packed(pack_a ? std::min(n, kRowsPerPass) * std::min(K, kKBlock) : 0);
  for (Index k0 = 0; k0 < K; k0 += kKBlock) {
    const Index kc = targets[0].b->block_depth(k0);
    const Start start = (accumulate || k0 > 0) ? Start::c : bias ? Start::bias : Start::zero;
    const S* ak = a + k0 * a_k;
    for (Index r0 = 0; r0 < n; r0 += kRowsPerPass) {
      const Index r1 = std::min(n, r0 + kRowsPerPass);
      if (pack_a)
        pack_a_blocks(ak + r0 * lda, lda, a_k, r1 - r0, kc, a_packed.data(), a_row_sums ? a_row_sums + r0 : nullptr);
      const APass<S> pass{pack_a ? a_packed.data() : ak, r0, r1, kc, lda, a_k, pack_a};
      for (size_t t = 0; t < count; ++t) gemm_pass(pass, n, targets[t], k0, start, bias);
    }
  }
}

// The row sums packed_gemm_targets took (a bias gradient) written to `to`, or added to what it
// holds when `accumulate`.
template <typename S>
void store_sums(S* to, const S* sums, Index n, bool accumulate) {
  if (accumulate) arr(to, n) += carr(sums, n);
  else std::copy_n(sums, n, to);
}

// The same for one product: C (n x b.N, row stride ldc) = A * B (+ C, + bias).
template <typename S>
void packed_gemm_strided(Index n, const S* a, Index lda, Index a_k, const PackedB<S>& b, S* c, Index ldc,
                         bool accumulate, const S* bias = nullptr, S* a_row_sums = nullptr) {
  const GemmTarget<S> target{&b, c, ldc};
  packed_gemm_targets(n, a, lda, a_k, &target, 1, accumulate, bias, a_row_sums);
}

// The same with A row-major (row stride lda).
template <typename S>
void packed_gemm(Index n, const S* a, Index lda, const PackedB<S>& b, S* c, Index ldc, bool accumulate,
                 const S* bias = nullptr) {
  packed_gemm_strided(n, a, lda, 1, b, c, ldc, accumulate, bias);
}

}  // namespace pyrnn
