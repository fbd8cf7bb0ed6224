// The stack driver: layers, directions, variable lengths, initial states, dropout masks.
//
// The batch is sorted once by length (longest first, stable), as PyTorch's packed path does, so
// the sequence driver only ever sees a prefix of active rows; everything is un-permuted at the
// end. Layer k > 0 reads layer k-1's outputs [fwd, bwd] times its dropout mask.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "pyrnn/cells.hpp"
#include "pyrnn/sequence_backward.hpp"
#include "pyrnn/sequence_forward.hpp"
#include "pyrnn/team_plan.hpp"
#include "pyrnn/threads.hpp"
#include "pyrnn/types.hpp"
#include "pyrnn/workspace.hpp"

namespace pyrnn {

enum class CellKind { rnn_tanh, rnn_relu, lstm, gru };

inline Index gate_count(CellKind cell) {
  switch (cell) {
    case CellKind::lstm: return LstmCell::G;
    case CellKind::gru: return GruCell::G;
    default: return 1;
  }
}

// Call f(Cell{}) with the cell struct for `cell`.
template <class F>
void with_cell(CellKind cell, F&& f) {
  switch (cell) {
    case CellKind::rnn_tanh: f(RnnTanhCell{}); break;
    case CellKind::rnn_relu: f(RnnReluCell{}); break;
    case CellKind::lstm: f(LstmCell{}); break;
    case CellKind::gru: f(GruCell{}); break;
  }
}

struct Dims {
  Index T, B, I, H, L, D;
  Index input_size(Index layer) const { return layer == 0 ? I : D * H; }
};

template <typename S>
struct StackInputs {
  CellKind cell;
  Dims dims;
  const S* x;                          // (T, B, I)
  const S* h0;                         // (L*D, B, H)
  const S* c0;                         // (L*D, B, H), lstm only
  std::vector<DirWeights<S>> weights;  // L*D, ordered l0-fwd, l0-bwd, l1-fwd, ...
  const std::int64_t* lengths;         // (B,) in [1, T], or null: all T
  std::vector<const S*> masks;         // empty, or L-1 arrays (T, B, D*H)
};

template <typename S>
struct StackOutputs {
  S* out;  // (T, B, D*H)
  S* h_n;  // (L*D, B, H)
  S* c_n;  // (L*D, B, H), lstm only
};

template <typename S>
struct StackGrads {
  S* dx;   // (T, B, I)
  S* dh0;  // (L*D, B, H)
  S* dc0;  // (L*D, B, H), lstm only
  std::vector<S*> dw_ih, dw_hh, db_ih, db_hh;  // L*D each
  // Add the weight gradients to what dw_*/db_* hold (as a module's gradients accumulate) instead
  // of writing them: the product lands in place, with no array of its own and no second pass.
  bool accumulate = false;
};

// What backward needs, owned: it stays valid whatever the caller does to its arrays.
struct TapeBase {
  CellKind cell;
  Dims dims;
  explicit TapeBase(CellKind c, Dims d) : cell(c), dims(d) {}
  virtual ~TapeBase() = default;
};

template <typename S>
struct Tape : TapeBase {
  using TapeBase::TapeBase;
  bool sorted = true;                  // no lengths: rows are in the caller's order
  std::vector<Index> order;            // sorted row j is the caller's row order[j]
  std::vector<Index> batch_sizes;      // (T,)
  // Each layer's input (T, B, I_k), sorted (and masked), for weight_grads: kept as it is (see
  // weight_grad_operand), except layer 0's without lengths, the caller's x packed here
  // (layer_input[0] empty).
  std::vector<Buffer<S>> layer_input;  // L
  PackedB<S> x_packed;
  std::vector<Buffer<S>> masks;        // L-1 sorted dropout masks, or none
  std::vector<DirTape<S>> dirs;        // L*D
};

// One stack's weights packed for its inference forward passes with one batch size and thread
// count, a ForwardPacks per layer and direction (see PackCache).
template <typename S>
struct StackPacks {
  std::vector<ForwardPacks<S>> dirs;  // L*D
  explicit StackPacks(Index n_dirs) : dirs(n_dirs) {}
  bool filled() const {
    return std::all_of(dirs.begin(), dirs.end(), [](const ForwardPacks<S>& d) { return d.filled; });
  }
};

// Sort rows by length, longest first, keeping ties in order; batch_sizes[t] = #{b: len_b > t}.
inline void sort_by_length(const std::int64_t* lengths, Index B, Index T, std::vector<Index>& order,
                           std::vector<Index>& batch_sizes) {
  order.resize(B);
  std::iota(order.begin(), order.end(), Index(0));
  batch_sizes.assign(T, B);
  if (!lengths) return;
  std::stable_sort(order.begin(), order.end(),
                   [&](Index a, Index b) { return lengths[a] > lengths[b]; });
  for (Index t = 0; t < T; ++t)
    batch_sizes[t] = std::count_if(lengths, lengths + B, [&](std::int64_t len) { return len > t; });
}

// dst[k, j, :] = src[k, order[j], :] for blocks k of B rows of C columns (and the inverse).
template <typename S>
void gather_rows(const S* src, S* dst, Index blocks, Index B, Index C, const std::vector<Index>& order) {
  for (Index k = 0; k < blocks; ++k)
    for (Index j = 0; j < B; ++j)
      std::copy_n(src + (k * B + order[j]) * C, C, dst + (k * B + j) * C);
}
template <typename S>
void scatter_rows(const S* src, S* dst, Index blocks, Index B, Index C, const std::vector<Index>& order) {
  for (Index k = 0; k < blocks; ++k)
    for (Index j = 0; j < B; ++j)
      std::copy_n(src + (k * B + j) * C, C, dst + (k * B + order[j]) * C);
}

// Run f(d, threads_for_d) for each direction: both at once when there are threads for both.
template <class F>
void for_each_direction(Index D, int threads, F&& f) {
  if (D == 2 && threads >= 2) {
#pragma omp parallel for num_threads(2) schedule(static, 1)
    for (int d = 0; d < 2; ++d) f(d, threads / 2);
  } else {
    for (int d = 0; d < D; ++d) f(d, threads);
  }
}

// Initial and final states of every layer and direction, (L*D, B, H) each, in sorted row order.
template <typename S>
struct LayerStates {
  const S* h0;
  const S* c0;  // lstm only
  S* h_n;
  S* c_n;  // lstm only
};

// The forward pass layer after layer, each with all threads (a bidirectional layer's directions
// at once when there are threads for both). The last layer writes y_last. The tape gets each
// layer's input but the first, and the masks.
template <class Cell, typename S>
void forward_layer_by_layer(const StackInputs<S>& in, const Index* batch_sizes, const std::vector<Index>& order,
                            const S* x, const LayerStates<S>& states, S* y_last, Tape<S>* tape,
                            StackPacks<S>* packs, int threads) {
  const Dims& dm = in.dims;
  const Index T = dm.T, B = dm.B, H = dm.H, D = dm.D, L = dm.L, DH = D * H;
  Buffer<S> x_own;  // this layer's input, past the first
  for (Index layer = 0; layer < L; ++layer) {
    const SeqShape shape{T, B, dm.input_size(layer), H, batch_sizes};
    const bool last = layer + 1 == L;
    Buffer<S> y_own;
    if (!last) y_own.allocate(T * B * DH);
    S* y = last ? y_last : y_own.data();
    for_each_direction(D, threads, [&](int d, int dir_threads) {
      const Index k = layer * D + d;
      const Index state = k * B * H;
      const DirForward<S> io{shape, &in.weights[k], d == 1, x, states.h0 + state,
                             Cell::has_c ? states.c0 + state : nullptr, y + d * H, DH, states.h_n + state,
                             Cell::has_c ? states.c_n + state : nullptr, tape ? &tape->dirs[k] : nullptr, nullptr};
      sequence_forward<Cell>(io, packs && !tape ? &packs->dirs[k] : nullptr, dir_threads);
    });
    if (last) break;
    // The next layer's input: this layer's output through its dropout mask.
    Buffer<S> next;
    if (in.masks.empty()) {
      next = std::move(y_own);
    } else {
      Buffer<S> mask(T * B * DH);
      gather_rows(in.masks[layer], mask.data(), T, B, DH, order);
      next.allocate(T * B * DH);
      arr(next.data(), T * B * DH) = carr(y, T * B * DH) * carr(mask.data(), T * B * DH);
      if (tape) tape->masks.push_back(std::move(mask));
    }
    if (tape && layer > 0) tape->layer_input[layer] = std::move(x_own);
    x_own = std::move(next);
    x = x_own.data();
  }
  if (tape && L > 1) tape->layer_input[L - 1] = std::move(x_own);
}

// The forward pass of a unidirectional stack with its layers at once (see layer_lanes). Layer l
// writes outs[l] (the last layer, y_last); layer l + 1 takes each chunk of it through its dropout
// mask once written. The tape gets each layer's input and the masks as the layer-by-layer pass
// leaves them.
template <class Cell, typename S>
void forward_layers_at_once(const StackInputs<S>& in, const Index* batch_sizes, const std::vector<Index>& order,
                            const S* x, const LayerStates<S>& states, S* y_last, Tape<S>* tape,
                            StackPacks<S>* packs, int lanes) {
  const Dims& dm = in.dims;
  const Index T = dm.T, B = dm.B, H = dm.H, L = dm.L;
  const bool masked = !in.masks.empty();
  std::vector<Buffer<S>> outs(L), inputs(L), masks(masked ? L - 1 : 0);
  for (Index l = 0; l + 1 < L; ++l) {
    outs[l].allocate(T * B * H);
    if (!masked) continue;
    masks[l].allocate(T * B * H);
    gather_rows(in.masks[l], masks[l].data(), T, B, H, order);
    inputs[l + 1].allocate(T * B * H);
  }
  auto input_of = [&](Index l) { return l == 0 ? x : masked ? inputs[l].data() : outs[l - 1].data(); };
  std::vector<StepCount> written(L);  // steps of outs[l] written

#pragma omp parallel num_threads(lanes)
  {
    const int team = omp_get_num_threads();
    for (Index l = omp_get_thread_num(); l < L; l += team) {
      Index ready = 0;  // steps of this layer's input taken through the mask
      LayerLink link;
      if (l > 0) {
        link.await_input = [&](Index steps) {
          const Index there = written[l - 1].await(steps);
          if (masked && there > ready)
            arr(inputs[l].data() + ready * B * H, (there - ready) * B * H) =
                carr(outs[l - 1].data() + ready * B * H, (there - ready) * B * H) *
                carr(masks[l - 1].data() + ready * B * H, (there - ready) * B * H);
          ready = there;
          return there;
        };
      }
      if (l + 1 < L) link.wrote = [&](Index steps) { written[l].publish(steps); };
      const SeqShape shape{T, B, dm.input_size(l), H, batch_sizes};
      const Index state = l * B * H;
      const DirForward<S> io{shape, &in.weights[l], false, input_of(l), states.h0 + state,
                             Cell::has_c ? states.c0 + state : nullptr, l + 1 == L ? y_last : outs[l].data(), H,
                             states.h_n + state, Cell::has_c ? states.c_n + state : nullptr,
                             tape ? &tape->dirs[l] : nullptr, &link};
      sequence_forward<Cell>(io, packs && !tape ? &packs->dirs[l] : nullptr, 1);
    }
  }
  if (!tape) return;
  for (Index l = 1; l < L; ++l) tape->layer_input[l] = masked ? std::move(inputs[l]) : std::move(outs[l - 1]);
  tape->masks = std::move(masks);
}

// BPTT through a unidirectional stack with its layers at once (see layer_lanes), from d_y, the
// gradient reaching the last layer's output. The gradient reaching layer l - 1's output is layer
// l's dx through the mask, which the two layers share: layer l computes its left half of the
// columns for the steps it has done since it last did, whenever layer l - 1 has used up what it
// had (a step at a time while that one keeps up) or for a pass of rows; layer l - 1 computes the
// right half as it needs the steps, and the mask. Writes each layer's d_gates (and gru's d_hn),
// dh0 and dc0.
template <class Cell, typename S>
void backward_layers_at_once(const Tape<S>& tape, const S* d_y, const S* d_h_n, const S* d_c_n, S* dh0, S* dc0,
                             std::vector<Buffer<S>>& d_gates, std::vector<Buffer<S>>& d_hn, int lanes) {
  const Dims& dm = tape.dims;
  const Index T = dm.T, B = dm.B, H = dm.H, L = dm.L, GH = Cell::G * H;
  const SeqShape shape{T, B, 0, H, tape.batch_sizes.data()};
  std::vector<Buffer<S>> d_outs(L - 1);  // d_outs[l]: the gradient reaching layer l's output
  for (auto& b : d_outs) b.allocate(T * B * H);
  // Steps from the end: of layer l's loop, and of the left columns of d_outs[l - 1] it wrote.
  std::vector<StepCount> done(L), left_sent(L);
  const Index pass_steps = std::max<Index>(1, kRowsPerPass / B);
  // Columns [0, left) and [left, H) of a layer's dx, whole panels of W_ih apart.
  constexpr Index P = kPacket<S>;
  const Index panels = (H + P - 1) / P, left_panels = panels / 2, left = left_panels * P;
  // dx of layer l (> 0) for the rows of steps [from, to) counted from the end, in columns [c0, c1).
  auto dx_part = [&](Index l, Index from, Index to, Index q0, Index q1, Index c0, Index c1) {
    if (to <= from || c1 <= c0) return;
    const Index r0 = (T - to) * B, rows = (to - from) * B;
    const PackedB<S> w_ih = tape.dirs[l].w_ih_for_dx.columns(q0, q1, c1 - c0);
    packed_gemm(rows, d_gates[l].data() + r0 * GH, GH, w_ih, d_outs[l - 1].data() + r0 * H + c0, H, false);
  };

#pragma omp parallel num_threads(lanes)
  {
    const int lane = omp_get_thread_num(), team = omp_get_num_threads();
    for (Index l = L - 1; l >= 0; --l) {
      if (l % team != lane) continue;
      Index sent = 0, right = 0, ready = 0;  // steps: left columns sent; right columns, mask done
      LayerLink link;
      if (l + 1 < L) {
        link.await_input = [&](Index steps) {
          const Index above = done[l + 1].await(steps);
          dx_part(l + 1, right, above, left_panels, panels, left, H);
          right = above;
          const Index both = std::min(right, left_sent[l + 1].await(steps));
          if (!tape.masks.empty() && both > ready) {
            const Index r0 = (T - both) * B, rows = (both - ready) * B;
            arr(d_outs[l].data() + r0 * H, rows * H) *= carr(tape.masks[l].data() + r0 * H, rows * H);
          }
          ready = std::max(ready, both);
          return ready;
        };
      }
      link.wrote = [&](Index steps) {
        done[l].publish(steps);
        if (l == 0) return;
        const bool below_waits = done[l - 1].count() >= sent;
        if (steps < T && !below_waits && steps - sent < pass_steps) return;
        dx_part(l, sent, steps, 0, left_panels, 0, left);
        left_sent[l].publish(steps);
        sent = steps;
      };
      const Index state = l * B * H;
      const DirBackward<S> io{shape, false, &tape.dirs[l], l + 1 == L ? d_y : d_outs[l].data(), H,
                              d_h_n ? d_h_n + state : nullptr, d_c_n ? d_c_n + state : nullptr, d_gates[l].data(),
                              Cell::has_hn ? d_hn[l].data() : nullptr, dh0 + state,
                              Cell::has_c ? dc0 + state : nullptr, &link};
      sequence_backward<Cell>(io, 1);
    }
  }
}

template <class Cell, typename S>
std::unique_ptr<Tape<S>> stack_forward_cell(const StackInputs<S>& in, const StackOutputs<S>& res,
                                            bool keep_tape, StackPacks<S>* packs, int threads, int lanes) {
  const Dims& dm = in.dims;
  const Index T = dm.T, B = dm.B, H = dm.H, D = dm.D, L = dm.L, GH = Cell::G * H, DH = D * H;
  // Without lengths the rows need no sorting and no padding: the caller's x and out are used as
  // they are, saving two copies of the sequence.
  const bool sorted = in.lengths == nullptr;
  std::vector<Index> order, batch_sizes;
  sort_by_length(in.lengths, B, T, order, batch_sizes);

  std::unique_ptr<Tape<S>> tape;
  if (keep_tape) {
    tape = std::make_unique<Tape<S>>(in.cell, dm);
    tape->sorted = sorted;
    tape->order = order;
    tape->batch_sizes = batch_sizes;
    tape->layer_input.resize(L);
    tape->dirs.resize(L * D);
    for (Index k = 0; k < L * D; ++k) {
      DirTape<S>& dt = tape->dirs[k];
      keep_weights<Cell>(dt, in.weights[k], dm.input_size(k / D), H, threads);
      dt.gates.allocate(T * B * GH);
      dt.h_prev.allocate(T * B * H);
      if (Cell::has_c) dt.c_prev.allocate(T * B * H);
      if (Cell::has_tanh_c) dt.tanh_c.allocate(T * B * H);
      if (Cell::has_hn) dt.hn.allocate(T * B * H);
    }
  }

  // Everything below is in sorted row order.
  std::vector<S> h0(L * D * B * H), c0(Cell::has_c ? L * D * B * H : 0);
  std::vector<S> h_n(h0.size()), c_n(c0.size());
  gather_rows(in.h0, h0.data(), L * D, B, H, order);
  if constexpr (Cell::has_c) gather_rows(in.c0, c0.data(), L * D, B, H, order);
  Buffer<S> x_own;  // the first layer's input, when it cannot be the caller's x
  const S* x = in.x;
  // The tape keeps the caller's x in the form weight_grads multiplies by: its copy and backward's
  // packing in one pass, on every thread. Rows to sort are gathered first, as the layer needs.
  if (sorted && keep_tape)
    tape->x_packed.pack_rows(T * B, dm.I, dm.I, [&](Index k) { return in.x + k * dm.I; }, threads);
  if (!sorted) {
    x_own.allocate(T * B * dm.I);
    gather_rows(in.x, x_own.data(), T, B, dm.I, order);
    for (Index t = 0; t < T; ++t)  // padding never reaches a gradient, even as 0 * NaN
      std::fill(x_own.data() + (t * B + batch_sizes[t]) * dm.I, x_own.data() + (t + 1) * B * dm.I, S(0));
    x = x_own.data();
  }

  // The last layer's output: the caller's out, or in sorted rows, scattered into it at the end.
  Buffer<S> y_own;
  if (!sorted) y_own.allocate(T * B * DH);
  S* y = sorted ? res.out : y_own.data();
  const LayerStates<S> states{h0.data(), c0.data(), h_n.data(), c_n.data()};
  if (lanes > 1) forward_layers_at_once<Cell>(in, batch_sizes.data(), order, x, states, y, tape.get(), packs, lanes);
  else forward_layer_by_layer<Cell>(in, batch_sizes.data(), order, x, states, y, tape.get(), packs, threads);
  if (keep_tape) tape->layer_input[0] = std::move(x_own);

  if (!sorted) scatter_rows(y, res.out, T, B, DH, order);
  scatter_rows(h_n.data(), res.h_n, L * D, B, H, order);
  if constexpr (Cell::has_c) scatter_rows(c_n.data(), res.c_n, L * D, B, H, order);
  return tape;
}

template <class Cell, typename S>
void stack_backward_cell(const Tape<S>& tape, const S* d_out_in, const S* d_h_n_in, const S* d_c_n_in,
                         const StackGrads<S>& grads, int threads) {
  const Dims& dm = tape.dims;
  const Index T = dm.T, B = dm.B, H = dm.H, D = dm.D, L = dm.L, GH = Cell::G * H, DH = D * H;
  const std::vector<Index>& order = tape.order;
  const SeqShape shape{T, B, 0, H, tape.batch_sizes.data()};

  Buffer<S> d_y_own;  // the gradient reaching this layer's output, when not the caller's d_out
  const S* d_y = d_out_in;
  if (!tape.sorted) {
    d_y_own.allocate(T * B * DH);
    gather_rows(d_out_in, d_y_own.data(), T, B, DH, order);
    d_y = d_y_own.data();
  }
  std::vector<S> d_h_n(d_h_n_in ? L * D * B * H : 0), d_c_n(Cell::has_c && d_c_n_in ? L * D * B * H : 0);
  if (d_h_n_in) gather_rows(d_h_n_in, d_h_n.data(), L * D, B, H, order);
  if (!d_c_n.empty()) gather_rows(d_c_n_in, d_c_n.data(), L * D, B, H, order);
  std::vector<S> dh0(L * D * B * H), dc0(Cell::has_c ? L * D * B * H : 0);

  // d_gates (and gru's d_hn) of one layer's directions, or of every layer when they run at once.
  const LayerPlan plan(kLayersBackward, dm.B, dm.I, dm.H, dm.L, dm.D, Cell::G, sizeof(S), threads);
  const int lanes = plan.lanes();
  const Index kept = lanes > 1 ? L : D;
  std::vector<Buffer<S>> d_gates(kept), d_hn(Cell::has_hn ? kept : 0);
  for (auto& b : d_gates) b.allocate(T * B * GH);
  for (auto& b : d_hn) b.allocate(T * B * H);
  auto d_gates_of = [&](Index layer, Index d) { return d_gates[lanes > 1 ? layer : d].data(); };
  auto d_hn_of = [&](Index layer, Index d) { return Cell::has_hn ? d_hn[lanes > 1 ? layer : d].data() : nullptr; };
  auto layer_weight_grads = [&](Index layer) {
    const Index Ik = dm.input_size(layer);
    const bool input_raw = !tape.layer_input[layer].empty();
    // This layer's input as weight_grads reads it, made once for both directions.
    const PackedB<S> input_packed =
        input_raw ? weight_grad_operand(tape.layer_input[layer].data(), T * B, Ik, GH, threads) : PackedB<S>();
    for (Index d = 0; d < D; ++d) {
      const Index k = layer * D + d;
      weight_grads(T * B, Ik, H, GH, d_gates_of(layer, d), d_hn_of(layer, d), input_raw ? input_packed : tape.x_packed,
                   tape.dirs[k].h_prev.data(), grads.dw_ih[k], grads.dw_hh[k], grads.db_ih[k], grads.db_hh[k],
                   grads.accumulate, threads);
    }
  };
  // The gradient reaching the layer's input, (T, B, I_layer) into `dx`.
  auto layer_input_grad = [&](Index layer, S* dx) {
    std::vector<const S*> dg(D);
    std::vector<const PackedB<S>*> w_ih(D);
    for (Index d = 0; d < D; ++d) {
      dg[d] = d_gates_of(layer, d);
      w_ih[d] = &tape.dirs[layer * D + d].w_ih_for_dx;
    }
    input_grad(T * B, dm.input_size(layer), GH, dg, w_ih, dx, threads);
  };

  if (lanes > 1) {
    backward_layers_at_once<Cell>(tape, d_y, d_h_n.empty() ? nullptr : d_h_n.data(),
                                  d_c_n.empty() ? nullptr : d_c_n.data(), dh0.data(), dc0.data(), d_gates, d_hn,
                                  lanes);
    for (Index layer = L - 1; layer >= 0; --layer) layer_weight_grads(layer);
  } else {
    for (Index layer = L - 1; layer >= 0; --layer) {
      for_each_direction(D, threads, [&](int d, int dir_threads) {
        const Index k = layer * D + d;
        const Index state = k * B * H;
        const DirBackward<S> io{shape, d == 1, &tape.dirs[k], d_y + d * H, DH,
                                d_h_n.empty() ? nullptr : d_h_n.data() + state,
                                d_c_n.empty() ? nullptr : d_c_n.data() + state, d_gates_of(layer, d),
                                d_hn_of(layer, d), dh0.data() + state, Cell::has_c ? dc0.data() + state : nullptr,
                                nullptr};
        sequence_backward<Cell>(io, dir_threads);
      });
      layer_weight_grads(layer);
      if (layer == 0) break;
      // Into the layer below, back through its dropout mask.
      Buffer<S> d_below(T * B * DH);
      layer_input_grad(layer, d_below.data());
      if (!tape.masks.empty())
        arr(d_below.data(), T * B * DH) *= carr(tape.masks[layer - 1].data(), T * B * DH);
      d_y_own = std::move(d_below);
      d_y = d_y_own.data();
    }
  }
  Buffer<S> dx_own;  // dx in sorted rows
  if (!tape.sorted) dx_own.allocate(T * B * dm.I);
  layer_input_grad(0, tape.sorted ? grads.dx : dx_own.data());
  if (!tape.sorted) scatter_rows(dx_own.data(), grads.dx, T, B, dm.I, order);
  scatter_rows(dh0.data(), grads.dh0, L * D, B, H, order);
  if constexpr (Cell::has_c) scatter_rows(dc0.data(), grads.dc0, L * D, B, H, order);
  plan.finished(T);
}

// How a forward pass runs its layers (see LayerPlan); the caller asks for it first when it keeps
// packs, which are laid out for it.
template <typename S>
LayerPlan forward_layer_plan(const StackInputs<S>& in, bool keep_tape, int threads) {
  const Dims& dm = in.dims;
  return LayerPlan(keep_tape ? kLayersTraining : kLayersInference, dm.B, dm.I, dm.H, dm.L, dm.D, gate_count(in.cell),
                   Index(sizeof(S)), threads);
}

// The entry points: inputs are assumed valid (the binding layer checks them). packs: null, or
// packs of these very weights for this batch size, thread count and plan, filled or to be filled;
// used only without a tape (training plans its steps otherwise, and packs for the tape on its
// own). plan: from forward_layer_plan for these inputs, or null to make one.
template <typename S>
std::unique_ptr<Tape<S>> stack_forward(const StackInputs<S>& in, const StackOutputs<S>& out, bool keep_tape,
                                       int threads, StackPacks<S>* packs = nullptr, const LayerPlan* plan = nullptr) {
  std::optional<LayerPlan> own_plan;
  if (!plan) plan = &own_plan.emplace(forward_layer_plan(in, keep_tape, threads));
  std::unique_ptr<Tape<S>> tape;
  with_cell(in.cell, [&](auto cell) {
    tape = stack_forward_cell<decltype(cell)>(in, out, keep_tape, packs, threads, plan->lanes());
  });
  plan->finished(in.dims.T);
  return tape;
}

template <typename S>
void stack_backward(const Tape<S>& tape, const S* d_out, const S* d_h_n, const S* d_c_n,
                    const StackGrads<S>& grads, int threads) {
  with_cell(tape.cell, [&](auto cell) {
    stack_backward_cell<decltype(cell)>(tape, d_out, d_h_n, d_c_n, grads, threads);
  });
}

}  // namespace pyrnn
