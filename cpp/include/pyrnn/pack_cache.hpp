// Packed weights kept between inference calls on weights that do not change.
//
// Each forward pass packs W_ih and W_hh into the panels its GEMMs read, which for a small model
// is a good part of the call. A caller that runs the same weights many times (a frozen module)
// keeps a PackCache: the first call with a given batch size and thread count fills a set of packs,
// and later calls with the same ones read it. The step plan, and so the layout of the packs,
// depends on both and on whether the layers run at once (see layer_lanes), hence one set per such
// triple, the few most recently used kept.
#pragma once

#include <algorithm>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "pyrnn/stack.hpp"
#include "pyrnn/types.hpp"

namespace pyrnn {

// What a cache's packs were made from: the stack's shape and the addresses of its weights.
struct PackSignature {
  CellKind cell;
  Index scalar_bytes, I, H, L, D;
  std::vector<const void*> weights;  // w_ih, w_hh, b_ih, b_hh of each layer and direction
  bool operator==(const PackSignature& o) const {
    return cell == o.cell && scalar_bytes == o.scalar_bytes && I == o.I && H == o.H && L == o.L && D == o.D &&
           weights == o.weights;
  }
};

// The packs one call uses. While `filling` holds the cache's lock the packs are empty and this
// call fills them; every other call waits for it, so none reads packs half made.
template <typename S>
struct PackLease {
  std::shared_ptr<StackPacks<S>> packs;
  std::unique_lock<std::mutex> filling;
};

class PackCache {
 public:
  // Sets of packs kept: the batch sizes, thread counts and layer plans a caller alternates between.
  static constexpr size_t kKeep = 4;

  // The packs for a call with these weights, batch size B, thread count and layer lanes (see
  // layer_lanes); nothing when the cache was first used with other weights or another stack.
  // Safe to call from many threads.
  template <typename S>
  std::optional<PackLease<S>> lease(const PackSignature& signature, Index B, int threads, int lanes) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!signature_) signature_ = signature;
    if (!(*signature_ == signature)) return std::nullopt;
    auto it = std::find_if(entries_.begin(), entries_.end(),
                           [&](const Entry& e) { return e.B == B && e.threads == threads && e.lanes == lanes; });
    if (it == entries_.end()) {
      if (entries_.size() == kKeep) entries_.erase(entries_.begin());  // a call using it keeps its own reference
      entries_.push_back({B, threads, lanes, std::make_shared<StackPacks<S>>(signature.L * signature.D)});
    } else {
      std::rotate(it, it + 1, entries_.end());  // most recently used last
    }
    PackLease<S> lease{std::static_pointer_cast<StackPacks<S>>(entries_.back().packs), {}};
    if (!lease.packs->filled()) lease.filling = std::move(lock);
    return lease;
  }

  // Sets of packs held now.
  size_t entries() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return entries_.size();
  }

 private:
  struct Entry {
    Index B;
    int threads, lanes;
    std::shared_ptr<void> packs;  // StackPacks<S> of the signature's scalar type
  };
  mutable std::mutex mutex_;
  std::optional<PackSignature> signature_;
  std::vector<Entry> entries_;
};

}  // namespace pyrnn
