// Vectorised sigmoid and tanh whose result for an element never depends on where it sits.
//
// Eigen peels the unaligned head and the tail of a vectorised loop into scalar code, and its
// scalar sigmoid/tanh are different formulas from its packet ones (or the same formula without
// FMA). An element's value would then depend on its buffer's alignment, and so differ between
// inference and training buffers or from run to run. Here the scalar path runs the packet code
// on a broadcast value and keeps lane 0, so every element goes through the same instructions.
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <type_traits>

namespace pyrnn {

template <typename S>
struct SigmoidOp {
  using Packet = typename Eigen::internal::packet_traits<S>::type;
  EIGEN_STRONG_INLINE S operator()(const S& x) const {
    return Eigen::internal::pfirst(packetOp(Eigen::internal::pset1<Packet>(x)));
  }
  template <typename P>
  EIGEN_STRONG_INLINE P packetOp(const P& x) const {
    return Eigen::internal::scalar_logistic_op<S>().packetOp(x);
  }
};

// float: Eigen's fast rational tanh; double: Eigen has no packet tanh, so std::tanh throughout.
template <typename S>
struct TanhOp {
  using Packet = typename Eigen::internal::packet_traits<S>::type;
  static constexpr bool vectorised = std::is_same<S, float>::value;
  EIGEN_STRONG_INLINE S operator()(const S& x) const {
    if constexpr (vectorised) return Eigen::internal::pfirst(packetOp(Eigen::internal::pset1<Packet>(x)));
    else return std::tanh(x);
  }
  template <typename P>
  EIGEN_STRONG_INLINE P packetOp(const P& x) const {
    return Eigen::internal::ptanh(x);
  }
};

template <typename A>
auto sigmoid(const A& a) {
  return a.unaryExpr(SigmoidOp<typename A::Scalar>());
}
template <typename A>
auto tanh_of(const A& a) {
  return a.unaryExpr(TanhOp<typename A::Scalar>());
}

}  // namespace pyrnn

namespace Eigen::internal {

template <typename S>
struct functor_traits<pyrnn::SigmoidOp<S>> {
  enum { Cost = functor_traits<scalar_logistic_op<S>>::Cost, PacketAccess = packet_traits<S>::HasExp };
};
template <typename S>
struct functor_traits<pyrnn::TanhOp<S>> {
  enum { Cost = functor_traits<scalar_tanh_op<S>>::Cost, PacketAccess = pyrnn::TanhOp<S>::vectorised };
};

}  // namespace Eigen::internal
