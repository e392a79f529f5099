// A small caching allocator for the CPU kernels' large outputs (y, dx, dvalues).
//
// Why: a fresh multi-megabyte tensor from the default CPU allocator comes back from glibc as
// pages the kernel must fault in and zero again on first touch (measured on the 2-core dev
// machine: writing a new 2048 x 3072 fp32 tensor costs 3.1 ms against 1.2 ms for a reused one,
// ~1,200 page faults a call). At 90% block sparsity that is a quarter of a forward. The same
// shapes recur every step, so freed blocks are kept by size and handed out again, as the CUDA
// caching allocator does on GPUs.
//
// Only blocks of at least 1 MiB are pooled (smaller ones are cheap to allocate). The memory held
// while no tensor uses it is capped by SPARSEBERT_CPU_POOL_MB (default 256; 0 turns pooling
// off), the oldest free blocks released first. torch.ops.sparsebert_cpu.empty_cache() releases
// everything idle; pool_stats() reports (held idle bytes, hits, misses).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace sparsebert_cpu {

// Like at::empty(sizes, dtype on CPU), with storage from the pool.
at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype = at::kFloat);
// `t` as `dtype` (itself when it already is), a converted copy in pooled storage.
at::Tensor pooled_to(const at::Tensor& t, at::ScalarType dtype);

void pool_empty_cache();
std::tuple<int64_t, int64_t, int64_t> pool_stats();

}  // namespace sparsebert_cpu
