// The sequence driver: one direction of one layer over all time steps, forward and BPTT.
//
// Batch rows are sorted by length (longest first) by the stack driver, so at time t the active
// sequences are the first batch_sizes[t] rows and only they do work. Within a time loop the
// threads of a team share the work in one of two ways (see StepPlan): each owns a slice of the
// hidden units of every row and meets the others at one barrier per step, or each owns some of
// the batch rows outright (see Share) and never waits for the others.
#pragma once

#include <algorithm>
#include <functional>
#include <initializer_list>
#include <memory>
#include <vector>

#include "pyrnn/cells.hpp"
#include "pyrnn/gemm.hpp"
#include "pyrnn/team_plan.hpp"
#include "pyrnn/threads.hpp"
#include "pyrnn/types.hpp"
#include "pyrnn/workspace.hpp"

namespace pyrnn {

struct SeqShape {
  Index T, B, I, H;
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
};

// What BPTT needs from one direction's forward pass; the sequences indexed by time t, (T, B, ·).
template <typename S>
struct DirTape {
  Buffer<S> gates;   // (T, B, G*H) activated gates
  Buffer<S> h_prev;  // (T, B, H) the state each step started from
  Buffer<S> c_prev;  // (T, B, H) lstm
  Buffer<S> tanh_c;  // (T, B, H) lstm: tanh(c_t)
  Buffer<S> hn;      // (T, B, H) gru: W_hn h_prev + b_hn
  // The weights as backward multiplies by them, packed during forward: the tape's own copy of
  // them and backward's packing in one. W_hh (G*H, H) right of d_gates in BPTT, gru's n rows
  // apart (they multiply d_hn, so that no copy of the r and z gradients is written for them);
  // W_ih (G*H, I) right of d_gates for dx.
  PackedB<S> w_hh_for_d_gates, w_hh_for_d_hn, w_ih_for_dx;
};

// One thread's share of a time loop: rows row0, row0 + row_step, ... below row_end, and units
// [j0, j0 + w). `team` is the number of threads running, which OpenMP makes fewer than planned
// inside another parallel region (each direction of a bidirectional layer runs in one).
//
// Sharing out rows, a thread takes a block of consecutive rows when every sequence has the same
// length, and every team-th row when they differ, so that each gets long and short ones alike.
// In blocks, each thread's rows sit apart from the others', and on two threads (256 units, paired
// rounds) inference and training steps took 1-8 % less time than every other row at batch 32 and
// 4-10 % less at batch 64, the most while the host was busy.
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
  Index at(Index ld) const { return row0 * ld + j0; }
  Index stride(Index ld) const { return ld * row_step; }
};

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
// GEMM reads it in order of depth, and each line that comes from another core then stalls it.
// Batch-1 LSTM and GRU steps on two threads: 1-3 % faster, most while the host is slow.
template <typename S>
void prefetch_shared(const S* p, Index n) {
  constexpr Index kLine = 64 / Index(sizeof(S)), kMaxLines = 64;
  if (n > kLine * kMaxLines) return;  // a large one is read by a GEMM long enough to hide them
  for (Index i = 0; i < n; i += kLine) __builtin_prefetch(p + i, 0, 3);
}

// xp = x W_ih^T + b_ih for all T*B rows at once: (T*B, I) x (I, G*H), rows split over threads.
template <typename S>
struct InputProjection {
  PackedB<S> w_ih;
  Buffer<S> b_ih;

  InputProjection(const DirWeights<S>& wt, Index I, Index GH, int threads) {
    w_ih.pack(I, GH, 1, [&](Index j) { return wt.w_ih + j * I; }, threads);
    b_ih = padded_row(wt.b_ih, GH, w_ih.padded_cols());
  }
  void run(Index rows, Index I, Index GH, const S* x, S* xp, int threads) const {
    parallel_for_blocks(rows, threads, 32, kRowBlock, [&](Range r) {
      packed_gemm(r.size(), x + r.begin * I, I, w_ih, xp + r.begin * GH, GH, false, b_ih.data());
    });
  }
};

// Multiply-adds of a linked loop's chunk of input projection (see LayerLink): about 20 us.
constexpr Index kLinkedChunkMacs = Index(1) << 20;

// Bytes of one thread's input projection computed ahead of its time loop: a few steps' worth,
// so that the cell reads them from cache, not from memory written long before.
constexpr Index kProjectionBytes = Index(1) << 20;

// x W_ih^T + b_ih for G gates of units [j0, j0 + w), one packed B per gate so that each gate's
// projection lands in that gate's own columns of the destination. Up to `threads` threads pack it.
template <typename S>
struct GateProjection {
  std::vector<PackedB<S>> w_ih;
  std::vector<Buffer<S>> b_ih;

  GateProjection(const DirWeights<S>& wt, Index G, Index I, Index H, Index j0, Index w, int threads = 1)
      : w_ih(G), b_ih(G) {
    for (Index g = 0; g < G; ++g) {
      w_ih[g].pack(I, w, 1, [&](Index j) { return wt.w_ih + (g * H + j0 + j) * I; }, threads);
      b_ih[g] = padded_row(wt.b_ih + g * H + j0, w, w_ih[g].padded_cols());
    }
  }
  // n rows of x (row stride ld_x) into n rows of gates (row stride ld, gate g at g * gate_stride).
  void run(Index n, const S* x, Index ld_x, S* gates, Index ld, Index gate_stride) const {
    for (size_t g = 0; g < w_ih.size(); ++g)
      packed_gemm(n, x, ld_x, w_ih[g], gates + g * gate_stride, ld, false, b_ih[g].data());
  }
};

// How a layer's time loop meets the layers next to it when the layers of a stack run at once,
// each loop on one thread (see stack.hpp). Steps are counted in the loop's order (backward: from
// the end). Either may be empty.
struct LayerLink {
  // Returns once the loop may read at least its first n steps of input, with how many it may.
  std::function<Index(Index)> await_input;
  std::function<void(Index)> wrote;  // the loop has written its first n steps (out, or d_gates)
};

// One direction's weights packed as its forward pass multiplies by them, for one step plan:
// made by the pass, or kept by the caller from an earlier inference pass on the same weights,
// batch size and thread count (see PackCache), as packing was 5-15 % of a small model's call.
// Which members are used depends on the plan; sharing out units, thread tid packs its own.
template <typename S>
struct ForwardPacks {
  bool filled = false;
  int team = 0;  // the team that packed the per-thread members (OpenMP may give fewer than planned)
  std::unique_ptr<InputProjection<S>> projection_up_front;
  PackedB<S> w_hh_all;
  std::unique_ptr<GateProjection<S>> projection_all;
  std::vector<PackedB<S>> w_hh_mine;
  std::vector<std::unique_ptr<GateProjection<S>>> projection_mine;
};

// Forward through time. x is this direction's (T, B, I) input. out is this direction's (T, B, H)
// slice of a (T, B, ld_out) buffer; rows past a sequence's end are zero. h0/c0 (B, H) in, h_n/c_n
// (B, H) out; c0/c_n only for lstm. With a tape, its gates receive the activated gates.
//
// The input projection is computed by the thread that uses it, a chunk of steps at a time, into
// the tape's gates or a small per-thread buffer; only a time loop too small for every thread
// projects the whole sequence up front, with all of them.
//
// kept: packs of these weights to use, or to fill when empty, for calls to come with the same
// batch size and threads (null: packed for this call only).
// link: how to meet the other layers when they run at once (null: they do not); the loop then
// runs on one thread, which projects its input in chunks as it goes, never up front.
template <class Cell, typename S>
void sequence_forward(const SeqShape& s, const DirWeights<S>& wt, bool reverse, const S* x, const S* h0,
                      const S* c0, S* out, Index ld_out, S* h_n, S* c_n, DirTape<S>* tape,
                      ForwardPacks<S>* kept, int threads, const LayerLink* link = nullptr) {
  constexpr Index G = Cell::G;
  const Index T = s.T, B = s.B, I = s.I, H = s.H, GH = G * H;
  // The cell's outputs live in 64-byte-aligned buffers (a std::vector's are only 16-byte aligned):
  // Eigen takes an output's unaligned head one element at a time, which in a batch-1 step of 64
  // units was up to 15 of them per gate, and made batch-1 inference 1.5-4 % slower.
  Buffer<S> h_buf(2 * B * H);
  // The state before step `step`: with a tape, in its h_prev, where the step before writes it
  // (copied there, it was one of two same-sized copies per step, with the one into out, that
  // together took 6.6 % of an RNN's training forward at batch 32); the last in h_buf.
  auto state_before = [&](Index step) -> S* {
    if (tape && step < T) return tape->h_prev.data() + time_at(step, T, reverse) * B * H;
    return h_buf.data() + (step % 2) * B * H;
  };
  Buffer<S> c(Cell::has_c ? B * H : 0);
  // Without a tape, what a step keeps for backward goes to scratch blocks (B, H).
  Buffer<S> tanh_c_scratch(Cell::has_tanh_c && !tape ? B * H : 0), hn_scratch(Cell::has_hn && !tape ? B * H : 0);
  if (link) threads = 1;
  const bool awaits = link && link->await_input;
  // Kept packs are laid out for the planned team: one thread would have to pack for itself.
  const LoopPlan loop_plan(tape ? kForwardTraining : kForwardInference, B, I, H, G, sizeof(S), threads, !kept);
  const StepPlan plan = loop_plan.steps();
  const bool project_up_front = plan.team < threads;
  ForwardPacks<S> made;
  ForwardPacks<S>& packs = kept ? *kept : made;
  const bool fill = !packs.filled;
  if (fill) {
    packs = ForwardPacks<S>();
    packs.w_hh_mine.resize(plan.team);
    packs.projection_mine.resize(plan.team);
  }
  Buffer<S> xp_all;  // (T, B, G*H), the whole projection when made up front without a tape
  S* xp_full = tape ? tape->gates.data() : nullptr;
  if (project_up_front) {
    if (!tape) {
      xp_all.allocate(T * B * GH);
      xp_full = xp_all.data();
    }
    if (fill) packs.projection_up_front = std::make_unique<InputProjection<S>>(wt, I, GH, threads);
    packs.projection_up_front->run(T * B, I, GH, x, xp_full, threads);
  }
  // The rows of W_hh for units [j0, j0 + w), gate g's units at columns [g * w, g * w + w). The
  // gates sit side by side, not each padded to whole panels: for H = 100 on two threads that
  // padding was 8-23 % more columns in every step's GEMM.
  auto pack_w_hh = [&](PackedB<S>& packed, Index j0, Index w, int pack_threads) {
    packed.pack(H, G * w, 1, [&](Index j) { return wt.w_hh + ((j / w) * H + j0 + j % w) * H; }, pack_threads);
  };
  // Sharing out rows, every thread multiplies by all of W_hh and W_ih: they are packed once, by
  // all of them, not once by each. Sharing out units, each thread packs its own units' rows.
  if (plan.by_rows && fill) {
    pack_w_hh(packs.w_hh_all, 0, H, threads);
    if (!project_up_front) packs.projection_all = std::make_unique<GateProjection<S>>(wt, G, I, H, 0, H, threads);
  }

  run_team(plan.team, [&](const Team& team) {
    const int tid = team.tid;
    const Share my = Share::of(plan, tid, team.size, s);
    const Index w = my.w, at_h = my.at(H), ld_h = my.stride(H), my_b = my.rows(B);
    // Sharing out units, a kept pack of my units serves only a team of the size that made it.
    if (fill && tid == 0) packs.team = team.size;
    const bool mine_kept = !fill && packs.team == team.size;
    PackedB<S> w_hh_made;
    PackedB<S>& w_hh_mine = mine_kept || fill ? packs.w_hh_mine[tid] : w_hh_made;
    if (!plan.by_rows && !mine_kept) pack_w_hh(w_hh_mine, my.j0, w, 1);
    const PackedB<S>& w_hh = plan.by_rows ? packs.w_hh_all : w_hh_mine;
    Buffer<S> hh(B * G * w);
    copy_cols(state_before(0) + at_h, ld_h, h0 + at_h, ld_h, 0, my_b, w);
    if constexpr (Cell::has_c) copy_cols(c.data() + at_h, ld_h, c0 + at_h, ld_h, 0, my_b, w);

    // Step t's gates of this share: into the (T, B, G*H) layout of the tape, or into `chunk`,
    // a buffer of `chunk_steps` steps of my_b rows by G*w, from time chunk_t0 on.
    const bool in_chunks = !project_up_front && w > 0;
    const Index step_elems = my_b * G * w;
    // At least a pass of rows per chunk, or W_ih would be fetched into cache more often than
    // one projection of the whole sequence fetches it.
    const Index min_steps = (kRowsPerPass + my_b - 1) / std::max<Index>(1, my_b);
    const Index fit_steps = kProjectionBytes / std::max<Index>(1, step_elems * Index(sizeof(S)));
    const Index chunk_steps = std::clamp<Index>(std::max(min_steps, fit_steps), 1, T);
    Buffer<S> chunk(in_chunks && !tape ? chunk_steps * step_elems : 0);
    const bool full_layout = xp_full != nullptr;
    const Index ld_xp = full_layout ? my.stride(GH) : G * w, gate_stride = full_layout ? H : w;
    Index chunk_t0 = 0;
    auto xp_at = [&](Index t) {
      return full_layout ? xp_full + t * B * GH + my.at(GH) : chunk.data() + (t - chunk_t0) * step_elems;
    };
    std::unique_ptr<GateProjection<S>> projection_made;
    std::unique_ptr<GateProjection<S>>& projection_mine =
        mine_kept || fill ? packs.projection_mine[tid] : projection_made;
    if (in_chunks && !plan.by_rows && !mine_kept)
      projection_mine = std::make_unique<GateProjection<S>>(wt, G, I, H, my.j0, w);
    const GateProjection<S>* projection = plan.by_rows ? packs.projection_all.get() : projection_mine.get();
    // Project times [t0, t0 + n): the rows of consecutive steps follow each other when this
    // thread has all of them.
    auto project = [&](Index t0, Index n) {
      chunk_t0 = t0;
      if (my.all_rows(B)) {
        projection->run(n * B, x + t0 * B * I, I, xp_at(t0), ld_xp, gate_stride);
      } else {
        for (Index t = t0; t < t0 + n; ++t)
          projection->run(my_b, x + t * B * I + my.at(I), my.stride(I), xp_at(t), ld_xp, gate_stride);
      }
    };
    if (!plan.by_rows) team.barrier();

    Index projected = 0;  // steps, in the loop's order
    for (Index step = 0; step < T; ++step) {
      const Index t = time_at(step, T, reverse), n = my.rows(s.batch_sizes[t]);
      if (in_chunks && step == projected) {
        // Linked, chunks of little work: the layer above, keeping pace, would wait through each
        // of this loop's chunks, and this one through each chunk of the layer below, which it
        // takes as far as written.
        Index steps = std::min(chunk_steps, T - step);
        const Index step_macs = std::max<Index>(1, B * I * GH);
        if (link) steps = std::min(steps, std::max<Index>(1, kLinkedChunkMacs / step_macs));
        if (awaits) steps = std::min(steps, link->await_input(step + 1) - step);
        project(reverse ? T - step - steps : step, steps);
        projected += steps;
      }
      const S* h_prev = state_before(step);
      S* h = state_before(step + 1);
      if constexpr (Cell::has_c)
        if (tape) copy_cols(tape->c_prev.data() + t * B * H + at_h, ld_h, c.data() + at_h, ld_h, 0, my_b, w);
      if (w > 0 && n > 0) {
        if (team.size > 1 && !plan.by_rows) prefetch_shared(h_prev, n * H);
        packed_gemm(n, h_prev + my.row0 * H, ld_h, w_hh, hh.data(), G * w, false);
        S* tanh_c = Cell::has_tanh_c ? (tape ? tape->tanh_c.data() + t * B * H : tanh_c_scratch.data()) : nullptr;
        S* hn = Cell::has_hn ? (tape ? tape->hn.data() + t * B * H : hn_scratch.data()) : nullptr;
        StepForward<S> step_io{n, w, H, ld_h,
                               {xp_at(t), ld_xp, gate_stride},
                               {hh.data(), G * w, w},
                               wt.b_hh + my.j0,
                               h_prev + at_h,
                               h + at_h,
                               Cell::has_c ? c.data() + at_h : nullptr,
                               tanh_c ? tanh_c + at_h : nullptr,
                               hn ? hn + at_h : nullptr};
        Cell::forward(step_io);
      }
      copy_cols(h + at_h, ld_h, h_prev + at_h, ld_h, n, my_b, w);  // finished (or not yet started) rows keep their state
      S* out_t = out + t * B * ld_out + my.at(ld_out);
      copy_cols(out_t, my.stride(ld_out), h + at_h, ld_h, 0, n, w);
      zero_cols(out_t, my.stride(ld_out), n, my_b, w);
      if (!plan.by_rows) team.barrier();
      if (link && link->wrote) link->wrote(step + 1);
    }
    copy_cols(h_n + at_h, ld_h, state_before(T) + at_h, ld_h, 0, my_b, w);
    if constexpr (Cell::has_c) copy_cols(c_n + at_h, ld_h, c.data() + at_h, ld_h, 0, my_b, w);
  });
  if (fill) packs.filled = true;  // only the filling call writes: others may be reading these packs
  loop_plan.finished(T);
}

// Pack one direction's weights onto its tape (see DirTape). Up to `threads` threads share it.
template <class Cell, typename S>
void keep_weights(DirTape<S>& tape, const DirWeights<S>& wt, Index I, Index H, int threads) {
  const Index GH = Cell::G * H, rows_from_d_gates = Cell::has_hn ? GH - H : GH;
  const Index padded_h = round_up(H, kPacket<S>);
  tape.w_hh_for_d_gates.pack_rows(rows_from_d_gates, H, padded_h, [&](Index k) { return wt.w_hh + k * H; },
                                  threads);
  if constexpr (Cell::has_hn)
    tape.w_hh_for_d_hn.pack_rows(H, H, padded_h, [&](Index k) { return wt.w_hh + (rows_from_d_gates + k) * H; },
                                 threads);
  tape.w_ih_for_dx.pack_rows(GH, I, I, [&](Index k) { return wt.w_ih + k * I; }, threads);
}

// BPTT through one direction. d_out is this direction's slice of a (T, B, ld_dout) buffer;
// d_h_n/d_c_n (B, H) may be null (zero). Writes d_gates (T, B, G*H) (rows past a sequence's end
// zero), d_hn (T, B, H) likewise for gru (else null), and dh0/dc0 (B, H).
// link: as for sequence_forward (its input is d_out).
template <class Cell, typename S>
void sequence_backward(const SeqShape& s, bool reverse, const DirTape<S>& tape, const S* d_out, Index ld_dout,
                       const S* d_h_n, const S* d_c_n, S* d_gates, S* d_hn, S* dh0, S* dc0, int threads,
                       const LayerLink* link = nullptr) {
  constexpr Index G = Cell::G;
  const Index T = s.T, B = s.B, H = s.H, GH = G * H;
  Buffer<S> dh(B * H), dc(Cell::has_c ? B * H : 0);
  if (link) threads = 1;
  const LoopPlan loop_plan(kBackward, B, 0, H, G, sizeof(S), threads, true);
  const StepPlan plan = loop_plan.steps();

  run_team(plan.team, [&](const Team& team) {
    const Share my = Share::of(plan, team.tid, team.size, s);
    const Index w = my.w, at_h = my.at(H), ld_h = my.stride(H), my_b = my.rows(B);
    const Index at_g = my.at(GH), ld_g = my.stride(GH);
    // This share's columns [j0, j0 + w) of the tape's W_hh panels, whole panels (j0 falls on a
    // panel's edge; past H they are zero): dh_hh receives d_gates W_hh (+ d_hn W_hn) for them.
    constexpr Index P = kPacket<S>;
    static_assert(kUnitAlign % P == 0, "a share of units must start on a panel's edge");
    const Index wp = round_up(w, P), q0 = my.j0 / P, q1 = q0 + wp / P;
    const PackedB<S> w_hh_for_d_gates = tape.w_hh_for_d_gates.columns(q0, q1, wp);
    const PackedB<S> w_hh_for_d_hn = Cell::has_hn ? tape.w_hh_for_d_hn.columns(q0, q1, wp) : PackedB<S>();
    Buffer<S> dh_hh(B * wp);
    if (d_h_n) copy_cols(dh.data() + at_h, ld_h, d_h_n + at_h, ld_h, 0, my_b, w);
    else zero_cols(dh.data() + at_h, ld_h, 0, my_b, w);
    if constexpr (Cell::has_c) {
      if (d_c_n) copy_cols(dc.data() + at_h, ld_h, d_c_n + at_h, ld_h, 0, my_b, w);
      else zero_cols(dc.data() + at_h, ld_h, 0, my_b, w);
    }

    for (Index step = T - 1; step >= 0; --step) {
      const Index t = time_at(step, T, reverse), n = my.rows(s.batch_sizes[t]);
      const Index at_t = t * B * H;
      S* dg_t = d_gates + t * B * GH;
      S* d_hn_t = Cell::has_hn ? d_hn + at_t : nullptr;
      if (link && link->await_input) link->await_input(T - step);
      if (w > 0) {
        mat(dh.data() + at_h, n, w, ld_h) += cmat(d_out + t * B * ld_dout + my.at(ld_dout), n, w, my.stride(ld_dout));
        StepBackward<S> step_io{n, w, ld_h,
                                {tape.gates.data() + t * B * GH + at_g, ld_g, H},
                                Cell::has_tanh_c ? tape.tanh_c.data() + at_t + at_h : nullptr,
                                Cell::has_hn ? tape.hn.data() + at_t + at_h : nullptr,
                                tape.h_prev.data() + at_t + at_h,
                                Cell::has_c ? tape.c_prev.data() + at_t + at_h : nullptr,
                                dh.data() + at_h,
                                Cell::has_c ? dc.data() + at_h : nullptr,
                                {dg_t + at_g, ld_g, H},
                                Cell::has_hn ? d_hn_t + at_h : nullptr};
        Cell::backward(step_io);
        for (Index g = 0; g < G; ++g) zero_cols(dg_t + at_g + g * H, ld_g, n, my_b, w);
        if constexpr (Cell::has_hn) zero_cols(d_hn_t + at_h, ld_h, n, my_b, w);
      }
      if (!plan.by_rows) team.barrier();  // the recurrent GEMM below reads every thread's d_gates
      if (link && link->wrote) link->wrote(T - step);
      if (w > 0 && n > 0) {
        if (team.size > 1 && !plan.by_rows) {
          prefetch_shared(dg_t, n * GH);
          if constexpr (Cell::has_hn) prefetch_shared(d_hn_t, n * H);
        }
        packed_gemm(n, dg_t + my.row0 * GH, ld_g, w_hh_for_d_gates, dh_hh.data(), wp, false);
        if constexpr (Cell::has_hn)
          packed_gemm(n, d_hn_t + my.row0 * H, ld_h, w_hh_for_d_hn, dh_hh.data(), wp, true);
        auto dh_prev = mat(dh.data() + at_h, n, w, ld_h);
        const auto from_w_hh = cmat(dh_hh.data(), n, w, wp);
        if constexpr (Cell::dh_bypasses_w_hh) dh_prev += from_w_hh;
        else dh_prev = from_w_hh;
      }
    }
    copy_cols(dh0 + at_h, ld_h, dh.data() + at_h, ld_h, 0, my_b, w);
    if constexpr (Cell::has_c) copy_cols(dc0 + at_h, ld_h, dc.data() + at_h, ld_h, 0, my_b, w);
  });
  loop_plan.finished(T);
}

// The B of a weight gradient, a (rows, n) matrix stored by rows at b (a layer's input, or its
// h_prev), for the GH gate rows that `threads` threads share out: read in place where each thread's
// gate rows take one pass over it, which packing first would make two (2-4 % of an RNN's backward
// at batch 32 and 256 units, 5-6 % of a batch-1 RNN's or GRU's); packed where they take more
// passes, as the kernel then reads every panel several times (in place, an LSTM's backward was
// 1 % slower), and where the panels would not be whole.
template <typename S>
PackedB<S> weight_grad_operand(const S* b, Index rows, Index n, Index GH, int threads) {
  const Index rows_per_thread = round_up((GH + threads - 1) / threads, kRowBlock);
  if (n % kPacket<S> == 0 && rows_per_thread <= kRowsPerPass) return PackedB<S>::in_place(b, rows, n, n);
  PackedB<S> packed;
  packed.pack_rows(rows, n, n, [&](Index k) { return b + k * n; }, threads);
  return packed;
}

// Weight gradients summed over all steps, as large GEMMs after the loop: dW_ih = d_gates^T x and
// dW_hh = d_gates^T h_prev (d_gates read transposed, in place; for gru's n rows of dW_hh, d_hn),
// and the biases as their column sums, taken as the GEMMs pack d_gates. Threads split the gate
// rows; each sum over steps runs in one order. Where both sides read d_gates, one pass over it
// feeds both products. xb is x (rows, I) as a B (packed, or read in place: see weight_grad_operand).
// With `accumulate` the gradients are added to what dw_*/db_* hold; added to zeros, they are the
// same bits as written.
template <typename S>
void weight_grads(Index rows, Index I, Index H, Index GH, const S* d_gates, const S* d_hn, const PackedB<S>& xb,
                  const S* h_prev, S* dw_ih, S* dw_hh, S* db_ih, S* db_hh, bool accumulate, int threads) {
  const PackedB<S> hb = weight_grad_operand(h_prev, rows, H, GH, threads);
  const Index rows_from_d_gates = d_hn ? GH - H : GH;
  parallel_for_blocks(GH, threads, 8, kRowBlock, [&](Range g) {
    auto ih = [&](Index r) { return GemmTarget<S>{&xb, dw_ih + r * I, I}; };
    auto hh = [&](Index r) { return GemmTarget<S>{&hb, dw_hh + r * H, H}; };
    // Gate rows [r0, r0 + n) of the bias gradients in db, from `sums`: the column sums of d_gates
    // (or d_hn) that the GEMM over those rows took.
    std::vector<S> sums(g.size());
    auto put_sums = [&](Index r0, Index n, std::initializer_list<S*> db) {
      for (S* to : db) store_sums(to + r0, sums.data(), n, accumulate);
    };
    const Index mid = std::clamp(rows_from_d_gates, g.begin, g.end);
    if (mid > g.begin) {
      const GemmTarget<S> both[] = {ih(g.begin), hh(g.begin)};
      packed_gemm_targets<S>(mid - g.begin, d_gates + g.begin, 1, GH, both, 2, accumulate, nullptr, sums.data());
      put_sums(g.begin, mid - g.begin, {db_ih, db_hh});
    }
    if (g.end > mid) {  // gru's n rows
      const GemmTarget<S> n_ih = ih(mid), n_hh = hh(mid);
      packed_gemm_targets<S>(g.end - mid, d_gates + mid, 1, GH, &n_ih, 1, accumulate, nullptr, sums.data());
      put_sums(mid, g.end - mid, {db_ih});
      packed_gemm_targets<S>(g.end - mid, d_hn + (mid - rows_from_d_gates), 1, H, &n_hh, 1, accumulate, nullptr,
                             sums.data());
      put_sums(mid, g.end - mid, {db_hh});
    }
  });
}

// dx = sum over directions of d_gates W_ih: (T*B, G*H) x (G*H, I), rows split over threads.
template <typename S>
void input_grad(Index rows, Index I, Index GH, const std::vector<const S*>& d_gates,
                const std::vector<const PackedB<S>*>& w_ih, S* dx, int threads) {
  parallel_for_blocks(rows, threads, 32, kRowBlock, [&](Range r) {
    for (size_t d = 0; d < w_ih.size(); ++d)
      packed_gemm(r.size(), d_gates[d] + r.begin * GH, GH, *w_ih[d], dx + r.begin * I, I, d > 0);
  });
}

}  // namespace pyrnn
