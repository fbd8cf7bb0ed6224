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

// The cells, in the order of the bindings' table of names.
enum class CellKind { rnn_tanh, rnn_relu, lstm, gru, lstm_peephole, lstm_coupled, lstm_coupled_peephole,
                      gru_reset_before };

// Call f(Cell{}) with the cell struct for `cell`.
template <class F>
void with_cell(CellKind cell, F&& f) {
  switch (cell) {
    case CellKind::rnn_tanh: f(RnnTanhCell{}); break;
    case CellKind::rnn_relu: f(RnnReluCell{}); break;
    case CellKind::lstm: f(LstmCell{}); break;
    case CellKind::gru: f(GruCell{}); break;
    case CellKind::lstm_peephole: f(LstmPeepholeCell{}); break;
    case CellKind::lstm_coupled: f(LstmCoupledCell<false>{}); break;
    case CellKind::lstm_coupled_peephole: f(LstmCoupledCell<true>{}); break;
    case CellKind::gru_reset_before: f(GruResetBeforeCell{}); break;
  }
}

// What a cell's weights and states look like from outside: G, K (peephole rows), whether it has c.
struct CellShape {
  Index G, K;
  bool has_c;
};
inline CellShape cell_shape(CellKind cell) {
  CellShape shape{};
  with_cell(cell, [&](auto c) { shape = {decltype(c)::G, decltype(c)::K, decltype(c)::has_c}; });
  return shape;
}
inline Index gate_count(CellKind cell) { return cell_shape(cell).G; }

// P: the width of h (h0, h_n, out), a projected LSTM's projection size, else H; projected: the
// stack has w_hr (P may equal H).
struct Dims {
  Index T, B, I, H, L, D, P;
  bool projected;
  Index input_size(Index layer) const { return layer == 0 ? I : D * P; }
};

template <typename S>
struct StackInputs {
  CellKind cell;
  Dims dims;
  const S* x;                          // (T, B, I)
  const S* h0;                         // (L*D, B, P)
  const S* c0;                         // (L*D, B, H), lstm only
  std::vector<DirWeights<S>> weights;  // L*D, ordered l0-fwd, l0-bwd, l1-fwd, ...
  const std::int64_t* lengths;         // (B,) in [1, T], or null: all T
  std::vector<const S*> masks;         // empty, or L-1 arrays (T, B, D*P)
  bool residual = false;               // layer k > 0 adds its input (after the mask) to its output
};

template <typename S>
struct StackOutputs {
  S* out;  // (T, B, D*P)
  S* h_n;  // (L*D, B, P)
  S* c_n;  // (L*D, B, H), lstm only
};

template <typename S>
struct StackGrads {
  S* dx;   // (T, B, I)
  S* dh0;  // (L*D, B, P)
  S* dc0;  // (L*D, B, H), lstm only
  std::vector<S*> dw_ih, dw_hh, db_ih, db_hh;  // L*D each
  std::vector<S*> dw_peep;                     // L*D (K, H) each, peephole cells; else empty
  std::vector<S*> dw_hr;                       // L*D (P, H) each, projected; else empty
  // Add the weight gradients to what dw_*/db_* hold (as a module's gradients accumulate) instead
  // of writing them: the product lands in place, with no array of its own and no second pass.
  bool accumulate = false;
};

// What backward needs, owned: it stays valid whatever the caller does to its arrays.
struct TapeBase {
  CellKind cell;
  Dims dims;
  bool residual;
  explicit TapeBase(CellKind c, Dims d, bool res = false) : cell(c), dims(d), residual(res) {}
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

// Initial and final states of every layer and direction, (L*D, B, P) h and (L*D, B, H) c, in
// sorted row order.
template <typename S>
struct LayerStates {
  const S* h0;
  const S* c0;  // lstm only
  S* h_n;
  S* c_n;  // lstm only
};

// What one direction k = layer * D + d of a forward pass reads and writes: its input x, its
// columns of the layer's output y (T, B, D*P).
template <class Cell, typename S>
DirForward<S> dir_forward(const StackInputs<S>& in, const Index* batch_sizes, Index k, const S* x,
                          const LayerStates<S>& states, S* y, Tape<S>* tape, const LayerLink* link = nullptr) {
  const Dims& dm = in.dims;
  const Index d = k % dm.D, h_state = k * dm.B * dm.P, c_state = k * dm.B * dm.H, DP = dm.D * dm.P;
  return {SeqShape{dm.T, dm.B, dm.input_size(k / dm.D), dm.H, dm.P, dm.projected, batch_sizes},
          &in.weights[k], d == 1, x,
          states.h0 + h_state, Cell::has_c ? states.c0 + c_state : nullptr,
          y + d * dm.P, DP,
          states.h_n + h_state, Cell::has_c ? states.c_n + c_state : nullptr,
          tape ? &tape->dirs[k] : nullptr, link};
}

// The input of layer `layer` + 1: y, this layer's output (T, B, D*P), through the layer's dropout
// mask, which the tape keeps. Moves y when there are no masks.
template <typename S>
Buffer<S> next_layer_input(const StackInputs<S>& in, Index layer, const std::vector<Index>& order, Buffer<S>&& y,
                           Tape<S>* tape) {
  if (in.masks.empty()) return std::move(y);
  const Dims& dm = in.dims;
  const Index n = dm.T * dm.B * dm.D * dm.P;
  Buffer<S> mask(n), next(n);
  gather_rows(in.masks[layer], mask.data(), dm.T, dm.B, dm.D * dm.P, order);
  arr(next.data(), n) = carr(y.data(), n) * carr(mask.data(), n);
  if (tape) tape->masks.push_back(std::move(mask));
  return next;
}

// The forward pass layer after layer, each with all threads (a bidirectional layer's directions
// at once when there are threads for both). The last layer writes y_last. The tape gets each
// layer's input but the first, and the masks.
template <class Cell, typename S>
void forward_layer_by_layer(const StackInputs<S>& in, const Index* batch_sizes, const std::vector<Index>& order,
                            const S* x, const LayerStates<S>& states, S* y_last, Tape<S>* tape,
                            StackPacks<S>* packs, int threads) {
  const Dims& dm = in.dims;
  Buffer<S> x_own;  // this layer's input, past the first
  for (Index layer = 0; layer < dm.L; ++layer) {
    const bool last = layer + 1 == dm.L;
    Buffer<S> y_own(last ? 0 : dm.T * dm.B * dm.D * dm.P);
    S* y = last ? y_last : y_own.data();
    for_each_direction(dm.D, threads, [&](int d, int dir_threads) {
      const Index k = layer * dm.D + d;
      sequence_forward<Cell>(dir_forward<Cell>(in, batch_sizes, k, x, states, y, tape),
                             packs && !tape ? &packs->dirs[k] : nullptr, dir_threads);
    });
    if (in.residual && layer > 0) {  // y and x: (T, B, D*P) both
      const Index n = dm.T * dm.B * dm.D * dm.P;
      arr(y, n) += carr(x, n);
    }
    if (last) break;
    Buffer<S> next = next_layer_input(in, layer, order, std::move(y_own), tape);
    if (tape && layer > 0) tape->layer_input[layer] = std::move(x_own);
    x_own = std::move(next);
    x = x_own.data();
  }
  if (tape && dm.L > 1) tape->layer_input[dm.L - 1] = std::move(x_own);
}

// The forward pass of a unidirectional stack with its layers at once (see layer_lanes). Layer l
// writes outs[l] (the last layer, the caller's y); layer l + 1 takes each chunk of it through
// its dropout mask once written.
template <typename S>
class LayersAtOnceForward {
 public:
  LayersAtOnceForward(const StackInputs<S>& in, const std::vector<Index>& order)
      : dm_(in.dims), masked_(!in.masks.empty()), outs_(dm_.L), inputs_(dm_.L), masks_(masked_ ? dm_.L - 1 : 0),
        written_(dm_.L) {
    const Index n = dm_.T * dm_.B * dm_.H;
    for (Index l = 0; l + 1 < dm_.L; ++l) {
      outs_[l].allocate(n);
      if (!masked_) continue;
      masks_[l].allocate(n);
      gather_rows(in.masks[l], masks_[l].data(), dm_.T, dm_.B, dm_.H, order);
      inputs_[l + 1].allocate(n);
    }
  }
  // Layer l > 0's input: layer l - 1's output, through its mask when there are masks.
  const S* input_of(Index l) { return masked_ ? inputs_[l].data() : outs_[l - 1].data(); }
  S* out_of(Index l) { return outs_[l].data(); }
  // How layer l's loop meets its neighbours: it waits for the steps of its input that layer l - 1
  // has written (taking them through the mask), and publishes its own. `ready` counts the steps
  // of its input taken through the mask, and must outlive the loop.
  LayerLink link(Index l, Index& ready) {
    LayerLink link;
    const Index step_values = dm_.B * dm_.H;
    if (l > 0) {
      link.await_input = [this, l, &ready, step_values](Index steps) {
        const Index there = written_[l - 1].await(steps);
        if (masked_ && there > ready)
          arr(inputs_[l].data() + ready * step_values, (there - ready) * step_values) =
              carr(outs_[l - 1].data() + ready * step_values, (there - ready) * step_values) *
              carr(masks_[l - 1].data() + ready * step_values, (there - ready) * step_values);
        ready = there;
        return there;
      };
    }
    if (l + 1 < dm_.L) link.wrote = [this, l](Index steps) { written_[l].publish(steps); };
    return link;
  }
  // The tape gets each layer's input and the masks as the layer-by-layer pass leaves them.
  void keep(Tape<S>& tape) {
    for (Index l = 1; l < dm_.L; ++l) tape.layer_input[l] = masked_ ? std::move(inputs_[l]) : std::move(outs_[l - 1]);
    tape.masks = std::move(masks_);
  }

 private:
  const Dims dm_;
  const bool masked_;
  std::vector<Buffer<S>> outs_, inputs_, masks_;
  std::vector<StepCount> written_;  // steps of outs_[l] written
};

template <class Cell, typename S>
void forward_layers_at_once(const StackInputs<S>& in, const Index* batch_sizes, const std::vector<Index>& order,
                            const S* x, const LayerStates<S>& states, S* y_last, Tape<S>* tape,
                            StackPacks<S>* packs, int lanes) {
  const Index L = in.dims.L;
  LayersAtOnceForward<S> layers(in, order);
#pragma omp parallel num_threads(lanes)
  {
    const int team = omp_get_num_threads();
    for (Index l = omp_get_thread_num(); l < L; l += team) {
      Index ready = 0;
      const LayerLink link = layers.link(l, ready);
      const DirForward<S> io = dir_forward<Cell>(in, batch_sizes, l, l == 0 ? x : layers.input_of(l), states,
                                                 l + 1 == L ? y_last : layers.out_of(l), tape, &link);
      sequence_forward<Cell>(io, packs && !tape ? &packs->dirs[l] : nullptr, 1);
    }
  }
  if (tape) layers.keep(*tape);
}

// The gradients reaching a stack's outputs and states, in sorted row order.
template <typename S>
struct OutputGrads {
  const S* d_y;    // (T, B, D*P): the last layer's output
  const S* d_h_n;  // (L*D, B, P), or null: zero
  const S* d_c_n;  // (L*D, B, H), lstm, or null: zero
  S* dh0;          // (L*D, B, P) out
  S* dc0;          // (L*D, B, H) out, lstm
};

// What BPTT through direction k reads and writes.
template <class Cell, typename S>
DirBackward<S> dir_backward(const Tape<S>& tape, Index k, const S* d_y, Index ld_dy, const OutputGrads<S>& g,
                            S* d_gates, S* d_hn, S* dh_kept = nullptr, const LayerLink* link = nullptr) {
  const Dims& dm = tape.dims;
  const Index h_state = k * dm.B * dm.P, c_state = k * dm.B * dm.H;
  return {SeqShape{dm.T, dm.B, 0, dm.H, dm.P, dm.projected, tape.batch_sizes.data()}, k % dm.D == 1, &tape.dirs[k],
          d_y, ld_dy,
          g.d_h_n ? g.d_h_n + h_state : nullptr, g.d_c_n ? g.d_c_n + c_state : nullptr, d_gates,
          Cell::has_hn ? d_hn : nullptr, dh_kept, g.dh0 + h_state, Cell::has_c ? g.dc0 + c_state : nullptr, link};
}

// BPTT through a unidirectional stack with its layers at once (see layer_lanes). The gradient
// reaching layer l - 1's output is layer l's dx through the mask, which the two layers share:
// layer l computes its left half of the columns for the steps it has done since it last did,
// whenever layer l - 1 has used up what it had (a step at a time while that one keeps up) or for
// a pass of rows; layer l - 1 computes the right half as it needs the steps, and the mask.
template <class Cell, typename S>
class LayersAtOnceBackward {
 public:
  LayersAtOnceBackward(const Tape<S>& tape, std::vector<Buffer<S>>& d_gates)
      : tape_(tape), dm_(tape.dims), GH_(Cell::G * dm_.H), d_gates_(d_gates), d_outs_(dm_.L - 1), done_(dm_.L),
        left_sent_(dm_.L), pass_steps_(std::max<Index>(1, kRowsPerPass / dm_.B)),
        panels_((dm_.H + kPacket<S> - 1) / kPacket<S>), left_panels_(panels_ / 2), left_(left_panels_ * kPacket<S>) {
    for (auto& b : d_outs_) b.allocate(dm_.T * dm_.B * dm_.H);
  }
  // The gradient reaching layer l's output (l < L - 1).
  const S* d_out_of(Index l) const { return d_outs_[l].data(); }

  // Layer l's loop: it waits for the steps of the gradient reaching its output (the right half of
  // the columns, and the mask, it computes itself), and after each of its own steps it may send
  // the layer below the left half of that one's. The counters must outlive the loop.
  LayerLink link(Index l, Index& sent, Index& right, Index& ready) {
    LayerLink link;
    if (l + 1 < dm_.L)
      link.await_input = [this, l, &right, &ready](Index steps) { return take_d_out(l, steps, right, ready); };
    link.wrote = [this, l, &sent](Index steps) { send_left(l, steps, sent); };
    return link;
  }

 private:
  // Returns once layer l's d_out is complete for `steps` steps from the end, with how many are.
  Index take_d_out(Index l, Index steps, Index& right, Index& ready) {
    const Index above = done_[l + 1].await(steps);
    dx_part(l + 1, right, above, left_panels_, panels_, left_, dm_.H);
    right = above;
    const Index both = std::min(right, left_sent_[l + 1].await(steps));
    if (!tape_.masks.empty() && both > ready) {
      const Index r0 = (dm_.T - both) * dm_.B, rows = (both - ready) * dm_.B;
      arr(d_outs_[l].data() + r0 * dm_.H, rows * dm_.H) *= carr(tape_.masks[l].data() + r0 * dm_.H, rows * dm_.H);
    }
    ready = std::max(ready, both);
    return ready;
  }
  // Layer l has done `steps` steps from the end: the left columns of the layer below's d_out for
  // the steps since `sent`, when that layer has used up what it had or a pass of rows is due.
  void send_left(Index l, Index steps, Index& sent) {
    done_[l].publish(steps);
    if (l == 0) return;
    const bool below_waits = done_[l - 1].count() >= sent;
    if (steps < dm_.T && !below_waits && steps - sent < pass_steps_) return;
    dx_part(l, sent, steps, 0, left_panels_, 0, left_);
    left_sent_[l].publish(steps);
    sent = steps;
  }
  // dx of layer l (> 0) for the rows of steps [from, to) counted from the end, in columns [c0, c1),
  // which are W_ih's panels [q0, q1).
  void dx_part(Index l, Index from, Index to, Index q0, Index q1, Index c0, Index c1) {
    if (to <= from || c1 <= c0) return;
    const Index r0 = (dm_.T - to) * dm_.B, rows = (to - from) * dm_.B;
    const PackedB<S> w_ih = tape_.dirs[l].w_ih_for_dx.columns(q0, q1, c1 - c0);
    packed_gemm(rows, d_gates_[l].data() + r0 * GH_, GH_, w_ih, d_outs_[l - 1].data() + r0 * dm_.H + c0, dm_.H, false);
  }

  const Tape<S>& tape_;
  const Dims dm_;
  const Index GH_;
  std::vector<Buffer<S>>& d_gates_;
  std::vector<Buffer<S>> d_outs_;  // d_outs_[l]: the gradient reaching layer l's output
  std::vector<StepCount> done_, left_sent_;  // steps from the end: of layer l's loop, of the left columns it sent
  const Index pass_steps_;
  // Columns [0, left) and [left, H) of a layer's dx, whole panels of W_ih apart.
  const Index panels_, left_panels_, left_;
};

// Writes each layer's d_gates (and gru's d_hn), dh0 and dc0 (see LayersAtOnceBackward).
template <class Cell, typename S>
void backward_layers_at_once(const Tape<S>& tape, const OutputGrads<S>& grads, std::vector<Buffer<S>>& d_gates,
                             std::vector<Buffer<S>>& d_hn, int lanes) {
  const Index L = tape.dims.L, H = tape.dims.H;
  LayersAtOnceBackward<Cell, S> layers(tape, d_gates);
#pragma omp parallel num_threads(lanes)
  {
    const int lane = omp_get_thread_num(), team = omp_get_num_threads();
    for (Index l = L - 1; l >= 0; --l) {
      if (l % team != lane) continue;
      Index sent = 0, right = 0, ready = 0;  // steps: left columns sent; right columns, mask done
      const LayerLink link = layers.link(l, sent, right, ready);
      const S* d_y = l + 1 == L ? grads.d_y : layers.d_out_of(l);
      sequence_backward<Cell>(
          dir_backward<Cell>(tape, l, d_y, H, grads, d_gates[l].data(), Cell::has_hn ? d_hn[l].data() : nullptr,
                             static_cast<S*>(nullptr), &link),
          1);
    }
  }
}

// A tape for a forward pass of these inputs, its weights packed and its sequences allocated.
template <class Cell, typename S>
std::unique_ptr<Tape<S>> new_tape(const StackInputs<S>& in, bool sorted, const std::vector<Index>& order,
                                  const std::vector<Index>& batch_sizes, int threads) {
  const Dims& dm = in.dims;
  const Index TBH = dm.T * dm.B * dm.H, TBP = dm.T * dm.B * dm.P;
  auto tape = std::make_unique<Tape<S>>(in.cell, dm, in.residual);
  tape->sorted = sorted;
  tape->order = order;
  tape->batch_sizes = batch_sizes;
  tape->layer_input.resize(dm.L);
  tape->dirs.resize(dm.L * dm.D);
  for (Index k = 0; k < dm.L * dm.D; ++k) {
    DirTape<S>& dt = tape->dirs[k];
    keep_weights<Cell>(dt, in.weights[k], dm.input_size(k / dm.D), dm.H, dm.P, threads);
    dt.gates.allocate(TBH * Cell::G);
    dt.h_prev.allocate(TBP);
    if (dm.projected) dt.m.allocate(TBH);
    if (Cell::has_c) dt.c_prev.allocate(TBH);
    if (Cell::has_tanh_c) dt.tanh_c.allocate(TBH);
    if (Cell::has_hn) dt.hn.allocate(TBH);
    if (Cell::K > 0) dt.c.allocate(TBH);
  }
  // Without lengths it keeps the caller's x as weight_grads multiplies by it, packed on every
  // thread: its copy and backward's packing in one pass.
  if (sorted)
    tape->x_packed.pack_rows(dm.T * dm.B, dm.I, dm.I, [&](Index k) { return in.x + k * dm.I; }, threads);
  return tape;
}

// The caller's x (T, B, I) with its rows sorted by length, and zero past each sequence's end:
// padding never reaches a gradient, even as 0 * NaN.
template <typename S>
Buffer<S> sorted_input(const StackInputs<S>& in, const std::vector<Index>& order,
                       const std::vector<Index>& batch_sizes) {
  const Dims& dm = in.dims;
  Buffer<S> x(dm.T * dm.B * dm.I);
  gather_rows(in.x, x.data(), dm.T, dm.B, dm.I, order);
  for (Index t = 0; t < dm.T; ++t)
    std::fill(x.data() + (t * dm.B + batch_sizes[t]) * dm.I, x.data() + (t + 1) * dm.B * dm.I, S(0));
  return x;
}

template <class Cell, typename S>
std::unique_ptr<Tape<S>> stack_forward_cell(const StackInputs<S>& in, const StackOutputs<S>& res,
                                            bool keep_tape, StackPacks<S>* packs, int threads, int lanes) {
  const Dims& dm = in.dims;
  const Index T = dm.T, B = dm.B, H = dm.H, P = dm.P, LD = dm.L * dm.D, DP = dm.D * P;
  // Without lengths the rows need no sorting and no padding: the caller's x and out are used as
  // they are, saving two copies of the sequence.
  const bool sorted = in.lengths == nullptr;
  std::vector<Index> order, batch_sizes;
  sort_by_length(in.lengths, B, T, order, batch_sizes);
  std::unique_ptr<Tape<S>> tape = keep_tape ? new_tape<Cell>(in, sorted, order, batch_sizes, threads) : nullptr;

  // Everything below is in sorted row order.
  std::vector<S> h0(LD * B * P), c0(Cell::has_c ? LD * B * H : 0), h_n(h0.size()), c_n(c0.size());
  gather_rows(in.h0, h0.data(), LD, B, P, order);
  if constexpr (Cell::has_c) gather_rows(in.c0, c0.data(), LD, B, H, order);
  Buffer<S> x_own = sorted ? Buffer<S>() : sorted_input(in, order, batch_sizes);
  const S* x = sorted ? in.x : x_own.data();
  // The last layer's output: the caller's out, or in sorted rows, scattered into it at the end.
  Buffer<S> y_own(sorted ? 0 : T * B * DP);
  S* y = sorted ? res.out : y_own.data();
  const LayerStates<S> states{h0.data(), c0.data(), h_n.data(), c_n.data()};
  if (lanes > 1) forward_layers_at_once<Cell>(in, batch_sizes.data(), order, x, states, y, tape.get(), packs, lanes);
  else forward_layer_by_layer<Cell>(in, batch_sizes.data(), order, x, states, y, tape.get(), packs, threads);
  if (keep_tape) tape->layer_input[0] = std::move(x_own);

  if (!sorted) scatter_rows(y, res.out, T, B, DP, order);
  scatter_rows(h_n.data(), res.h_n, LD, B, P, order);
  if constexpr (Cell::has_c) scatter_rows(c_n.data(), res.c_n, LD, B, H, order);
  return tape;
}

// The gradients a backward pass reads, in sorted row order, and the state gradients it writes
// there (owned: copies of the caller's where their rows must be sorted).
template <class Cell, typename S>
class SortedGrads {
 public:
  SortedGrads(const Tape<S>& tape, const S* d_out, const S* d_h_n, const S* d_c_n) {
    const Dims& dm = tape.dims;
    const Index h_states = dm.L * dm.D * dm.B * dm.P, c_states = dm.L * dm.D * dm.B * dm.H;
    d_y_ = d_out;
    if (!tape.sorted) {
      d_y_own_.allocate(dm.T * dm.B * dm.D * dm.P);
      gather_rows(d_out, d_y_own_.data(), dm.T, dm.B, dm.D * dm.P, tape.order);
      d_y_ = d_y_own_.data();
    }
    if (d_h_n) gather_rows(d_h_n, d_h_n_.emplace(h_states).data(), dm.L * dm.D, dm.B, dm.P, tape.order);
    if (Cell::has_c && d_c_n)
      gather_rows(d_c_n, d_c_n_.emplace(c_states).data(), dm.L * dm.D, dm.B, dm.H, tape.order);
    dh0_.resize(h_states);
    dc0_.resize(Cell::has_c ? c_states : 0);
  }
  OutputGrads<S> view() {
    return {d_y_, d_h_n_ ? d_h_n_->data() : nullptr, d_c_n_ ? d_c_n_->data() : nullptr, dh0_.data(), dc0_.data()};
  }
  // dh0 and dc0 into the caller's rows.
  void scatter(const Tape<S>& tape, const StackGrads<S>& grads) const {
    const Dims& dm = tape.dims;
    scatter_rows(dh0_.data(), grads.dh0, dm.L * dm.D, dm.B, dm.P, tape.order);
    if constexpr (Cell::has_c) scatter_rows(dc0_.data(), grads.dc0, dm.L * dm.D, dm.B, dm.H, tape.order);
  }

 private:
  const S* d_y_;
  Buffer<S> d_y_own_;
  std::optional<std::vector<S>> d_h_n_, d_c_n_;
  std::vector<S> dh0_, dc0_;
};

// The d_gates (and gru's d_hn, a projected stack's dh) of a backward pass: of one layer's
// directions at a time, or of every layer when the layers run at once (never projected).
template <class Cell, typename S>
struct GateGrads {
  bool all_layers;
  std::vector<Buffer<S>> d_gates, d_hn, dh_kept;
  GateGrads(const Dims& dm, bool layers_at_once) : all_layers(layers_at_once) {
    const Index kept = layers_at_once ? dm.L : dm.D, rows = dm.T * dm.B;
    d_gates.resize(kept);
    d_hn.resize(Cell::has_hn ? kept : 0);
    dh_kept.resize(dm.projected ? dm.D : 0);
    for (auto& b : d_gates) b.allocate(rows * Cell::G * dm.H);
    for (auto& b : d_hn) b.allocate(rows * dm.H);
    for (auto& b : dh_kept) b.allocate(rows * dm.P);
  }
  S* dh_kept_of(Index d) { return dh_kept.empty() ? nullptr : dh_kept[d].data(); }
  S* d_gates_of(Index layer, Index d) { return d_gates[all_layers ? layer : d].data(); }
  S* d_hn_of(Index layer, Index d) { return Cell::has_hn ? d_hn[all_layers ? layer : d].data() : nullptr; }
};

// The weight gradients of one layer's directions, from its d_gates (see weight_grads).
template <class Cell, typename S>
void layer_weight_grads(const Tape<S>& tape, Index layer, GateGrads<Cell, S>& g, const StackGrads<S>& grads,
                        int threads) {
  const Dims& dm = tape.dims;
  const Index rows = dm.T * dm.B, Ik = dm.input_size(layer), GH = Cell::G * dm.H;
  const bool input_kept = !tape.layer_input[layer].empty();
  // This layer's input as weight_grads reads it, made once for both directions.
  const PackedB<S> input_packed =
      input_kept ? weight_grad_operand(tape.layer_input[layer].data(), rows, Ik, GH, threads) : PackedB<S>();
  for (Index d = 0; d < dm.D; ++d) {
    const Index k = layer * dm.D + d;
    const DirTape<S>& dt = tape.dirs[k];
    weight_grads(rows, Ik, dm.H, dm.P, GH, g.d_gates_of(layer, d), g.d_hn_of(layer, d),
                 input_kept ? input_packed : tape.x_packed, dt.h_prev.data(),
                 Cell::split_product ? dt.hn.data() : dt.h_prev.data(), grads.dw_ih[k],
                 grads.dw_hh[k], grads.db_ih[k], grads.db_hh[k], grads.accumulate, threads);
    if constexpr (Cell::K > 0)
      peephole_grads<Cell>(rows, dm.H, g.d_gates_of(layer, d), tape.dirs[k].c_prev.data(), tape.dirs[k].c.data(),
                           grads.dw_peep[k], grads.accumulate, threads);
    if (dm.projected)
      projection_grads(rows, dm.H, dm.P, g.dh_kept_of(d), dt.m.data(), grads.dw_hr[k], grads.accumulate, threads);
  }
}

// The gradient reaching one layer's input, (T, B, I_layer) into `dx`.
template <class Cell, typename S>
void layer_input_grad(const Tape<S>& tape, Index layer, GateGrads<Cell, S>& g, S* dx, int threads) {
  const Dims& dm = tape.dims;
  std::vector<const S*> d_gates(dm.D);
  std::vector<const PackedB<S>*> w_ih(dm.D);
  for (Index d = 0; d < dm.D; ++d) {
    d_gates[d] = g.d_gates_of(layer, d);
    w_ih[d] = &tape.dirs[layer * dm.D + d].w_ih_for_dx;
  }
  input_grad(dm.T * dm.B, dm.input_size(layer), Cell::G * dm.H, d_gates, w_ih, dx, threads);
}

// BPTT layer after layer, each with all threads (a bidirectional layer's directions at once when
// there are threads for both), the weight gradients of each as soon as its loop is done. Leaves
// layer 0's d_gates in `g` for dx.
template <class Cell, typename S>
void backward_layer_by_layer(const Tape<S>& tape, const OutputGrads<S>& out, GateGrads<Cell, S>& g,
                             const StackGrads<S>& grads, int threads) {
  const Dims& dm = tape.dims;
  const Index n = dm.T * dm.B * dm.D * dm.P;
  const S* d_y = out.d_y;
  Buffer<S> d_below;  // the gradient reaching the layer below's output
  for (Index layer = dm.L - 1; layer >= 0; --layer) {
    for_each_direction(dm.D, threads, [&](int d, int dir_threads) {
      const Index k = layer * dm.D + d;
      sequence_backward<Cell>(
          dir_backward<Cell>(tape, k, d_y + d * dm.P, dm.D * dm.P, out, g.d_gates_of(layer, d), g.d_hn_of(layer, d),
                             g.dh_kept_of(d)),
          dir_threads);
    });
    layer_weight_grads(tape, layer, g, grads, threads);
    if (layer == 0) break;
    // Into the layer below, back through its dropout mask.
    Buffer<S> next(n);
    layer_input_grad(tape, layer, g, next.data(), threads);
    if (tape.residual) arr(next.data(), n) += carr(d_y, n);  // the input reached the output directly too
    if (!tape.masks.empty()) arr(next.data(), n) *= carr(tape.masks[layer - 1].data(), n);
    d_below = std::move(next);
    d_y = d_below.data();
  }
}

// The threads that run a stack's layers at once (see layer_lanes), or 1; a residual stack runs
// them one after another (each layer's output is summed with its input between layers), and so
// does a projected one (its loops share steps by rows; see projected_plan).
template <typename S>
int stack_lanes(const Dims& dm, CellKind cell, bool residual, int threads) {
  if (residual || dm.projected) return 1;
  const Index widest_row_macs = gate_count(cell) * dm.H * (std::max(dm.I, dm.D * dm.H) + dm.P);
  return layer_lanes(dm.L, dm.D, dm.B * widest_row_macs, widest_row_macs * Index(sizeof(S)), threads);
}

template <class Cell, typename S>
void stack_backward_cell(const Tape<S>& tape, const S* d_out, const S* d_h_n, const S* d_c_n,
                         const StackGrads<S>& grads, int threads) {
  const Dims& dm = tape.dims;
  SortedGrads<Cell, S> sorted(tape, d_out, d_h_n, d_c_n);
  const OutputGrads<S> out = sorted.view();
  const int lanes = stack_lanes<S>(dm, tape.cell, tape.residual, threads);
  GateGrads<Cell, S> g(dm, lanes > 1);
  if (lanes > 1) {
    backward_layers_at_once<Cell>(tape, out, g.d_gates, g.d_hn, lanes);
    for (Index layer = dm.L - 1; layer >= 0; --layer) layer_weight_grads(tape, layer, g, grads, threads);
  } else {
    backward_layer_by_layer<Cell>(tape, out, g, grads, threads);
  }
  Buffer<S> dx_own(tape.sorted ? 0 : dm.T * dm.B * dm.I);  // dx in sorted rows
  layer_input_grad(tape, 0, g, tape.sorted ? grads.dx : dx_own.data(), threads);
  if (!tape.sorted) scatter_rows(dx_own.data(), grads.dx, dm.T, dm.B, dm.I, tape.order);
  sorted.scatter(tape, grads);
}

// The entry points: inputs are assumed valid (the binding layer checks them). packs: null, or
// packs of these very weights for this batch size, thread count and stack_lanes, filled or to be
// filled; used only without a tape (training plans its steps otherwise, and packs for the tape on
// its own).
template <typename S>
std::unique_ptr<Tape<S>> stack_forward(const StackInputs<S>& in, const StackOutputs<S>& out, bool keep_tape,
                                       int threads, StackPacks<S>* packs = nullptr) {
  const int lanes = stack_lanes<S>(in.dims, in.cell, in.residual, threads);
  std::unique_ptr<Tape<S>> tape;
  with_cell(in.cell, [&](auto cell) {
    tape = stack_forward_cell<decltype(cell)>(in, out, keep_tape, packs, threads, lanes);
  });
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
