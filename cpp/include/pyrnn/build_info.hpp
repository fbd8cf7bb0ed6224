// What this build of the core is: compiler, code generation, SIMD level Eigen uses, threads.
#pragma once

#include <Eigen/Core>
#include <omp.h>

#include <string>

#ifndef PYRNN_CODEGEN_FLAGS
#define PYRNN_CODEGEN_FLAGS "unknown"
#endif
#ifndef PYRNN_VERSION
#define PYRNN_VERSION "unknown"
#endif

namespace pyrnn {

struct BuildInfo {
  std::string version;
  std::string compiler;
  std::string codegen_flags;
  std::string simd;
  std::string eigen_version;
  int openmp_version;
  int max_threads;
};

inline std::string compiler_name() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

// Eigen 3.4's SimdInstructionSetsInUse() stops at "AVX"; name the wider sets it really uses.
inline std::string simd_level() {
  std::string level;
#if defined(EIGEN_VECTORIZE_AVX512)
  level += "AVX512 ";
#endif
#if defined(EIGEN_VECTORIZE_AVX2)
  level += "AVX2 ";
#endif
#if defined(EIGEN_VECTORIZE_FMA)
  level += "FMA ";
#endif
  return level + "(" + Eigen::SimdInstructionSetsInUse() + ")";
}

inline BuildInfo build_info() {
  return BuildInfo{
      PYRNN_VERSION,
      compiler_name(),
      PYRNN_CODEGEN_FLAGS,
      simd_level(),
      std::to_string(EIGEN_WORLD_VERSION) + "." + std::to_string(EIGEN_MAJOR_VERSION) + "." +
          std::to_string(EIGEN_MINOR_VERSION),
      _OPENMP,
      omp_get_max_threads(),
  };
}

}  // namespace pyrnn
