// Thin pybind11 layer: guard the arguments, release the GIL, call the core. No math here.
//
// Arguments are checked in Python (pyrnn/_checks.py) before they reach this file, and arrive in
// the core's form. What is left here are the guards that stop a direct call from making the core
// read or write out of bounds: each array's dtype, shape and layout, each list's length, sizes,
// the lengths' range, the types of the tape and the packs. A failed guard raises TypeError or
// ValueError naming the argument; nothing is converted or copied.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "pyrnn/adam.hpp"
#include "pyrnn/build_info.hpp"
#include "pyrnn/dense.hpp"
#include "pyrnn/pack_cache.hpp"
#include "pyrnn/stack.hpp"
#include "pyrnn/threads.hpp"
#include "pyrnn/workspace.hpp"

namespace py = pybind11;
using pyrnn::Index;

namespace {

template <typename S>
using Array = py::array_t<S, py::array::c_style>;
using Shape = std::vector<Index>;

// The cells by name, in the order of pyrnn::CellKind.
const char* const kCells[] = {"rnn_tanh", "rnn_relu", "lstm", "gru", "lstm_peephole", "lstm_coupled",
                              "lstm_coupled_peephole", "gru_reset_before"};
constexpr int kCellCount = sizeof(kCells) / sizeof(kCells[0]);
// The options of the kernel contract this build runs, besides its cells (see features()).
const char* const kOptions[] = {"projection", "residual"};

std::string shape_str(const Shape& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

Shape shape_of(const py::array& a) { return Shape(a.shape(), a.shape() + a.ndim()); }

std::string type_name(py::handle obj) { return py::str(py::type::of(obj).attr("__name__")); }

template <typename S>
std::string dtype_name() {
  return py::str(py::dtype::of<S>());
}

// An argument's name, spelled out only when a guard fails: "x", "weights[2] w_ih".
struct Arg {
  const char* name;
  Index index = -1;
  const char* part = nullptr;
  std::string str() const {
    std::string s = name;
    if (index >= 0) s += "[" + std::to_string(index) + "]";
    return part ? s + " " + part : s;
  }
};

// The item size of a real floating-point dtype (any byte order), or 0 for any other dtype.
size_t float_size(const py::array& a) {
  return a.dtype().kind() == 'f' ? static_cast<size_t>(a.dtype().itemsize()) : 0;
}

py::array array_arg(py::handle obj, const Arg& arg) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(arg.str() + ": expected a numpy array, got " + type_name(obj));
  return py::reinterpret_borrow<py::array>(obj);
}

// An array of S in native byte order, of exactly `shape`, C-contiguous and aligned, and writable
// when the core writes into it: the caller's own array, never a copy.
template <typename S>
Array<S> guarded(py::handle obj, const Arg& arg, const Shape& shape, bool written = false) {
  const py::array a = array_arg(obj, arg);
  if (!py::isinstance<py::array_t<S>>(a))
    throw py::type_error(arg.str() + ": expected dtype " + dtype_name<S>() + " in native byte order, got " +
                         std::string(py::str(a.dtype())));
  if (a.ndim() != static_cast<py::ssize_t>(shape.size()) || !std::equal(shape.begin(), shape.end(), a.shape()))
    throw py::value_error(arg.str() + ": expected shape " + shape_str(shape) + ", got " + shape_str(shape_of(a)));
  const int needed = py::array::c_style | py::detail::npy_api::NPY_ARRAY_ALIGNED_ |
                     (written ? py::detail::npy_api::NPY_ARRAY_WRITEABLE_ : 0);
  if ((a.flags() & needed) != needed)
    throw py::value_error(arg.str() + (written ? ": expected a C-contiguous, aligned, writable array"
                                               : ": expected a C-contiguous, aligned array"));
  return py::reinterpret_borrow<Array<S>>(a);
}

py::sequence guarded_list(py::handle obj, const Arg& arg, Index expected) {
  if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
    throw py::type_error(arg.str() + ": expected a list, got " + type_name(obj));
  auto seq = py::reinterpret_borrow<py::sequence>(obj);
  if (static_cast<Index>(seq.size()) != expected)
    throw py::value_error(arg.str() + ": expected " + std::to_string(expected) + " entries, got " +
                          std::to_string(seq.size()));
  return seq;
}

// Refuse sizes whose product would overflow the core's index arithmetic (no array that large can
// exist, but the product of a few large dimensions can).
void guard_size(std::initializer_list<Index> factors, const char* what) {
  Index n = 1;
  for (Index f : factors)
    if (__builtin_mul_overflow(n, f, &n) || n > (Index(1) << 56))
      throw py::value_error(std::string(what) + ": sizes too large for the core");
}

// A new uninitialised array whose memory comes from (and returns to) the core's buffer pool, so
// that returning large arrays call after call does not fault in fresh pages every time.
template <typename S>
Array<S> new_array(const Shape& shape) {
  Index n = 1;
  for (Index d : shape) n *= d;
  // At least one element: NumPy takes a null data pointer as a request to allocate its own.
  auto [p, bytes] = pyrnn::Buffer<S>(static_cast<size_t>(std::max<Index>(n, 1))).release();
  auto* block = new std::pair<void*, size_t>(p, bytes);
  py::capsule owner(block, [](void* b) {
    auto* blk = static_cast<std::pair<void*, size_t>*>(b);
    pyrnn::BufferPool::instance().release(blk->first, blk->second);
    delete blk;
  });
  return Array<S>(shape, p, owner);
}

py::object or_none(bool present, py::object value) { return present ? std::move(value) : py::none(); }

// Call f(S{}) with the float type of the array argument `arg`.
template <class F>
auto with_float_type(const py::object& obj, const Arg& arg, F&& f) {
  const size_t size = float_size(array_arg(obj, arg));
  if (size == sizeof(float)) return f(float{});
  if (size == sizeof(double)) return f(double{});
  throw py::type_error(arg.str() + ": expected dtype float32 or float64, got " +
                       std::string(py::str(py::reinterpret_borrow<py::array>(obj).dtype())));
}

// ------------------------------------------------------------------------------ stack_forward

pyrnn::CellKind parse_cell(const std::string& name) {
  std::string names;
  for (int k = 0; k < kCellCount; ++k) {
    if (name == kCells[k]) return static_cast<pyrnn::CellKind>(k);
    names += std::string(k ? ", '" : "'") + kCells[k] + "'";
  }
  throw py::value_error("cell must be one of " + names + ", got '" + name + "'");
}

// H of a projected stack: weights[0]'s w_hr (P, H), when the tuple has one; else 0 (not projected).
// Only looks: the tuple's guards come later, in the order of the arguments.
Index projected_hidden(pyrnn::CellKind cell, const py::object& weights, Index P) {
  if (!py::isinstance<py::sequence>(weights) || py::len(weights) < 1) return 0;
  const py::object entry = py::reinterpret_borrow<py::sequence>(weights)[0];
  if (!py::isinstance<py::sequence>(entry) || py::len(entry) != 6) return 0;
  const py::object w_hr = py::reinterpret_borrow<py::sequence>(entry)[5];
  if (w_hr.is_none()) return 0;
  if (!pyrnn::cell_shape(cell).has_c)
    throw py::value_error(std::string("weights[0] w_hr: cell '") + kCells[static_cast<int>(cell)] +
                          "' has no projection (only the LSTM cells have one); expected None");
  const py::array a = array_arg(w_hr, {"weights", 0, "w_hr"});
  if (a.ndim() != 2 || a.shape(0) != P || a.shape(1) < 1)
    throw py::value_error("weights[0] w_hr: expected shape (P, H) with P = h0's width = " + std::to_string(P) +
                          " and H >= 1, got " + shape_str(shape_of(a)));
  return a.shape(1);
}

// T, B, I from x (T, B, I); L, D and P from h0 (L*D, B, P); H = P, or from weights[0]'s w_hr.
pyrnn::Dims stack_dims(const py::array& x, py::handle h0_obj, bool bidirectional, pyrnn::CellKind cell,
                       const py::object& weights) {
  if (x.ndim() != 3 || x.shape(0) < 1 || x.shape(1) < 1 || x.shape(2) < 1)
    throw py::value_error("x: expected shape (T, B, I) with every dimension >= 1, got " + shape_str(shape_of(x)));
  if (h0_obj.is_none()) throw py::value_error("h0: required, an array (L*D, B, H)");
  const py::array h0 = array_arg(h0_obj, {"h0"});
  const Index D = bidirectional ? 2 : 1;
  if (h0.ndim() != 3 || h0.shape(0) < 1 || h0.shape(0) % D != 0 || h0.shape(2) < 1)
    throw py::value_error("h0: expected shape (L*D, B, H) with L, H >= 1 and D = " + std::to_string(D) + ", got " +
                          shape_str(shape_of(h0)));
  const Index P = h0.shape(2), H = projected_hidden(cell, weights, P);
  const pyrnn::Dims dm{x.shape(0), x.shape(1), x.shape(2), H > 0 ? H : P, h0.shape(0) / D, D, P, H > 0};
  guard_size({dm.T, dm.B, 4 * dm.H, dm.L, dm.D}, "x and h0");
  return dm;
}

// The arrays of one call, held alive while the core runs: weights first (in the order a
// PackSignature lists them), then the rest.
template <typename S>
struct Held {
  std::vector<Array<S>> weights, others;
  const S* other(Array<S> a) {
    others.push_back(std::move(a));
    return others.back().data();
  }
};

template <typename S>
const S* guarded_c0(pyrnn::CellKind cell, const py::object& c0_obj, const pyrnn::Dims& dm, Held<S>& held) {
  if (!pyrnn::cell_shape(cell).has_c) {
    if (!c0_obj.is_none())
      throw py::value_error("c0: only 'lstm' has a cell state (with its variants 'lstm_*'); expected None");
    return nullptr;
  }
  if (c0_obj.is_none())
    throw py::value_error("c0: required for cell '" + std::string(kCells[static_cast<int>(cell)]) + "', got None");
  return held.other(guarded<S>(c0_obj, {"c0"}, {dm.L * dm.D, dm.B, dm.H}));
}

// The parts of a weights tuple (see the kernel contract), and how many a stack's tuples have: 6
// with peepholes or a projection, else 4.
const char* const kParts[] = {"w_ih", "w_hh", "b_ih", "b_hh", "w_peep", "w_hr"};
constexpr Index kPeep = 4, kHr = 5;
Index parts_of(pyrnn::CellKind cell, const pyrnn::Dims& dm) {
  return pyrnn::cell_shape(cell).K > 0 || dm.projected ? 6 : 4;
}

// The shapes of weights[k]'s parts, 6 of them when the tuple has 6; an absent part (None), none.
std::vector<std::optional<Shape>> part_shapes(pyrnn::CellKind cell, const pyrnn::Dims& dm, Index k) {
  const pyrnn::CellShape c = pyrnn::cell_shape(cell);
  const Index GH = c.G * dm.H;
  std::vector<std::optional<Shape>> shapes{Shape{GH, dm.input_size(k / dm.D)}, Shape{GH, dm.P}, Shape{GH},
                                           Shape{GH}};
  if (parts_of(cell, dm) == 4) return shapes;
  shapes.push_back(c.K > 0 ? std::optional<Shape>(Shape{c.K, dm.H}) : std::nullopt);
  shapes.push_back(dm.projected ? std::optional<Shape>(Shape{dm.P, dm.H}) : std::nullopt);
  return shapes;
}

// One weights tuple, of its stack's form: 4 parts, or 6 with None where a part is absent.
py::sequence guarded_entry(py::handle obj, pyrnn::CellKind cell, const pyrnn::Dims& dm, const Arg& arg) {
  py::sequence entry = guarded_list(obj, arg, parts_of(cell, dm));
  const std::vector<std::optional<Shape>> shapes = part_shapes(cell, dm, 0);
  for (size_t j = 4; j < shapes.size(); ++j)
    if (!shapes[j] && !entry[j].is_none())
      throw py::value_error(arg.str() + " " + kParts[j] + ": expected None (" +
                            (j == kHr ? "weights[0] has no projection)" : "the cell has no peepholes)"));
  return entry;
}

// weights: L*D tuples of the parts and shapes the kernel contract gives.
template <typename S>
std::vector<pyrnn::DirWeights<S>> guarded_weights(pyrnn::CellKind cell, const py::object& obj,
                                                  const pyrnn::Dims& dm, Held<S>& held) {
  const Index LD = dm.L * dm.D;
  py::sequence weights = guarded_list(obj, {"weights"}, LD);
  std::vector<pyrnn::DirWeights<S>> dir_weights;
  for (Index k = 0; k < LD; ++k) {
    py::sequence entry = guarded_entry(weights[k], cell, dm, {"weights", k});
    const std::vector<std::optional<Shape>> shapes = part_shapes(cell, dm, k);
    const S* parts[6] = {};
    for (size_t j = 0; j < shapes.size(); ++j) {
      if (!shapes[j]) continue;
      held.weights.push_back(guarded<S>(entry[j], {"weights", k, kParts[j]}, *shapes[j]));
      parts[j] = held.weights.back().data();
    }
    dir_weights.push_back({parts[0], parts[1], parts[2], parts[3], parts[kPeep], parts[kHr]});
  }
  return dir_weights;
}

// lengths: None (all T), or int64 (B,) with every value in [1, T]: the time loops index by them.
std::vector<std::int64_t> guarded_lengths(const py::object& obj, Index T, Index B) {
  if (obj.is_none()) return {};
  const Array<std::int64_t> a = guarded<std::int64_t>(obj, {"lengths"}, {B});
  std::vector<std::int64_t> lengths(a.data(), a.data() + B);
  for (Index b = 0; b < B; ++b)
    if (lengths[b] < 1 || lengths[b] > T)
      throw py::value_error("lengths: every length must be in [1, T] = [1, " + std::to_string(T) + "], got " +
                            std::to_string(lengths[b]) + " at index " + std::to_string(b));
  return lengths;
}

// dropout_masks: None, or L-1 arrays (T, B, D*P).
template <typename S>
std::vector<const S*> guarded_masks(const py::object& obj, const pyrnn::Dims& dm, Held<S>& held) {
  if (obj.is_none()) return {};
  py::sequence seq = guarded_list(obj, {"dropout_masks"}, dm.L - 1);
  std::vector<const S*> masks;
  for (Index k = 0; k + 1 < dm.L; ++k)
    masks.push_back(held.other(guarded<S>(seq[k], {"dropout_masks", k}, {dm.T, dm.B, dm.D * dm.P})));
  return masks;
}

// packs: None, or a PackCache (inference only, see pyrnn/pack_cache.hpp).
pyrnn::PackCache* guarded_packs(const py::object& obj, bool keep_tape) {
  if (obj.is_none()) return nullptr;
  if (!py::isinstance<pyrnn::PackCache>(obj))
    throw py::type_error("packs: expected None or a PackCache of this module, got " + type_name(obj));
  if (keep_tape) throw py::value_error("packs: only for inference (keep_tape=False); a tape packs its own");
  return obj.cast<pyrnn::PackCache*>();
}

// An inference pass with the weights packed in `cache`, which serves only the weights it was
// filled from (the same arrays, by address).
template <typename S>
void forward_with_packs(const pyrnn::StackInputs<S>& in, const pyrnn::StackOutputs<S>& res, pyrnn::PackCache& cache,
                        const py::object& packs_obj, const std::vector<Array<S>>& weights) {
  const pyrnn::Dims& dm = in.dims;
  pyrnn::PackSignature signature{in.cell, Index(sizeof(S)), dm.I, dm.H, dm.L, dm.D, {}};
  for (const Array<S>& w : weights) signature.weights.push_back(w.data());
  const pyrnn::ThreadShare share;  // the core's threads this call may use, until it returns
  const int threads = share.count();
  bool served = false;
  {
    py::gil_scoped_release release;  // before the lease: a call filling the packs holds its lock
    if (auto lease = cache.lease<S>(signature, dm.B, threads, pyrnn::stack_lanes<S>(dm, in.cell, in.residual, threads))) {
      pyrnn::stack_forward(in, res, false, threads, lease->packs.get());
      served = true;
    }
  }
  if (!served)
    throw py::value_error("packs: this PackCache holds packs of other weight arrays or another stack; "
                          "one PackCache serves one set of weights, passed as the same C-contiguous arrays "
                          "of x's dtype every call");
  // Holding the weights keeps their addresses from naming other arrays later.
  if (!py::hasattr(packs_obj, "weights")) packs_obj.attr("weights") = py::list(py::cast(weights));
}

template <typename S>
py::tuple run_forward(const pyrnn::StackInputs<S>& in, bool keep_tape, pyrnn::PackCache* cache,
                      const py::object& packs_obj, const Held<S>& held) {
  const pyrnn::Dims& dm = in.dims;
  const bool has_c = pyrnn::cell_shape(in.cell).has_c;
  const Shape h_state{dm.L * dm.D, dm.B, dm.P}, c_state{dm.L * dm.D, dm.B, dm.H};
  Array<S> out = new_array<S>({dm.T, dm.B, dm.D * dm.P}), h_n = new_array<S>(h_state);
  Array<S> c_n = has_c ? new_array<S>(c_state) : Array<S>();
  const pyrnn::StackOutputs<S> res{out.mutable_data(), h_n.mutable_data(), has_c ? c_n.mutable_data() : nullptr};
  std::unique_ptr<pyrnn::Tape<S>> tape;
  if (cache) {
    forward_with_packs(in, res, *cache, packs_obj, held.weights);
  } else {
    const pyrnn::ThreadShare share;  // the core's threads this call may use, until it returns
    const int threads = share.count();
    py::gil_scoped_release release;
    tape = pyrnn::stack_forward(in, res, keep_tape, threads);
  }
  py::object tape_obj = tape ? py::cast(std::shared_ptr<pyrnn::TapeBase>(std::move(tape))) : py::none();
  return py::make_tuple(out, h_n, or_none(has_c, c_n), tape_obj);
}

template <typename S>
py::tuple forward_impl(pyrnn::CellKind cell, const py::array& x, const py::object& h0, const py::object& c0,
                       const py::object& weights, bool bidirectional, const py::object& lengths_obj,
                       const py::object& masks, bool keep_tape, const py::object& packs, bool residual) {
  pyrnn::PackCache* cache = guarded_packs(packs, keep_tape);
  const pyrnn::Dims dm = stack_dims(x, h0, bidirectional, cell, weights);
  const std::vector<std::int64_t> lengths = guarded_lengths(lengths_obj, dm.T, dm.B);
  Held<S> held;
  // Braced initialisers run in order: the guards raise in the order of the arguments.
  const pyrnn::StackInputs<S> in{cell,
                                 dm,
                                 held.other(guarded<S>(x, {"x"}, {dm.T, dm.B, dm.I})),
                                 held.other(guarded<S>(h0, {"h0"}, {dm.L * dm.D, dm.B, dm.P})),
                                 guarded_c0<S>(cell, c0, dm, held),
                                 guarded_weights<S>(cell, weights, dm, held),
                                 lengths.empty() ? nullptr : lengths.data(),
                                 guarded_masks<S>(masks, dm, held),
                                 residual};
  return run_forward<S>(in, keep_tape, cache, packs, held);
}

py::tuple stack_forward(const std::string& cell, const py::object& x, const py::object& h0, const py::object& c0,
                        const py::object& weights, bool bidirectional, const py::object& lengths,
                        const py::object& dropout_masks, bool keep_tape, const py::object& packs, bool residual) {
  const pyrnn::CellKind kind = parse_cell(cell);
  return with_float_type(x, {"x"}, [&](auto s) {
    return forward_impl<decltype(s)>(kind, py::reinterpret_borrow<py::array>(x), h0, c0, weights, bidirectional,
                                     lengths, dropout_masks, keep_tape, packs, residual);
  });
}

// ----------------------------------------------------------------------------- stack_backward

// The weight gradients' arrays, L*D entries of the weights' parts (dw_ih, dw_hh, db_ih, db_hh
// [, dw_peep, dw_hr], an empty array where the part is absent): new ones, or those of
// accumulate_into, which the core adds into.
template <typename S>
std::vector<std::vector<Array<S>>> weight_grad_arrays(const pyrnn::Tape<S>& tape, const py::object& into_obj) {
  static const char* const parts[] = {"dw_ih", "dw_hh", "db_ih", "db_hh", "dw_peep", "dw_hr"};
  const pyrnn::Dims& dm = tape.dims;
  const Index LD = dm.L * dm.D;
  const bool fresh = into_obj.is_none();
  py::sequence into = fresh ? py::sequence() : guarded_list(into_obj, {"accumulate_into"}, LD);
  std::vector<std::vector<Array<S>>> arrays(LD);
  for (Index k = 0; k < LD; ++k) {
    const std::vector<std::optional<Shape>> shapes = part_shapes(tape.cell, dm, k);
    py::sequence entry = fresh ? py::sequence() : guarded_entry(into[k], tape.cell, dm, {"accumulate_into", k});
    for (size_t j = 0; j < shapes.size(); ++j) {
      if (!shapes[j]) arrays[k].push_back(Array<S>());
      else arrays[k].push_back(fresh ? new_array<S>(*shapes[j])
                                     : guarded<S>(entry[j], {"accumulate_into", k, parts[j]}, *shapes[j], true));
    }
  }
  return arrays;
}

// One entry of d_weights, in the form of the weights: 4 parts, or 6 with None where absent.
template <typename S>
py::tuple grads_entry(const std::vector<Array<S>>& w, const std::vector<std::optional<Shape>>& shapes) {
  if (w.size() == 4) return py::make_tuple(w[0], w[1], w[2], w[3]);
  return py::make_tuple(w[0], w[1], w[2], w[3], or_none(shapes[kPeep].has_value(), w[kPeep]),
                        or_none(shapes[kHr].has_value(), w[kHr]));
}

template <typename S>
py::tuple backward_impl(const pyrnn::Tape<S>& tape, const py::object& d_out_obj, const py::object& d_h_n_obj,
                        const py::object& d_c_n_obj, const py::object& into_obj) {
  const pyrnn::Dims& dm = tape.dims;
  const bool has_c = pyrnn::cell_shape(tape.cell).has_c;
  const Shape h_state{dm.L * dm.D, dm.B, dm.P}, c_state{dm.L * dm.D, dm.B, dm.H};
  const Array<S> d_out = guarded<S>(d_out_obj, {"d_out"}, {dm.T, dm.B, dm.D * dm.P});
  if (!has_c && !d_c_n_obj.is_none())
    throw py::value_error("d_c_n: only 'lstm' has a cell state (with its variants 'lstm_*'); expected None");
  // A default-constructed array_t is an empty array, not null: presence is the argument's.
  const Array<S> d_h_n = d_h_n_obj.is_none() ? Array<S>() : guarded<S>(d_h_n_obj, {"d_h_n"}, h_state);
  const Array<S> d_c_n = d_c_n_obj.is_none() ? Array<S>() : guarded<S>(d_c_n_obj, {"d_c_n"}, c_state);
  std::vector<std::vector<Array<S>>> weight_grads = weight_grad_arrays(tape, into_obj);

  Array<S> dx = new_array<S>({dm.T, dm.B, dm.I}), dh0 = new_array<S>(h_state);
  Array<S> dc0 = has_c ? new_array<S>(c_state) : Array<S>();
  pyrnn::StackGrads<S> grads{dx.mutable_data(), dh0.mutable_data(), has_c ? dc0.mutable_data() : nullptr,
                             {}, {}, {}, {}, {}, {}, !into_obj.is_none()};
  const std::vector<std::optional<Shape>> shapes = part_shapes(tape.cell, dm, 0);
  py::list d_weights;
  for (std::vector<Array<S>>& w : weight_grads) {
    grads.dw_ih.push_back(w[0].mutable_data());
    grads.dw_hh.push_back(w[1].mutable_data());
    grads.db_ih.push_back(w[2].mutable_data());
    grads.db_hh.push_back(w[3].mutable_data());
    if (w.size() > 4 && shapes[kPeep]) grads.dw_peep.push_back(w[kPeep].mutable_data());
    if (w.size() > 4 && shapes[kHr]) grads.dw_hr.push_back(w[kHr].mutable_data());
    d_weights.append(grads_entry(w, shapes));
  }
  const pyrnn::ThreadShare share;  // the core's threads this call may use, until it returns
  const int threads = share.count();
  {
    py::gil_scoped_release release;
    pyrnn::stack_backward(tape, d_out.data(), d_h_n_obj.is_none() ? nullptr : d_h_n.data(),
                          d_c_n_obj.is_none() ? nullptr : d_c_n.data(), grads, threads);
  }
  return py::make_tuple(dx, dh0, or_none(has_c, dc0), d_weights);
}

py::tuple stack_backward(const py::object& tape_obj, const py::object& d_out, const py::object& d_h_n,
                         const py::object& d_c_n, const py::object& accumulate_into) {
  if (!py::isinstance<pyrnn::TapeBase>(tape_obj))
    throw py::type_error("tape: expected the Tape returned by this module's stack_forward, got " +
                         type_name(tape_obj));
  const auto tape = tape_obj.cast<std::shared_ptr<pyrnn::TapeBase>>();
  if (auto t32 = std::dynamic_pointer_cast<pyrnn::Tape<float>>(tape))
    return backward_impl(*t32, d_out, d_h_n, d_c_n, accumulate_into);
  if (auto t64 = std::dynamic_pointer_cast<pyrnn::Tape<double>>(tape))
    return backward_impl(*t64, d_out, d_h_n, d_c_n, accumulate_into);
  throw py::type_error("tape: unknown tape type");
}

// ---------------------------------------------------------------- the dense layer (Linear)

// n, k, m of x (n, k) and weight (m, k).
struct DenseDims {
  Index n, k, m;
};

DenseDims dense_dims(const py::object& x_obj, const py::object& weight_obj) {
  const py::array x = array_arg(x_obj, {"x"}), weight = array_arg(weight_obj, {"weight"});
  if (x.ndim() != 2 || x.shape(1) < 1)
    throw py::value_error("x: expected shape (N, K) with K >= 1, got " + shape_str(shape_of(x)));
  if (weight.ndim() != 2 || weight.shape(0) < 1)
    throw py::value_error("weight: expected shape (M, K) with M >= 1, got " + shape_str(shape_of(weight)));
  guard_size({x.shape(0), std::max(x.shape(1), weight.shape(0))}, "x and weight");
  return {x.shape(0), x.shape(1), weight.shape(0)};
}

template <typename S>
py::array linear_forward_impl(const DenseDims& d, const py::object& x_obj, const py::object& weight_obj,
                              const py::object& bias_obj) {
  const Array<S> x = guarded<S>(x_obj, {"x"}, {d.n, d.k}), weight = guarded<S>(weight_obj, {"weight"}, {d.m, d.k});
  const Array<S> bias = bias_obj.is_none() ? Array<S>() : guarded<S>(bias_obj, {"bias"}, {d.m});
  Array<S> y = new_array<S>({d.n, d.m});
  const pyrnn::ThreadShare share;  // the core's threads this call may use, until it returns
  const int threads = share.count();
  {
    py::gil_scoped_release release;
    pyrnn::dense_forward(d.n, d.k, d.m, x.data(), weight.data(), bias_obj.is_none() ? nullptr : bias.data(),
                         y.mutable_data(), threads);
  }
  return y;
}

py::array linear_forward(const py::object& x, const py::object& weight, const py::object& bias) {
  const DenseDims d = dense_dims(x, weight);
  return with_float_type(x, {"x"}, [&](auto s) { return linear_forward_impl<decltype(s)>(d, x, weight, bias); });
}

// accumulate_into of linear_backward: (d_weight, d_bias, or None when there is no bias).
template <typename S>
std::pair<Array<S>, Array<S>> linear_targets(const DenseDims& d, bool has_bias, const py::object& into_obj) {
  if (into_obj.is_none()) return {new_array<S>({d.m, d.k}), has_bias ? new_array<S>({d.m}) : Array<S>()};
  py::sequence into = guarded_list(into_obj, {"accumulate_into"}, 2);
  if (!has_bias && !into[1].is_none())
    throw py::value_error("accumulate_into[1] d_bias: expected None, as has_bias is False");
  return {guarded<S>(into[0], {"accumulate_into", 0, "d_weight"}, {d.m, d.k}, true),
          has_bias ? guarded<S>(into[1], {"accumulate_into", 1, "d_bias"}, {d.m}, true) : Array<S>()};
}

template <typename S>
py::tuple linear_backward_impl(const DenseDims& d, const py::object& x_obj, const py::object& weight_obj,
                               const py::object& d_y_obj, bool has_bias, const py::object& into_obj) {
  const Array<S> x = guarded<S>(x_obj, {"x"}, {d.n, d.k}), weight = guarded<S>(weight_obj, {"weight"}, {d.m, d.k});
  const Array<S> d_y = guarded<S>(d_y_obj, {"d_y"}, {d.n, d.m});
  auto [d_weight, d_bias] = linear_targets<S>(d, has_bias, into_obj);
  Array<S> dx = new_array<S>({d.n, d.k});
  const pyrnn::ThreadShare share;  // the core's threads this call may use, until it returns
  const int threads = share.count();
  {
    py::gil_scoped_release release;
    pyrnn::dense_backward(d.n, d.k, d.m, x.data(), weight.data(), d_y.data(), dx.mutable_data(),
                          d_weight.mutable_data(), has_bias ? d_bias.mutable_data() : nullptr, !into_obj.is_none(),
                          threads);
  }
  return py::make_tuple(dx, d_weight, or_none(has_bias, d_bias));
}

py::tuple linear_backward(const py::object& x, const py::object& weight, const py::object& d_y, bool has_bias,
                          const py::object& accumulate_into) {
  const DenseDims d = dense_dims(x, weight);
  return with_float_type(x, {"x"}, [&](auto s) {
    return linear_backward_impl<decltype(s)>(d, x, weight, d_y, has_bias, accumulate_into);
  });
}

// ------------------------------------------------------------------------- Adam's update

// param, exp_avg, exp_avg_sq and max_exp_avg_sq (or None) are written in place and grad read:
// arrays of param's dtype and shape.
template <typename S>
void adam_update_impl(const py::object& param_obj, const py::object& grad_obj, const py::object& exp_avg_obj,
                      const py::object& exp_avg_sq_obj, const py::object& max_obj, const pyrnn::AdamScalars& a) {
  const Shape shape = shape_of(py::reinterpret_borrow<py::array>(param_obj));
  Index n = 1;
  for (Index d : shape) n *= d;
  Array<S> param = guarded<S>(param_obj, {"param"}, shape, true);
  const Array<S> grad = guarded<S>(grad_obj, {"grad"}, shape);
  Array<S> exp_avg = guarded<S>(exp_avg_obj, {"exp_avg"}, shape, true);
  Array<S> exp_avg_sq = guarded<S>(exp_avg_sq_obj, {"exp_avg_sq"}, shape, true);
  const bool amsgrad = !max_obj.is_none();
  Array<S> max_exp_avg_sq = amsgrad ? guarded<S>(max_obj, {"max_exp_avg_sq"}, shape, true) : Array<S>();
  const pyrnn::ThreadShare share;  // the core's threads this call may use, until it returns
  const int threads = share.count();
  py::gil_scoped_release release;
  pyrnn::adam_update(n, param.mutable_data(), grad.data(), exp_avg.mutable_data(), exp_avg_sq.mutable_data(),
                     amsgrad ? max_exp_avg_sq.mutable_data() : nullptr, a, threads);
}

void adam_update(const py::object& param, const py::object& grad, const py::object& exp_avg,
                 const py::object& exp_avg_sq, const py::object& max_exp_avg_sq, double neg_step_size,
                 double lerp_weight, double beta2, double bias_correction2_sqrt, double eps, double weight_decay) {
  const pyrnn::AdamScalars a{neg_step_size, lerp_weight, beta2, bias_correction2_sqrt, eps, weight_decay};
  with_float_type(param, {"param"}, [&](auto s) {
    adam_update_impl<decltype(s)>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, a);
  });
}

std::string tape_dtype(const pyrnn::TapeBase& t) {
  return dynamic_cast<const pyrnn::Tape<float>*>(&t) ? "float32" : "float64";
}

// A key of TeamChoice that only `loop` tells apart.
pyrnn::TeamChoice::Key test_key(int loop) { return {loop, 0, 0, 0, 0, 0, 2}; }

// ------------------------------------------------------------------ the GEMM, for its tests

// One product of gemm_for_tests: B as given, packed or read in place by the core, and its C.
template <typename S>
struct GemmOperand {
  Array<S> b, c;
  Index N;
  pyrnn::PackedB<S> pack(const std::string& layout, Index K, int threads) const {
    pyrnn::PackedB<S> packed;
    const S* p = b.data();
    const Index n_cols = N;
    if (layout == "columns") packed.pack(K, N, 1, [&](Index j) { return p + j * K; }, threads);
    else if (layout == "rows") packed.pack_rows(K, N, N, [&](Index k) { return p + k * n_cols; }, threads);
    else packed = pyrnn::PackedB<S>::in_place(p, K, N, N);
    return packed;
  }
};

// The bytes an array spans, named as its guard names it.
struct Span {
  const char *begin, *end;
  std::string name;
};

Span span_of(const py::array& a, const std::string& name) {
  const char* p = static_cast<const char*>(a.data());
  return {p, p + a.nbytes(), name};
}

// A C the product writes must not overlap anything it reads or another C: the core's GEMM
// assumes its output aliases none of its inputs.
void guard_disjoint(const std::vector<Span>& taken, const Span& c) {
  for (const Span& s : taken)
    if (c.begin < s.end && s.begin < c.end) throw py::value_error(c.name + ": shares memory with " + s.name);
}

// b[t] and c[t] guarded: B of depth K as `layout` stores it, C of n rows and at least N columns,
// writable and sharing no memory with what the product reads or with another C.
template <typename S>
GemmOperand<S> guarded_gemm_operand(const py::sequence& bs, const py::sequence& cs, size_t t,
                                    const std::string& layout, Index n, Index K, std::vector<Span>& taken) {
  const Arg b_arg{"b", Index(t)}, c_arg{"c", Index(t)};
  const py::array b_in = array_arg(bs[t], b_arg), c_in = array_arg(cs[t], c_arg);
  for (const auto& [arr, arg] : {std::pair{b_in, b_arg}, std::pair{c_in, c_arg}})
    if (arr.ndim() != 2) throw py::value_error(arg.str() + ": expected a 2-D numpy array");
  const Shape b_shape = shape_of(b_in), c_shape = shape_of(c_in);
  const bool by_columns = layout == "columns";
  const Index N = by_columns ? b_shape[0] : b_shape[1];
  if (N < 1 || (by_columns ? b_shape[1] : b_shape[0]) != K)
    throw py::value_error(b_arg.str() + ": expected depth K = " + std::to_string(K) + ", got " + shape_str(b_shape));
  if (layout == "in_place" && N % pyrnn::kPacket<S> != 0)
    throw py::value_error(b_arg.str() + ": read in place, N must be a multiple of " +
                          std::to_string(pyrnn::kPacket<S>));
  if (c_shape[0] != n || c_shape[1] < N)
    throw py::value_error(c_arg.str() + ": expected " + std::to_string(n) + " rows of >= " + std::to_string(N) +
                          " columns, got " + shape_str(c_shape));
  GemmOperand<S> op{guarded<S>(b_in, b_arg, b_shape), guarded<S>(c_in, c_arg, c_shape, true), N};
  taken.push_back(span_of(op.b, b_arg.str()));
  const Span c_span = span_of(op.c, c_arg.str());
  guard_disjoint(taken, c_span);
  taken.push_back(c_span);
  return op;
}

// n and K of A from `a` (A (n, K), or A^T (K, n) when a_transposed), with the other arguments
// that need no array guarded.
std::pair<Index, Index> gemm_dims(const py::object& a_obj, const py::sequence& bs, const py::sequence& cs,
                                  const py::object& bias_obj, const std::string& layout, bool a_transposed,
                                  int threads) {
  if (layout != "columns" && layout != "rows" && layout != "in_place")
    throw py::value_error("layout: expected 'columns', 'rows' or 'in_place', got '" + layout + "'");
  if (threads < 1 || threads > pyrnn::kMaxThreads) throw py::value_error("threads: expected [1, max_threads]");
  if (bs.size() < 1 || cs.size() != bs.size()) throw py::value_error("b, c: expected lists of one length >= 1");
  if (!bias_obj.is_none() && bs.size() != 1) throw py::value_error("bias: only with a single target");
  const Shape shape = shape_of(array_arg(a_obj, {"a"}));
  if (shape.size() != 2 || shape[0] < 1 || shape[1] < 1)
    throw py::value_error("a: expected a 2-D array with both dimensions >= 1, got " + shape_str(shape));
  guard_size({shape[0], shape[1]}, "a");
  return a_transposed ? std::pair{shape[1], shape[0]} : std::pair{shape[0], shape[1]};
}

// c[t][:, :N_t] = A b[t] (+ c[t] when accumulate, + bias (N,), one target only) through the core's
// packed GEMM, B given as `layout` says: "columns", B^T (N, K), packed from its rows as a weight
// matrix is; "rows", B (K, N) packed by rows; "in_place", B (K, N) read where it is (N a multiple
// of the SIMD width). a: A (n, K), or A^T (K, n) when a_transposed. Returns A's row sums or None.
template <typename S>
py::object gemm_for_tests_impl(const py::object& a_obj, const py::sequence& bs, const py::sequence& cs,
                               bool accumulate, const py::object& bias_obj, const std::string& layout,
                               bool a_transposed, bool row_sums, int threads) {
  const auto [n, K] = gemm_dims(a_obj, bs, cs, bias_obj, layout, a_transposed, threads);
  const Array<S> a = guarded<S>(a_obj, {"a"}, shape_of(py::reinterpret_borrow<py::array>(a_obj)));
  std::vector<Span> taken{span_of(a, "a")};
  std::vector<GemmOperand<S>> ops;
  for (size_t t = 0; t < bs.size(); ++t) ops.push_back(guarded_gemm_operand<S>(bs, cs, t, layout, n, K, taken));
  const bool has_bias = !bias_obj.is_none();
  const Array<S> bias = has_bias ? guarded<S>(bias_obj, {"bias"}, {ops[0].N}) : Array<S>();
  Array<S> sums = new_array<S>({n});
  {
    py::gil_scoped_release release;
    std::vector<pyrnn::PackedB<S>> packed;
    std::vector<pyrnn::GemmTarget<S>> targets;
    for (const GemmOperand<S>& op : ops) packed.push_back(op.pack(layout, K, threads));
    for (size_t t = 0; t < ops.size(); ++t)
      targets.push_back({&packed[t], ops[t].c.mutable_data(), static_cast<Index>(ops[t].c.shape(1))});
    pyrnn::Buffer<S> bias_row;
    if (has_bias) bias_row = pyrnn::padded_row(bias.data(), ops[0].N, packed[0].padded_cols());
    pyrnn::packed_gemm_targets<S>(n, a.data(), a_transposed ? 1 : K, a_transposed ? n : 1, targets.data(),
                                  targets.size(), accumulate, bias_row.data(),
                                  row_sums ? sums.mutable_data() : nullptr);
  }
  return row_sums ? py::object(sums) : py::none();
}

py::object gemm_for_tests(const py::object& a, const py::sequence& b, const py::sequence& c, bool accumulate,
                          const py::object& bias, const std::string& layout, bool a_transposed, bool row_sums,
                          int threads) {
  return with_float_type(a, {"a"}, [&](auto s) {
    return gemm_for_tests_impl<decltype(s)>(a, b, c, accumulate, bias, layout, a_transposed, row_sums, threads);
  });
}

// For the tests: TeamCap replayed (see replay_team_cap); events are calls
// (now_ns, wanted, wall_ns, work_ns, regions, cores_free).
std::vector<int> team_cap_for_tests(
    const std::vector<std::tuple<double, int, double, double, int, bool>>& events) {
  std::vector<pyrnn::TeamCapEvent> replay;
  for (const auto& [now_ns, wanted, wall_ns, work_ns, regions, cores_free] : events) {
    if (wanted < 1) throw py::value_error("team_cap_for_tests: wanted must be at least 1");
    if (regions < 0 || regions > 1000) throw py::value_error("team_cap_for_tests: regions must be in [0, 1000]");
    replay.push_back({now_ns, wanted, wall_ns, work_ns, regions, cores_free});
  }
  return pyrnn::replay_team_cap(replay);
}

}  // namespace

// The module name comes from CMake: one module per code-generation target (_core_avx2, ...).
PYBIND11_MODULE(PYRNN_MODULE_NAME, m) {
  m.doc() = "pyrnn C++ core (Eigen + OpenMP)";

  m.def("build_info", [] {
    const pyrnn::BuildInfo info = pyrnn::build_info();
    py::dict d;
    d["version"] = info.version;
    d["compiler"] = info.compiler;
    d["codegen_flags"] = info.codegen_flags;
    d["simd"] = info.simd;
    d["eigen_version"] = info.eigen_version;
    d["openmp_version"] = info.openmp_version;
    d["max_threads"] = info.max_threads;
    return d;
  }, "Facts about how the core was compiled.");

  // Local to this module: pyrnn/_core.py may load two builds of the core side by side (see there),
  // each registering the same C++ type, and each tape must go back to the build that made it.
  py::class_<pyrnn::TapeBase, std::shared_ptr<pyrnn::TapeBase>>(
      m, "Tape", "What stack_backward needs from a stack_forward call (opaque; owns its copies).",
      py::module_local())
      .def_property_readonly("cell", [](const pyrnn::TapeBase& t) { return kCells[static_cast<int>(t.cell)]; })
      .def_property_readonly("dtype", &tape_dtype)
      .def_property_readonly("proj_size", [](const pyrnn::TapeBase& t) { return t.dims.projected ? t.dims.P : 0; },
                             "P of a projected stack, else 0.")
      .def_property_readonly("dims", [](const pyrnn::TapeBase& t) {
        const pyrnn::Dims& d = t.dims;
        return py::make_tuple(d.T, d.B, d.I, d.H, d.L, d.D);
      }, "(T, B, I, H, L, D) of the forward call.")
      .def("__repr__", [](const pyrnn::TapeBase& t) {
        const pyrnn::Dims& d = t.dims;
        return "<pyrnn._core.Tape " + std::string(kCells[static_cast<int>(t.cell)]) + " " + tape_dtype(t) +
               " T=" + std::to_string(d.T) + " B=" + std::to_string(d.B) + " I=" + std::to_string(d.I) +
               " H=" + std::to_string(d.H) + " L=" + std::to_string(d.L) + " D=" + std::to_string(d.D) + ">";
      });

  py::class_<pyrnn::PackCache>(
      m, "PackCache",
      "Weights packed for inference, kept between stack_forward calls (packs=) on the same, unchanged\n"
      "weight arrays: one set per batch size and thread count, the 4 most recent kept.",
      py::module_local(), py::dynamic_attr())
      .def(py::init<>())
      .def_property_readonly("entries", &pyrnn::PackCache::entries, "Sets of packs held now.")
      .def("__repr__", [](const pyrnn::PackCache& c) {
        return "<pyrnn._core.PackCache entries=" + std::to_string(c.entries()) + ">";
      });

  // For the tests: a TeamChoice of its own, fed made-up times (the core's own one learns from the
  // time loops' calls). Options are "team" and "alone".
  py::class_<pyrnn::TeamChoice>(m, "_TeamChoice", py::module_local())
      .def(py::init<>())
      .def("pick", [](pyrnn::TeamChoice& c, int loop) {
        return c.pick(test_key(loop)) == pyrnn::TeamChoice::team ? "team" : "alone";
      }, py::arg("loop"))
      .def("record", [](pyrnn::TeamChoice& c, int loop, const std::string& option, double ns_per_step) {
        if (option != "team" && option != "alone")
          throw py::value_error("option: expected 'team' or 'alone', got '" + option + "'");
        if (!(ns_per_step >= 0)) throw py::value_error("ns_per_step: expected a time >= 0");
        c.record(test_key(loop), option == "team" ? pyrnn::TeamChoice::team : pyrnn::TeamChoice::alone, ns_per_step);
      }, py::arg("loop"), py::arg("option"), py::arg("ns_per_step"));

  m.def("stack_forward", &stack_forward, py::arg("cell"), py::arg("x"), py::arg("h0"), py::arg("c0"),
        py::arg("weights"), py::arg("bidirectional"), py::arg("lengths"), py::arg("dropout_masks"), py::arg("keep_tape"),
        py::arg("packs") = py::none(), py::arg("residual") = false,
        "Run a stack of layers and directions over (T, B, I) x; see pyrnn/_backend.py for the contract,\n"
        "which pyrnn._core.stack_forward checks. Returns (out, h_n, c_n or None, tape or None).");
  m.def("stack_backward", &stack_backward, py::arg("tape"), py::arg("d_out"), py::arg("d_h_n"), py::arg("d_c_n"),
        py::arg("accumulate_into") = py::none(),
        "BPTT through the stack recorded on tape. Returns (dx, dh0, dc0 or None, d_weights); with\n"
        "accumulate_into, the weight gradients are added into those arrays, which d_weights returns.");
  m.def("linear_forward", &linear_forward, py::arg("x"), py::arg("weight"), py::arg("bias"),
        "y (N, M) = x (N, K) weight^T + bias, weight (M, K), bias (M,) or None; see pyrnn/_backend.py.");
  m.def("linear_backward", &linear_backward, py::arg("x"), py::arg("weight"), py::arg("d_y"), py::arg("has_bias"),
        py::arg("accumulate_into") = py::none(),
        "Gradients of linear_forward: returns (dx, d_weight, d_bias or None); with accumulate_into\n"
        "(d_weight, d_bias or None), the weight gradients are added into those arrays.");
  m.def("adam_update", &adam_update, py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("max_exp_avg_sq"), py::arg("neg_step_size"), py::arg("lerp_weight"), py::arg("beta2"),
        py::arg("bias_correction2_sqrt"), py::arg("eps"), py::arg("weight_decay"),
        "One Adam step in place (torch.optim.Adam's arithmetic); see pyrnn/_backend.py.");
  m.def("features", [] {
    py::list names;
    for (const char* cell : kCells) names.append(cell);
    for (const char* option : kOptions) names.append(option);
    return names;
  }, "What this build runs: its cells' names, and the options of the kernel contract it supports.");
  m.attr("max_threads") = pyrnn::kMaxThreads;
  m.def("set_num_threads", [](long long n) {
    if (n < 1 || n > pyrnn::kMaxThreads)
      throw py::value_error("set_num_threads: n must be in [1, " + std::to_string(pyrnn::kMaxThreads) + "], got " +
                            std::to_string(n));
    pyrnn::set_num_threads(static_cast<int>(n));
  }, py::arg("n"), "Threads the kernels may use (default: OpenMP's max, i.e. OMP_NUM_THREADS).");
  m.def("get_num_threads", &pyrnn::get_num_threads, "Threads the kernels may use.");
  m.def("_gemm_for_tests", &gemm_for_tests, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("accumulate") = false,
        py::arg("bias") = py::none(), py::arg("layout") = "columns", py::arg("a_transposed") = false,
        py::arg("row_sums") = false, py::arg("threads") = 1,
        "For the tests: the core's packed GEMM (see gemm_for_tests).");
  m.def("_team_cap_for_tests", &team_cap_for_tests, py::arg("events"),
        "For the tests: the team sizes TeamCap allows a scripted run of regions (see busy_host.hpp).");
  m.def("set_adaptive_threads", [](bool on) { pyrnn::team_cap().set_enabled(on); }, py::arg("enabled"),
        "Whether calls run on fewer threads while other programs keep their teams off the cores.");
  m.def("team_cap_info", [] {
    const auto [cap, counts] = pyrnn::team_cap().state();
    py::dict d;
    d["enabled"] = pyrnn::team_cap().enabled();
    d["cap"] = cap == INT_MAX ? py::object(py::none()) : py::object(py::int_(cap));
    d["regions"] = counts.regions;
    d["lost"] = counts.lost;
    d["probes"] = counts.probes;
    d["postponed"] = counts.postponed;
    return d;
  }, "The cap on team sizes on a busy host (None: none) and what set it: the regions of more than one "
     "thread run, those whose threads lost their cores, the probes of a whole team, and the probes "
     "postponed while the host had no free cores.");

  // The buffer pool (pyrnn/workspace.hpp): what it keeps, its bounds, and freeing it.
  m.def("memory_cache_info", [] {
    const pyrnn::BufferPool::Stats s = pyrnn::BufferPool::instance().stats();
    py::dict d;
    d["cached_bytes"] = s.cached_bytes;
    d["cached_blocks"] = s.cached_blocks;
    d["limit_bytes"] = s.limit_bytes;
    d["idle_seconds"] = s.idle_seconds;
    d["allocations"] = s.allocations;
    return d;
  }, "The buffer pool's cached bytes and blocks, its bounds, and its allocations so far.");
  m.def("set_memory_cache_limit", [](size_t limit_bytes, double idle_seconds) {
    if (!(idle_seconds >= 0)) throw py::value_error("idle_seconds: expected a number >= 0");
    pyrnn::BufferPool::instance().configure(limit_bytes, idle_seconds);
  }, py::arg("limit_bytes"), py::arg("idle_seconds"),
        "Bound the buffer pool: at most limit_bytes cached, each block at most idle_seconds unused.");
  m.def("release_memory", [] { return pyrnn::BufferPool::instance().trim(); },
        "Free every block the buffer pool caches; returns the bytes freed.");
}
