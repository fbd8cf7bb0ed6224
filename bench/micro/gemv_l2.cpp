// The floor of a batch-1 time step: one thread's GEMV against its share of W_hh, streamed from L2
// every step (a batch-1 LSTM with 128 units on two threads: 64 units x 4 gates x 128 inputs,
// 128 KB), in pyrnn's packed layout (gemm.hpp: panels of 16 columns, each holding every depth row)
// with its 1-row kernel (8 panels per pass). Three figures:
// - panels exactly 128 rows (8 KB) apart, as they were packed before: every panel's row k falls in
//   the same L1 set, and 8 of them fill its 8 ways;
// - panels one line further apart (PackedB::panel_rows), each row in a set of its own;
// - the same multiply-adds on 16 rows of each panel, 8 times over, which stay in L1: what the
//   kernel would take if W_hh did not have to come from L2.
// Not part of the build; AVX-512 (x86-64-v4) only:
//
//   g++ -O3 -march=x86-64-v4 bench/micro/gemv_l2.cpp -o /tmp/gemv_l2 && /tmp/gemv_l2
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

constexpr int kDepth = 128, kPanels = 16, kLanes = 16, kPanelsPerPass = 8;

// out[8 panels' columns] = sum over k < depth of h[k] * w[panel][k]; panels `stride` rows apart.
void gemv_pass(const float* w, int stride, const float* h, int depth, float* out) {
  __m512 acc[kPanelsPerPass];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int k = 0; k < depth; ++k) {
    const __m512 hk = _mm512_set1_ps(h[k]);
    for (int p = 0; p < kPanelsPerPass; ++p)
      acc[p] = _mm512_fmadd_ps(hk, _mm512_load_ps(w + (p * stride + k) * kLanes), acc[p]);
  }
  for (int p = 0; p < kPanelsPerPass; ++p) _mm512_storeu_ps(out + p * kLanes, acc[p]);
}

// Nanoseconds per step, best of 5 rounds of many steps; each step's h depends on the last's.
template <class Step>
double ns_per_step(Step step, std::vector<float>& h, const std::vector<float>& out) {
  constexpr int kSteps = 100000;
  double best = 1e30;
  for (int round = 0; round < 5; ++round) {
    const auto start = std::chrono::steady_clock::now();
    for (int s = 0; s < kSteps; ++s) {
      step();
      h[s % kDepth] = 0.1f + 1e-6f * out[s % (kPanels * kLanes)];
    }
    const std::chrono::duration<double, std::nano> took = std::chrono::steady_clock::now() - start;
    best = std::min(best, took.count() / kSteps);
  }
  return best;
}

}  // namespace

int main() {
  constexpr int kPadded = kDepth + 1;
  const size_t values = size_t(kPanels) * kPadded * kLanes;
  float* w = static_cast<float*>(std::aligned_alloc(64, values * sizeof(float)));
  for (size_t i = 0; i < values; ++i) w[i] = float(i % 1000) * 1e-4f;
  std::vector<float> h(kDepth, 0.1f), out(kPanels * kLanes);
  float* second = out.data() + kPanelsPerPass * kLanes;

  auto whole = [&](int stride) {
    return ns_per_step([&] {
      gemv_pass(w, stride, h.data(), kDepth, out.data());
      gemv_pass(w + kPanelsPerPass * stride * kLanes, stride, h.data(), kDepth, second);
    }, h, out);
  };
  const double aliased = whole(kDepth), padded = whole(kPadded);
  constexpr int kSlice = 16;
  const double in_l1 = ns_per_step([&] {
    for (int j = 0; j < kDepth / kSlice; ++j) {
      gemv_pass(w, kPadded, h.data() + j * kSlice, kSlice, out.data());
      gemv_pass(w + kPanelsPerPass * kPadded * kLanes, kPadded, h.data() + j * kSlice, kSlice, second);
    }
  }, h, out);
  const double kb = double(kPanels) * kDepth * kLanes * sizeof(float) / 1024;
  std::printf("GEMV of 1 x %d by %d x %d (%.0f KB) per step: %.0f ns with panels 8 KB apart, "
              "%.0f ns one line further apart (%.0f GB/s from L2), %.0f ns with the same "
              "multiply-adds in L1\n",
              kDepth, kDepth, kPanels * kLanes, kb, aliased, padded, kb * 1024 / padded, in_l1);
  std::free(w);
}
