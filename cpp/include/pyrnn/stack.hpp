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
#include <string>
#include <vector>

#include "pyrnn/cells.hpp"
#include "pyrnn/sequence.hpp"
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
  // Each layer's input (T, B, I_k), sorted (and masked), for weight_grads: kept as it is (backward
  // packs it), except layer 0's without lengths, the caller's x packed here (layer_input[0] empty).
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

template <class Cell, typename S>
std::unique_ptr<Tape<S>> stack_forward_cell(const StackInputs<S>& in, const StackOutputs<S>& res,
                                            bool keep_tape, StackPacks<S>* packs, int threads) {
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
      if (Cell::has_aux) dt.aux.allocate(T * B * H);
      if (Cell::has_c) dt.c_prev.allocate(T * B * H);
    }
  }

  // Everything below is in sorted row order.
  std::vector<S> h0(L * D * B * H), c0(Cell::has_c ? L * D * B * H : 0);
  std::vector<S> h_n(h0.size()), c_n(c0.size());
  gather_rows(in.h0, h0.data(), L * D, B, H, order);
  if constexpr (Cell::has_c) gather_rows(in.c0, c0.data(), L * D, B, H, order);
  Buffer<S> x_own;  // this layer's input, when it cannot be the caller's x
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

  Buffer<S> y_own;
  S* y = nullptr;
  for (Index layer = 0; layer < L; ++layer) {
    const SeqShape shape{T, B, dm.input_size(layer), H, batch_sizes.data()};
    const bool last = layer + 1 == L;
    if (last && sorted) {
      y = res.out;
    } else {
      y_own.allocate(T * B * DH);
      y = y_own.data();
    }
    for_each_direction(D, threads, [&](int d, int dir_threads) {
      const Index k = layer * D + d;
      const Index state = k * B * H;
      sequence_forward<Cell>(shape, in.weights[k], d == 1, x, h0.data() + state,
                             Cell::has_c ? c0.data() + state : nullptr, y + d * H, DH,
                             h_n.data() + state, Cell::has_c ? c_n.data() + state : nullptr,
                             keep_tape ? &tape->dirs[k] : nullptr,
                             packs && !keep_tape ? &packs->dirs[k] : nullptr, dir_threads);
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
      if (keep_tape) tape->masks.push_back(std::move(mask));
    }
    if (keep_tape) tape->layer_input[layer] = std::move(x_own);
    x_own = std::move(next);
    x = x_own.data();
  }
  if (keep_tape) tape->layer_input[L - 1] = std::move(x_own);

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

  std::vector<Buffer<S>> d_gates(D), d_hn(Cell::has_d_hn ? D : 0);
  for (auto& b : d_gates) b.allocate(T * B * GH);
  for (auto& b : d_hn) b.allocate(T * B * H);
  Buffer<S> dx_own;
  for (Index layer = L - 1; layer >= 0; --layer) {
    const Index Ik = dm.input_size(layer);
    for_each_direction(D, threads, [&](int d, int dir_threads) {
      const Index k = layer * D + d;
      const Index state = k * B * H;
      sequence_backward<Cell>(shape, d == 1, tape.dirs[k], d_y + d * H, DH,
                              d_h_n.empty() ? nullptr : d_h_n.data() + state,
                              d_c_n.empty() ? nullptr : d_c_n.data() + state, d_gates[d].data(),
                              Cell::has_d_hn ? d_hn[d].data() : nullptr, dh0.data() + state,
                              Cell::has_c ? dc0.data() + state : nullptr, dir_threads);
    });
    PackedB<S> input_packed;  // this layer's input, packed once for both directions
    const bool input_raw = !tape.layer_input[layer].empty();
    if (input_raw)
      input_packed.pack_rows(T * B, Ik, Ik, [&](Index r) { return tape.layer_input[layer].data() + r * Ik; }, threads);
    std::vector<const S*> dg(D);
    std::vector<const PackedB<S>*> w_ih(D);
    for (Index d = 0; d < D; ++d) {
      const Index k = layer * D + d;
      dg[d] = d_gates[d].data();
      w_ih[d] = &tape.dirs[k].w_ih_for_dx;
      weight_grads(T * B, Ik, H, GH, dg[d], Cell::has_d_hn ? d_hn[d].data() : nullptr,
                   input_raw ? input_packed : tape.x_packed, tape.dirs[k].h_prev.data(), grads.dw_ih[k],
                   grads.dw_hh[k], grads.db_ih[k], grads.db_hh[k], grads.accumulate, threads);
    }
    if (layer == 0 && tape.sorted) {
      input_grad(T * B, Ik, GH, dg, w_ih, grads.dx, threads);
      break;
    }
    dx_own.allocate(T * B * Ik);
    input_grad(T * B, Ik, GH, dg, w_ih, dx_own.data(), threads);
    if (layer == 0) break;
    // Into the layer below, back through its dropout mask.
    if (tape.masks.empty()) {
      d_y_own = std::move(dx_own);
    } else {
      d_y_own.allocate(T * B * DH);
      arr(d_y_own.data(), T * B * DH) = carr(dx_own.data(), T * B * DH) *
                                        carr(tape.masks[layer - 1].data(), T * B * DH);
    }
    d_y = d_y_own.data();
  }
  if (!tape.sorted) scatter_rows(dx_own.data(), grads.dx, T, B, dm.I, order);
  scatter_rows(dh0.data(), grads.dh0, L * D, B, H, order);
  if constexpr (Cell::has_c) scatter_rows(dc0.data(), grads.dc0, L * D, B, H, order);
}

// The entry points: inputs are assumed valid (the binding layer checks them). packs: null, or
// packs of these very weights for this batch size and thread count, filled or to be filled; used
// only without a tape (training plans its steps otherwise, and packs for the tape on its own).
template <typename S>
std::unique_ptr<Tape<S>> stack_forward(const StackInputs<S>& in, const StackOutputs<S>& out,
                                       bool keep_tape, int threads, StackPacks<S>* packs = nullptr) {
  std::unique_ptr<Tape<S>> tape;
  with_cell(in.cell, [&](auto cell) {
    tape = stack_forward_cell<decltype(cell)>(in, out, keep_tape, packs, threads);
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
