// The input side of a forward pass: x_t W_ih^T + b_ih, the part of every step's gates that does
// not depend on h, computed for many steps at once (one GEMM of many rows reads W_ih once).
#pragma once

#include <algorithm>
#include <vector>

#include "pyrnn/gemm.hpp"
#include "pyrnn/sequence.hpp"
#include "pyrnn/threads.hpp"
#include "pyrnn/types.hpp"
#include "pyrnn/workspace.hpp"

namespace pyrnn {

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
    parallel_for_blocks(rows, threads, kMinGemmRowsPerThread, kRowBlock, [&](Range r) {
      packed_gemm(r.size(), x + r.begin * I, I, w_ih, xp + r.begin * GH, GH, false, b_ih.data());
    });
  }
};

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

// Multiply-adds of a linked loop's chunk of projection (see LayerLink): small, so that the layer
// above, keeping pace, does not wait through each of this loop's chunks.
constexpr Index kLinkedChunkMacs = Index(1) << 20;

// Bytes of one thread's projection made ahead of its steps: a few steps' worth, so that the cell
// reads them from cache, not from memory written long before.
constexpr Index kProjectionBytes = Index(1) << 20;

// Where one thread of a forward pass finds x_t W_ih^T + b_ih for its share of each step: in a
// (T, B, G*H) array made before its loop (`all`), or projected by the thread itself a chunk of
// steps at a time as its loop reaches them, into the tape's gates (`all` again) or into a buffer
// of a few steps of its own.
template <typename S>
class StepInputs {
 public:
  // all: the (T, B, G*H) array, or null; all_projected: whether it already holds every step's
  // projection. w_ih: this share's projection (null when all_projected).
  StepInputs(const DirForward<S>& io, Index G, const Share& share, const GateProjection<S>* w_ih, S* all,
             bool all_projected)
      : io_(io), share_(share), w_ih_(w_ih), all_(all), G_(G), rows_(share.rows(io.s.B)),
        step_values_(rows_ * G * share.w), own_(!all_projected && share.w > 0),
        chunk_steps_(chunk_steps(io.s.T, rows_, step_values_)),
        chunk_(own_ && !all ? chunk_steps_ * step_values_ : 0) {}

  // Step `step`'s gates (steps in the loop's order), projecting the chunk that starts there.
  GateView<S> at(Index step) {
    if (own_ && step == projected_) project_chunk(step);
    return at_time(time_at(step, io_.s.T, io_.reverse));
  }

 private:
  // At least a pass of rows per chunk, or W_ih would be fetched into cache more often than one
  // projection of the whole sequence fetches it.
  static Index chunk_steps(Index T, Index rows, Index step_values) {
    const Index min_steps = (kRowsPerPass + rows - 1) / std::max<Index>(1, rows);
    const Index fit_steps = kProjectionBytes / std::max<Index>(1, step_values * Index(sizeof(S)));
    return std::clamp<Index>(std::max(min_steps, fit_steps), 1, T);
  }

  // Linked, chunks of little work: the layer above, keeping pace, would wait through each of
  // this loop's chunks, and this one through each chunk of the layer below, which it takes as
  // far as written.
  void project_chunk(Index step) {
    const SeqShape& s = io_.s;
    Index steps = std::min(chunk_steps_, s.T - step);
    const LayerLink* link = io_.link;
    if (link) steps = std::min(steps, std::max<Index>(1, kLinkedChunkMacs / std::max<Index>(1, s.B * s.I * G_ * s.H)));
    if (link && link->await_input) steps = std::min(steps, link->await_input(step + 1) - step);
    project(io_.reverse ? s.T - step - steps : step, steps);
    projected_ += steps;
  }

  // Times [t0, t0 + n): the rows of consecutive steps follow each other when this thread has
  // all of them.
  void project(Index t0, Index n) {
    const SeqShape& s = io_.s;
    chunk_t0_ = t0;
    if (share_.all_rows(s.B)) {
      const GateView<S> to = at_time(t0);
      w_ih_->run(n * s.B, io_.x + t0 * s.B * s.I, s.I, to.p, to.ld, to.gate_stride);
      return;
    }
    for (Index t = t0; t < t0 + n; ++t) {
      const GateView<S> to = at_time(t);
      w_ih_->run(rows_, io_.x + t * s.B * s.I + share_.offset(s.I), share_.stride(s.I), to.p, to.ld, to.gate_stride);
    }
  }
  // Time t's gates of this share: in `all`, or in the chunk.
  GateView<S> at_time(Index t) {
    const Index GH = G_ * io_.s.H;
    if (all_) return {all_ + t * io_.s.B * GH + share_.offset(GH), share_.stride(GH), io_.s.H};
    return {chunk_.data() + (t - chunk_t0_) * step_values_, G_ * share_.w, share_.w};
  }

  const DirForward<S>& io_;
  const Share share_;
  const GateProjection<S>* w_ih_;
  S* const all_;
  const Index G_, rows_, step_values_;
  const bool own_;  // this thread projects its own steps
  const Index chunk_steps_;
  Buffer<S> chunk_;
  Index chunk_t0_ = 0, projected_ = 0;  // the chunk's first time; steps projected, in the loop's order
};

}  // namespace pyrnn
