// How many threads run a time loop and how they share its steps, and whether a stack runs its
// layers at once: every decision on the size and shape of a team is made here.
//
// plan_steps is the rule for one time loop (a team, sharing each step by rows or by units);
// layer_lanes the rule for a stack's layers. TeamChoice may run a small time loop on one thread
// instead of its team, from what the loop's own calls take (see there).
#pragma once

#include <algorithm>
#include <chrono>
#include <mutex>
#include <vector>

#include "pyrnn/gemm.hpp"
#include "pyrnn/threads.hpp"
#include "pyrnn/types.hpp"

namespace pyrnn {

// Hidden units are handed to threads in multiples of this (one or two SIMD registers).
constexpr Index kUnitAlign = 16;

// Rows each thread needs before a step is shared out by rows against a W_hh that fits in L2.
// Against a W_hh past L2 it takes kMinRowsToChunkB rows each, so that each thread's GEMM streams
// W_hh a chunk of panels at a time against all of its rows (see gemm_pass).
constexpr Index kMinRowsPerThread = 8;

// How a time loop is shared. By units, each thread owns a slice of the hidden units of every row:
// the threads meet after every step (each step reads every unit of h_prev), and half of each
// h_prev crosses between cores. By rows, each owns some of the batch rows outright: sequences are
// independent and nobody waits, but every thread reads all of W_hh each step, which pays when
// W_hh fits in a core's L2 and each thread has enough rows to amortise reading it, or when each
// thread has enough rows for the GEMM to stream W_hh from L3 in chunks. By units, a thread keeps
// the same units at every step, so that its gates and c stay in its own core's cache.
struct StepPlan {
  int team;
  bool by_rows;
};

// When a time loop is worth a team: from `min_macs` multiply-adds per step (below, a meeting costs
// more than the step) and, sharing out units, from `min_w_hh_bytes` of W_hh (each thread streams
// its part of W_hh from L2 every step; below, what that saves is less than what meeting costs).
// Training meets twice as often per weight read (forward and BPTT) and needs a larger W_hh.
struct TeamThresholds {
  Index min_macs, min_w_hh_bytes;
};
constexpr TeamThresholds kInferenceTeam{Index(24) << 10, Index(112) << 10};
constexpr TeamThresholds kTrainingTeam{Index(24) << 10, Index(128) << 10};

// The rule: a time loop of B rows and H units of a G-gate cell on up to `threads` threads.
inline StepPlan plan_steps(Index B, Index H, Index G, Index scalar_bytes, int threads, TeamThresholds min) {
  const Index macs = B * H * G * H, w_hh_bytes = G * H * H * scalar_bytes;
  if (threads <= 1 || macs < min.min_macs) return {1, false};
  const bool w_hh_in_l2 = w_hh_bytes <= static_cast<Index>(kL2Bytes);
  if (w_hh_in_l2 && B >= kMinRowsPerThread * 2)
    return {static_cast<int>(std::min<Index>(threads, B / kMinRowsPerThread)), true};
  if (!w_hh_in_l2 && B >= kMinRowsToChunkB * threads) return {threads, true};
  if (w_hh_bytes < min.min_w_hh_bytes) return {1, false};
  return {static_cast<int>(std::min<Index>(threads, std::max<Index>(1, H / kUnitAlign))), false};
}

// A stack's layers run at once only while a step of its widest layer is small and its weights
// are few. Small: below kLanesMaxMacs multiply-adds, meeting at every step costs a team much of
// the step; past it the meetings cost little, and layers at once lose more to their unequal
// shares (a first layer with a narrower input waits for the next). Few: a layer's thread reads
// all its weights at every step, and from kLanesMaxWeightBytes on it reads them at the pace of
// one core's share of L3 or memory, where a team spreads them over every core's caches.
// Measured on the commits that set them.
constexpr Index kLanesMaxMacs = Index(1) << 23;
constexpr Index kLanesMaxWeightBytes = Index(8) << 20;

// The rule for a stack: the threads that run its layers at once (1: layer after layer, each
// with all threads). Layer l then runs on thread l % lanes, its time loop on that thread alone,
// a few steps behind layer l - 1: its steps need no meeting of threads, where a team that shares
// out the units of a small step meets at every one. Only unidirectional stacks (a bidirectional
// layer's first output needs its whole input), only when every thread gets as many layers, and
// only for small steps of few weights (above). step_macs and weight_bytes: the widest layer's.
inline int layer_lanes(Index layers, Index directions, Index step_macs, Index weight_bytes, int threads) {
  const bool small = step_macs < kLanesMaxMacs && weight_bytes < kLanesMaxWeightBytes;
  return directions == 1 && threads > 1 && layers % threads == 0 && small ? threads : 1;
}

// The kinds of time loop: TeamChoice learns each apart.
enum LoopKind { kForwardInference, kForwardTraining, kBackward };

// Multiply-adds per step below which a host's slow periods, not the rule, decide whether a team
// that shares out units pays: only such loops let TeamChoice run them on one thread.
constexpr Index kChoiceMaxMacs = Index(1) << 20;

// TeamChoice decides, per kind and shape of small time loop, whether plan_steps' team or one
// thread runs it faster now: on a shared host a team that meets at every step can for seconds at a
// time run several times slower, which no rule made on a quiet host foresees.
//
// Each kind of call keeps a running estimate of its time per step on the option it uses, and now
// and then tries the other (after 4 calls, then ever more rarely while the answer stays the same:
// at most one call in 256 pays for a try that loses). Both options give the same bits (see the
// tests), so this changes the time of a call, never its result.
class TeamChoice {
 public:
  // team: the time loop's planned team; alone: one thread.
  enum Option { team = 0, alone = 1 };
  // What sets a loop's cost: its kind and shape, and the team it was planned with.
  struct Key {
    int loop;
    Index B, I, H, G, scalar_bytes;
    int team;
    bool operator==(const Key& o) const {
      return loop == o.loop && B == o.B && I == o.I && H == o.H && G == o.G && scalar_bytes == o.scalar_bytes &&
             team == o.team;
    }
  };

  Option pick(const Key& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    Entry& e = entry(key);
    if (e.calls_to_try > 0) {
      --e.calls_to_try;
      return e.choice;
    }
    return other(e.choice);
  }

  // A call of `key` ran on `option` at `ns_per_step`.
  void record(const Key& key, Option option, double ns_per_step) {
    std::lock_guard<std::mutex> lock(mutex_);
    Entry& e = entry(key);
    double& estimate = e.ns_per_step[option];
    if (option == e.choice) {  // a running mean: one slow call must not flip the choice
      estimate = estimate > 0 ? estimate + (ns_per_step - estimate) * kWeight : ns_per_step;
      return;
    }
    estimate = ns_per_step;  // a try: the other option's time now, whatever it was before
    if (estimate < e.ns_per_step[e.choice] * (1 - kMargin)) {
      e.choice = option;
      e.interval = kFirstTry;
    } else {
      e.interval = std::min(2 * e.interval, kLastTry);
    }
    e.calls_to_try = e.interval;
  }

 private:
  static constexpr int kFirstTry = 4, kLastTry = 256;
  static constexpr double kWeight = 0.25, kMargin = 0.05;
  static constexpr size_t kKeep = 64;  // kinds of loops remembered, the least recently used dropped
  struct Entry {
    Key key;
    Option choice = team;
    int interval = kFirstTry, calls_to_try = kFirstTry;
    double ns_per_step[2] = {0, 0};
  };
  static Option other(Option o) { return o == team ? alone : team; }
  Entry& entry(const Key& key) {
    auto it = std::find_if(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.key == key; });
    if (it == entries_.end()) {
      if (entries_.size() == kKeep) entries_.erase(entries_.begin());
      entries_.push_back(Entry{key});
    } else {
      std::rotate(it, it + 1, entries_.end());  // most recently used last
    }
    return entries_.back();
  }
  std::mutex mutex_;
  std::vector<Entry> entries_;
};

inline TeamChoice& team_choice() {
  static TeamChoice choice;
  return choice;
}

// Nanoseconds since `start`.
inline double ns_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
}

// A time loop's plan as it runs: plan_steps' team, or one thread where TeamChoice finds that
// faster now, which it may only for a team that shares out the units of small steps and when the
// caller lets it (`may_learn`; a caller keeping packs laid out for the planned team does not).
class LoopPlan {
 public:
  LoopPlan(LoopKind kind, Index B, Index I, Index H, Index G, Index scalar_bytes, int threads, bool may_learn)
      : planned_(
            plan_steps(B, H, G, scalar_bytes, threads, kind == kForwardInference ? kInferenceTeam : kTrainingTeam)),
        learning_(may_learn && planned_.team > 1 && !planned_.by_rows && B * G * H * H < kChoiceMaxMacs),
        key_{kind, B, I, H, G, scalar_bytes, planned_.team},
        option_(learning_ ? team_choice().pick(key_) : TeamChoice::team),
        start_(std::chrono::steady_clock::now()) {}
  // The team and how it shares each step.
  StepPlan steps() const { return option_ == TeamChoice::alone ? StepPlan{1, false} : planned_; }
  // Tells TeamChoice what the loop's T steps took.
  void finished(Index T) const {
    if (learning_) team_choice().record(key_, option_, ns_since(start_) / double(std::max<Index>(1, T)));
  }

 private:
  StepPlan planned_;
  bool learning_;
  TeamChoice::Key key_;
  TeamChoice::Option option_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace pyrnn
