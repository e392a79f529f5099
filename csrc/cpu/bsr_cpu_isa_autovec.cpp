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
    for (int64_t o = 0; o < bo; ++o) acc[o] = accumulate ? out[m * ld_out + o] : 0.f;
    for (int64_t e = 0; e < ne; ++e) {
      const float* __restrict a = in + m * ld_in + in_off[e];
      const float* __restrict b = B[e];
      for (int64_t k = 0; k < bi; ++k) {
        const float s = a[k];
#pragma omp simd
        for (int64_t o = 0; o < bo; ++o) acc[o] += s * b[k * bo + o];
      }
    }
    if (bias)  // after the products (the last pass only), as the register-blocked kernels
      for (int64_t o = 0; o < bo; ++o) acc[o] += bias[o];
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

void transpose(const float* src, int64_t n_blocks, int64_t bn, int64_t bk, float* dst) {
  for (int64_t b = 0; b < n_blocks; ++b)
    for (int64_t n = 0; n < bn; ++n)
      for (int64_t k = 0; k < bk; ++k) dst[b * bn * bk + k * bn + n] = src[b * bn * bk + n * bk + k];
}

void dot(const float* x, int64_t ld_x, int64_t M, const float* w, const int64_t* x_off,
         int64_t ne, int64_t bn, int64_t bk, const float* bias, float* out, int64_t ld_out,
         bool gelu) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < bn; ++n) {
      float sum = 0.f;
      for (int64_t e = 0; e < ne; ++e) {
        const float* __restrict a = x + m * ld_x + x_off[e];
        const float* __restrict b = w + e * bn * bk + n * bk;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < bk; ++k) sum += a[k] * b[k];
      }
      if (bias) sum += bias[n];
      if (gelu) sum = 0.5f * sum * (1.0f + std::erf(sum * 0.70710678118654752f));
      out[m * ld_out + n] = sum;
    }
}

void tpanel(const float* xt, int64_t ld_xt, int64_t M, const float* w, const int64_t* xt_off,
            int64_t ne, int64_t bn, int64_t bk, const float* bias, float* out, int64_t ld_out,
            bool gelu) {
  alignas(64) float acc[kMaxBo];
  for (int64_t n = 0; n < bn; ++n) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxBo) {
      const int64_t mc = M - m0 < kMaxBo ? M - m0 : kMaxBo;
      for (int64_t m = 0; m < mc; ++m) acc[m] = 0.f;
      for (int64_t e = 0; e < ne; ++e)
        for (int64_t k = 0; k < bk; ++k) {
          const float s = w[e * bn * bk + n * bk + k];
          const float* __restrict b = xt + xt_off[e] + k * ld_xt + m0;
#pragma omp simd
          for (int64_t m = 0; m < mc; ++m) acc[m] += s * b[m];
        }
      for (int64_t m = 0; m < mc; ++m) {
        float v = acc[m] + (bias ? bias[n] : 0.f);
        if (gelu) v = 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
        out[(m0 + m) * ld_out + n] = v;
      }
    }
  }
}

void transpose_rows(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst,
                    int64_t ld_dst) {
  const int64_t padded = (rows + 15) / 16 * 16;
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < padded; ++r) dst[c * ld_dst + r] = r < rows ? src[r * ld_src + c] : 0.f;
}

}  // namespace

Kernels kernels_autovec() {
  return Kernels{&panel, &sdd, "autovec", &panel, &sdd, &panel, &panel, &transpose, &dot,
                 &tpanel, &transpose_rows, 16};
}

}  // namespace sparsebert_cpu
#endif
