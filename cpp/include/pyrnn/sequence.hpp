// The sequence driver: one direction of one layer over all time steps, forward and BPTT.
//
// Batch rows are sorted by length (longest first) by the stack driver, so at time t the active
// sequences are the first batch_sizes[t] rows and only they do work. Within a time loop the
// threads of a team each own a slice of the hidden units: each computes the recurrent GEMM for
// its own gate columns, runs the cell's pointwise pass on them, and meets the others at one
// barrier per step.
#pragma once

#include <algorithm>
#include <vector>

#include "pyrnn/cells.hpp"
#include "pyrnn/gemm.hpp"
#include "pyrnn/threads.hpp"
#include "pyrnn/types.hpp"
#include "pyrnn/workspace.hpp"

namespace pyrnn {

struct SeqShape {
  Index T, B, I, H;
  const Index* batch_sizes;  // (T,) active rows at each time step
};

template <typename S>
struct DirWeights {
  const S* w_ih;  // (G*H, I)
  const S* w_hh;  // (G*H, H)
  const S* b_ih;  // (G*H,)
  const S* b_hh;  // (G*H,)
};

// What BPTT needs from one direction's forward pass; everything indexed by time t, (T, B, ·).
template <typename S>
struct DirTape {
  Buffer<S> gates;   // (T, B, G*H) activated gates
  Buffer<S> aux;     // (T, B, H) lstm: tanh(c); gru: W_hn h_prev + b_hn
  Buffer<S> h_prev;  // (T, B, H) the state each step started from
  Buffer<S> c_prev;  // (T, B, H) lstm
};

// Hidden units are handed to threads in multiples of this (one or two SIMD registers).
constexpr Index kUnitAlign = 16;

// Threads for one time loop: a barrier per step only pays when the step's GEMM is big enough.
inline int step_team_size(Index B, Index H, Index G, int threads) {
  const Index macs = B * H * G * H;
  if (threads <= 1 || macs < (Index(1) << 17)) return 1;
  return static_cast<int>(std::min<Index>(threads, (H + kUnitAlign - 1) / kUnitAlign));
}

inline Index time_at(Index step, Index T, bool reverse) { return reverse ? T - 1 - step : step; }
inline Index round_up(Index n, Index m) { return (n + m - 1) / m * m; }

// Copy columns [j0, j0 + w) of rows [r0, r1) between two (·, ld) row-major buffers.
template <typename S>
void copy_cols(S* dst, Index ld_dst, const S* src, Index ld_src, Index r0, Index r1, Index w) {
  if (r1 > r0 && w > 0) mat(dst + r0 * ld_dst, r1 - r0, w, ld_dst) = cmat(src + r0 * ld_src, r1 - r0, w, ld_src);
}
template <typename S>
void zero_cols(S* dst, Index ld, Index r0, Index r1, Index w) {
  if (r1 > r0 && w > 0) mat(dst + r0 * ld, r1 - r0, w, ld).setZero();
}

// xp = x W_ih^T + b_ih for all T*B rows at once: (T*B, I) x (I, G*H), rows split over threads.
template <typename S>
void input_projection(Index rows, Index I, Index GH, const S* x, const S* w_ih, const S* b_ih, S* xp,
                      int threads) {
  PackedB<S> w;
  w.pack(I, GH, 1, [&](Index j) { return w_ih + j * I; });
  const Buffer<S> bias = padded_row(b_ih, GH, w.padded_cols());
  parallel_for_blocks(rows, threads, 32, kRowBlock, [&](Range r) {
    packed_gemm(r.size(), x + r.begin * I, I, w, xp + r.begin * GH, GH, false, bias.data());
  });
}

// Forward through time. xp holds the input projection on entry and the activated gates on exit.
// out is this direction's (T, B, H) slice of a (T, B, ld_out) buffer; rows past a sequence's end
// are zero. h0/c0 (B, H) in, h_n/c_n (B, H) out; c0/c_n only for lstm. tape may be null.
template <class Cell, typename S>
void sequence_forward(const SeqShape& s, const DirWeights<S>& wt, bool reverse, S* xp, const S* h0,
                      const S* c0, S* out, Index ld_out, S* h_n, S* c_n, DirTape<S>* tape,
                      int threads) {
  constexpr Index G = Cell::G;
  const Index T = s.T, B = s.B, H = s.H, GH = G * H;
  std::vector<S> h_buf(2 * B * H);
  std::vector<S> c(Cell::has_c ? B * H : 0), aux_scratch(Cell::has_aux && !tape ? B * H : 0);

  run_team(step_team_size(B, H, G, threads), [&](int tid, int team) {
    const Range u = split(H, tid, team, kUnitAlign);
    const Index j0 = u.begin, w = u.size();
    // This thread's rows of W_hh, packed once: gate g's units at columns [g * wp, g * wp + w).
    const Index wp = round_up(w, kPacket<S>);
    PackedB<S> w_hh;
    w_hh.pack(H, G * wp, 1, [&](Index j) {
      const Index g = j / wp, unit = j % wp;
      return unit < w ? wt.w_hh + (g * H + j0 + unit) * H : nullptr;
    });
    Buffer<S> hh(B * G * wp);
    copy_cols(h_buf.data() + j0, H, h0 + j0, H, 0, B, w);
    if constexpr (Cell::has_c) copy_cols(c.data() + j0, H, c0 + j0, H, 0, B, w);
    team_barrier();

    for (Index step = 0; step < T; ++step) {
      const Index t = time_at(step, T, reverse), n = s.batch_sizes[t];
      const S* h_prev = h_buf.data() + (step % 2) * B * H;
      S* h = h_buf.data() + ((step + 1) % 2) * B * H;
      if (tape) {
        copy_cols(tape->h_prev.data() + t * B * H + j0, H, h_prev + j0, H, 0, B, w);
        if constexpr (Cell::has_c) copy_cols(tape->c_prev.data() + t * B * H + j0, H, c.data() + j0, H, 0, B, w);
      }
      if (w > 0 && n > 0) {
        packed_gemm(n, h_prev, H, w_hh, hh.data(), G * wp, false);
        S* aux = Cell::has_aux ? (tape ? tape->aux.data() + t * B * H : aux_scratch.data()) : nullptr;
        StepForward<S> step_io{n, w, H,
                               {xp + t * B * GH + j0, GH, H},
                               {hh.data(), G * wp, wp},
                               wt.b_hh + j0,
                               h_prev + j0,
                               h + j0,
                               Cell::has_c ? c.data() + j0 : nullptr,
                               aux ? aux + j0 : nullptr};
        Cell::forward(step_io);
      }
      copy_cols(h + j0, H, h_prev + j0, H, n, B, w);  // finished (or not yet started) rows keep their state
      S* out_t = out + t * B * ld_out + j0;
      copy_cols(out_t, ld_out, h + j0, H, 0, n, w);
      zero_cols(out_t, ld_out, n, B, w);
      team_barrier();
    }
    copy_cols(h_n + j0, H, h_buf.data() + (T % 2) * B * H + j0, H, 0, B, w);
    if constexpr (Cell::has_c) copy_cols(c_n + j0, H, c.data() + j0, H, 0, B, w);
  });
}

// BPTT through one direction. d_out is this direction's slice of a (T, B, ld_dout) buffer;
// d_h_n/d_c_n (B, H) may be null (zero). Writes d_gates (T, B, G*H) (rows past a sequence's end
// zero), d_gates_hh likewise for gru (else null), and dh0/dc0 (B, H).
template <class Cell, typename S>
void sequence_backward(const SeqShape& s, const S* w_hh, bool reverse, const DirTape<S>& tape,
                       const S* d_out, Index ld_dout, const S* d_h_n, const S* d_c_n, S* d_gates,
                       S* d_gates_hh, S* dh0, S* dc0, int threads) {
  constexpr Index G = Cell::G;
  const Index T = s.T, B = s.B, H = s.H, GH = G * H;
  std::vector<S> dh(B * H), dc(Cell::has_c ? B * H : 0);
  S* dg_hh = Cell::split_hh_grad ? d_gates_hh : d_gates;

  run_team(step_team_size(B, H, G, threads), [&](int tid, int team) {
    const Range u = split(H, tid, team, kUnitAlign);
    const Index j0 = u.begin, w = u.size();
    // The columns of W_hh for this thread's units, packed once; dh_hh receives d_gates W_hh.
    const Index wp = round_up(w, kPacket<S>);
    PackedB<S> w_cols;
    w_cols.pack_rows(GH, w, wp, [&](Index k) { return w_hh + k * H + j0; });
    Buffer<S> dh_hh(B * wp);
    if (d_h_n) copy_cols(dh.data() + j0, H, d_h_n + j0, H, 0, B, w);
    else zero_cols(dh.data() + j0, H, 0, B, w);
    if constexpr (Cell::has_c) {
      if (d_c_n) copy_cols(dc.data() + j0, H, d_c_n + j0, H, 0, B, w);
      else zero_cols(dc.data() + j0, H, 0, B, w);
    }

    for (Index step = T - 1; step >= 0; --step) {
      const Index t = time_at(step, T, reverse), n = s.batch_sizes[t];
      const Index at_t = t * B * H;
      S* dg_t = d_gates + t * B * GH;
      S* dg_hh_t = dg_hh + t * B * GH;
      if (w > 0) {
        mat(dh.data() + j0, n, w, H) += cmat(d_out + t * B * ld_dout + j0, n, w, ld_dout);
        StepBackward<S> step_io{n, w, H,
                                {tape.gates.data() + t * B * GH + j0, GH, H},
                                Cell::has_aux ? tape.aux.data() + at_t + j0 : nullptr,
                                tape.h_prev.data() + at_t + j0,
                                Cell::has_c ? tape.c_prev.data() + at_t + j0 : nullptr,
                                dh.data() + j0,
                                Cell::has_c ? dc.data() + j0 : nullptr,
                                {dg_t + j0, GH, H},
                                {dg_hh_t + j0, GH, H}};
        Cell::backward(step_io);
        for (Index g = 0; g < G; ++g) {
          zero_cols(dg_t + g * H + j0, GH, n, B, w);
          if constexpr (Cell::split_hh_grad) zero_cols(dg_hh_t + g * H + j0, GH, n, B, w);
        }
      }
      team_barrier();  // the recurrent GEMM below reads every thread's d_gates
      if (w > 0 && n > 0) {
        packed_gemm(n, dg_hh_t, GH, w_cols, dh_hh.data(), wp, false);
        auto dh_prev = mat(dh.data() + j0, n, w, H);
        const auto from_w_hh = cmat(dh_hh.data(), n, w, wp);
        if constexpr (Cell::dh_bypasses_w_hh) dh_prev += from_w_hh;
        else dh_prev = from_w_hh;
      }
    }
    copy_cols(dh0 + j0, H, dh.data() + j0, H, 0, B, w);
    if constexpr (Cell::has_c) copy_cols(dc0 + j0, H, dc.data() + j0, H, 0, B, w);
  });
}

// sums[j] = sum over r of m[r, j], adding row after row: unlike Eigen's colwise().sum(), whose
// summation order differs between its packet and scalar columns, this does not depend on alignment.
template <typename S>
void column_sums(const S* m, Index rows, Index cols, Index ld, S* sums) {
  auto acc = arr(sums, cols);
  acc.setZero();
  for (Index r = 0; r < rows; ++r) acc += carr(m + r * ld, cols);
}

// Weight gradients summed over all steps, as two large GEMMs after the loop:
// dW_ih = d_gates^T x, dW_hh = d_gates_hh^T h_prev (d_gates read transposed, in place), and the
// biases as column sums. Threads split the gate rows; each sum over steps runs in one order.
template <typename S>
void weight_grads(Index rows, Index I, Index H, Index GH, const S* d_gates, const S* d_gates_hh,
                  const S* x, const S* h_prev, S* dw_ih, S* dw_hh, S* db_ih, S* db_hh, int threads) {
  PackedB<S> xb, hb;
  xb.pack_rows(rows, I, I, [&](Index k) { return x + k * I; });
  hb.pack_rows(rows, H, H, [&](Index k) { return h_prev + k * H; });
  parallel_for_blocks(GH, threads, 8, kRowBlock, [&](Range g) {
    packed_gemm_strided(g.size(), d_gates + g.begin, 1, GH, xb, dw_ih + g.begin * I, I, false);
    packed_gemm_strided(g.size(), d_gates_hh + g.begin, 1, GH, hb, dw_hh + g.begin * H, H, false);
    column_sums(d_gates + g.begin, rows, g.size(), GH, db_ih + g.begin);
    column_sums(d_gates_hh + g.begin, rows, g.size(), GH, db_hh + g.begin);
  });
}

// dx = sum over directions of d_gates W_ih: (T*B, G*H) x (G*H, I), rows split over threads.
template <typename S>
void input_grad(Index rows, Index I, Index GH, const std::vector<const S*>& d_gates,
                const std::vector<const S*>& w_ih, S* dx, int threads) {
  std::vector<PackedB<S>> w(d_gates.size());
  for (size_t d = 0; d < w.size(); ++d) w[d].pack_rows(GH, I, I, [&](Index k) { return w_ih[d] + k * I; });
  parallel_for_blocks(rows, threads, 32, kRowBlock, [&](Range r) {
    for (size_t d = 0; d < w.size(); ++d)
      packed_gemm(r.size(), d_gates[d] + r.begin * GH, GH, w[d], dx + r.begin * I, I, d > 0);
  });
}

}  // namespace pyrnn
