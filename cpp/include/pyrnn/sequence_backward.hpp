// BPTT through one direction of one layer: sequence_backward, then the gradients over all steps.
//
// The loop runs the steps from the last; each is the cell's pointwise backward on a thread's
// share, then the recurrent product d_gates W_hh into dh_prev. Its team shares the steps as the
// forward loop's does (team_plan.hpp): by rows, each thread on its own rows, or by units, the
// team meeting between the pointwise pass and the product, which reads every unit of d_gates.
// The weight gradients and dx are large GEMMs over all steps, after the loop.
#pragma once

#include <algorithm>
#include <initializer_list>
#include <vector>

#include "pyrnn/cells.hpp"
#include "pyrnn/gemm.hpp"
#include "pyrnn/projection.hpp"
#include "pyrnn/sequence.hpp"
#include "pyrnn/team_plan.hpp"
#include "pyrnn/threads.hpp"
#include "pyrnn/types.hpp"
#include "pyrnn/workspace.hpp"

namespace pyrnn {

// The gradients one backward pass carries from step to step, which its team shares (each thread
// writes only its share): dh (B, P) in: dL/dh_t; out: dL/dh_prev. dc (B, H) likewise (lstm).
// Projected, dm (B, H) = dh W_hr, dL/dm_t, which the cell's backward reads as its dh.
template <class Cell, typename S>
struct BackwardState {
  Buffer<S> dh, dc, dm;
  explicit BackwardState(const SeqShape& s)
      : dh(s.B * s.P), dc(Cell::has_c ? s.B * s.H : 0), dm(s.projected ? s.B * s.H : 0) {}
};

// One thread's share of a backward pass: d_h_n/d_c_n in, its rows and units of every step,
// dh0/dc0 out. A projected pass is shared out by rows: its share's dh is all P columns of its
// rows, its dc and dm all H.
template <class Cell, typename S>
class BackwardShare {
 public:
  BackwardShare(const DirBackward<S>& io, BackwardState<Cell, S>& state, const Share& share)
      : io_(io), share_(share), H_(io.s.H), P_(io.s.P), GH_(Cell::G * io.s.H), offset_h_(share.offset(H_)),
        ld_h_(share.stride(H_)), offset_p_(share.offset(P_)), ld_p_(share.stride(P_)),
        hw_(io.s.projected ? P_ : share.w), offset_g_(share.offset(GH_)), ld_g_(share.stride(GH_)),
        rows_(share.rows(io.s.B)), wp_(round_up(hw_, kPacket<S>)), dh_(state.dh.data()), dc_(state.dc.data()),
        dm_(state.dm.data()), dh_hh_(io.s.B * wp_) {
    // This share's columns [j0, j0 + w) of the tape's W_hh panels, whole panels (j0 falls on a
    // panel's edge; past H they are zero): dh_hh receives d_gates W_hh (+ d_hn W_hn) for them.
    static_assert(kUnitAlign % kPacket<S> == 0, "a share of units must start on a panel's edge");
    const Index q0 = share.j0 / kPacket<S>, q1 = q0 + wp_ / kPacket<S>;
    w_hh_for_d_gates_ = io.tape->w_hh_for_d_gates.columns(q0, q1, wp_);
    if constexpr (Cell::has_hn) w_hh_for_d_hn_ = io.tape->w_hh_for_d_hn.columns(q0, q1, wp_);
  }

  void start() const {
    start_with(dh_, io_.d_h_n, true);
    if constexpr (Cell::has_c) start_with(dc_, io_.d_c_n, false);
  }
  Index time(Index step) const { return time_at(step, io_.s.T, io_.reverse); }
  Index active(Index step) const { return share_.rows(io_.s.batch_sizes[time(step)]); }

  // dh += d_out_t, (projected: kept, and through W_hr into dm) then the cell's backward on the n
  // active rows; rows past them get zero d_gates (and d_hn).
  void pointwise(Index step, Index n) const {
    const Index t = time(step), w = share_.w;
    mat(dh_ + offset_p_, n, hw_, ld_p_) +=
        cmat(io_.d_out + t * io_.s.B * io_.ld_dout + share_.offset(io_.ld_dout), n, hw_, share_.stride(io_.ld_dout));
    if (io_.s.projected) through_w_hr(t, n);
    S* dg_t = d_gates(t) + offset_g_;
    Cell::backward(step_backward(t, n));
    for (Index g = 0; g < Cell::G; ++g) zero_cols(dg_t + g * H_, ld_g_, n, rows_, w);
    if constexpr (Cell::has_hn) zero_cols(d_hn(t) + offset_h_, ld_h_, n, rows_, w);
  }

  // The cell's operands at time t for the share's first n rows.
  StepBackward<S> step_backward(Index t, Index n) const {
    const Index t_block = t * io_.s.B * H_;
    const DirTape<S>& tape = *io_.tape;
    return {n, share_.w, ld_h_,
            {tape.gates.data() + t * io_.s.B * GH_ + offset_g_, ld_g_, H_},
            Cell::has_tanh_c ? tape.tanh_c.data() + t_block + offset_h_ : nullptr,
            Cell::has_hn ? tape.hn.data() + t_block + offset_h_ : nullptr,
            tape.h_prev.data() + t * io_.s.B * P_ + offset_p_,
            Cell::has_c ? tape.c_prev.data() + t_block + offset_h_ : nullptr,
            io_.s.projected ? dm_ + offset_h_ : dh_ + offset_h_,
            Cell::has_c ? dc_ + offset_h_ : nullptr,
            {d_gates(t) + offset_g_, ld_g_, H_},
            Cell::has_hn ? d_hn(t) + offset_h_ : nullptr,
            Cell::K > 0 ? tape.w_peep.data() + share_.j0 : nullptr, H_};
  }

  // Ask for the n active rows of d_hn at once (see prefetch_shared).
  void prefetch_d_hn(Index step, Index n) const { prefetch_shared(d_hn(time(step)), n * H_); }

  // Ask for the n active rows of d_gates (and d_hn) at once (see prefetch_shared).
  void prefetch_d_gates(Index step, Index n) const {
    prefetch_shared(d_gates(time(step)), n * GH_);
    if constexpr (Cell::has_hn) prefetch_shared(d_hn(time(step)), n * H_);
  }

  // A cell that splits its product (see Cell::split_product): d(r h_prev) = d_hn W_hn for the n
  // active rows and the share's units, then the cell's backward_reset on them (d_r, and dh).
  void through_w_hn(Index step, Index n) {
    const Index t = time(step);
    packed_gemm(n, d_hn(t) + share_.row0 * H_, ld_h_, w_hh_for_d_hn_, dh_hh_.data(), wp_, false);
    Cell::backward_reset(step_backward(t, n), dh_hh_.data(), wp_);
  }

  // dh_prev of the n active rows: d_gates W_hh (+ d_hn W_hn), plus what bypasses W_hh. A cell
  // that splits its product took d_hn through W_hn before (through_w_hn).
  void through_w_hh(Index step, Index n) {
    const Index t = time(step);
    packed_gemm(n, d_gates(t) + share_.row0 * GH_, ld_g_, w_hh_for_d_gates_, dh_hh_.data(), wp_, false);
    if constexpr (Cell::has_hn && !Cell::split_product)
      packed_gemm(n, d_hn(t) + share_.row0 * H_, ld_h_, w_hh_for_d_hn_, dh_hh_.data(), wp_, true);
    auto dh_prev = mat(dh_ + offset_p_, n, hw_, ld_p_);
    const auto from_w_hh = cmat(dh_hh_.data(), n, hw_, wp_);
    if constexpr (Cell::dh_bypasses_w_hh) dh_prev += from_w_hh;
    else dh_prev = from_w_hh;
  }

  void finish() const {
    copy_cols(io_.dh0 + offset_p_, ld_p_, dh_ + offset_p_, ld_p_, 0, rows_, hw_);
    if constexpr (Cell::has_c) copy_cols(io_.dc0 + offset_h_, ld_h_, dc_ + offset_h_, ld_h_, 0, rows_, share_.w);
  }

 private:
  S* d_gates(Index t) const { return io_.d_gates + t * io_.s.B * GH_; }
  S* d_hn(Index t) const { return io_.d_hn + t * io_.s.B * H_; }
  // The share of a gradient from the caller's (B, P) block (dh), or (B, H) block (dc), or zero.
  void start_with(S* d, const S* given, bool is_h) const {
    const Index offset = is_h ? offset_p_ : offset_h_, ld = is_h ? ld_p_ : ld_h_, w = is_h ? hw_ : share_.w;
    if (given) copy_cols(d + offset, ld, given + offset, ld, 0, rows_, w);
    else zero_cols(d + offset, ld, 0, rows_, w);
  }
  // Projected: dh_t of the n active rows kept for dW_hr (zero past them), and dm = dh W_hr.
  void through_w_hr(Index t, Index n) const {
    S* kept = io_.dh_kept + t * io_.s.B * P_ + offset_p_;
    copy_cols(kept, ld_p_, dh_ + offset_p_, ld_p_, 0, n, P_);
    zero_cols(kept, ld_p_, n, rows_, P_);
    packed_gemm(n, dh_ + offset_p_, ld_p_, io_.tape->w_hr_for_dh, dm_ + offset_h_, ld_h_, false);
  }

  const DirBackward<S>& io_;
  const Share share_;
  const Index H_, P_, GH_, offset_h_, ld_h_, offset_p_, ld_p_;
  const Index hw_;  // the share's columns of dh: P projected, else its units
  const Index offset_g_, ld_g_, rows_, wp_;
  S* const dh_;
  S* const dc_;
  S* const dm_;
  PackedB<S> w_hh_for_d_gates_, w_hh_for_d_hn_;
  Buffer<S> dh_hh_;  // (rows, wp) the product through W_hh
};

// One thread's loop, sharing out rows: its rows are its own at every step, so it never waits.
template <class Cell, typename S>
void backward_by_rows(const DirBackward<S>& io, BackwardState<Cell, S>& state, const Share& share) {
  BackwardShare<Cell, S> part(io, state, share);
  part.start();
  const Index T = io.s.T;
  for (Index step = T - 1; step >= 0; --step) {
    if (io.link && io.link->await_input) io.link->await_input(T - step);
    const Index n = part.active(step);
    part.pointwise(step, n);
    if constexpr (Cell::split_product)
      if (n > 0) part.through_w_hn(step, n);  // d_gates complete
    if (io.link && io.link->wrote) io.link->wrote(T - step);
    if (n > 0) part.through_w_hh(step, n);
  }
  part.finish();
}

// One thread's loop, sharing out units: the product through W_hh reads every unit of d_gates, so
// the team meets between the pointwise pass and the product.
template <class Cell, typename S>
void backward_by_units(const DirBackward<S>& io, BackwardState<Cell, S>& state, const Team& team,
                       const Share& share) {
  BackwardShare<Cell, S> part(io, state, share);
  part.start();
  const Index T = io.s.T;
  const bool has_units = share.w > 0;
  for (Index step = T - 1; step >= 0; --step) {
    if (io.link && io.link->await_input) io.link->await_input(T - step);
    const Index n = part.active(step);
    if (has_units) part.pointwise(step, n);
    team.barrier();
    if constexpr (Cell::split_product) {  // d_hn W_hn reads every unit of d_hn; d_gates complete after
      if (has_units && n > 0) {
        if (team.size > 1) part.prefetch_d_hn(step, n);
        part.through_w_hn(step, n);
      }
      team.barrier();
    }
    if (io.link && io.link->wrote) io.link->wrote(T - step);
    if (!has_units || n == 0) continue;
    if (team.size > 1) part.prefetch_d_gates(step, n);
    part.through_w_hh(step, n);
  }
  part.finish();
}

// BPTT through one direction (see DirBackward). A linked loop (io.link) runs on one thread.
template <class Cell, typename S>
void sequence_backward(const DirBackward<S>& io, int threads) {
  const SeqShape& s = io.s;
  if (io.link) threads = 1;
  const LoopPlan loop_plan(kBackward, s.B, 0, s.H, Cell::G, sizeof(S), threads, !s.projected);
  const StepPlan plan = projected_plan(loop_plan.steps(), s);
  BackwardState<Cell, S> state(s);
  run_team(plan.team, [&](const Team& team) {
    const Share share = Share::of(plan, team.tid, team.size, s);
    if (plan.by_rows) backward_by_rows<Cell>(io, state, share);
    else backward_by_units<Cell>(io, state, team, share);
  });
  loop_plan.finished(s.T);
}

// The B of a weight gradient, a (rows, n) matrix stored by rows at b (a layer's input, or its
// h_prev), for the GH gate rows that `threads` threads share out: read in place where each
// thread's gate rows take one pass over it, which packing first would make two; packed where they
// take more passes, as the kernel then reads every panel several times, and where the panels
// would not be whole.
template <typename S>
PackedB<S> weight_grad_operand(const S* b, Index rows, Index n, Index GH, int threads) {
  const Index rows_per_thread = round_up((GH + threads - 1) / threads, kRowBlock);
  if (n % kPacket<S> == 0 && rows_per_thread <= kRowsPerPass) return PackedB<S>::in_place(b, rows, n, n);
  PackedB<S> packed;
  packed.pack_rows(rows, n, n, [&](Index k) { return b + k * n; }, threads);
  return packed;
}

// Gate rows [r0, r0 + n) of the bias gradients in each of `db`, from the column sums of d_gates
// (or d_hn) that the GEMM over those rows took.
template <typename S>
void put_bias_sums(Index r0, Index n, const S* sums, std::initializer_list<S*> db, bool accumulate) {
  for (S* to : db) store_sums(to + r0, sums, n, accumulate);
}

// Weight gradients summed over all steps, as large GEMMs after the loop: dW_ih = d_gates^T x and
// dW_hh = d_gates^T h_prev (d_gates read transposed, in place; for gru's n rows of dW_hh, d_hn),
// and the biases as their column sums, taken as the GEMMs pack d_gates. Threads split the gate
// rows; each sum over steps runs in one order. Where both sides read d_gates, one pass over it
// feeds both products. xb is x (rows, I) as a B (packed, or read in place: see weight_grad_operand).
// With `accumulate` the gradients are added to what dw_*/db_* hold; added to zeros, they are the
// same bits as written.
//
// hn_input: what the n rows of dW_hh multiply d_hn by (gru: h_prev; gru_reset_before: r * h_prev).
// h_prev is (rows, P), P the width of h (H but for a projected LSTM).
template <typename S>
void weight_grads(Index rows, Index I, Index H, Index P, Index GH, const S* d_gates, const S* d_hn,
                  const PackedB<S>& xb, const S* h_prev, const S* hn_input, S* dw_ih, S* dw_hh, S* db_ih, S* db_hh,
                  bool accumulate, int threads) {
  const PackedB<S> hb = weight_grad_operand(h_prev, rows, P, GH, threads);
  const PackedB<S> hn_own = d_hn && hn_input != h_prev ? weight_grad_operand(hn_input, rows, H, GH, threads)
                                                       : PackedB<S>();
  const PackedB<S>& hnb = d_hn && hn_input != h_prev ? hn_own : hb;
  const Index rows_from_d_gates = d_hn ? GH - H : GH;
  parallel_for_blocks(GH, threads, kMinGradRowsPerThread, kRowBlock, [&](Range g) {
    auto ih = [&](Index r) { return GemmTarget<S>{&xb, dw_ih + r * I, I}; };
    auto hh = [&](Index r) { return GemmTarget<S>{&hb, dw_hh + r * P, P}; };
    std::vector<S> sums(g.size());
    const Index mid = std::clamp(rows_from_d_gates, g.begin, g.end);
    if (mid > g.begin) {
      const GemmTarget<S> both[] = {ih(g.begin), hh(g.begin)};
      packed_gemm_targets<S>(mid - g.begin, d_gates + g.begin, 1, GH, both, 2, accumulate, nullptr, sums.data());
      put_bias_sums<S>(g.begin, mid - g.begin, sums.data(), {db_ih, db_hh}, accumulate);
    }
    if (g.end > mid) {  // gru's n rows
      const GemmTarget<S> n_ih = ih(mid), n_hh{&hnb, dw_hh + mid * H, H};
      packed_gemm_targets<S>(g.end - mid, d_gates + mid, 1, GH, &n_ih, 1, accumulate, nullptr, sums.data());
      put_bias_sums<S>(mid, g.end - mid, sums.data(), {db_ih}, accumulate);
      packed_gemm_targets<S>(g.end - mid, d_hn + (mid - rows_from_d_gates), 1, H, &n_hh, 1, accumulate, nullptr,
                             sums.data());
      put_bias_sums<S>(mid, g.end - mid, sums.data(), {db_hh}, accumulate);
    }
  });
}

// The peephole vectors' gradients, summed over all steps and rows: row k of dw_peep (K, H) is the
// column sums of gate peepholes[k].gate's d_gates times the c that gate saw (c_prev, or c_t: the
// tape's, (rows, H) each). Threads split the units; each unit's sum runs over the rows in order,
// so the bits do not depend on the threads. With `accumulate` added to what dw_peep holds.
template <class Cell, typename S>
void peephole_grads(Index rows, Index H, const S* d_gates, const S* c_prev, const S* c, S* dw_peep, bool accumulate,
                    int threads) {
  const Index GH = Cell::G * H;
  parallel_for_blocks(H, threads, kUnitAlign, kUnitAlign, [&](Range u) {
    std::vector<S> sums(u.size());
    for (Index k = 0; k < Cell::K; ++k) {
      const Peephole peep = Cell::peepholes[k];
      const S* seen = (peep.new_c ? c : c_prev) + u.begin;
      const S* dg = d_gates + peep.gate * H + u.begin;
      std::fill(sums.begin(), sums.end(), S(0));
      for (Index r = 0; r < rows; ++r)
        for (Index j = 0; j < u.size(); ++j) sums[j] += dg[r * GH + j] * seen[r * H + j];
      store_sums(dw_peep + k * H + u.begin, sums.data(), u.size(), accumulate);
    }
  });
}

// A projected LSTM's dW_hr = sum over steps of dh_t^T m_t: (P, rows) x (rows, H), dh read
// transposed in place. Threads split W_hr's rows; each sum over steps runs in one order. With
// `accumulate` added to what dw_hr holds.
template <typename S>
void projection_grads(Index rows, Index H, Index P, const S* dh, const S* m, S* dw_hr, bool accumulate, int threads) {
  const PackedB<S> mb = weight_grad_operand(m, rows, H, P, threads);
  parallel_for_blocks(P, threads, kMinGradRowsPerThread, kRowBlock, [&](Range g) {
    const GemmTarget<S> target{&mb, dw_hr + g.begin * H, H};
    packed_gemm_targets<S>(g.size(), dh + g.begin, 1, P, &target, 1, accumulate);
  });
}

// dx = sum over directions of d_gates W_ih: (T*B, G*H) x (G*H, I), rows split over threads.
template <typename S>
void input_grad(Index rows, Index I, Index GH, const std::vector<const S*>& d_gates,
                const std::vector<const PackedB<S>*>& w_ih, S* dx, int threads) {
  parallel_for_blocks(rows, threads, kMinGemmRowsPerThread, kRowBlock, [&](Range r) {
    for (size_t d = 0; d < w_ih.size(); ++d)
      packed_gemm(r.size(), d_gates[d] + r.begin * GH, GH, *w_ih[d], dx + r.begin * I, I, d > 0);
  });
}

}  // namespace pyrnn
