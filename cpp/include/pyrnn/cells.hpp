// The cell math, one struct per cell: gate count, pointwise forward, pointwise backward.
//
// Both passes work on one time step, on a block of hidden units [j0, j0 + w) of n rows, so that
// each thread of the sequence driver can own a slice of the hidden units or of the batch rows.
// All pointers below are already offset to the thread's first row and unit j0; its rows of every
// (·, H)-shaped buffer are `ld` apart (H, or a multiple of H when every team-th row is a thread's).
#pragma once

#include "pyrnn/activations.hpp"
#include "pyrnn/types.hpp"

namespace pyrnn {

// Row r, gate g of a (rows, G·H)-shaped buffer: `p + r * ld + g * gate_stride`.
template <typename S>
struct GateView {
  S* p;
  Index ld;
  Index gate_stride;
  S* at(Index r, Index g) const { return p + r * ld + g * gate_stride; }
};

template <typename S>
struct StepForward {
  Index n, w, H, ld;         // H: the gate stride of b_hh; ld: the row stride of (·, H) buffers
  GateView<S> gates;         // in: x W_ih^T + b_ih; out: the activated gates (kept on the tape)
  GateView<const S> hh;      // h_prev W_hh^T, without bias
  const S* b_hh;             // gate stride H
  const S* h_prev;           // (n, w)
  S* h;                      // (n, w) out: the new hidden state
  S* c;                      // lstm, (n, w) in: c_prev, out: c
  S* tanh_c;                 // lstm, (n, w) out: tanh(c), kept for backward
  S* hn;                     // gru, (n, w) out: W_hn h_prev + b_hn, kept for backward
  const S* w_peep = nullptr; // peephole cells, (K, w) rows H apart: the vectors of the gates that see c
};

template <typename S>
struct StepBackward {
  Index n, w, ld;
  GateView<const S> gates;   // activated gates from the forward pass
  const S* tanh_c;           // lstm: tanh(c_t) from the forward pass
  const S* hn;               // gru: W_hn h_prev + b_hn from the forward pass
  const S* h_prev;
  const S* c_prev;           // lstm
  S* dh;                     // in: dL/dh_t; out: the part of dL/dh_prev that bypasses W_hh
  S* dc;                     // lstm, in: dL/dc_t from later steps; out: dL/dc_prev
  GateView<S> d_gates;       // out: dL/d(pre-activation gates), the x side (and h side, but gru's n)
  S* d_hn;                   // gru, (n, w) out: dL/d(W_hn h_prev + b_hn), the h side of gate n
  const S* w_peep = nullptr; // peephole cells, as in StepForward
  Index peep_stride = 0;     // the row stride of w_peep (H)
};

// Each cell says what it keeps and how its gradient reaches h_prev:
//   has_c             a cell state c beside h (lstm)
//   has_tanh_c        tanh(c) kept on the tape (lstm)
//   has_hn            W_hn h_prev + b_hn kept, and its gradient d_hn multiplies W_hn apart (gru)
//   dh_bypasses_w_hh  part of dL/dh_prev does not go through W_hh (gru: z * dh)
//   split_product     the recurrent product comes in two, the pointwise pass between them
//                     (gru_reset_before: r first, then (r * h_prev) W_hn^T; see GruResetBeforeCell)
//   K, peepholes      the gates that see c through w_peep (K, H), one row each: which gate block,
//                     and whether it reads the new c (o) or c_prev (i, f); K = 0 for the rest

struct Tanh {
  template <typename A>
  static auto f(const A& a) { return tanh_of(a); }
  // derivative written through the output y = tanh(a)
  template <typename A>
  static auto df(const A& y) { return 1 - y.square(); }
};

struct Relu {
  template <typename A>
  static auto f(const A& a) { return a.cwiseMax(typename A::Scalar(0)); }
  template <typename A>
  static auto df(const A& y) { return (y > typename A::Scalar(0)).template cast<typename A::Scalar>(); }
};

// h = act(W_ih x + b_ih + W_hh h_prev + b_hh)
template <class Act>
struct RnnCell {
  static constexpr Index K = 0;
  static constexpr bool split_product = false;
  static constexpr Index G = 1;
  static constexpr bool has_c = false;
  static constexpr bool has_tanh_c = false;
  static constexpr bool has_hn = false;
  static constexpr bool dh_bypasses_w_hh = false;

  template <typename S>
  static void forward(const StepForward<S>& s) {
    const auto b = carr(s.b_hh, s.w);
    for (Index r = 0; r < s.n; ++r) {
      auto a = arr(s.gates.at(r, 0), s.w);
      a = Act::f(a + carr(s.hh.at(r, 0), s.w) + b);
      arr(s.h + r * s.ld, s.w) = a;
    }
  }

  template <typename S>
  static void backward(const StepBackward<S>& s) {
    for (Index r = 0; r < s.n; ++r) {
      const auto y = carr(s.gates.at(r, 0), s.w);
      arr(s.d_gates.at(r, 0), s.w) = carr(s.dh + r * s.ld, s.w) * Act::df(y);
    }
  }
};

using RnnTanhCell = RnnCell<Tanh>;
using RnnReluCell = RnnCell<Relu>;

// gates i, f, g, o;  c = f * c_prev + i * g;  h = o * tanh(c)
struct LstmCell {
  static constexpr Index K = 0;
  static constexpr bool split_product = false;
  static constexpr Index G = 4;
  static constexpr bool has_c = true;
  static constexpr bool has_tanh_c = true;
  static constexpr bool has_hn = false;
  static constexpr bool dh_bypasses_w_hh = false;

  template <typename S>
  static void forward(const StepForward<S>& s) {
    const Index w = s.w, H = s.H, ld = s.ld;
    for (Index r = 0; r < s.n; ++r) {
      auto i = arr(s.gates.at(r, 0), w);
      auto f = arr(s.gates.at(r, 1), w);
      auto g = arr(s.gates.at(r, 2), w);
      auto o = arr(s.gates.at(r, 3), w);
      i = sigmoid(i + carr(s.hh.at(r, 0), w) + carr(s.b_hh, w));
      f = sigmoid(f + carr(s.hh.at(r, 1), w) + carr(s.b_hh + H, w));
      g = tanh_of(g + carr(s.hh.at(r, 2), w) + carr(s.b_hh + 2 * H, w));
      o = sigmoid(o + carr(s.hh.at(r, 3), w) + carr(s.b_hh + 3 * H, w));
      auto c = arr(s.c + r * ld, w);
      auto tanh_c = arr(s.tanh_c + r * ld, w);
      c = f * c + i * g;
      tanh_c = tanh_of(c);
      arr(s.h + r * ld, w) = o * tanh_c;
    }
  }

  template <typename S>
  static void backward(const StepBackward<S>& s) {
    const Index w = s.w, ld = s.ld;
    for (Index r = 0; r < s.n; ++r) {
      const auto i = carr(s.gates.at(r, 0), w);
      const auto f = carr(s.gates.at(r, 1), w);
      const auto g = carr(s.gates.at(r, 2), w);
      const auto o = carr(s.gates.at(r, 3), w);
      const auto tanh_c = carr(s.tanh_c + r * ld, w);
      const auto c_prev = carr(s.c_prev + r * ld, w);
      const auto dh = carr(s.dh + r * ld, w);
      auto dc = arr(s.dc + r * ld, w);
      dc += dh * o * (1 - tanh_c.square());
      arr(s.d_gates.at(r, 0), w) = dc * g * i * (1 - i);
      arr(s.d_gates.at(r, 1), w) = dc * c_prev * f * (1 - f);
      arr(s.d_gates.at(r, 2), w) = dc * i * (1 - g.square());
      arr(s.d_gates.at(r, 3), w) = dh * tanh_c * o * (1 - o);
      dc *= f;
    }
  }
};

// gates r, z, n;  n = tanh(W_in x + b_in + r * (W_hn h_prev + b_hn));  h = (1 - z) * n + z * h_prev
struct GruCell {
  static constexpr Index K = 0;
  static constexpr bool split_product = false;
  static constexpr Index G = 3;
  static constexpr bool has_c = false;
  static constexpr bool has_tanh_c = false;
  static constexpr bool has_hn = true;
  static constexpr bool dh_bypasses_w_hh = true;

  template <typename S>
  static void forward(const StepForward<S>& s) {
    const Index w = s.w, H = s.H, ld = s.ld;
    for (Index r = 0; r < s.n; ++r) {
      auto rg = arr(s.gates.at(r, 0), w);
      auto z = arr(s.gates.at(r, 1), w);
      auto n = arr(s.gates.at(r, 2), w);
      auto hn = arr(s.hn + r * ld, w);
      rg = sigmoid(rg + carr(s.hh.at(r, 0), w) + carr(s.b_hh, w));
      z = sigmoid(z + carr(s.hh.at(r, 1), w) + carr(s.b_hh + H, w));
      hn = carr(s.hh.at(r, 2), w) + carr(s.b_hh + 2 * H, w);
      n = tanh_of(n + rg * hn);
      arr(s.h + r * ld, w) = (1 - z) * n + z * carr(s.h_prev + r * ld, w);
    }
  }

  template <typename S>
  static void backward(const StepBackward<S>& s) {
    const Index w = s.w, ld = s.ld;
    for (Index r = 0; r < s.n; ++r) {
      const auto rg = carr(s.gates.at(r, 0), w);
      const auto z = carr(s.gates.at(r, 1), w);
      const auto n = carr(s.gates.at(r, 2), w);
      const auto hn = carr(s.hn + r * ld, w);
      const auto h_prev = carr(s.h_prev + r * ld, w);
      auto dh = arr(s.dh + r * ld, w);
      auto d_n = arr(s.d_gates.at(r, 2), w);
      d_n = dh * (1 - z) * (1 - n.square());
      arr(s.d_gates.at(r, 0), w) = d_n * hn * rg * (1 - rg);
      arr(s.d_gates.at(r, 1), w) = dh * (h_prev - n) * z * (1 - z);
      arr(s.d_hn + r * ld, w) = d_n * rg;
      dh *= z;
    }
  }
};

// A gate that sees the cell state through a peephole: its block in the gates, and which c it reads.
struct Peephole {
  Index gate;
  bool new_c;  // c_t (o), else c_prev (i, f)
};

// LSTM with peepholes (ONNX's P): i and f see c_prev, o sees the new c; gates i, f, g, o.
//   i = σ(a_i + w_ci c_prev)  f = σ(a_f + w_cf c_prev)  c = f c_prev + i g  o = σ(a_o + w_co c)
struct LstmPeepholeCell {
  static constexpr Index G = 4, K = 3;
  static constexpr bool split_product = false;
  static constexpr Peephole peepholes[K] = {{0, false}, {1, false}, {3, true}};
  static constexpr bool has_c = true;
  static constexpr bool has_tanh_c = true;
  static constexpr bool has_hn = false;
  static constexpr bool dh_bypasses_w_hh = false;

  template <typename S>
  static void forward(const StepForward<S>& s) {
    const Index w = s.w, H = s.H, ld = s.ld;
    const auto w_ci = carr(s.w_peep, w), w_cf = carr(s.w_peep + H, w), w_co = carr(s.w_peep + 2 * H, w);
    for (Index r = 0; r < s.n; ++r) {
      auto i = arr(s.gates.at(r, 0), w);
      auto f = arr(s.gates.at(r, 1), w);
      auto g = arr(s.gates.at(r, 2), w);
      auto o = arr(s.gates.at(r, 3), w);
      auto c = arr(s.c + r * ld, w);
      auto tanh_c = arr(s.tanh_c + r * ld, w);
      i = sigmoid(i + carr(s.hh.at(r, 0), w) + carr(s.b_hh, w) + w_ci * c);
      f = sigmoid(f + carr(s.hh.at(r, 1), w) + carr(s.b_hh + H, w) + w_cf * c);
      g = tanh_of(g + carr(s.hh.at(r, 2), w) + carr(s.b_hh + 2 * H, w));
      c = f * c + i * g;
      o = sigmoid(o + carr(s.hh.at(r, 3), w) + carr(s.b_hh + 3 * H, w) + w_co * c);
      tanh_c = tanh_of(c);
      arr(s.h + r * ld, w) = o * tanh_c;
    }
  }

  template <typename S>
  static void backward(const StepBackward<S>& s) {
    const Index w = s.w, ld = s.ld, ps = s.peep_stride;
    const auto w_ci = carr(s.w_peep, w), w_cf = carr(s.w_peep + ps, w), w_co = carr(s.w_peep + 2 * ps, w);
    for (Index r = 0; r < s.n; ++r) {
      const auto i = carr(s.gates.at(r, 0), w);
      const auto f = carr(s.gates.at(r, 1), w);
      const auto g = carr(s.gates.at(r, 2), w);
      const auto o = carr(s.gates.at(r, 3), w);
      const auto tanh_c = carr(s.tanh_c + r * ld, w);
      const auto c_prev = carr(s.c_prev + r * ld, w);
      const auto dh = carr(s.dh + r * ld, w);
      auto dc = arr(s.dc + r * ld, w);
      auto d_i = arr(s.d_gates.at(r, 0), w);
      auto d_f = arr(s.d_gates.at(r, 1), w);
      auto d_o = arr(s.d_gates.at(r, 3), w);
      d_o = dh * tanh_c * o * (1 - o);
      dc += dh * o * (1 - tanh_c.square()) + d_o * w_co;  // c reaches h directly and through o
      d_i = dc * g * i * (1 - i);
      d_f = dc * c_prev * f * (1 - f);
      arr(s.d_gates.at(r, 2), w) = dc * i * (1 - g.square());
      dc = dc * f + d_i * w_ci + d_f * w_cf;
    }
  }
};

// LSTM with the input and forget gates coupled, i = 1 - f; gates f, g, o. With Peep, f sees c_prev
// and o the new c (w_peep rows: f, o).  c = f c_prev + (1 - f) g
template <bool Peep>
struct LstmCoupledCell {
  static constexpr Index G = 3, K = Peep ? 2 : 0;
  static constexpr bool split_product = false;
  static constexpr Peephole peepholes[2] = {{0, false}, {2, true}};
  static constexpr bool has_c = true;
  static constexpr bool has_tanh_c = true;
  static constexpr bool has_hn = false;
  static constexpr bool dh_bypasses_w_hh = false;

  template <typename S>
  static void forward(const StepForward<S>& s) {
    const Index w = s.w, H = s.H, ld = s.ld;
    for (Index r = 0; r < s.n; ++r) {
      auto f = arr(s.gates.at(r, 0), w);
      auto g = arr(s.gates.at(r, 1), w);
      auto o = arr(s.gates.at(r, 2), w);
      auto c = arr(s.c + r * ld, w);
      auto tanh_c = arr(s.tanh_c + r * ld, w);
      if constexpr (Peep) f = sigmoid(f + carr(s.hh.at(r, 0), w) + carr(s.b_hh, w) + carr(s.w_peep, w) * c);
      else f = sigmoid(f + carr(s.hh.at(r, 0), w) + carr(s.b_hh, w));
      g = tanh_of(g + carr(s.hh.at(r, 1), w) + carr(s.b_hh + H, w));
      c = f * c + (1 - f) * g;
      if constexpr (Peep) o = sigmoid(o + carr(s.hh.at(r, 2), w) + carr(s.b_hh + 2 * H, w) + carr(s.w_peep + H, w) * c);
      else o = sigmoid(o + carr(s.hh.at(r, 2), w) + carr(s.b_hh + 2 * H, w));
      tanh_c = tanh_of(c);
      arr(s.h + r * ld, w) = o * tanh_c;
    }
  }

  template <typename S>
  static void backward(const StepBackward<S>& s) {
    const Index w = s.w, ld = s.ld;
    for (Index r = 0; r < s.n; ++r) {
      const auto f = carr(s.gates.at(r, 0), w);
      const auto g = carr(s.gates.at(r, 1), w);
      const auto o = carr(s.gates.at(r, 2), w);
      const auto tanh_c = carr(s.tanh_c + r * ld, w);
      const auto c_prev = carr(s.c_prev + r * ld, w);
      const auto dh = carr(s.dh + r * ld, w);
      auto dc = arr(s.dc + r * ld, w);
      auto d_f = arr(s.d_gates.at(r, 0), w);
      auto d_o = arr(s.d_gates.at(r, 2), w);
      d_o = dh * tanh_c * o * (1 - o);
      if constexpr (Peep) dc += dh * o * (1 - tanh_c.square()) + d_o * carr(s.w_peep + s.peep_stride, w);
      else dc += dh * o * (1 - tanh_c.square());
      d_f = dc * (c_prev - g) * f * (1 - f);
      arr(s.d_gates.at(r, 1), w) = dc * (1 - f) * (1 - g.square());
      if constexpr (Peep) dc = dc * f + d_f * carr(s.w_peep, w);
      else dc *= f;
    }
  }
};

// The original GRU (ONNX's linear_before_reset=0): the reset gate applies to h_prev before W_hn,
//   r = σ(a_r)  z = σ(a_z)  n = tanh(x W_in^T + b_in + (r h_prev) W_hn^T + b_hn)  h = (1 - z) n + z h_prev
// so a step is two products with a pointwise pass after each: h_prev W_h{r,z}^T, forward_gates
// (r, z, and r * h_prev into `hn`), (r * h_prev) W_hn^T into the n gate of `hh`, forward. BPTT
// likewise: backward (d_n, d_z; d_hn = d_n), d_hn W_hn = d(r h_prev), backward_reset (d_r), then
// [d_r, d_z] W_h{r,z}. On the tape, `hn` holds r * h_prev, which dW_hn's n rows multiply.
struct GruResetBeforeCell {
  static constexpr Index G = 3, K = 0;
  static constexpr bool split_product = true;
  static constexpr bool has_c = false;
  static constexpr bool has_tanh_c = false;
  static constexpr bool has_hn = true;
  static constexpr bool dh_bypasses_w_hh = true;

  // r, z and r * h_prev (into hn), from the first product (hh's r and z gates).
  template <typename S>
  static void forward_gates(const StepForward<S>& s) {
    const Index w = s.w, H = s.H, ld = s.ld;
    for (Index r = 0; r < s.n; ++r) {
      auto rg = arr(s.gates.at(r, 0), w);
      auto z = arr(s.gates.at(r, 1), w);
      rg = sigmoid(rg + carr(s.hh.at(r, 0), w) + carr(s.b_hh, w));
      z = sigmoid(z + carr(s.hh.at(r, 1), w) + carr(s.b_hh + H, w));
      arr(s.hn + r * ld, w) = rg * carr(s.h_prev + r * ld, w);
    }
  }

  // n and h, from the second product (hh's n gate: (r * h_prev) W_hn^T).
  template <typename S>
  static void forward(const StepForward<S>& s) {
    const Index w = s.w, H = s.H, ld = s.ld;
    for (Index r = 0; r < s.n; ++r) {
      const auto z = carr(s.gates.at(r, 1), w);
      auto n = arr(s.gates.at(r, 2), w);
      n = tanh_of(n + carr(s.hh.at(r, 2), w) + carr(s.b_hh + 2 * H, w));
      arr(s.h + r * ld, w) = (1 - z) * n + z * carr(s.h_prev + r * ld, w);
    }
  }

  // d_n (also into d_hn, the A of d(r h_prev) = d_hn W_hn) and d_z; dh becomes dh * z.
  template <typename S>
  static void backward(const StepBackward<S>& s) {
    const Index w = s.w, ld = s.ld;
    for (Index r = 0; r < s.n; ++r) {
      const auto z = carr(s.gates.at(r, 1), w);
      const auto n = carr(s.gates.at(r, 2), w);
      const auto h_prev = carr(s.h_prev + r * ld, w);
      auto dh = arr(s.dh + r * ld, w);
      auto d_n = arr(s.d_gates.at(r, 2), w);
      d_n = dh * (1 - z) * (1 - n.square());
      arr(s.d_hn + r * ld, w) = d_n;
      arr(s.d_gates.at(r, 1), w) = dh * (h_prev - n) * z * (1 - z);
      dh *= z;
    }
  }

  // From d_rh = d(r h_prev) (n rows of w, ld_rh apart): d_r, and dh += d_rh * r.
  template <typename S>
  static void backward_reset(const StepBackward<S>& s, const S* d_rh, Index ld_rh) {
    const Index w = s.w, ld = s.ld;
    for (Index r = 0; r < s.n; ++r) {
      const auto rg = carr(s.gates.at(r, 0), w);
      const auto d_reset = carr(d_rh + r * ld_rh, w);
      arr(s.d_gates.at(r, 0), w) = d_reset * carr(s.h_prev + r * ld, w) * rg * (1 - rg);
      arr(s.dh + r * ld, w) += d_reset * rg;
    }
  }
};

}  // namespace pyrnn
