// fp32 block kernels, included once per ISA translation unit (see bsr_cpu_kernels.h).
// The including file defines, before including this header and after its #pragma GCC target:
//   SB_VW  floats per SIMD vector (16 AVX-512, 8 AVX2, 4 SSE2)
//   SB_MT  tokens per register tile of the panel kernel
//   SB_NV  vectors per register tile (the tile is SB_MT x SB_NV*SB_VW outputs)
//   SB_NR  weight-gradient tile rows (the tile is SB_NR x SB_NV*SB_VW)
//   SB_PREFETCH  1: software-prefetch the next token tile's input rows
//   SB_KERNELS_FN, SB_NAME  the exported table getter and its name
// No torch or standard-library template is used here (see the ODR note in bsr_cpu_kernels.h).
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "bsr_cpu_kernels.h"

namespace sparsebert_cpu {
namespace {  // internal linkage: every ISA TU keeps its own copy

constexpr int VW = SB_VW;
constexpr int MT = SB_MT;
constexpr int NV = SB_NV;
constexpr int NR = SB_NR;
#ifndef SB_SDD_CHUNK
#define SB_SDD_CHUNK 128
#endif

// A GCC vector extension: one register of VW floats, compiled to zmm/ymm/xmm by the target.
typedef float vec __attribute__((vector_size(SB_VW * sizeof(float))));

inline vec load(const float* p) { vec v; std::memcpy(&v, p, sizeof v); return v; }   // vmovups
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

// Non-temporal store (p aligned to the vector size): the line goes to memory without being read
// first (no read-for-ownership) and without evicting the inputs from the caches.
inline void stream(float* p, vec v) {
#if (defined(__x86_64__) || defined(__i386__)) && SB_VW == 16
  __m512 q; std::memcpy(&q, &v, sizeof q); _mm512_stream_ps(p, q);
#elif (defined(__x86_64__) || defined(__i386__)) && SB_VW == 8
  __m256 q; std::memcpy(&q, &v, sizeof q); _mm256_stream_ps(p, q);
#elif (defined(__x86_64__) || defined(__i386__)) && SB_VW == 4
  __m128 q; std::memcpy(&q, &v, sizeof q); _mm_stream_ps(p, q);
#else
  store(p, v);
#endif
}

inline void stream_fence() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();
#endif
}

// ---- GELU epilogue (exact form, 0.5 x (1 + erf(x / sqrt 2))) ------------------------------
// erf as PyTorch's own CPU kernel computes it (at::vec::Vectorized<float>::erf, Abramowitz &
// Stegun 7.1.26, |error| < 1.5e-7), with a Cephes-style exp, so the fused forward agrees with
// nn.GELU() on CPU to fp32 rounding.
typedef int32_t ivec __attribute__((vector_size(SB_VW * sizeof(int32_t))));

inline vec vexp(vec x) {  // for x <= 0 (here -z^2): clamped at -87.3, so 2^n stays normal
  x = x < -87.3f ? vec{} - 87.3f : x;
  const vec fx = x * 1.44269504088896341f + 0.5f;
  vec n = __builtin_convertvector(__builtin_convertvector(fx, ivec), vec);
  n = n > fx ? n - 1.0f : n;  // floor (the conversion truncates toward zero)
  const vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vec p = vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vec y = p * r * r + r + 1.0f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;  // 2^n
  vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

inline vec vgelu(vec x) {
  const vec z = x * 0.70710678118654752f;
  const vec az = z < 0.0f ? -z : z;
  const vec t = 1.0f / (az * 0.3275911f + 1.0f);
  const vec r = ((((t * 1.061405429f - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t +
                 0.254829592f) * t;
  const vec e = 1.0f - r * vexp(-az * az);
  return 0.5f * x * (1.0f + (z < 0.0f ? -e : e));
}

// ---- panel: out[m, :bo] = bias + sum_e in[m, off_e : off_e + bi] @ B_e --------------------
// Register tile: T tokens x V vectors of accumulators, kept in registers over all entries e
// and all bi; per k: V loads of B, T broadcasts of `in`, T*V FMAs.
template <int T, int V, int PF>
void panel_tile(const float* in, int64_t ld_in, const float* const* B, const int64_t* in_off,
                int64_t ne, int64_t bi, int64_t bo, int64_t col0, const float* bias,
                float* out, int64_t ld_out, bool accumulate, bool gelu, bool nt) {
  vec acc[T][V];
#if SB_PREFETCH
  // PF & 2: request the next token tile's output lines for writing (rows ld_out apart: the
  // store misses then overlap this tile's FMAs instead of stalling the store buffer).
  if (PF & 2)
#pragma GCC unroll 16
    for (int i = 0; i < T; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < (V * VW + 15) / 16; ++v)
        __builtin_prefetch(out + (T + i) * ld_out + col0 + 16 * v, 1, 3);
#endif
  if (accumulate) {
#pragma GCC unroll 16
    for (int i = 0; i < T; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[i][v] = load(out + i * ld_out + col0 + v * VW);
  } else {
    vec init[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) init[v] = bias ? load(bias + col0 + v * VW) : vec{};
#pragma GCC unroll 16
    for (int i = 0; i < T; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[i][v] = init[v];
  }
  for (int64_t e = 0; e < ne; ++e) {
    const float* b = B[e] + col0;
    const float* a = in + in_off[e];
#if SB_PREFETCH
    // The next token tile's slice of `in` for this entry (rows ld_in apart, which the hardware
    // prefetcher does not follow). Prefetching past the end of `in` is harmless.
    if ((PF & 1) && col0 == 0)
#pragma GCC unroll 16
      for (int i = 0; i < T; ++i)
        for (int64_t k = 0; k < bi; k += 16) __builtin_prefetch(a + (T + i) * ld_in + k, 0, 3);
#endif
    for (int64_t k = 0; k < bi; ++k) {
      vec w[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) w[v] = load(b + k * bo + v * VW);
#pragma GCC unroll 16
      for (int i = 0; i < T; ++i) {
        const float s = a[i * ld_in + k];
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[i][v] += w[v] * s;
      }
    }
  }
  if (gelu) {
#pragma GCC unroll 16
    for (int i = 0; i < T; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[i][v] = vgelu(acc[i][v]);
  }
  if (nt) {
#pragma GCC unroll 16
    for (int i = 0; i < T; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) stream(out + i * ld_out + col0 + v * VW, acc[i][v]);
    return;
  }
#pragma GCC unroll 16
  for (int i = 0; i < T; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) store(out + i * ld_out + col0 + v * VW, acc[i][v]);
}

template <int T, int PF>
void panel_rows(const float* in, int64_t ld_in, const float* const* B, const int64_t* in_off,
                int64_t ne, int64_t bi, int64_t bo, const float* bias, float* out,
                int64_t ld_out, bool accumulate, bool gelu, bool nt) {
  int64_t c = 0;
  for (; c + NV * VW <= bo; c += NV * VW)
    panel_tile<T, NV, PF>(in, ld_in, B, in_off, ne, bi, bo, c, bias, out, ld_out, accumulate, gelu, nt);
  for (; c < bo; c += VW)  // bo is a multiple of 16, hence of VW
    panel_tile<T, 1, PF>(in, ld_in, B, in_off, ne, bi, bo, c, bias, out, ld_out, accumulate, gelu, nt);
}

// Token tail (fewer than MT rows left): a tile of exactly `rows` tokens.
template <int T, int PF>
void panel_tail(int64_t rows, const float* in, int64_t ld_in, const float* const* B,
                const int64_t* in_off, int64_t ne, int64_t bi, int64_t bo, const float* bias,
                float* out, int64_t ld_out, bool accumulate, bool gelu, bool nt) {
  if (rows == T) {
    panel_rows<T, PF>(in, ld_in, B, in_off, ne, bi, bo, bias, out, ld_out, accumulate, gelu, nt);
  } else if constexpr (T > 1) {
    panel_tail<T - 1, PF>(rows, in, ld_in, B, in_off, ne, bi, bo, bias, out, ld_out, accumulate, gelu, nt);
  }
}

template <int PF>
void panel(const float* in, int64_t ld_in, int64_t M, const float* const* B,
           const int64_t* in_off, int64_t ne, int64_t bi, int64_t bo, const float* bias,
           float* out, int64_t ld_out, bool accumulate, bool gelu, bool nt) {
  int64_t m = 0;
  for (; m + MT <= M; m += MT)
    panel_rows<MT, PF>(in + m * ld_in, ld_in, B, in_off, ne, bi, bo, bias, out + m * ld_out, ld_out,
                       accumulate, gelu, nt);
  if (m < M)
    panel_tail<MT - 1, PF>(M - m, in + m * ld_in, ld_in, B, in_off, ne, bi, bo, bias,
                           out + m * ld_out, ld_out, accumulate, gelu, nt);
  if (nt) stream_fence();  // order the streamed lines before anything that reads them
}

// ---- sdd: out[n, k] (+)= sum_m dy[m, n] x[m, k] ------------------------------------------
// Register tile: NR rows (n) x V vectors (k); per token m: V loads of x, NR broadcasts of dy.
template <int V, bool PF>
void sdd_tile(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x, int64_t M,
              float* out, int64_t ld_out, bool accumulate) {
  vec acc[NR][V];
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[i][v] = vec{};
  for (int64_t m = 0; m < M; ++m) {
#if SB_PREFETCH
    // Rows are ld_x / ld_dy apart (strided): fetch a few tokens ahead. Past the end: harmless.
    constexpr int64_t ahead = 8;
    if (PF) {
#pragma GCC unroll 8
      for (int v = 0; v < (V * VW + 15) / 16; ++v) __builtin_prefetch(x + (m + ahead) * ld_x + 16 * v, 0, 3);
      __builtin_prefetch(dy + (m + ahead) * ld_dy, 0, 3);
    }
#endif
    vec w[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) w[v] = load(x + m * ld_x + v * VW);
#pragma GCC unroll 16
    for (int i = 0; i < NR; ++i) {
      const float s = dy[m * ld_dy + i];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[i][v] += w[v] * s;
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      float* o = out + i * ld_out + v * VW;
      store(o, accumulate ? load(o) + acc[i][v] : acc[i][v]);
    }
}

// dbias (may be null): dbias[0:bn] += sum_m dy[m, 0:bn], the bias gradient of these rows, summed
// per token chunk while the chunk's dy rows are still in L1 (saves the op layer a pass over dy).
template <bool PF>
void sdd(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x, int64_t M, int64_t bn,
         int64_t bk, float* out, bool accumulate, float* dbias) {
  if (M <= 0) {
    if (!accumulate) std::memset(out, 0, sizeof(float) * bn * bk);
    return;
  }
  // Tokens in chunks so the dy / x sub-panels of one chunk (2 x 128 x 32 floats for 32 x 32
  // blocks) stay in L1 across the bn / NR row tiles.
  constexpr int64_t MC = SB_SDD_CHUNK;
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t mc = M - m0 < MC ? M - m0 : MC;
    const bool acc = accumulate || m0 > 0;
    const float* dyc = dy + m0 * ld_dy;
    const float* xc = x + m0 * ld_x;
    for (int64_t n0 = 0; n0 < bn; n0 += NR) {
      int64_t k0 = 0;
      for (; k0 + NV * VW <= bk; k0 += NV * VW)
        sdd_tile<NV, PF>(dyc + n0, ld_dy, xc + k0, ld_x, mc, out + n0 * bk + k0, bk, acc);
      for (; k0 < bk; k0 += VW)
        sdd_tile<1, PF>(dyc + n0, ld_dy, xc + k0, ld_x, mc, out + n0 * bk + k0, bk, acc);
    }
    if (dbias) {
      for (int64_t n0 = 0; n0 < bn; n0 += VW) {  // bn is a multiple of 16, hence of VW
        vec sum = load(dbias + n0);
        for (int64_t m = 0; m < mc; ++m) sum += load(dyc + m * ld_dy + n0);
        store(dbias + n0, sum);
      }
    }
  }
}

}  // namespace

Kernels SB_KERNELS_FN() {
  return Kernels{&panel<1>, &sdd<true>, SB_NAME, &panel<0>, &sdd<false>, &panel<3>, &panel<2>};
}

}  // namespace sparsebert_cpu
