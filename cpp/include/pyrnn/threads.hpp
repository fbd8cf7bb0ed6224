// Threading: how many threads the core may use, and the two ways it splits work among them.
//
// Eigen is compiled with EIGEN_DONT_PARALLELIZE, so every thread here is ours. Work is always
// split into disjoint output blocks fixed by the team size, so results are deterministic for a
// given thread count (no reductions across threads).
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "pyrnn/busy_host.hpp"
#include "pyrnn/types.hpp"

namespace pyrnn {

// Threads the kernels may be given. A team is created as asked, and when the system cannot make
// that many threads libgomp ends the process: a count far past any machine's is refused instead.
constexpr int kMaxThreads = 1024;

inline std::atomic<int>& num_threads_setting() {
  static std::atomic<int> n{std::clamp(omp_get_max_threads(), 1, kMaxThreads)};
  return n;
}
inline int get_num_threads() { return num_threads_setting().load(); }
inline void set_num_threads(int n) { num_threads_setting().store(std::clamp(n, 1, kMaxThreads)); }

// The threads of get_num_threads() shared among the calls that run at once (Python threads that
// call in with the GIL released): a call takes what the calls already running left, at least one,
// and gives it back when it ends. Concurrent calls thus put about get_num_threads() threads on the
// cores, not that many each: more threads than cores leave teams waiting at their barriers for a
// thread that has no core. While the host keeps teams off their cores, the team cap (see
// busy_host.hpp) lowers what a call asks for; it is fixed for the whole call, so that the plans
// and cached packs of its time loops match the teams that run them. A team's size changes the
// time, never the bits.
class ThreadShare {
 public:
  ThreadShare() : count_(take(team_cap().allowed(get_num_threads()))) {}
  ~ThreadShare() { in_use().fetch_sub(count_, std::memory_order_relaxed); }
  ThreadShare(const ThreadShare&) = delete;
  ThreadShare& operator=(const ThreadShare&) = delete;
  int count() const { return count_; }

 private:
  static std::atomic<int>& in_use() {
    static std::atomic<int> threads{0};
    return threads;
  }
  static int take(int wanted) {
    int used = in_use().load(std::memory_order_relaxed), n = 1;
    do n = std::max(1, wanted - used);
    while (!in_use().compare_exchange_weak(used, used + n, std::memory_order_relaxed));
    return n;
  }
  const int count_;
};

// Pauses a waiter spins before it sleeps or yields: about 400 us (a pause is ~25 ns here).
constexpr int kSpinPauses = 1 << 14;

// One spin-wait pause: tells the core (and its sibling, if any) that this thread only waits.
inline void cpu_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// A barrier for one team. libgomp's `omp barrier` makes a futex system call at every crossing,
// whether or not a thread sleeps, which costs several crossings without one, and a time loop that
// shares out units crosses at every step. As libgomp does, a waiter here spins, then sleeps on a
// futex; unlike it, the last thread to arrive makes the call only when somebody sleeps. A waiter
// does not yield while it spins: a yielded core may go to another library's spinning pool thread
// for a whole time slice, while a sleeper that is woken gets its core back at once. With more
// threads than cores a waiter sleeps after a short spin, since the thread it waits for may need
// its core.
class TeamBarrier {
 public:
  // Every thread of a team of `team_size` calls this; none returns before all have called it,
  // and each then sees what the others wrote before they called it.
  // A waiter that spins past its first kShortSpin pauses adds the wall time of the rest of its
  // spin to `spun_ns` (see RegionClock): CPU time that did no work.
  void wait(int team_size, double* spun_ns) {
    // The generation cannot move before this thread arrives: it moves when all have.
    const unsigned generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == team_size - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      // Sequentially consistent with the sleepers' count: either this sees a sleeper, or the
      // sleeper sees the new generation and does not sleep.
      generation_.store(generation + 1, std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) wake_all();
      return;
    }
    if (spin_while(generation, kShortSpin)) return;
    if (team_size <= processors()) {
      const double spin_start = monotonic_ns();
      const bool released = spin_while(generation, kSpinPauses - kShortSpin);
      *spun_ns += monotonic_ns() - spin_start;
      if (released) return;
    }
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    while (generation_.load(std::memory_order_seq_cst) == generation) sleep_while(generation);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }

 private:
  static constexpr int kShortSpin = 64;  // pauses, about 1.6 us
  // Spins up to `pauses` pauses while the generation is `generation`; whether it moved.
  bool spin_while(unsigned generation, int pauses) const {
    for (int i = 0; i < pauses; ++i) {
      if (generation_.load(std::memory_order_acquire) != generation) return true;
      cpu_pause();
    }
    return generation_.load(std::memory_order_acquire) != generation;
  }
  // Read once: omp_get_num_procs() asks the kernel for the thread's affinity at every call.
  static int processors() {
    static const int count = omp_get_num_procs();
    return count;
  }
#if defined(__linux__)
  // The futex reads the generation's value; std::atomic<unsigned> holds just that value.
  unsigned* futex_word() { return reinterpret_cast<unsigned*>(&generation_); }
  void sleep_while(unsigned generation) {
    syscall(SYS_futex, futex_word(), FUTEX_WAIT_PRIVATE, generation, nullptr, nullptr, 0);
  }
  void wake_all() { syscall(SYS_futex, futex_word(), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0); }
#else
  void sleep_while(unsigned) { std::this_thread::yield(); }
  void wake_all() {}
#endif
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<unsigned> generation_{0};  // a line of its own: the waiters read it
  std::atomic<int> sleepers_{0};
  static_assert(sizeof(std::atomic<unsigned>) == sizeof(unsigned), "the futex word is the atomic's value");
};

// How many steps of a sequence one thread has written, for another that reads them as they come
// (the layers of a stack run at once, see stack.hpp). The reader spins, as each runs on a core of
// its own, and yields after a while in case it does not.
class StepCount {
 public:
  void publish(Index steps) { steps_.store(steps, std::memory_order_release); }
  // Steps written so far: what the writer wrote before publishing them is then visible.
  Index count() const { return steps_.load(std::memory_order_acquire); }
  // Returns once at least `steps` are written, with the count.
  Index await(Index steps) const {
    Index now = count();
    for (int spins = 0; now < steps; ++spins, now = count()) {
      if (spins < kSpinPauses) cpu_pause();
      else std::this_thread::yield();
    }
    return now;
  }

 private:
  alignas(64) std::atomic<Index> steps_{0};  // a line of its own (the class is padded to 64 bytes)
};

// One thread of a team: its index, the team's size, the team's barrier, and where the thread adds
// the time it spins at the barrier (see RegionClock; null for a team of one, which never waits).
struct Team {
  int tid, size;
  TeamBarrier* team_barrier;
  double* spun_ns;
  void barrier() const {
    if (size > 1) team_barrier->wait(size, spun_ns);
  }
};

// What one region's threads measure of it (see RegionTimes). The work a thread did is the CPU time
// it had less the time it spun at barriers; the region's wall time runs from its start to the end
// of its last thread. Each thread writes only its own slot.
class RegionClock {
 public:
  explicit RegionClock(int threads) : start_ns_(monotonic_ns()), slots_(threads) {}
  // The calling thread begins its part / ends it.
  void thread_start(int tid) { slots_[tid].cpu_ns = -thread_cpu_ns(); }
  void thread_done(int tid) {
    Slot& me = slots_[tid];
    me.cpu_ns += thread_cpu_ns();
    me.end_ns = monotonic_ns();
  }
  double* spun_ns(int tid) { return &slots_[tid].spun_ns; }
  // After the region, with `threads` of them run.
  RegionTimes times(int threads) const {
    double end_ns = start_ns_, work_ns = 0;
    for (int t = 0; t < threads; ++t) {
      end_ns = std::max(end_ns, slots_[t].end_ns);
      work_ns += std::max(0.0, slots_[t].cpu_ns - slots_[t].spun_ns);
    }
    return {threads, end_ns - start_ns_, work_ns};
  }

 private:
  struct alignas(64) Slot {  // a cache line each: threads write their own as they run
    double cpu_ns = 0, spun_ns = 0, end_ns = 0;
  };
  const double start_ns_;
  std::vector<Slot> slots_;
};

// Run body(team) on a team of up to n threads (inline when n == 1), and tell the team cap (see
// busy_host.hpp) whether the team had its cores. OpenMP may give fewer threads than asked (inside
// another parallel region): team.size is what it gave.
template <class F>
void run_team(int n, F&& body) {
  TeamBarrier barrier;
  if (n <= 1) {
    body(Team{0, 1, &barrier, nullptr});
    return;
  }
  const bool measured = team_cap().enabled();  // the CPU-time reads are system calls: only then
  RegionClock clock(n);
  int size = 1;
#pragma omp parallel num_threads(n)
  {
    const int tid = omp_get_thread_num();
    if (measured) clock.thread_start(tid);
    const Team team{tid, omp_get_num_threads(), &barrier, clock.spun_ns(tid)};
    if (tid == 0) size = team.size;
    body(team);
    if (measured) clock.thread_done(tid);
  }
  if (measured) team_cap().observe(clock.times(size));
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
  run_team(team, [&](const Team& me) {
    const Range r = split(n, me.tid, me.size, align);
    if (r.size() > 0) body(r);
  });
}

}  // namespace pyrnn
