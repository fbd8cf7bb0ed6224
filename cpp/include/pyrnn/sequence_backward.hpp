// BPTT through one direction of one layer: sequence_backward, then the gradients over all steps.
#pragma once

#include <algorithm>
#include <initializer_list>
#include <vector>

#include "pyrnn/cells.hpp"
#include "pyrnn/gemm.hpp"
#include "pyrnn/sequence.hpp"
#include "pyrnn/team_plan.hpp"
#include "pyrnn/threads.hpp"
#include "pyrnn/types.hpp"
#include "pyrnn/workspace.hpp"

namespace pyrnn {

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
  parallel_for_blocks(GH, threads, kMinGradRowsPerThread, kRowBlock, [&](Range g) {
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
  parallel_for_blocks(rows, threads, kMinGemmRowsPerThread, kRowBlock, [&](Range r) {
    for (size_t d = 0; d < w_ih.size(); ++d)
      packed_gemm(r.size(), d_gates[d] + r.begin * GH, GH, *w_ih[d], dx + r.begin * I, I, d > 0);
  });
}

}  // namespace pyrnn
