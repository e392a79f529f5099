// Comparison kernels: the same products written as plain loops (one token at a time, the
// output row of a block accumulated in a stack array) and left to GCC's auto-vectoriser
// (`#pragma omp simd`), AVX-512 target. Selected only with SPARSEBERT_CPU_ISA=autovec; kept
// so the benchmark can show what the register-blocked micro-kernel buys (benchmarks/RESULTS.md, CPU section).
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#include <cmath>
#include <cstdint>
#include <cstring>

#include "bsr_cpu_kernels.h"

namespace sparsebert_cpu {
namespace {

constexpr int64_t kMaxBo = 1024;  // the binding limits blocks to 256

void panel(const float* in, int64_t ld_in, int64_t M, const float* const* B,
           const int64_t* in_off, int64_t ne, int64_t bi, int64_t bo, const float* bias,
           float* out, int64_t ld_out, bool accumulate, bool gelu, bool /*nt: plain stores*/) {
  alignas(64) float acc[kMaxBo];
  for (int64_t m = 0; m < M; ++m) {
#pragma omp simd
    for (int64_t o = 0; o < bo; ++o) acc[o] = accumulate ? out[m * ld_out + o] : bias ? bias[o] : 0.f;
    for (int64_t e = 0; e < ne; ++e) {
      const float* __restrict a = in + m * ld_in + in_off[e];
      const float* __restrict b = B[e];
      for (int64_t k = 0; k < bi; ++k) {
        const float s = a[k];
#pragma omp simd
        for (int64_t o = 0; o < bo; ++o) acc[o] += s * b[k * bo + o];
      }
    }
    if (gelu)
      for (int64_t o = 0; o < bo; ++o) acc[o] = 0.5f * acc[o] * (1.0f + std::erf(acc[o] * 0.70710678118654752f));
    std::memcpy(out + m * ld_out, acc, sizeof(float) * bo);
  }
}

void sdd(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x, int64_t M, int64_t bn,
         int64_t bk, float* out, bool accumulate, float* dbias) {
  if (!accumulate) std::memset(out, 0, sizeof(float) * bn * bk);
  for (int64_t m = 0; m < M; ++m) {
    const float* __restrict xr = x + m * ld_x;
    for (int64_t n = 0; n < bn; ++n) {
      const float s = dy[m * ld_dy + n];
      if (dbias) dbias[n] += s;
      float* __restrict o = out + n * bk;
#pragma omp simd
      for (int64_t k = 0; k < bk; ++k) o[k] += s * xr[k];
    }
  }
}

}  // namespace

Kernels kernels_autovec() { return Kernels{&panel, &sdd, "autovec", &panel, &sdd, &panel, &panel}; }

}  // namespace sparsebert_cpu
#endif
