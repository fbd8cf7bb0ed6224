// Threading: how many threads the core may use, and the two ways it splits work among them.
//
// Eigen is compiled with EIGEN_DONT_PARALLELIZE, so every thread here is ours. Work is always
// split into disjoint output blocks fixed by the team size, so results are deterministic for a
// given thread count (no reductions across threads).
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>

#include "pyrnn/types.hpp"

namespace pyrnn {

inline std::atomic<int>& num_threads_setting() {
  static std::atomic<int> n{std::max(1, omp_get_max_threads())};
  return n;
}
inline int get_num_threads() { return num_threads_setting().load(); }
inline void set_num_threads(int n) { num_threads_setting().store(std::max(1, n)); }

// Run body(tid, team_size) on a team of up to n threads (inline when n == 1).
template <class F>
void run_team(int n, F&& body) {
  if (n <= 1) {
    body(0, 1);
    return;
  }
#pragma omp parallel num_threads(n)
  body(omp_get_thread_num(), omp_get_num_threads());
}

inline void team_barrier() {
#pragma omp barrier
}

// The tid-th of `parts` contiguous slices of [0, n), with slice edges on multiples of `align`.
struct Range {
  Index begin, end;
  Index size() const { return end - begin; }
};
inline Range split(Index n, int tid, int parts, Index align = 1) {
  const Index chunks = (n + align - 1) / align;
  const Index c0 = chunks * tid / parts, c1 = chunks * (tid + 1) / parts;
  return {std::min(n, c0 * align), std::min(n, c1 * align)};
}

// Split [0, n) across up to `threads` threads, but give each at least `min_per_thread` items.
template <class F>
void parallel_for_blocks(Index n, int threads, Index min_per_thread, Index align, F&& body) {
  const Index useful = std::max<Index>(1, n / std::max<Index>(1, min_per_thread));
  const int team = static_cast<int>(std::min<Index>(threads, useful));
  run_team(team, [&](int tid, int parts) {
    const Range r = split(n, tid, parts, align);
    if (r.size() > 0) body(r);
  });
}

}  // namespace pyrnn
