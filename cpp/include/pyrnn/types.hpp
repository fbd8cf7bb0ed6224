// Row-major Eigen views over raw buffers: every array in the core is one of these.
#pragma once

#include <Eigen/Core>

#include <cstdint>

namespace pyrnn {

using Index = Eigen::Index;

template <typename S>
using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename S>
using Vec = Eigen::Matrix<S, Eigen::Dynamic, 1>;

// A (rows, cols) block of a row-major buffer whose rows are `ld` elements apart.
template <typename S>
using MatMap = Eigen::Map<Mat<S>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <typename S>
using CMatMap = Eigen::Map<const Mat<S>, Eigen::Unaligned, Eigen::OuterStride<>>;
// A contiguous run of n elements, as an array for coefficient-wise math.
template <typename S>
using ArrMap = Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>>;
template <typename S>
using CArrMap = Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>>;

template <typename S>
MatMap<S> mat(S* p, Index rows, Index cols, Index ld) {
  return MatMap<S>(p, rows, cols, Eigen::OuterStride<>(ld));
}
template <typename S>
CMatMap<S> cmat(const S* p, Index rows, Index cols, Index ld) {
  return CMatMap<S>(p, rows, cols, Eigen::OuterStride<>(ld));
}
template <typename S>
ArrMap<S> arr(S* p, Index n) {
  return ArrMap<S>(p, n);
}
template <typename S>
CArrMap<S> carr(const S* p, Index n) {
  return CArrMap<S>(p, n);
}

}  // namespace pyrnn
