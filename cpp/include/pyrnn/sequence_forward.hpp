// The forward time loop of one direction of one layer: sequence_forward.
//
// A pass is planned (team_plan.hpp: its team, and whether the team shares each step by rows or by
// units), its weights are packed (ForwardPacks), and each thread of the team runs the loop of its
// way of sharing: forward_by_rows, where it owns some batch rows outright and never waits, or
// forward_by_units, where it owns a slice of the hidden units of every row and meets the others
// after every step. A step is the recurrent product of the thread's share and the cell's pointwise
// pass on it (step_by_rows, step_by_units); a cell whose step needs more (another product, a
// meeting of the team inside the step) extends those.
#pragma once

#include <memory>
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

// One thread's units of the weights, sharing out units: W_hh's rows for them, and W_ih's (with
// b_ih) when the thread projects its own input. For a cell whose step splits its product (see
// Cell::split_product), W_hh's last gate (n) is packed apart, into w_hn.
template <typename S>
struct UnitPacks {
  PackedB<S> w_hh, w_hn;
  std::unique_ptr<GateProjection<S>> w_ih;  // null where the input is projected before the loop

  void pack(const DirWeights<S>& wt, Index G, Index I, Index H, const Share& share, bool with_w_ih, bool split) {
    pack_w_hh_units(w_hh, wt.w_hh, split ? G - 1 : G, H, H, share.j0, share.w, 1);
    if (split) pack_w_hh_units(w_hn, wt.w_hh + (G - 1) * H * H, 1, H, H, share.j0, share.w, 1);
    if (with_w_ih) w_ih = std::make_unique<GateProjection<S>>(wt, G, I, H, share.j0, share.w);
  }
  // W_hh^T's columns for units [j0, j0 + w), gate g's at [g * w, g * w + w): the gates side by
  // side, as padding each to whole panels would add up to a panel per gate to every step's GEMM.
  // W_hh is (G*H, P), P the width of h.
  static void pack_w_hh_units(PackedB<S>& packed, const S* w_hh, Index G, Index H, Index P, Index j0, Index w,
                              int threads) {
    packed.pack(P, G * w, 1, [&](Index j) { return w_hh + ((j / w) * H + j0 + j % w) * P; }, threads);
  }
};

// One direction's weights packed as its forward passes multiply by them, for one plan: packed by
// a pass for itself, or kept by the caller between inference calls on the same weights, batch
// size and thread count (see PackCache), as packing is a good part of a small model's call.
// Sharing out rows a pass reads w_hh_all and w_ih_all, sharing out units thread tid reads
// units[tid]; either reads up_front when its team is smaller than its threads.
template <typename S>
struct ForwardPacks {
  bool filled = false;
  int team = 0;  // the team that packed `units` (OpenMP may give fewer threads than planned)
  std::unique_ptr<InputProjection<S>> up_front;  // every step's projection at once, by all threads
  PackedB<S> w_hh_all, w_hn_all;  // w_hn_all: the n gate apart, for a cell that splits its product
  PackedB<S> w_hr;                 // projected: W_hr^T (H, P), h = m W_hr^T
  std::unique_ptr<GateProjection<S>> w_ih_all;
  std::vector<UnitPacks<S>> units;

  void reset(int planned_team) {
    *this = ForwardPacks();
    units.resize(planned_team);
  }
  // Sharing out rows every thread multiplies by all of W_hh and W_ih: packed once, by all of them.
  void pack_for_rows(const DirWeights<S>& wt, Index G, Index I, Index H, Index P, bool with_w_ih, bool split,
                     int threads) {
    UnitPacks<S>::pack_w_hh_units(w_hh_all, wt.w_hh, split ? G - 1 : G, H, P, 0, H, threads);
    if (split) UnitPacks<S>::pack_w_hh_units(w_hn_all, wt.w_hh + (G - 1) * H * H, 1, H, H, 0, H, threads);
    if (with_w_ih) w_ih_all = std::make_unique<GateProjection<S>>(wt, G, I, H, 0, H, threads);
    if (wt.w_hr) w_hr.pack(H, P, 1, [&](Index j) { return wt.w_hr + j * H; }, threads);
  }
  // This thread's units, sharing out units: the kept ones when a team of this size packed them,
  // else packed now, into these packs when `fill`, else into `own`.
  const UnitPacks<S>& units_of(const Team& team, bool fill, UnitPacks<S>& own, const DirWeights<S>& wt, Index G,
                               Index I, Index H, const Share& share, bool with_w_ih, bool split) {
    if (!fill && this->team == team.size) return units[team.tid];
    if (fill && team.tid == 0) this->team = team.size;
    UnitPacks<S>& packed_now = fill ? units[team.tid] : own;
    packed_now.pack(wt, G, I, H, share, with_w_ih, split);
    return packed_now;
  }
};

// The state one forward pass carries from step to step, which its team shares (each thread writes
// only its share), and where each step keeps what backward needs. Its buffers are 64-byte aligned
// (Eigen takes an unaligned output's head one element at a time).
template <class Cell, typename S>
class ForwardState {
 public:
  explicit ForwardState(const DirForward<S>& io)
      : io_(io), BH_(io.s.B * io.s.H), BP_(io.s.B * io.s.P), h_buf_(2 * BP_), c_(Cell::has_c ? BH_ : 0),
        tanh_c_(Cell::has_tanh_c && !io.tape ? BH_ : 0), hn_(Cell::has_hn && !io.tape ? BH_ : 0),
        m_(io.s.projected && !io.tape ? BH_ : 0) {}

  // h before step `step` (in the loop's order), (B, P): with a tape in its h_prev, where the
  // step before writes it; after the last step, and without a tape, in h_buf.
  S* h_before(Index step) const {
    if (io_.tape && step < io_.s.T) return io_.tape->h_prev.data() + time_at(step, io_.s.T, io_.reverse) * BP_;
    return h_buf_.data() + (step % 2) * BP_;
  }
  // Projected: time t's (B, H) m = o * tanh(c), on the tape, or in a scratch block without one.
  S* m(Index t) const { return io_.tape ? io_.tape->m.data() + t * BH_ : m_.data(); }
  S* c() const { return c_.data(); }  // lstm (B, H): c_prev in, c out at every step
  // Time t's (B, H) block of the tape's c_prev, tanh_c and hn; without a tape, tanh_c and hn go
  // to a scratch block of their own.
  S* c_prev(Index t) const { return io_.tape->c_prev.data() + t * BH_; }
  S* c_kept(Index t) const { return io_.tape->c.data() + t * BH_; }  // peephole cells: c_t
  S* tanh_c(Index t) const { return io_.tape ? io_.tape->tanh_c.data() + t * BH_ : tanh_c_.data(); }
  S* hn(Index t) const { return io_.tape ? io_.tape->hn.data() + t * BH_ : hn_.data(); }

 private:
  const DirForward<S>& io_;
  const Index BH_, BP_;
  mutable Buffer<S> h_buf_, c_, tanh_c_, hn_, m_;  // the blocks are written, never the buffers
};

// One thread's share of a forward pass: h0/c0 in, its rows and units of every step, h_n/c_n out.
// A projected pass is shared out by rows (each step's projection reads every unit of m): its
// share's h is all P columns of its rows, its c and m all H.
template <class Cell, typename S>
class ForwardShare {
 public:
  ForwardShare(const DirForward<S>& io, const ForwardState<Cell, S>& state, const Share& share,
               const PackedB<S>& w_hh, const PackedB<S>& w_hn, const PackedB<S>& w_hr)
      : io_(io), state_(state), share_(share), w_hh_(w_hh), w_hn_(w_hn), w_hr_(w_hr), H_(io.s.H), P_(io.s.P),
        offset_h_(share.offset(H_)), ld_h_(share.stride(H_)), offset_p_(share.offset(P_)), ld_p_(share.stride(P_)),
        hw_(io.s.projected ? P_ : share.w), rows_(share.rows(io.s.B)), hh_(io.s.B * Cell::G * share.w) {}

  void start() const {
    copy_cols(state_.h_before(0) + offset_p_, ld_p_, io_.h0 + offset_p_, ld_p_, 0, rows_, hw_);
    if constexpr (Cell::has_c) copy_cols(state_.c() + offset_h_, ld_h_, io_.c0 + offset_h_, ld_h_, 0, rows_, share_.w);
  }
  Index time(Index step) const { return time_at(step, io_.s.T, io_.reverse); }
  // This share's rows active at step `step`.
  Index active(Index step) const { return share_.rows(io_.s.batch_sizes[time(step)]); }
  // With a tape, c before the step is kept on it.
  void keep_c_prev(Index step) const {
    if constexpr (Cell::has_c)
      if (io_.tape)
        copy_cols(state_.c_prev(time(step)) + offset_h_, ld_h_, state_.c() + offset_h_, ld_h_, 0, rows_, share_.w);
  }
  // hh = h_prev W_hh^T for the share's first n active rows and its units.
  void recurrent_product(Index step, Index n) {
    packed_gemm(n, h_prev_rows(step), ld_p_, w_hh_, hh_.data(), Cell::G * share_.w, false);
  }
  // Ask for those rows of h_prev at once (see prefetch_shared).
  void prefetch_h_prev(Index step, Index n) const { prefetch_shared(h_prev_rows(step), n * P_); }
  // Projected: h = m W_hr^T for the share's first n rows, m being what the cell just wrote.
  void project(Index step, Index n) {
    if (!io_.s.projected) return;
    packed_gemm(n, state_.m(time(step)) + offset_h_, ld_h_, w_hr_, state_.h_before(step + 1) + offset_p_, ld_p_,
                false);
  }
  // A cell that splits its product: hh's last gate = (r * h_prev) W_hn^T, r * h_prev being what
  // the cell's forward_gates left in hn for every unit of the share's first n rows.
  void reset_product(Index step, Index n) {
    const Index gw = (Cell::G - 1) * share_.w;
    packed_gemm(n, reset_rows(step), ld_h_, w_hn_, hh_.data() + gw, Cell::G * share_.w, false);
  }
  void prefetch_reset(Index step, Index n) const { prefetch_shared(reset_rows(step), n * H_); }
  // The cell's operands at step `step` for the share's first n rows, its gates' input at xp.
  StepForward<S> cell_step(Index step, Index n, const GateView<S>& xp) {
    const Index t = time(step), w = share_.w;
    S* h = io_.s.projected ? state_.m(t) + offset_h_ : state_.h_before(step + 1) + offset_h_;
    return {n, w, H_, ld_h_, xp, {hh_.data(), Cell::G * w, w}, io_.wt->b_hh + share_.j0,
            state_.h_before(step) + offset_h_, h,
            Cell::has_c ? state_.c() + offset_h_ : nullptr,
            Cell::has_tanh_c ? state_.tanh_c(t) + offset_h_ : nullptr,
            Cell::has_hn ? state_.hn(t) + offset_h_ : nullptr,
            Cell::K > 0 ? io_.wt->w_peep + share_.j0 : nullptr};
  }
  // After the step: rows past the first n (finished, or not yet started) keep their state; out
  // gets the new h of the n rows and zeros past them.
  void end_step(Index step, Index n) const {
    const Index t = time(step), w = share_.w;
    const S* h_prev = state_.h_before(step) + offset_p_;
    S* h = state_.h_before(step + 1) + offset_p_;
    copy_cols(h, ld_p_, h_prev, ld_p_, n, rows_, hw_);
    S* out_t = io_.out + t * io_.s.B * io_.ld_out + share_.offset(io_.ld_out);
    copy_cols(out_t, share_.stride(io_.ld_out), h, ld_p_, 0, n, hw_);
    zero_cols(out_t, share_.stride(io_.ld_out), n, rows_, hw_);
    if (io_.s.projected && io_.tape) zero_cols(state_.m(t) + offset_h_, ld_h_, n, rows_, w);  // for dW_hr
    if constexpr (Cell::K > 0)  // with a tape, the c that o saw, for dw_co
      if (io_.tape) copy_cols(state_.c_kept(t) + offset_h_, ld_h_, state_.c() + offset_h_, ld_h_, 0, rows_, w);
    if constexpr (Cell::split_product)  // the tape's r * h_prev: zero past the n rows, for dW_hn
      if (io_.tape) zero_cols(state_.hn(t) + offset_h_, ld_h_, n, rows_, w);
  }
  void finish() const {
    copy_cols(io_.h_n + offset_p_, ld_p_, state_.h_before(io_.s.T) + offset_p_, ld_p_, 0, rows_, hw_);
    if constexpr (Cell::has_c) copy_cols(io_.c_n + offset_h_, ld_h_, state_.c() + offset_h_, ld_h_, 0, rows_, share_.w);
  }

 private:
  const S* h_prev_rows(Index step) const { return state_.h_before(step) + share_.row0 * P_; }
  const S* reset_rows(Index step) const { return state_.hn(time(step)) + share_.row0 * H_; }

  const DirForward<S>& io_;
  const ForwardState<Cell, S>& state_;
  const Share share_;
  const PackedB<S>& w_hh_;
  const PackedB<S>& w_hn_;  // a cell that splits its product: its last gate's rows
  const PackedB<S>& w_hr_;  // projected: W_hr^T
  const Index H_, P_, offset_h_, ld_h_, offset_p_, ld_p_;
  const Index hw_;  // the share's columns of h: P projected, else its units
  const Index rows_;
  Buffer<S> hh_;  // (rows, G*w) h_prev W_hh^T of the share
};

// A step shared out by rows: this thread's n active rows against all of W_hh, then the cell.
template <class Cell, typename S>
void step_by_rows(ForwardShare<Cell, S>& part, Index step, Index n, const GateView<S>& xp) {
  part.recurrent_product(step, n);
  if constexpr (Cell::split_product) {
    Cell::forward_gates(part.cell_step(step, n, xp));
    part.reset_product(step, n);
  }
  Cell::forward(part.cell_step(step, n, xp));
  part.project(step, n);
}

// A step shared out by units: the n active rows of h_prev, which the whole team wrote, against
// this thread's units of W_hh, then the cell on those units.
template <class Cell, typename S>
void step_by_units(ForwardShare<Cell, S>& part, const Team& team, Index step, Index n, const GateView<S>& xp) {
  if (team.size > 1) part.prefetch_h_prev(step, n);
  part.recurrent_product(step, n);
  Cell::forward(part.cell_step(step, n, xp));
}

// The same for a cell that splits its product: the second product reads every unit of what the
// first pointwise pass wrote, so the team meets between them. Every thread comes to the meeting,
// those without rows or units too (n = 0).
template <class Cell, typename S>
void split_step_by_units(ForwardShare<Cell, S>& part, const Team& team, Index step, Index n, const GateView<S>& xp) {
  if (n > 0) {
    if (team.size > 1) part.prefetch_h_prev(step, n);
    part.recurrent_product(step, n);
    Cell::forward_gates(part.cell_step(step, n, xp));
  }
  team.barrier();
  if (n == 0) return;
  if (team.size > 1) part.prefetch_reset(step, n);
  part.reset_product(step, n);
  Cell::forward(part.cell_step(step, n, xp));
}

// One thread's loop, sharing out rows: its rows are its own at every step, so it never waits.
template <class Cell, typename S>
void forward_by_rows(const DirForward<S>& io, const ForwardState<Cell, S>& state, const Share& share,
                     const ForwardPacks<S>& packs, StepInputs<S>& inputs) {
  ForwardShare<Cell, S> part(io, state, share, packs.w_hh_all, packs.w_hn_all, packs.w_hr);
  part.start();
  for (Index step = 0; step < io.s.T; ++step) {
    const Index n = part.active(step);
    const GateView<S> xp = inputs.at(step);
    part.keep_c_prev(step);
    if (n > 0) step_by_rows<Cell>(part, step, n, xp);
    part.end_step(step, n);
    if (io.link && io.link->wrote) io.link->wrote(step + 1);
  }
  part.finish();
}

// One thread's loop, sharing out units: each step reads every unit of h_prev, so the team meets
// before the first and after every step.
template <class Cell, typename S>
void forward_by_units(const DirForward<S>& io, const ForwardState<Cell, S>& state, const Team& team,
                      const Share& share, const PackedB<S>& w_hh, const PackedB<S>& w_hn, StepInputs<S>& inputs) {
  ForwardShare<Cell, S> part(io, state, share, w_hh, w_hn, w_hn);  // never projected (see ForwardShare)
  part.start();
  team.barrier();
  for (Index step = 0; step < io.s.T; ++step) {
    const Index n = part.active(step);
    const GateView<S> xp = inputs.at(step);
    part.keep_c_prev(step);
    if constexpr (Cell::split_product) split_step_by_units<Cell>(part, team, step, share.w > 0 ? n : 0, xp);
    else if (share.w > 0 && n > 0) step_by_units<Cell>(part, team, step, n, xp);
    part.end_step(step, n);
    team.barrier();
    if (io.link && io.link->wrote) io.link->wrote(step + 1);
  }
  part.finish();
}

// Before the team starts: with `up_front` every step's projection into xp_all (T, B, G*H), by
// all threads; sharing out rows, W_hh and W_ih for all units, packed once by all threads.
template <class Cell, typename S>
void prepare_shared(ForwardPacks<S>& packs, bool fill, const DirForward<S>& io, const StepPlan& plan,
                    bool up_front, S* xp_all, int threads) {
  constexpr Index G = Cell::G;
  const SeqShape& s = io.s;
  if (up_front) {
    if (fill) packs.up_front = std::make_unique<InputProjection<S>>(*io.wt, s.I, G * s.H, threads);
    packs.up_front->run(s.T * s.B, s.I, G * s.H, io.x, xp_all, threads);
  }
  if (plan.by_rows && fill) packs.pack_for_rows(*io.wt, G, s.I, s.H, s.P, !up_front, Cell::split_product, threads);
}

// One thread's part of a pass: its share, its packs, its inputs, and the loop of its plan.
template <class Cell, typename S>
void run_share(const DirForward<S>& io, const ForwardState<Cell, S>& state, const Team& team, const StepPlan& plan,
               ForwardPacks<S>& packs, bool fill, S* xp_all, bool up_front) {
  constexpr Index G = Cell::G;
  const Share share = Share::of(plan, team.tid, team.size, io.s);
  if (plan.by_rows) {
    StepInputs<S> inputs(io, G, share, packs.w_ih_all.get(), xp_all, up_front);
    forward_by_rows<Cell>(io, state, share, packs, inputs);
    return;
  }
  UnitPacks<S> own;
  const bool with_w_ih = !up_front && share.w > 0;
  const UnitPacks<S>& units =
      packs.units_of(team, fill, own, *io.wt, G, io.s.I, io.s.H, share, with_w_ih, Cell::split_product);
  StepInputs<S> inputs(io, G, share, units.w_ih.get(), xp_all, up_front);
  forward_by_units<Cell>(io, state, team, share, units.w_hh, units.w_hn, inputs);
}

// Forward through time (see DirForward). With a tape, its gates receive the activated gates.
//
// The input projection is computed by the thread that uses it, a chunk of steps at a time, into
// the tape's gates or a small buffer of its own (StepInputs); only a time loop whose team is
// smaller than its threads has all of them project the whole sequence before it starts.
//
// kept: packs of these weights to use, or to fill when empty, for calls to come with the same
// batch size and threads (null: packed for this call only). A linked loop (io.link) runs on one
// thread, which projects its input in chunks as it goes, never up front.
template <class Cell, typename S>
void sequence_forward(const DirForward<S>& io, ForwardPacks<S>* kept, int threads) {
  constexpr Index G = Cell::G;
  const SeqShape& s = io.s;
  if (io.link) threads = 1;
  // Kept packs are laid out for the planned team: one thread would have to pack for itself.
  const LoopPlan loop_plan(io.tape ? kForwardTraining : kForwardInference, s.B, s.I, s.H, G, sizeof(S), threads,
                           !kept && !s.projected);
  const StepPlan plan = projected_plan(loop_plan.steps(), s);
  const bool up_front = plan.team < threads;
  ForwardPacks<S> own;
  ForwardPacks<S>& packs = kept ? *kept : own;
  const bool fill = !packs.filled;
  if (fill) packs.reset(plan.team);
  // Every step's projection (T, B, G*H): the tape's gates, or made up front without a tape.
  Buffer<S> xp_up_front(up_front && !io.tape ? s.T * s.B * G * s.H : 0);
  S* const xp_all = io.tape ? io.tape->gates.data() : xp_up_front.data();
  prepare_shared<Cell>(packs, fill, io, plan, up_front, xp_all, threads);
  const ForwardState<Cell, S> state(io);
  run_team(plan.team, [&](const Team& team) { run_share<Cell>(io, state, team, plan, packs, fill, xp_all, up_front); });
  if (fill) packs.filled = true;  // only the filling call writes: others may be reading these packs
  loop_plan.finished(s.T);
}

// Pack one direction's weights onto its tape (see DirTape). Up to `threads` threads share it.
template <class Cell, typename S>
void keep_weights(DirTape<S>& tape, const DirWeights<S>& wt, Index I, Index H, Index P, int threads) {
  const Index GH = Cell::G * H, rows_from_d_gates = Cell::has_hn ? GH - H : GH;
  const Index padded_h = round_up(H, kPacket<S>);
  tape.w_hh_for_d_gates.pack_rows(rows_from_d_gates, P, round_up(P, kPacket<S>),
                                  [&](Index k) { return wt.w_hh + k * P; }, threads);
  if (wt.w_hr) tape.w_hr_for_dh.pack_rows(P, H, H, [&](Index k) { return wt.w_hr + k * H; }, threads);
  if constexpr (Cell::has_hn)
    tape.w_hh_for_d_hn.pack_rows(H, H, padded_h, [&](Index k) { return wt.w_hh + (rows_from_d_gates + k) * H; },
                                 threads);
  tape.w_ih_for_dx.pack_rows(GH, I, I, [&](Index k) { return wt.w_ih + k * I; }, threads);
  if constexpr (Cell::K > 0) {
    tape.w_peep.allocate(Cell::K * H);
    std::copy_n(wt.w_peep, Cell::K * H, tape.w_peep.data());
  }
}

}  // namespace pyrnn
