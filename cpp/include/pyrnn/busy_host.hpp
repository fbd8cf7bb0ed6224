// Whether this process's teams get the cores they ask for, and how many threads a call may use.
//
// On a host where other processes want the cores too, a thread of a team is often off its core:
// the threads that wait for it at a barrier wait a time slice (milliseconds) for a step that takes
// microseconds. run_team measures each region it runs (the work its threads did, CPU time less
// the time they spun at barriers, against its wall time) and TeamCap turns that into a cap on the
// team size of later calls: while teams get less than half their threads' worth of work done, calls
// run on as many threads as the teams' speed-up (down to one thread), and now and then a call tries
// the whole team again, so that a host that turns quiet gets its full speed back.
//
// The cap changes who computes what and on how many threads, never a result: every team's work is
// split so that any team size gives the same bits.
#pragma once

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <utility>
#include <vector>

#include <unistd.h>

namespace pyrnn {

// Nanoseconds on the monotonic clock, and the CPU time the calling thread has had.
inline double monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return double(ts.tv_sec) * 1e9 + double(ts.tv_nsec);
}
inline double thread_cpu_ns() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) * 1e9 + double(ts.tv_nsec);
}

// Threads runnable on the whole host now (the fourth field of /proc/loadavg), or -1 where that
// cannot be read.
inline int runnable_threads() {
  std::FILE* file = std::fopen("/proc/loadavg", "r");
  if (!file) return -1;
  double load1, load5, load15;
  int running = 0, total = 0;
  const int read = std::fscanf(file, "%lf %lf %lf %d/%d", &load1, &load5, &load15, &running, &total);
  std::fclose(file);
  return read == 5 ? running : -1;
}

// Whether a team of `wanted` threads would find its cores free now: besides the calling thread,
// the host runs at most its processors less the team. True where the count cannot be read.
inline bool cores_free_for(int wanted) {
  const int running = runnable_threads();
  if (running < 0) return true;
  return running - 1 <= sysconf(_SC_NPROCESSORS_ONLN) - wanted;
}

// One region as its team measured it: `wall_ns` from its start to the end of its last thread, and
// `work_ns`, the CPU time its threads had less the time they spun waiting for each other (a thread
// off its core does no work, and one that waits for it does none either).
struct RegionTimes {
  int threads;
  double wall_ns, work_ns;
};

// The team's speed-up: how many threads' work it got done per unit of wall time.
inline double speedup(const RegionTimes& r) { return r.wall_ns > 0 ? r.work_ns / r.wall_ns : r.threads; }

// Whether a region's team lost more than kMinLostNsPerThread a thread: less is a worker woken from
// sleep on an idle host, which starts some tens of us late, not a lost core.
constexpr double kMinTeamShare = 0.5, kMinLostNsPerThread = 100e3;
inline bool lost_time(const RegionTimes& r) {
  return r.threads * r.wall_ns - r.work_ns > kMinLostNsPerThread * r.threads;
}

// A region whose team lost time and got less than kMinTeamShare of its threads' worth of work
// done: a team of two then did no better than one thread would have on its own. Counted for
// backend_info; the cap itself follows the share over recent time (see TeamCap).
inline bool lost_its_cores(const RegionTimes& r) {
  return r.threads > 1 && lost_time(r) && speedup(r) < kMinTeamShare * r.threads;
}

// What TeamCap has seen: regions of more than one thread, those that lost their cores, probes.
struct TeamCapCounts {
  long long regions = 0, lost = 0, probes = 0, postponed = 0;
};

// The cap on team sizes, from the regions run so far. Not thread-safe: see team_cap().
//
// TeamCap keeps the share of its teams' thread time that did work over about the last kMemoryNs
// (older regions fade): time, not regions, weighs, so a host busy one moment and quiet the next
// caps teams only when they lose more than they gain over both. Once it has seen kMinEvidenceNs
// of team time, a share below kMinTeamShare sets the cap to the threads' worth of work the teams
// got (at least one, fewer than the team) for `hold_ns`. Then one call runs with the team it asks
// for (a probe): its regions add to the share, and the first tells. A probe that finds the share
// still low keeps the cap and doubles the hold (up to kMaxHoldNs); one that finds it high lifts
// the cap on trial: a low share within kTrialNs sets it again with the hold doubled (a host busy
// a few seconds ago is likely busy again, and each probe costs a call on a starved team).
class TeamCap {
 public:
  static constexpr double kFirstHoldNs = 20e6, kMaxHoldNs = 1e9, kTrialNs = 10e9;
  static constexpr double kMemoryNs = 50e6, kMinEvidenceNs = 1e6;
  static constexpr int kMaxPostponed = 8;

  // Threads a call asking for `wanted` may have at `now_ns`, for all its regions. A probe that is
  // due asks `cores_free(wanted)` (read only then) and waits another hold while the host has no
  // free cores for it: a starved probe costs a whole call on a team that waits time slices for
  // its threads. A host that stays busy still sees a probe every kMaxPostponed holds.
  template <class CoresFree>
  int allowed(int wanted, double now_ns, CoresFree&& cores_free) {
    if (cap_ >= wanted) return wanted;
    if (now_ns < probe_at_ns_) return cap_;
    probe_at_ns_ = now_ns + hold_ns_;  // one probe or postponement per hold, whoever asks next
    if (postponed_ < kMaxPostponed && !cores_free(wanted)) {
      ++postponed_;
      ++counts_.postponed;
      return cap_;
    }
    probe_open_ = true;
    postponed_ = 0;
    ++counts_.probes;
    return wanted;
  }

  // A region of `r.threads` threads finished at `now_ns`.
  void observe(const RegionTimes& r, double now_ns) {
    if (r.threads < 2) return;
    remember(r, now_ns);
    ++counts_.regions;
    counts_.lost += lost_its_cores(r);
    const bool probe = r.threads > cap_;
    // Past the cap: the first region of the call that probes tells; the rest of that call, and
    // calls begun before the cap was set, only add to the share.
    if (probe && !probe_open_) return;
    probe_open_ = false;
    const bool starved = team_ns_ >= kMinEvidenceNs && work_ns_ < kMinTeamShare * team_ns_;
    if (!starved) {
      if (probe) cap_ = INT_MAX, trial_until_ns_ = now_ns + kTrialNs;
      return;
    }
    if (!probe && cap_ < r.threads) return;  // a team within the cap
    const bool again = probe || now_ns < trial_until_ns_;
    hold_ns_ = again ? std::min(2 * hold_ns_, kMaxHoldNs) : kFirstHoldNs;
    trial_until_ns_ = 0;
    cap_ = std::clamp(static_cast<int>(std::floor(r.threads * work_ns_ / team_ns_)), 1, r.threads - 1);
    probe_at_ns_ = now_ns + hold_ns_;
  }

  int cap() const { return cap_; }
  const TeamCapCounts& counts() const { return counts_; }

 private:
  // Adds the region's thread time (threads x wall) and work to the fading sums; a loss too small
  // for lost_time counts as work.
  void remember(const RegionTimes& r, double now_ns) {
    const double fade = std::exp(-std::max(0.0, now_ns - last_ns_) / kMemoryNs);
    const double thread_ns = r.threads * r.wall_ns;
    team_ns_ = team_ns_ * fade + thread_ns;
    work_ns_ = work_ns_ * fade + (lost_time(r) ? r.work_ns : thread_ns);
    last_ns_ = now_ns;
  }
  int cap_ = INT_MAX, postponed_ = 0;  // postponed_: probes postponed since the last
  bool probe_open_ = false;  // a probe was allowed and no region of it has been seen
  double hold_ns_ = kFirstHoldNs, probe_at_ns_ = 0, trial_until_ns_ = 0;
  double team_ns_ = 0, work_ns_ = 0, last_ns_ = 0;  // the fading sums, and when they were last added to
  TeamCapCounts counts_;
};

// The process's cap, shared by every team, and the lock that guards it. Switched off, every call
// gets the threads it asks for, and nothing is measured.
class SharedTeamCap {
 public:
  int allowed(int wanted) {
    if (!enabled_.load(std::memory_order_relaxed)) return wanted;
    std::lock_guard<std::mutex> lock(mutex_);
    return cap_.allowed(wanted, monotonic_ns(), cores_free_for);
  }
  void observe(const RegionTimes& r) {
    if (!enabled_.load(std::memory_order_relaxed)) return;
    std::lock_guard<std::mutex> lock(mutex_);
    cap_.observe(r, monotonic_ns());
  }
  // Switching it either way starts afresh: no cap, no counts.
  void set_enabled(bool on) {
    std::lock_guard<std::mutex> lock(mutex_);
    enabled_.store(on, std::memory_order_relaxed);
    cap_ = TeamCap{};
  }
  bool enabled() const { return enabled_.load(std::memory_order_relaxed); }
  // The cap now (INT_MAX: none) and the counts so far.
  std::pair<int, TeamCapCounts> state() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cap_.cap(), cap_.counts()};
  }

 private:
  std::mutex mutex_;
  std::atomic<bool> enabled_{true};
  TeamCap cap_;
};

inline SharedTeamCap& team_cap() {
  static SharedTeamCap cap;
  return cap;
}

// One call of a replay of TeamCap (for its tests): at `now_ns` a call asks for `wanted` threads,
// with the host's cores free for it or not, and runs `regions` regions on what it is allowed,
// each with `wall_ns` and `work_ns` as measured.
struct TeamCapEvent {
  double now_ns;
  int wanted;
  double wall_ns, work_ns;
  int regions;
  bool cores_free;
};

// The threads each call was allowed, replayed on a fresh TeamCap.
inline std::vector<int> replay_team_cap(const std::vector<TeamCapEvent>& events) {
  TeamCap cap;
  std::vector<int> allowed;
  for (const TeamCapEvent& e : events) {
    const int n = cap.allowed(e.wanted, e.now_ns, [&](int) { return e.cores_free; });
    allowed.push_back(n);
    for (int k = 0; k < e.regions; ++k) cap.observe({n, e.wall_ns, e.work_ns}, e.now_ns);
  }
  return allowed;
}

}  // namespace pyrnn
