// What the time loops of one direction of one layer share: its shape, weights and tape, how a
// thread's share of a step is laid out, and how a loop meets the layers next to it.
//
// Batch rows are sorted by length (longest first) by the stack driver, so at time t the active
// sequences are the first batch_sizes[t] rows and only they do work. The forward loop is in
// sequence_forward.hpp, BPTT in sequence_backward.hpp.
#pragma once

#include <algorithm>
#include <functional>

#include "pyrnn/gemm.hpp"
#include "pyrnn/team_plan.hpp"
#include "pyrnn/types.hpp"
#include "pyrnn/workspace.hpp"

namespace pyrnn {

struct SeqShape {
  Index T, B, I, H;
  Index P;                   // width of h: the projection's size for a projected LSTM, else H
  bool projected;            // h = m W_hr^T (an LSTM with w_hr; P may equal H)
  const Index* batch_sizes;  // (T,) active rows at each time step
  // Whether every row is active at every step (batch_sizes never rises, so its last says).
  bool same_lengths() const { return T == 0 || batch_sizes[T - 1] == B; }
};

template <typename S>
struct DirWeights {
  const S* w_ih;  // (G*H, I)
  const S* w_hh;  // (G*H, H)
  const S* b_ih;  // (G*H,)
  const S* b_hh;  // (G*H,)
  const S* w_peep = nullptr;  // (K, H): peephole cells' vectors, one row per gate that sees c
  const S* w_hr = nullptr;    // (P, H): a projected LSTM's projection, h = m w_hr^T
};

// What BPTT needs from one direction's forward pass; the sequences indexed by time t, (T, B, ·).
template <typename S>
struct DirTape {
  Buffer<S> gates;   // (T, B, G*H) activated gates
  Buffer<S> h_prev;  // (T, B, P) the state each step started from
  Buffer<S> c_prev;  // (T, B, H) lstm
  Buffer<S> tanh_c;  // (T, B, H) lstm: tanh(c_t)
  Buffer<S> hn;      // (T, B, H) gru: W_hn h_prev + b_hn
  Buffer<S> c;       // (T, B, H) peephole cells: c_t, which o saw (for dw_co)
  Buffer<S> w_peep;  // (K, H) peephole cells: the tape's copy of the vectors
  Buffer<S> m;       // (T, B, H) projected: m_t = o * tanh(c_t), zero past each sequence's end
  PackedB<S> w_hr_for_dh;  // projected: W_hr (P, H) right of dh, dm = dh W_hr
  // The weights as backward multiplies by them, packed during forward: the tape's own copy of
  // them and backward's packing in one. W_hh (G*H, H) right of d_gates in BPTT, gru's n rows
  // apart (they multiply d_hn, so that no copy of the r and z gradients is written for them);
  // W_ih (G*H, I) right of d_gates for dx. Projected, W_hh is (G*H, P).
  PackedB<S> w_hh_for_d_gates, w_hh_for_d_hn, w_ih_for_dx;
};

// How a layer's time loop meets the layers next to it when the layers of a stack run at once,
// each loop on one thread (see stack.hpp). Steps are counted in the loop's order (backward: from
// the end). Either may be empty.
struct LayerLink {
  // Returns once the loop may read at least its first n steps of input, with how many it may.
  std::function<Index(Index)> await_input;
  std::function<void(Index)> wrote;  // the loop has written its first n steps (out, or d_gates)
};

// One direction's forward pass over a sequence (see sequence_forward). Rows past a sequence's end
// get zeros in out, and keep their state.
template <typename S>
struct DirForward {
  SeqShape s;
  const DirWeights<S>* wt;
  bool reverse;           // run from t = T - 1 down to 0
  const S* x;             // (T, B, I)
  const S* h0;            // (B, P)
  const S* c0;            // (B, H), lstm
  S* out;                 // (T, B, P) out: this direction's slice of a (T, B, ld_out) buffer
  Index ld_out;
  S* h_n;                 // (B, P) out
  S* c_n;                 // (B, H) out, lstm
  DirTape<S>* tape;       // null: inference; else its gates, h_prev, c_prev, tanh_c, hn, c are written
  const LayerLink* link;  // null: the layers do not run at once
};

// BPTT through one direction (see sequence_backward).
template <typename S>
struct DirBackward {
  SeqShape s;
  bool reverse;
  const DirTape<S>* tape;
  const S* d_out;         // (T, B, P): this direction's slice of a (T, B, ld_dout) buffer
  Index ld_dout;
  const S* d_h_n;         // (B, P), or null: zero
  const S* d_c_n;         // (B, H), lstm, or null: zero
  S* d_gates;             // (T, B, G*H) out; rows past a sequence's end zero
  S* d_hn;                // (T, B, H) out, gru (else null); rows past a sequence's end zero
  S* dh_kept;             // (T, B, P) out, projected (else null): dL/dh_t of every step, for dW_hr
  S* dh0;                 // (B, P) out
  S* dc0;                 // (B, H) out, lstm
  const LayerLink* link;  // null: the layers do not run at once
};

// One thread's share of a time loop: rows row0, row0 + row_step, ... below row_end, and units
// [j0, j0 + w). `team` is the number of threads running, which OpenMP makes fewer than planned
// inside another parallel region (each direction of a bidirectional layer runs in one).
//
// Sharing out rows, a thread takes a block of consecutive rows when every sequence has the same
// length (its rows then sit apart from the others'), and every team-th row when they differ, so
// that each gets long and short ones alike.
struct Share {
  Index row0, row_step, row_end, j0, w;
  static Share of(const StepPlan& plan, int tid, int team, const SeqShape& s) {
    if (plan.by_rows && s.same_lengths()) {
      const Range r = split(s.B, tid, team);
      return {r.begin, 1, r.end, 0, s.H};
    }
    if (plan.by_rows) return {tid, team, s.B, 0, s.H};
    const Range u = split(s.H, tid, team, kUnitAlign);
    return {0, 1, s.B, u.begin, u.size()};
  }
  // How many of the first n rows are this thread's.
  Index rows(Index n) const {
    const Index below = std::min(n, row_end);
    return below > row0 ? (below - row0 + row_step - 1) / row_step : 0;
  }
  // Whether this share has every row of a (B, ·) batch.
  bool all_rows(Index B) const { return row0 == 0 && row_step == 1 && row_end >= B; }
  // Where this share starts in a (rows, ld) buffer, and how far apart its rows are there.
  Index offset(Index ld) const { return row0 * ld + j0; }
  Index stride(Index ld) const { return ld * row_step; }
};

// A projected loop is shared out by rows (each step's projection, forward and back, reads every
// unit of its rows): one thread where the plan was units.
inline StepPlan projected_plan(StepPlan plan, const SeqShape& s) {
  if (s.projected && !plan.by_rows) return {1, true};
  return plan;
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

// Ask for a small block that other threads have just written, all its lines at once: the step's
// GEMM reads it in order of depth, and each line that comes from another core would stall it.
template <typename S>
void prefetch_shared(const S* p, Index n) {
  constexpr Index kLine = kCacheLine / Index(sizeof(S)), kMaxLines = 64;
  if (n > kLine * kMaxLines) return;  // a large one is read by a GEMM long enough to hide them
  for (Index i = 0; i < n; i += kLine) __builtin_prefetch(p + i, 0, 3);
}

}  // namespace pyrnn
