// Buffers recycled across calls: the kernels' scratch arrays, the tape, and the returned arrays.
//
// A fresh multi-megabyte allocation is handed out by the kernel page by page: every 4 KiB costs a
// page fault (and zeroing) on first touch, which at medium sizes rivals the RNN's arithmetic.
// Released blocks are kept here instead and handed out again, uninitialised, to the next request
// that fits, so a training loop stops faulting after its first step.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#include <sys/mman.h>  // POSIX: mmap, munmap

namespace pyrnn {

// What it keeps: a released block (64 KiB or more) waits at most `idle` (default 5 s) to be
// reused, and all waiting blocks together stay under `limit` (default 1 GiB, oldest out first);
// the others go back to the system at the next acquire or release. trim() frees them all now.
// A loop that reuses its blocks every step keeps them; a call the program moved on from does not.
class BufferPool {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr std::size_t kDefaultLimit = std::size_t(1) << 30;
  static constexpr double kDefaultIdleSeconds = 5.0;

  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();  // never destroyed: blocks may outlive statics
    return *pool;
  }

  // At least `bytes` (rounded up to whole pages), 64-byte aligned, contents undefined; give it
  // back with release(p, bytes) with the bytes this returned.
  void* acquire(std::size_t& bytes) {
    bytes = round_up(bytes == 0 ? 1 : bytes);
    if (bytes < kSmall) return allocate(bytes);
    std::vector<Block> evicted;
    void* reused = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evict(Clock::now(), evicted);
      auto best = free_.end();  // a fit, at most twice as large, the smallest such
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        const bool fits = it->bytes >= bytes && it->bytes <= 2 * bytes;
        if (fits && (best == free_.end() || it->bytes < best->bytes)) best = it;
      }
      if (best != free_.end()) {
        reused = best->p;
        bytes = best->bytes;
        cached_ -= best->bytes;
        free_.erase(best);
      }
    }
    free_all(evicted);
    if (reused) return reused;
    void* p = allocate(bytes);
    allocations_.fetch_add(1, std::memory_order_relaxed);
    return p;
  }

  void release(void* p, std::size_t bytes) {
    if (!p) return;
    if (bytes < kSmall) {  // malloc recycles small blocks well by itself
      std::free(p);
      return;
    }
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const Clock::time_point now = Clock::now();
      if (bytes <= limit_) {
        free_.push_back({bytes, p, now});
        cached_ += bytes;
      } else {
        evicted.push_back({bytes, p, now});
      }
      evict(now, evicted);
    }
    free_all(evicted);
  }

  // Return every cached block to the system; the bytes they held.
  std::size_t trim() {
    std::vector<Block> blocks;
    std::size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      std::swap(bytes, cached_);
    }
    free_all(blocks);
    return bytes;
  }

  // Set the rule's two bounds (idle_seconds >= 0; infinity: no time bound) and apply them now.
  void configure(std::size_t limit_bytes, double idle_seconds) {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = limit_bytes;
      idle_seconds_ = idle_seconds;
      idle_ = to_duration(idle_seconds);
      evict(Clock::now(), evicted);
    }
    free_all(evicted);
  }

  struct Stats {
    std::size_t cached_bytes, cached_blocks, limit_bytes;
    double idle_seconds;
    std::uint64_t allocations;  // blocks of kSmall or more allocated from the system so far
  };
  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, free_.size(), limit_, idle_seconds_, allocations_.load(std::memory_order_relaxed)};
  }

 private:
  struct Block {
    std::size_t bytes;
    void* p;
    Clock::time_point released;
  };
  static constexpr std::size_t kAlign = 64;
  static constexpr std::size_t kPage = 4096;
  static constexpr std::size_t kMaxBlocks = 256;
  static constexpr std::size_t kSmall = std::size_t(64) << 10;  // below this, plain malloc
  static std::size_t round_up(std::size_t n) { return (n + kPage - 1) / kPage * kPage; }
  // Blocks of kSmall or more are mapped from the system directly, so that freeing one gives its
  // pages back (malloc keeps some of them in its heap); smaller ones come from malloc.
  static void* allocate(std::size_t bytes) {
    void* p = bytes < kSmall ? std::aligned_alloc(kAlign, bytes) : map(bytes);
    if (!p) throw std::bad_alloc();
    return p;
  }
  static void* map(std::size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
  }
  static void free_all(const std::vector<Block>& blocks) {
    for (const Block& b : blocks) munmap(b.p, b.bytes);
  }
  static Clock::duration to_duration(double seconds) {
    if (!(seconds < 1e9)) return Clock::duration::max();  // "forever" (and +inf)
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  }

  // Move the blocks the rule no longer keeps into `out`. Caller holds mutex_.
  void evict(Clock::time_point now, std::vector<Block>& out) {
    while (!free_.empty() &&
           (cached_ > limit_ || free_.size() > kMaxBlocks || now - free_.front().released > idle_)) {
      cached_ -= free_.front().bytes;
      out.push_back(free_.front());
      free_.erase(free_.begin());
    }
  }

  std::mutex mutex_;
  std::vector<Block> free_;  // oldest release first
  std::size_t cached_ = 0;
  std::size_t limit_ = kDefaultLimit;
  double idle_seconds_ = kDefaultIdleSeconds;
  Clock::duration idle_ = to_duration(kDefaultIdleSeconds);
  std::atomic<std::uint64_t> allocations_{0};
};

// An uninitialised array of n elements from the pool, returned to it when destroyed.
template <typename S>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(std::size_t n) { allocate(n); }
  Buffer(Buffer&& o) noexcept { swap(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    Buffer(std::move(o)).swap(*this);
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { BufferPool::instance().release(data_, bytes_); }

  // Make room for n elements (contents undefined afterwards). None takes no memory: the pool
  // hands out at least a page, and buffers sized 0 where a path does not use them (a GEMM's
  // packed A, a cell's c) were made at every call, some at every time step.
  void allocate(std::size_t n) {
    Buffer fresh;
    if (n > 0) {
      fresh.bytes_ = n * sizeof(S);
      fresh.data_ = static_cast<S*>(BufferPool::instance().acquire(fresh.bytes_));
      fresh.size_ = n;
    }
    swap(fresh);
  }
  void fill(S value) { std::fill(data_, data_ + size_, value); }
  // Hand the block over (the caller must give it back with BufferPool::release(p, bytes)).
  std::pair<S*, std::size_t> release() {
    auto r = std::make_pair(data_, bytes_);
    data_ = nullptr;
    size_ = bytes_ = 0;
    return r;
  }

  S* data() { return data_; }
  const S* data() const { return data_; }
  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  S* begin() { return data_; }
  S* end() { return data_ + size_; }
  S& operator[](std::size_t i) { return data_[i]; }
  const S& operator[](std::size_t i) const { return data_[i]; }

  void swap(Buffer& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    std::swap(bytes_, o.bytes_);
  }

 private:
  S* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t bytes_ = 0;
};

}  // namespace pyrnn
