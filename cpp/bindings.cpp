// Thin pybind11 layer: check arrays, release the GIL, call the core. No math here.
#include <pybind11/pybind11.h>

#include "pyrnn/build_info.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
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
}
