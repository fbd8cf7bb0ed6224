// Buffers recycled across calls: the kernels' scratch arrays, the tape, and the returned arrays.
//
// A fresh multi-megabyte allocation is handed out by the kernel page by page: every 4 KiB costs a
// page fault (and zeroing) on first touch, which at medium sizes rivals the RNN's arithmetic.
// Released blocks are kept here instead and handed out again, uninitialised, to the next request
// that fits, so a training loop stops faulting after its first step.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

namespace pyrnn {

class BufferPool {
 public:
  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();  // never destroyed: blocks may outlive statics
    return *pool;
  }

  // At least `bytes` (rounded up to whole pages), 64-byte aligned, contents undefined.
  void* acquire(std::size_t& bytes) {
    bytes = round_up(bytes == 0 ? 1 : bytes);
    if (bytes < kSmall) return allocate(bytes);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      std::size_t best = free_.size();
      for (std::size_t i = 0; i < free_.size(); ++i) {
        const std::size_t size = free_[i].first;
        // a fit, at most twice as large, the smallest such
        if (size >= bytes && size <= 2 * bytes && (best == free_.size() || size < free_[best].first))
          best = i;
      }
      if (best != free_.size()) {
        auto [size, p] = free_[best];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        cached_ -= size;
        bytes = size;
        return p;
      }
    }
    return allocate(bytes);
  }

  void release(void* p, std::size_t bytes) {
    if (!p) return;
    if (bytes < kSmall) {  // malloc recycles small blocks well by itself
      std::free(p);
      return;
    }
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.emplace_back(bytes, p);
      cached_ += bytes;
      while (cached_ > kMaxCached || free_.size() > kMaxBlocks) {  // oldest first
        cached_ -= free_.front().first;
        evicted.push_back(free_.front().second);
        free_.erase(free_.begin());
      }
    }
    for (void* q : evicted) std::free(q);
  }

  // Return every cached block to the system.
  void trim() {
    std::vector<std::pair<std::size_t, void*>> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_ = 0;
    }
    for (auto& b : blocks) std::free(b.second);
  }

  std::size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  static constexpr std::size_t kAlign = 64;
  static constexpr std::size_t kPage = 4096;
  static constexpr std::size_t kMaxCached = std::size_t(1) << 30;  // 1 GiB kept at most
  static constexpr std::size_t kMaxBlocks = 256;
  static constexpr std::size_t kSmall = std::size_t(64) << 10;  // below this, plain malloc
  static std::size_t round_up(std::size_t n) { return (n + kPage - 1) / kPage * kPage; }
  static void* allocate(std::size_t bytes) {
    void* p = std::aligned_alloc(kAlign, bytes);
    if (!p) throw std::bad_alloc();
    return p;
  }

  std::mutex mutex_;
  std::vector<std::pair<std::size_t, void*>> free_;  // (bytes, block), oldest first
  std::size_t cached_ = 0;
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
