// Thin pybind11 layer: check arrays, release the GIL, call the core. No math here.
//
// Everything that could make the core read or write out of bounds is checked here, so that a
// direct call with bad arguments raises a Python exception instead of crashing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "pyrnn/adam.hpp"
#include "pyrnn/build_info.hpp"
#include "pyrnn/dense.hpp"
#include "pyrnn/pack_cache.hpp"
#include "pyrnn/stack.hpp"
#include "pyrnn/threads.hpp"

namespace py = pybind11;
using pyrnn::Index;

namespace {

template <typename S>
using Array = py::array_t<S, py::array::c_style>;

const char* const kCells[] = {"rnn_tanh", "rnn_relu", "lstm", "gru"};

pyrnn::CellKind parse_cell(const std::string& name) {
  if (name == "rnn_tanh") return pyrnn::CellKind::rnn_tanh;
  if (name == "rnn_relu") return pyrnn::CellKind::rnn_relu;
  if (name == "lstm") return pyrnn::CellKind::lstm;
  if (name == "gru") return pyrnn::CellKind::gru;
  throw py::value_error("cell must be one of 'rnn_tanh', 'rnn_relu', 'lstm', 'gru', got '" + name + "'");
}

std::string shape_str(const std::vector<Index>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

std::vector<Index> shape_of(const py::array& a) {
  return std::vector<Index>(a.shape(), a.shape() + a.ndim());
}

// The item size of a real floating-point dtype (any byte order), or 0 for any other dtype.
size_t float_size(const py::array& a) {
  return a.dtype().kind() == 'f' ? static_cast<size_t>(a.dtype().itemsize()) : 0;
}

template <typename S>
std::string dtype_name() {
  return sizeof(S) == 4 ? "float32" : "float64";
}

// An array argument with x's dtype and exactly `shape`, as a C-contiguous aligned array
// (the caller's own buffer when it already is one, else a copy).
template <typename S>
Array<S> take(py::handle obj, const std::string& name, const std::vector<Index>& shape, const char* dtype_of = "x") {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(name + ": expected a numpy array, got " + std::string(py::str(py::type::of(obj))));
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (float_size(a) != sizeof(S))
    throw py::type_error(name + ": expected dtype " + dtype_name<S>() + " (the dtype of " + dtype_of + "), got " +
                         std::string(py::str(a.dtype())));
  if (shape_of(a) != shape)
    throw py::value_error(name + ": expected shape " + shape_str(shape) + ", got " + shape_str(shape_of(a)));
  const bool ready = py::isinstance<py::array_t<S>>(a) && (a.flags() & py::array::c_style) &&
                     (a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_);
  if (ready) return py::reinterpret_borrow<Array<S>>(a);
  // Strided, unaligned or byte-swapped: one native, contiguous copy.
  py::object copy = py::module_::import("numpy").attr("require")(a, py::dtype::of<S>(), "CA");
  return py::reinterpret_borrow<Array<S>>(copy);
}

// A new uninitialised array whose memory comes from (and returns to) the core's buffer pool, so
// that returning large arrays call after call does not fault in fresh pages every time.
template <typename S>
Array<S> new_array(const std::vector<Index>& shape) {
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

// lengths: None, or B integers in [1, T], any integer dtype.
std::vector<std::int64_t> take_lengths(py::handle obj, Index T, Index B) {
  if (obj.is_none()) return {};
  py::array a = py::module_::import("numpy").attr("asarray")(obj);
  const char kind = a.dtype().kind();
  if (kind != 'i' && kind != 'u')
    throw py::type_error("lengths: expected integers, got dtype " + std::string(py::str(a.dtype())));
  if (shape_of(a) != std::vector<Index>{B})
    throw py::value_error("lengths: expected shape " + shape_str({B}) + " (one per sequence), got " +
                          shape_str(shape_of(a)));
  auto as64 = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
  if (!as64) throw py::type_error("lengths: cannot be read as int64");
  std::vector<std::int64_t> lengths(as64.data(), as64.data() + B);
  for (Index b = 0; b < B; ++b)
    if (lengths[b] < 1 || lengths[b] > T)
      throw py::value_error("lengths: every length must be in [1, T] = [1, " + std::to_string(T) + "], got " +
                            std::to_string(lengths[b]) + " at index " + std::to_string(b));
  return lengths;
}

py::sequence take_list(py::handle obj, const std::string& name, Index expected, const std::string& why) {
  if (!py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj))
    throw py::type_error(name + ": expected a list, got " + std::string(py::str(py::type::of(obj))));
  auto seq = py::reinterpret_borrow<py::sequence>(obj);
  if (static_cast<Index>(seq.size()) != expected)
    throw py::value_error(name + ": expected " + std::to_string(expected) + " entries (" + why + "), got " +
                          std::to_string(seq.size()));
  return seq;
}

// The four arrays of a weights entry, and the shapes of entry k's (as of their gradients).
const char* const kWeightParts[] = {"w_ih", "w_hh", "b_ih", "b_hh"};
std::array<std::vector<Index>, 4> weight_shapes(const pyrnn::Dims& dm, Index GH, Index k) {
  return {{{GH, dm.input_size(k / dm.D)}, {GH, dm.H}, {GH}, {GH}}};
}

// packs: None, or a PackCache (inference only, see pyrnn/pack_cache.hpp).
pyrnn::PackCache* take_packs(const py::object& packs_obj, bool keep_tape) {
  if (packs_obj.is_none()) return nullptr;
  if (!py::isinstance<pyrnn::PackCache>(packs_obj))
    throw py::type_error("packs: expected None or a PackCache of this module, got " +
                         std::string(py::str(py::type::of(packs_obj))));
  if (keep_tape) throw py::value_error("packs: only for inference (keep_tape=False); a tape packs its own");
  return packs_obj.cast<pyrnn::PackCache*>();
}

template <typename S>
py::tuple forward_impl(pyrnn::CellKind cell, const py::array& x_obj, const py::object& h0_obj,
                       const py::object& c0_obj, const py::object& weights_obj,
                       bool bidirectional, const py::object& lengths_obj, const py::object& masks_obj, bool keep_tape,
                       const py::object& packs_obj) {
  pyrnn::PackCache* cache = take_packs(packs_obj, keep_tape);
  if (x_obj.ndim() != 3)
    throw py::value_error("x: expected 3 dimensions (T, B, I), got shape " + shape_str(shape_of(x_obj)));
  const Index T = x_obj.shape(0), B = x_obj.shape(1), I = x_obj.shape(2);
  if (T < 1 || B < 1 || I < 1) throw py::value_error("x: every dimension must be >= 1, got shape " + shape_str(shape_of(x_obj)));
  Array<S> x = take<S>(x_obj, "x", {T, B, I});

  if (h0_obj.is_none()) throw py::value_error("h0: required, an array (L*D, B, H)");
  if (!py::isinstance<py::array>(h0_obj)) throw py::type_error("h0: expected a numpy array");
  const auto h0_shape = shape_of(py::reinterpret_borrow<py::array>(h0_obj));
  if (h0_shape.size() != 3 || h0_shape[0] < 1 || h0_shape[2] < 1)
    throw py::value_error("h0: expected shape (L*D, B, H) with L*D, H >= 1, got " + shape_str(h0_shape));
  const Index LD = h0_shape[0], H = h0_shape[2];
  Array<S> h0 = take<S>(h0_obj, "h0", {LD, B, H});

  const bool is_lstm = cell == pyrnn::CellKind::lstm;
  Array<S> c0;
  if (is_lstm) {
    if (c0_obj.is_none()) throw py::value_error("c0: required for cell 'lstm', got None");
    c0 = take<S>(c0_obj, "c0", {LD, B, H});
  } else if (!c0_obj.is_none()) {
    throw py::value_error("c0: only 'lstm' has a cell state; expected None");
  }

  const Index D = bidirectional ? 2 : 1, L = LD / D;
  if (LD % D != 0)
    throw py::value_error("h0: expected L*D entries with D = 2 (bidirectional), got " + std::to_string(LD));
  py::sequence weights = take_list(weights_obj, "weights", LD, "one tuple per layer and direction, as h0");
  const Index GH = pyrnn::gate_count(cell) * H;
  const pyrnn::Dims dims{T, B, I, H, L, D};
  std::vector<Array<S>> keep;  // holds converted arrays alive while the core runs
  std::vector<pyrnn::DirWeights<S>> dir_weights;
  for (Index k = 0; k < LD; ++k) {
    const std::string name = "weights[" + std::to_string(k) + "]";
    py::sequence entry = take_list(weights[k], name, 4, "w_ih, w_hh, b_ih, b_hh");
    const auto shapes = weight_shapes(dims, GH, k);
    for (int j = 0; j < 4; ++j) keep.push_back(take<S>(entry[j], name + " " + kWeightParts[j], shapes[j]));
    const size_t n = keep.size();
    dir_weights.push_back({keep[n - 4].data(), keep[n - 3].data(), keep[n - 2].data(), keep[n - 1].data()});
  }

  const std::vector<std::int64_t> lengths = take_lengths(lengths_obj, T, B);
  std::vector<const S*> masks;
  if (!masks_obj.is_none()) {
    py::sequence seq = take_list(masks_obj, "dropout_masks", L - 1, "one per layer but the last");
    for (Index k = 0; k + 1 < L; ++k) {
      keep.push_back(take<S>(seq[k], "dropout_masks[" + std::to_string(k) + "]", {T, B, D * H}));
      masks.push_back(keep.back().data());
    }
  }

  Array<S> out = new_array<S>({T, B, D * H}), h_n = new_array<S>({LD, B, H});
  Array<S> c_n = is_lstm ? new_array<S>({LD, B, H}) : Array<S>();
  const pyrnn::StackInputs<S> in{cell, dims, x.data(), h0.data(), is_lstm ? c0.data() : nullptr,
                                 std::move(dir_weights), lengths.empty() ? nullptr : lengths.data(),
                                 std::move(masks)};
  const pyrnn::StackOutputs<S> res{out.mutable_data(), h_n.mutable_data(), is_lstm ? c_n.mutable_data() : nullptr};
  pyrnn::PackSignature signature{cell, Index(sizeof(S)), I, H, L, D, {}};
  if (cache)
    for (Index k = 0; k < 4 * LD; ++k) signature.weights.push_back(keep[k].data());
  const int threads = pyrnn::get_num_threads();
  std::unique_ptr<pyrnn::Tape<S>> tape;
  bool other_weights = false;
  {
    py::gil_scoped_release release;  // before the lease: a call filling the packs holds its lock
    if (!cache) {
      tape = pyrnn::stack_forward(in, res, keep_tape, threads);
    } else if (const pyrnn::LayerPlan plan = pyrnn::forward_layer_plan(in, false, threads);
               auto lease = cache->lease<S>(signature, B, threads, plan.lanes())) {
      pyrnn::stack_forward(in, res, false, threads, lease->packs.get(), &plan);
    } else {
      other_weights = true;
    }
  }
  if (other_weights)
    throw py::value_error("packs: this PackCache holds packs of other weight arrays or another stack; "
                          "one PackCache serves one set of weights, passed as the same C-contiguous arrays "
                          "of x's dtype every call");
  // The cache knows its weights by address: holding them keeps that address from naming others.
  if (cache && !py::hasattr(packs_obj, "weights"))
    packs_obj.attr("weights") = py::list(py::cast(std::vector<Array<S>>(keep.begin(), keep.begin() + 4 * LD)));
  py::object c_n_obj = is_lstm ? py::object(c_n) : py::none();
  py::object tape_obj = tape ? py::cast(std::shared_ptr<pyrnn::TapeBase>(std::move(tape))) : py::none();
  return py::make_tuple(out, h_n, c_n_obj, tape_obj);
}

py::tuple stack_forward(const std::string& cell_name, const py::object& x, const py::object& h0,
                        const py::object& c0, const py::object& weights, bool bidirectional,
                        const py::object& lengths,
                        const py::object& dropout_masks, bool keep_tape, const py::object& packs) {
  const pyrnn::CellKind cell = parse_cell(cell_name);
  if (!py::isinstance<py::array>(x))
    throw py::type_error("x: expected a numpy array, got " + std::string(py::str(py::type::of(x))));
  auto xa = py::reinterpret_borrow<py::array>(x);
  if (float_size(xa) == sizeof(float))
    return forward_impl<float>(cell, xa, h0, c0, weights, bidirectional, lengths, dropout_masks, keep_tape, packs);
  if (float_size(xa) == sizeof(double))
    return forward_impl<double>(cell, xa, h0, c0, weights, bidirectional, lengths, dropout_masks, keep_tape, packs);
  throw py::type_error("x: expected dtype float32 or float64, got " + std::string(py::str(xa.dtype())));
}

// An array the core adds into: exactly `shape`, x's dtype, C-contiguous, aligned and writable
// (no copy can stand in for it: the caller keeps reading the array it passed). `name` makes the
// argument's name, only for a message: a module's step calls this for every weight.
template <typename S, class Name>
Array<S> take_target(py::handle obj, Name&& name, const std::vector<Index>& shape, const char* dtype_of = "the tape's") {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(name() + ": expected a numpy array, got " + std::string(py::str(py::type::of(obj))));
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!py::isinstance<py::array_t<S>>(a))
    throw py::type_error(name() + ": expected dtype " + dtype_name<S>() + " in native byte order (" + dtype_of + "), got " +
                         std::string(py::str(a.dtype())));
  if (a.ndim() != static_cast<py::ssize_t>(shape.size()) || !std::equal(shape.begin(), shape.end(), a.shape()))
    throw py::value_error(name() + ": expected shape " + shape_str(shape) + ", got " + shape_str(shape_of(a)));
  const int needed = py::array::c_style | py::detail::npy_api::NPY_ARRAY_ALIGNED_ |
                     py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  if ((a.flags() & needed) != needed)
    throw py::value_error(name() + ": expected a C-contiguous, aligned, writable array (the gradients are added "
                          "into it in place)");
  return py::reinterpret_borrow<Array<S>>(a);
}

// The bytes of an array's data.
struct Span {
  const char* begin;
  const char* end;
  bool overlaps(const Span& other) const { return begin < other.end && other.begin < end; }
};

template <typename S>
Span span_of(const Array<S>& a) {
  const char* begin = reinterpret_cast<const char*>(a.data());
  return {begin, begin + a.nbytes()};
}

// accumulate_into: L*D tuples (dw_ih, dw_hh, db_ih, db_hh) the weight gradients are added into,
// none sharing memory with another or with the arrays backward reads (`reads`, named).
template <typename S>
std::vector<Array<S>> take_targets(const py::object& obj, const pyrnn::Dims& dm, Index GH,
                                   const std::vector<std::pair<Span, const char*>>& reads) {
  const Index LD = dm.L * dm.D;
  py::sequence entries = take_list(obj, "accumulate_into", LD, "one tuple per layer and direction, as weights");
  const char* const parts[] = {"dw_ih", "dw_hh", "db_ih", "db_hh"};
  auto name_of = [&](size_t i) {
    return "accumulate_into[" + std::to_string(i / 4) + "] " + parts[i % 4];
  };
  std::vector<Array<S>> targets;
  std::vector<Span> written;
  for (Index k = 0; k < LD; ++k) {
    py::sequence entry = take_list(entries[k], "accumulate_into[" + std::to_string(k) + "]", 4,
                                   "dw_ih, dw_hh, db_ih, db_hh");
    const auto shapes = weight_shapes(dm, GH, k);
    for (int j = 0; j < 4; ++j) {
      const size_t i = targets.size();
      targets.push_back(take_target<S>(entry[j], [&] { return name_of(i); }, shapes[j]));
      const Span span = span_of(targets.back());
      auto shared = [&](const std::string& other) {
        return py::value_error(name_of(i) + ": shares memory with " + other +
                               "; every array of accumulate_into must be its own");
      };
      for (size_t w = 0; w < written.size(); ++w)
        if (span.overlaps(written[w])) throw shared(name_of(w));
      for (const auto& [read, read_name] : reads)
        if (span.overlaps(read)) throw shared(read_name);
      written.push_back(span);
    }
  }
  return targets;
}

template <typename S>
py::tuple backward_impl(const pyrnn::Tape<S>& tape, const py::object& d_out_obj, const py::object& d_h_n_obj,
                        const py::object& d_c_n_obj, const py::object& into_obj) {
  const pyrnn::Dims& dm = tape.dims;
  const Index LD = dm.L * dm.D, GH = pyrnn::gate_count(tape.cell) * dm.H;
  const bool is_lstm = tape.cell == pyrnn::CellKind::lstm;
  Array<S> d_out = take<S>(d_out_obj, "d_out", {dm.T, dm.B, dm.D * dm.H});
  // A default-constructed array_t is an empty array, not null: track presence explicitly.
  const bool has_d_h_n = !d_h_n_obj.is_none(), has_d_c_n = !d_c_n_obj.is_none();
  if (has_d_c_n && !is_lstm) throw py::value_error("d_c_n: only 'lstm' has a cell state; expected None");
  Array<S> d_h_n, d_c_n;
  if (has_d_h_n) d_h_n = take<S>(d_h_n_obj, "d_h_n", {LD, dm.B, dm.H});
  if (has_d_c_n) d_c_n = take<S>(d_c_n_obj, "d_c_n", {LD, dm.B, dm.H});

  Array<S> dx = new_array<S>({dm.T, dm.B, dm.I}), dh0 = new_array<S>({LD, dm.B, dm.H});
  Array<S> dc0 = is_lstm ? new_array<S>({LD, dm.B, dm.H}) : Array<S>();
  pyrnn::StackGrads<S> grads{dx.mutable_data(), dh0.mutable_data(), is_lstm ? dc0.mutable_data() : nullptr, {}, {}, {}, {}};
  std::vector<Array<S>> weight_grads;  // dw_ih, dw_hh, db_ih, db_hh of each layer and direction
  if (into_obj.is_none()) {
    for (Index k = 0; k < LD; ++k)
      for (const std::vector<Index>& shape : weight_shapes(dm, GH, k)) weight_grads.push_back(new_array<S>(shape));
  } else {
    std::vector<std::pair<Span, const char*>> reads{{span_of(d_out), "d_out"}};
    if (has_d_h_n) reads.push_back({span_of(d_h_n), "d_h_n"});
    if (has_d_c_n) reads.push_back({span_of(d_c_n), "d_c_n"});
    weight_grads = take_targets<S>(into_obj, dm, GH, reads);
    grads.accumulate = true;
  }
  py::list d_weights;
  for (Index k = 0; k < LD; ++k) {
    Array<S>* entry = &weight_grads[4 * k];
    grads.dw_ih.push_back(entry[0].mutable_data());
    grads.dw_hh.push_back(entry[1].mutable_data());
    grads.db_ih.push_back(entry[2].mutable_data());
    grads.db_hh.push_back(entry[3].mutable_data());
    d_weights.append(py::make_tuple(entry[0], entry[1], entry[2], entry[3]));
  }
  const int threads = pyrnn::get_num_threads();
  {
    py::gil_scoped_release release;
    pyrnn::stack_backward(tape, d_out.data(), has_d_h_n ? d_h_n.data() : nullptr,
                          has_d_c_n ? d_c_n.data() : nullptr,
                          grads, threads);
  }
  py::object dc0_obj = is_lstm ? py::object(dc0) : py::none();
  return py::make_tuple(dx, dh0, dc0_obj, d_weights);
}

py::tuple stack_backward(const py::object& tape_obj, const py::object& d_out, const py::object& d_h_n,
                         const py::object& d_c_n, const py::object& accumulate_into) {
  if (tape_obj.is_none())
    throw py::value_error("tape: got None; run stack_forward with keep_tape=True to get one");
  if (!py::isinstance<pyrnn::TapeBase>(tape_obj))
    throw py::type_error("tape: expected the Tape returned by pyrnn._core.stack_forward, got " +
                         std::string(py::str(py::type::of(tape_obj))));
  const auto tape = tape_obj.cast<std::shared_ptr<pyrnn::TapeBase>>();
  if (auto t32 = std::dynamic_pointer_cast<pyrnn::Tape<float>>(tape))
    return backward_impl(*t32, d_out, d_h_n, d_c_n, accumulate_into);
  if (auto t64 = std::dynamic_pointer_cast<pyrnn::Tape<double>>(tape))
    return backward_impl(*t64, d_out, d_h_n, d_c_n, accumulate_into);
  throw py::type_error("tape: unknown tape type");
}

// ---------------------------------------------------------------- the dense layer (Linear)

// n, k, m of x (n, k) and weight (m, k), from arrays checked to be 2-D with k, m >= 1.
struct DenseDims {
  Index n, k, m;
};

DenseDims dense_dims(const py::object& x_obj, const py::object& weight_obj) {
  for (const auto& [obj, name] : {std::pair{&x_obj, "x"}, std::pair{&weight_obj, "weight"}})
    if (!py::isinstance<py::array>(*obj))
      throw py::type_error(std::string(name) + ": expected a numpy array, got " +
                           std::string(py::str(py::type::of(*obj))));
  auto x = py::reinterpret_borrow<py::array>(x_obj), weight = py::reinterpret_borrow<py::array>(weight_obj);
  if (x.ndim() != 2 || x.shape(1) < 1)
    throw py::value_error("x: expected shape (N, K) with K >= 1, got " + shape_str(shape_of(x)));
  if (weight.ndim() != 2 || weight.shape(0) < 1)
    throw py::value_error("weight: expected shape (M, K) with M >= 1, got " + shape_str(shape_of(weight)));
  return {x.shape(0), x.shape(1), weight.shape(0)};
}

// Call f(S{}) with the float type of the array `name` (checked to be an array).
template <class F>
auto with_float_type(const py::object& obj, const char* name, F&& f) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + ": expected a numpy array, got " + std::string(py::str(py::type::of(obj))));
  const auto array = py::reinterpret_borrow<py::array>(obj);
  const size_t size = float_size(array);
  if (size == sizeof(float)) return f(float{});
  if (size == sizeof(double)) return f(double{});
  throw py::type_error(std::string(name) + ": expected dtype float32 or float64, got " +
                       std::string(py::str(array.dtype())));
}

// Adds `target`'s memory to `taken` as `name`, refusing it when it overlaps an array already
// there (what the core reads, and the other targets): each array it writes must be its own.
template <typename S>
void claim_own(std::vector<std::pair<Span, std::string>>& taken, const Array<S>& target, const std::string& name) {
  for (const auto& [span, other] : taken)
    if (span_of(target).overlaps(span))
      throw py::value_error(name + ": shares memory with " + other + "; each array written must be its own");
  taken.push_back({span_of(target), name});
}

template <typename S>
py::array linear_forward_impl(const DenseDims& d, const py::object& x_obj, const py::object& weight_obj,
                              const py::object& bias_obj) {
  Array<S> x = take<S>(x_obj, "x", {d.n, d.k}), weight = take<S>(weight_obj, "weight", {d.m, d.k});
  const bool has_bias = !bias_obj.is_none();
  Array<S> bias;
  if (has_bias) bias = take<S>(bias_obj, "bias", {d.m});
  Array<S> y = new_array<S>({d.n, d.m});
  const int threads = pyrnn::get_num_threads();
  {
    py::gil_scoped_release release;
    pyrnn::dense_forward(d.n, d.k, d.m, x.data(), weight.data(), has_bias ? bias.data() : nullptr, y.mutable_data(),
                         threads);
  }
  return y;
}

py::array linear_forward(const py::object& x, const py::object& weight, const py::object& bias) {
  const DenseDims d = dense_dims(x, weight);
  return with_float_type(x, "x", [&](auto s) { return linear_forward_impl<decltype(s)>(d, x, weight, bias); });
}

template <typename S>
py::tuple linear_backward_impl(const DenseDims& d, const py::object& x_obj, const py::object& weight_obj,
                               const py::object& d_y_obj, bool has_bias, const py::object& into_obj) {
  Array<S> x = take<S>(x_obj, "x", {d.n, d.k}), weight = take<S>(weight_obj, "weight", {d.m, d.k});
  Array<S> d_y = take<S>(d_y_obj, "d_y", {d.n, d.m});
  Array<S> dx = new_array<S>({d.n, d.k}), d_weight, d_bias;
  const bool accumulate = !into_obj.is_none();
  if (!accumulate) {
    d_weight = new_array<S>({d.m, d.k});
    if (has_bias) d_bias = new_array<S>({d.m});
  } else {
    py::sequence into = take_list(into_obj, "accumulate_into", 2, "d_weight, d_bias");
    std::vector<std::pair<Span, std::string>> taken{{span_of(x), "x"}, {span_of(weight), "weight"}, {span_of(d_y), "d_y"}};
    d_weight = take_target<S>(into[0], [] { return std::string("accumulate_into[0] d_weight"); }, {d.m, d.k}, "x's");
    claim_own(taken, d_weight, "accumulate_into[0] d_weight");
    if (has_bias) {
      d_bias = take_target<S>(into[1], [] { return std::string("accumulate_into[1] d_bias"); }, {d.m}, "x's");
      claim_own(taken, d_bias, "accumulate_into[1] d_bias");
    } else if (!into[1].is_none()) {
      throw py::value_error("accumulate_into[1] d_bias: expected None, as has_bias is False");
    }
  }
  const int threads = pyrnn::get_num_threads();
  {
    py::gil_scoped_release release;
    pyrnn::dense_backward(d.n, d.k, d.m, x.data(), weight.data(), d_y.data(), dx.mutable_data(),
                          d_weight.mutable_data(), has_bias ? d_bias.mutable_data() : nullptr, accumulate, threads);
  }
  return py::make_tuple(dx, d_weight, has_bias ? py::object(d_bias) : py::none());
}

py::tuple linear_backward(const py::object& x, const py::object& weight, const py::object& d_y, bool has_bias,
                          const py::object& accumulate_into) {
  const DenseDims d = dense_dims(x, weight);
  return with_float_type(x, "x", [&](auto s) {
    return linear_backward_impl<decltype(s)>(d, x, weight, d_y, has_bias, accumulate_into);
  });
}

// ------------------------------------------------------------------------- Adam's update

// param, exp_avg, exp_avg_sq and max_exp_avg_sq (or None) are written in place and grad read:
// arrays of param's dtype and shape, the written ones C-contiguous, aligned and writable, each
// its own memory.
template <typename S>
void adam_update_impl(const py::array& param_obj, const py::object& grad_obj, const py::object& exp_avg_obj,
                      const py::object& exp_avg_sq_obj, const py::object& max_obj, const pyrnn::AdamScalars& a) {
  const std::vector<Index> shape = shape_of(param_obj);
  Index n = 1;
  for (Index d : shape) n *= d;
  auto written = [&](const py::handle& obj, const char* name) {
    return take_target<S>(obj, [&] { return std::string(name); }, shape, "param's");
  };
  Array<S> param = written(param_obj, "param"), exp_avg = written(exp_avg_obj, "exp_avg");
  Array<S> exp_avg_sq = written(exp_avg_sq_obj, "exp_avg_sq"), max_exp_avg_sq;
  const bool amsgrad = !max_obj.is_none();
  if (amsgrad) max_exp_avg_sq = written(max_obj, "max_exp_avg_sq");
  Array<S> grad = take<S>(grad_obj, "grad", shape, "param");
  std::vector<std::pair<Span, std::string>> taken{{span_of(grad), "grad"}};
  claim_own(taken, param, "param");
  claim_own(taken, exp_avg, "exp_avg");
  claim_own(taken, exp_avg_sq, "exp_avg_sq");
  if (amsgrad) claim_own(taken, max_exp_avg_sq, "max_exp_avg_sq");
  const int threads = pyrnn::get_num_threads();
  py::gil_scoped_release release;
  pyrnn::adam_update(n, param.mutable_data(), grad.data(), exp_avg.mutable_data(), exp_avg_sq.mutable_data(),
                     amsgrad ? max_exp_avg_sq.mutable_data() : nullptr, a, threads);
}

void adam_update(const py::object& param, const py::object& grad, const py::object& exp_avg,
                 const py::object& exp_avg_sq, const py::object& max_exp_avg_sq, double neg_step_size,
                 double lerp_weight, double beta2, double bias_correction2_sqrt, double eps, double weight_decay) {
  const pyrnn::AdamScalars a{neg_step_size, lerp_weight, beta2, bias_correction2_sqrt, eps, weight_decay};
  with_float_type(param, "param", [&](auto s) {
    adam_update_impl<decltype(s)>(py::reinterpret_borrow<py::array>(param), grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                                  a);
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

// b[t] and c[t] checked: B of depth K as `layout` stores it, C of n rows and at least N columns,
// writable and sharing no memory with what the product reads or with another C.
template <typename S>
GemmOperand<S> take_gemm_operand(const py::sequence& bs, const py::sequence& cs, size_t t, const std::string& layout,
                                 Index n, Index K, std::vector<std::pair<Span, std::string>>& taken) {
  const std::string b_name = "b[" + std::to_string(t) + "]", c_name = "c[" + std::to_string(t) + "]";
  for (const auto& [obj, name] : {std::pair{bs[t], b_name}, std::pair{cs[t], c_name}})
    if (!py::isinstance<py::array>(obj) || py::reinterpret_borrow<py::array>(obj).ndim() != 2)
      throw py::value_error(name + ": expected a 2-D numpy array");
  const auto b_shape = shape_of(py::reinterpret_borrow<py::array>(bs[t]));
  const bool by_columns = layout == "columns";
  const Index N = by_columns ? b_shape[0] : b_shape[1];
  if (N < 1 || (by_columns ? b_shape[1] : b_shape[0]) != K)
    throw py::value_error(b_name + ": expected depth K = " + std::to_string(K) + ", got " + shape_str(b_shape));
  if (layout == "in_place" && N % pyrnn::kPacket<S> != 0)
    throw py::value_error(b_name + ": read in place, N must be a multiple of " + std::to_string(pyrnn::kPacket<S>));
  const auto c_shape = shape_of(py::reinterpret_borrow<py::array>(cs[t]));
  if (c_shape[0] != n || c_shape[1] < N)
    throw py::value_error(c_name + ": expected " + std::to_string(n) + " rows of >= " + std::to_string(N) +
                          " columns, got " + shape_str(c_shape));
  GemmOperand<S> op{take<S>(bs[t], b_name, b_shape, "a"), take_target<S>(cs[t], [&] { return c_name; }, c_shape, "a's"),
                    N};
  taken.push_back({span_of(op.b), b_name});
  claim_own(taken, op.c, c_name);
  return op;
}

// n and K of A from `a` (A (n, K), or A^T (K, n) when a_transposed), with the other arguments
// that need no array checked.
std::pair<Index, Index> gemm_dims(const py::object& a_obj, const py::sequence& bs, const py::sequence& cs,
                                  const py::object& bias_obj, const std::string& layout, bool a_transposed,
                                  int threads) {
  if (layout != "columns" && layout != "rows" && layout != "in_place")
    throw py::value_error("layout: expected 'columns', 'rows' or 'in_place', got '" + layout + "'");
  if (threads < 1 || threads > pyrnn::kMaxThreads) throw py::value_error("threads: expected [1, max_threads]");
  if (bs.size() < 1 || cs.size() != bs.size()) throw py::value_error("b, c: expected lists of one length >= 1");
  if (!bias_obj.is_none() && bs.size() != 1) throw py::value_error("bias: only with a single target");
  const auto shape = shape_of(py::reinterpret_borrow<py::array>(a_obj));
  if (shape.size() != 2 || shape[0] < 1 || shape[1] < 1)
    throw py::value_error("a: expected a 2-D array with both dimensions >= 1, got " + shape_str(shape));
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
  Array<S> a = take<S>(a_obj, "a", shape_of(py::reinterpret_borrow<py::array>(a_obj)), "a");
  std::vector<std::pair<Span, std::string>> taken{{span_of(a), "a"}};
  std::vector<GemmOperand<S>> ops;
  for (size_t t = 0; t < bs.size(); ++t) ops.push_back(take_gemm_operand<S>(bs, cs, t, layout, n, K, taken));
  const bool has_bias = !bias_obj.is_none();
  Array<S> bias = has_bias ? take<S>(bias_obj, "bias", {ops[0].N}, "a") : Array<S>();
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
  return with_float_type(a, "a", [&](auto s) {
    return gemm_for_tests_impl<decltype(s)>(a, b, c, accumulate, bias, layout, a_transposed, row_sums, threads);
  });
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
        py::arg("packs") = py::none(),
        "Run a stack of layers and directions over (T, B, I) x; see pyrnn/_backend.py for the contract.\n"
        "Returns (out, h_n, c_n or None, tape or None).");
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
}
