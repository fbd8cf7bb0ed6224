// One Adam step over a parameter's values, in place: torch.optim.Adam's arithmetic.
//
// Each operation is done in S in the order NumPy does it in pyrnn/reference.py's twin (the build
// has no FMA contraction), so the two give the same bits. One pass over the five arrays replaces
// NumPy's eight, each with a temporary of the parameter's size.
#pragma once

#include <cmath>

#include "pyrnn/threads.hpp"
#include "pyrnn/types.hpp"

namespace pyrnn {

// The step's scalars, as Adam computes them from its hyper-parameters and step count.
struct AdamScalars {
  double neg_step_size;  // -lr / (1 - beta1^step)
  double lerp_weight;    // 1 - beta1: exp_avg moves this far towards the gradient
  double beta2;
  double bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  double eps, weight_decay;
};

// Values each thread takes at least: below, a team costs more than it saves.
constexpr Index kMinAdamPerThread = Index(1) << 14;

// Values [begin, end) of one step. The variants are template arguments, so that the loop has no
// branch and the compiler vectorises it (with one, it stays scalar).
template <typename S, bool kFromStart, bool kDecay, bool kAmsgrad>
void adam_values(Index begin, Index end, S* __restrict param, const S* __restrict grad, S* __restrict exp_avg,
                 S* __restrict exp_avg_sq, S* __restrict max_exp_avg_sq, const AdamScalars& a) {
  const S weight_decay = S(a.weight_decay), beta2 = S(a.beta2), one_minus_beta2 = S(1 - a.beta2);
  const S bc2_sqrt = S(a.bias_correction2_sqrt), eps = S(a.eps), neg_step_size = S(a.neg_step_size);
  // torch.lerp's two branches: from the start for small weights, from the end for large ones.
  const S lerp_weight = S(kFromStart ? a.lerp_weight : 1 - a.lerp_weight);
  for (Index i = begin; i < end; ++i) {
    S g = grad[i];
    if constexpr (kDecay) g = g + weight_decay * param[i];
    const S m = kFromStart ? exp_avg[i] + lerp_weight * (g - exp_avg[i]) : g - (g - exp_avg[i]) * lerp_weight;
    exp_avg[i] = m;
    const S v = exp_avg_sq[i] * beta2 + one_minus_beta2 * g * g;
    exp_avg_sq[i] = v;
    S second_moment = v;
    if constexpr (kAmsgrad) {  // NumPy's maximum: a nan on either side wins
      const S kept = max_exp_avg_sq[i];
      second_moment = (kept < v || v != v) ? v : kept;
      max_exp_avg_sq[i] = second_moment;
    }
    const S denom = std::sqrt(second_moment) / bc2_sqrt + eps;
    param[i] = param[i] + neg_step_size * m / denom;
  }
}

// param, exp_avg, exp_avg_sq and max_exp_avg_sq (amsgrad; else null) are updated; grad is read.
template <typename S>
void adam_update(Index n, S* param, const S* grad, S* exp_avg, S* exp_avg_sq, S* max_exp_avg_sq,
                 const AdamScalars& a, int threads) {
  using Values = void (*)(Index, Index, S*, const S*, S*, S*, S*, const AdamScalars&);
  // Indexed by [from start][decay][amsgrad].
  constexpr Values variants[2][2][2] = {
      {{adam_values<S, false, false, false>, adam_values<S, false, false, true>},
       {adam_values<S, false, true, false>, adam_values<S, false, true, true>}},
      {{adam_values<S, true, false, false>, adam_values<S, true, false, true>},
       {adam_values<S, true, true, false>, adam_values<S, true, true, true>}}};
  const Values values = variants[std::abs(a.lerp_weight) < 0.5][a.weight_decay != 0][max_exp_avg_sq != nullptr];
  parallel_for_blocks(n, threads, kMinAdamPerThread, 16, [&](Range r) {
    values(r.begin, r.end, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, a);
  });
}

}  // namespace pyrnn
