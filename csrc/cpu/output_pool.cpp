// Caching allocator for the CPU kernels' large outputs; see output_pool.h for why.
#include "output_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#include <list>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace sparsebert_cpu {
namespace {

constexpr size_t kMinPooled = size_t(1) << 20;  // smaller blocks: the default allocator
constexpr size_t kGranule = size_t(1) << 18;    // sizes rounded up to 256 KiB, so a few tokens
                                                 // more or less still hit the same block

size_t idle_limit() {
  static const size_t limit = [] {
    const char* env = std::getenv("SPARSEBERT_CPU_POOL_MB");
    const long long mb = (env && env[0] != '\0') ? std::atoll(env) : 256;
    return mb > 0 ? size_t(mb) << 20 : size_t(0);
  }();
  return limit;
}

struct Pool {
  std::mutex mu;
  std::unordered_map<void*, size_t> live;   // handed out: pointer -> rounded size
  std::list<std::pair<size_t, void*>> idle;  // free blocks, most recently freed first
  size_t idle_bytes = 0;
  int64_t hits = 0, misses = 0;
};

Pool& pool();

// fork() while another thread holds the lock would leave it locked forever in the child (a
// DataLoader worker freeing a pooled tensor would hang): hold it across fork, as malloc does.
void lock_for_fork() { pool().mu.lock(); }
void unlock_after_fork() { pool().mu.unlock(); }

// Never destroyed: tensors holding pool blocks may be freed during static destruction.
Pool& pool() {
  static Pool* p = [] {
    Pool* q = new Pool();
#if defined(__unix__) || defined(__APPLE__)
    pthread_atfork(&lock_for_fork, &unlock_after_fork, &unlock_after_fork);
#endif
    return q;
  }();
  return *p;
}

void release(void* ptr) {
  Pool& p = pool();
  std::vector<void*> to_free;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    auto it = p.live.find(ptr);
    if (it == p.live.end()) {  // cannot happen: only pool blocks carry this deleter
      to_free.push_back(ptr);
    } else {
      const size_t n = it->second;
      p.live.erase(it);
      p.idle.emplace_front(n, ptr);
      p.idle_bytes += n;
      while (p.idle_bytes > idle_limit() && !p.idle.empty()) {
        p.idle_bytes -= p.idle.back().first;
        to_free.push_back(p.idle.back().second);
        p.idle.pop_back();
      }
    }
  }
  for (void* q : to_free) c10::free_cpu(q);  // outside the lock: munmap can be slow
}

void* acquire(size_t n) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    for (auto it = p.idle.begin(); it != p.idle.end(); ++it) {
      if (it->first != n) continue;
      void* q = it->second;
      p.idle_bytes -= n;
      p.idle.erase(it);
      p.live.emplace(q, n);
      ++p.hits;
      return q;
    }
    ++p.misses;
  }
  void* q = c10::alloc_cpu(n);
  std::lock_guard<std::mutex> lock(p.mu);
  p.live.emplace(q, n);
  return q;
}

struct PoolAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinPooled || idle_limit() == 0) return c10::GetDefaultCPUAllocator()->allocate(n);
    void* q = acquire((n + kGranule - 1) / kGranule * kGranule);
    return {q, q, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  static PoolAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

at::Tensor pooled_to(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t;
  at::Tensor out = pooled_empty(t.sizes(), dtype);
  out.copy_(t);
  return out;
}

void pool_empty_cache() {
  Pool& p = pool();
  std::vector<void*> to_free;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    for (const auto& e : p.idle) to_free.push_back(e.second);
    p.idle.clear();
    p.idle_bytes = 0;
  }
  for (void* q : to_free) c10::free_cpu(q);
}

std::tuple<int64_t, int64_t, int64_t> pool_stats() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  return {int64_t(p.idle_bytes), p.hits, p.misses};
}

}  // namespace sparsebert_cpu
