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

// ---- GELU epilogue (exact form, x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))) ---------------------
// PyTorch's fp32 GELU on CPU runs oneDNN's gelu_erf (6.2e-8 relative error on N(0, 1) inputs,
// rounding alone is 2.5e-8). The Abramowitz & Stegun 7.1.26 erf used here before (|error| 1.5e-7,
// as at::vec::Vectorized<float>::erf) cost 2.8x PyTorch's error on gelu(bias) alone. Two own fits,
// both 3.0e-8 on N(0, 1) inputs, no division:
//  * AVX-512 and AVX2 (vgelu, table form): gelu = h + |h| E(|x|), h = x / 2, E(a) = erf(a / sqrt 2)
//    from a table of one polynomial piece per vector lane (benchmarks/gelu_table_fit.py; AVX-512:
//    16 pieces of degree 5, AVX2: 8 of degree 7; |error| <= 3.4e-8, about the float32 rounding
//    of E itself), each lane's coefficients picked by vpermps. About 22 (AVX2 ~26) instructions
//    per vector instead of ~50: the polynomial form below cost 1.6 ns per output element in the
//    AVX-512 panel tile, this one ~0.2 (benchmarks/RESULTS.md, "GELU epilogue, table").
//    Negative tail: h (1 - E) cancels, so it is accurate to |h| * 3e-8 absolutely, not relatively
//    (as oneDNN's 0.5 x (1 + erf)); beyond the clamp (5.9, AVX2 6.1) it gives 0 or x exactly.
//  * SSE2 and other (vgelu, polynomial form, <= 1.3 ulp for x >= 0):
//    - |x| <= sqrt 2: gelu = h + h * x P(x^2); P of degree 6 fits erf(x / sqrt 2) / x to 1.2e-9
//      relative.
//    - |x| >  sqrt 2: E = erfc(|x| / sqrt 2) = exp(-x^2 / 2 + R(|x|)), R of degree 9 in
//      |x| - 3 sqrt 2 fits log erfc(|x| / sqrt 2) + x^2 / 2 on [sqrt 2, 5 sqrt 2] to 1.1e-8
//      (clamped beyond, where E < 1e-12); gelu = x - h E for x > 0, h E for x < 0 (no
//      cancellation in the negative tail).
//    - |x| > 10: x or 0 (so +-inf give +inf and 0, not inf - inf).
typedef int32_t ivec __attribute__((vector_size(SB_VW * sizeof(int32_t))));

// Exact replacements of the selects they stand for (the same result for every input, NaN included),
// one instruction each where the ISA has it instead of a compare and a blend:
//   vmin(a, b) = a < b ? a : b, vmax(a, b) = a > b ? a : b (minps / maxps are defined so).
//   The polynomial vgelu built on them was checked bit for bit over all 2^32 inputs against its
//   compare-and-blend form (SSE2 build): the same results.
inline vec vmin(vec a, vec b) {
#if (defined(__x86_64__) || defined(__i386__)) && SB_VW == 16
  return (vec)_mm512_mask_min_ps((__m512)a, 0xffff, (__m512)a, (__m512)b);  // masked: no -Wmaybe-uninitialized (GCC 12)
#elif (defined(__x86_64__) || defined(__i386__)) && SB_VW == 8
  return (vec)_mm256_min_ps((__m256)a, (__m256)b);
#elif (defined(__x86_64__) || defined(__i386__)) && SB_VW == 4
  return (vec)_mm_min_ps((__m128)a, (__m128)b);
#else
  return a < b ? a : b;
#endif
}

inline vec vmax(vec a, vec b) {
#if (defined(__x86_64__) || defined(__i386__)) && SB_VW == 16
  return (vec)_mm512_mask_max_ps((__m512)a, 0xffff, (__m512)a, (__m512)b);
#elif (defined(__x86_64__) || defined(__i386__)) && SB_VW == 8
  return (vec)_mm256_max_ps((__m256)a, (__m256)b);
#elif (defined(__x86_64__) || defined(__i386__)) && SB_VW == 4
  return (vec)_mm_max_ps((__m128)a, (__m128)b);
#else
  return a > b ? a : b;
#endif
}

inline vec vabs(vec x) {  // x < 0 ? -x : x, except +0 for -0 (vgelu only compares and clamps it)
  ivec b;
  std::memcpy(&b, &x, sizeof b);
  b &= 0x7fffffff;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// Always inlined: a call clobbers every vector register (all caller-saved), the panel tile's
// 16 accumulators included.
#if (defined(__x86_64__) || defined(__i386__)) && (SB_VW == 16 || SB_VW == 8)
#if SB_VW == 16
// benchmarks/gelu_table_fit.py 5 5.7 16: worst |table - erf(a / sqrt 2)| = 3.41e-08
constexpr float kGeluScale = 2.543859720e+00f;
constexpr float kGeluClamp = 5.896551609e+00f;  // the last piece (E = 1) from here on
constexpr int kGeluDeg = 5;
alignas(64) const float gt_coef[6][16] = {  // [power of t][piece]
    {8.771510566e-17f, 3.057568967e-01f, 5.682536960e-01f, 7.617253661e-01f, 8.841453791e-01f, 9.506456256e-01f, 9.816570282e-01f, 9.940717816e-01f, 9.983381629e-01f, 9.995967150e-01f, 9.999154210e-01f, 9.999846816e-01f, 9.999976158e-01f, 9.999997020e-01f, 9.999999404e-01f, 1.000000000e+00f},
    {3.136511445e-01f, 2.903294265e-01f, 2.302626967e-01f, 1.564748138e-01f, 9.110739082e-02f, 4.545180500e-02f, 1.942839660e-02f, 7.115593646e-03f, 2.232922707e-03f, 6.003778544e-04f, 1.383133931e-04f, 2.730187771e-05f, 4.617530522e-06f, 6.691389558e-07f, 8.308308708e-08f, 0.000000000e+00f},
    {-1.361757929e-15f, -2.243151702e-02f, -3.558189422e-02f, -3.626994416e-02f, -2.815799788e-02f, -1.756002568e-02f, -9.007395245e-03f, -3.848961322e-03f, -1.380354282e-03f, -4.173077177e-04f, -1.068833590e-04f, -2.311001299e-05f, -4.381870895e-06f, -1.046834768e-06f, 2.665880459e-07f, 0.000000000e+00f},
    {-8.077912964e-03f, -6.321859080e-03f, -2.264771610e-03f, 1.574687543e-03f, 3.455077764e-03f, 3.351781517e-03f, 2.283320995e-03f, 1.204427215e-03f, 5.112583167e-04f, 1.780801249e-04f, 5.148113996e-05f, 1.244229225e-05f, 2.526558774e-06f, 4.325919463e-07f, 6.261706176e-08f, 0.000000000e+00f},
    {4.438960440e-15f, 8.140641148e-04f, 1.083570765e-03f, 7.490466814e-04f, 1.939702342e-04f, -1.899183408e-04f, -2.939521801e-04f, -2.249231038e-04f, -1.223562431e-04f, -5.210017844e-05f, -1.727440031e-05f, -5.063567187e-06f, -7.624475415e-07f, 9.891074342e-07f, -1.168699555e-06f, 0.000000000e+00f},
    {1.857409661e-04f, 1.203544598e-04f, -1.442978737e-05f, -1.051277068e-04f, -1.031595093e-04f, -4.763371544e-05f, 1.848932470e-06f, 2.087341090e-05f, 1.837691889e-05f, 1.013454130e-05f, 4.138205895e-06f, 1.324901177e-06f, 3.418985841e-07f, 7.224592480e-08f, 1.262702742e-08f, 0.000000000e+00f},
};
#else
// benchmarks/gelu_table_fit.py 7 5.7 8: worst |table - erf(a / sqrt 2)| = 2.92e-08
constexpr float kGeluScale = 1.140350819e+00f;
constexpr float kGeluClamp = 6.138462067e+00f;  // the last piece (E = 1) from here on
constexpr int kGeluDeg = 7;
alignas(64) const float gt_coef[8][8] = {  // [power of t][piece]
    {-1.122289009e-16f, 6.194716096e-01f, 9.205431342e-01f, 9.914808273e-01f, 9.995480180e-01f, 9.999883771e-01f, 9.999998808e-01f, 1.000000000e+00f},
    {6.996834278e-01f, 4.763395488e-01f, 1.503009498e-01f, 2.198046818e-02f, 1.489849412e-03f, 4.680337588e-05f, 6.814507287e-07f, 0.000000000e+00f},
    {3.580469254e-15f, -1.831509173e-01f, -1.155806333e-01f, -2.535451576e-02f, -2.292279853e-03f, -8.986432658e-05f, -2.326634331e-06f, 0.000000000e+00f},
    {-8.967490494e-02f, -1.410334185e-02f, 3.999049589e-02f, 1.668019220e-02f, 2.158426447e-03f, 1.093257524e-04f, 2.331283213e-06f, 0.000000000e+00f},
    {-2.845704426e-14f, 2.617609501e-02f, -5.563190207e-04f, -6.370109972e-03f, -1.359243412e-03f, -9.434746607e-05f, 3.538965302e-06f, 0.000000000e+00f},
    {1.033669058e-02f, -2.395456191e-03f, -4.440824967e-03f, 1.014732756e-03f, 5.918613751e-04f, 5.929932740e-05f, 2.015784503e-06f, 0.000000000e+00f},
    {6.432637219e-14f, -2.309246920e-03f, 1.141064917e-03f, 2.709710097e-04f, -1.766862551e-04f, -2.744246012e-05f, -1.511415576e-05f, 0.000000000e+00f},
    {-9.079242009e-04f, 4.541224625e-04f, 1.494814205e-04f, -1.762699685e-04f, 1.552281719e-05f, 1.036173126e-05f, 7.271974596e-07f, 0.000000000e+00f},
};
#endif

// table[k] for the piece index k in the low 4 (AVX2: 3) bits of each lane of idx (vpermps).
__attribute__((always_inline)) inline vec vpick(const float* table, vec idx) {
#if SB_VW == 16
  const __m512 t = _mm512_load_ps(table);
  return (vec)_mm512_mask_permutexvar_ps(t, 0xffff, (__m512i)idx, t);  // masked: no -Wmaybe-uninitialized
#else
  return (vec)_mm256_permutevar8x32_ps(_mm256_load_ps(table), (__m256i)idx);
#endif
}

__attribute__((always_inline)) inline vec vgelu(vec x) {
  const vec xc = vmax(vec{} - kGeluClamp, x);  // below: E = 1, h + |h| = 0 (and -inf gives 0, not nan)
  const vec h = 0.5f * xc;
  const vec a = vmin(vabs(xc), vec{} + kGeluClamp);  // above: the last piece, E = 1, h + |h| = x (+inf too)
  const vec y = a * kGeluScale + 8388608.0f;  // 2^23 + round(a * scale): k in the low mantissa bits
  const vec t = a * kGeluScale - (y - 8388608.0f);  // |t| <= 1/2
  vec e = vpick(gt_coef[kGeluDeg], y);
#pragma GCC unroll 8
  for (int j = kGeluDeg - 1; j >= 0; --j) e = e * t + vpick(gt_coef[j], y);
  return vabs(h) * e + h;  // h (1 + erf(x / sqrt 2)), erf odd
}
#else
// c[0] x^(N-1) + ... + c[N-1], highest power first (p * x - c and p * x + (-c) round alike)
template <int N>
__attribute__((always_inline)) inline vec horner(vec x, const float (&c)[N]) {
  vec p = vec{} + c[0];
#pragma GCC unroll 16
  for (int j = 1; j < N; ++j) p = p * x + c[j];
  return p;
}

inline vec vfloor(vec x) {  // for |x| < 2^31
  const vec n = __builtin_convertvector(__builtin_convertvector(x, ivec), vec);
  return n > x ? n - 1.0f : n;  // the conversion truncates toward zero
}

inline vec vldexp(vec y, vec n) {  // y * 2^n for integral n in [-126, 127]
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;  // 2^n
  vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

__attribute__((always_inline)) inline vec vexp(vec x) {  // for x <= 0 (here -z^2): clamped at -87.3, so 2^n stays normal
  x = vmax(vec{} - 87.3f, x);  // x < -87.3 ? -87.3 : x
  const vec fx = x * 1.44269504088896341f + 0.5f;
  const vec n = vfloor(fx);
  const vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  static constexpr float c[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  const vec y = horner(r, c) * r * r + r + 1.0f;
  return vldexp(y, n);
}

__attribute__((always_inline)) inline vec vgelu(vec x) {
  const vec ax = vabs(x);
  const vec h = 0.5f * x;
  const vec s = x * x;
  static constexpr float cp[] = {8.677357073e-07f, -1.770018571e-05f, 2.292938298e-04f,
                                 -2.373564057e-03f, 1.994674839e-02f, -1.329807192e-01f,
                                 7.978845835e-01f};
  const vec small = h * (x * horner(s, cp)) + h;
  const vec u = vmin(ax, vec{} + 7.071067812f) - 4.242640687f;
  static constexpr float cr[] = {-4.780088769e-09f, 7.042984862e-08f, -6.421403214e-07f,
                                 5.369264727e-06f, -4.337858263e-05f, 3.383603180e-04f,
                                 -2.620585728e-03f, 2.130286396e-02f, -2.147862613e-01f,
                                 -1.720363021e+00f};
  const vec q = horner(u, cr) - h * x;  // -x^2 / 2 + R, one rounding (FMA)
  const vec he = h * vexp(q);  // vexp clamps q at -87.3
  const vec big = x > 0.0f ? x - he : he;
  const vec g = ax <= 1.414213562f ? small : big;
  return ax > 10.0f ? vmax(x, vec{}) : g;  // x > 0 ? x : 0
}
#endif

// GELU in place over a finished [M, n] output block (n a multiple of VW), 4 independent vectors
// per step. vgelu is one dependent chain (~30 FMAs in the polynomial form); dot finishes one vector at a time behind
// a lane reduction, and applying it there ran those chains back to back (latency-bound).
// The block is still in L1/L2; the result is bitwise the same.
inline void gelu_block(float* out, int64_t ld_out, int64_t M, int64_t n) {
  const int64_t nv = n / VW, total = M * nv;
  int64_t q = 0;
  for (; q + 4 <= total; q += 4) {
    float* p[4];
    vec v[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      p[i] = out + (q + i) / nv * ld_out + (q + i) % nv * VW;
      v[i] = load(p[i]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) v[i] = vgelu(v[i]);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) store(p[i], v[i]);
  }
  for (; q < total; ++q) {
    float* p = out + q / nv * ld_out + q % nv * VW;
    store(p, vgelu(load(p)));
  }
}

// ---- panel: out[m, :bo] = bias + sum_e in[m, off_e : off_e + bi] @ B_e --------------------
// Register tile: T tokens x V vectors of accumulators, kept in registers over all entries e
// and all bi; per k: V loads of B, T broadcasts of `in`, T*V FMAs.
//
// Accuracy (tests/backend_harness.py holds the kernel to 2x PyTorch's fp32 error):
//  * the accumulators start from 0 (or the partial sum of an earlier input group) and the bias
//    is added once, after the last product, as oneDNN's GEMM does. Starting them from the bias
//    rounded every FMA at the bias's magnitude: 3.55x PyTorch's error on bias-dominated outputs.
//  * a tile with few accumulators (small T * V: one token at M = 1, the token tail) sums the k of
//    each block into S interleaved chains (k mod S), added pairwise at the end: a single chain
//    of N FMAs cost 1.6-2.3x PyTorch's error at M = 1 (grad_input over N = 256), and it is also
//    latency-bound (one dependent FMA per cycle pair instead of a full pipe).
#ifndef SB_CHAINS
#define SB_CHAINS 16  // accumulator vectors a tile should have at least (half the register file)
#endif
constexpr int chains_for(int tv) {
  int s = 1;
  while (s < 8 && 2 * s * tv <= SB_CHAINS) s *= 2;  // a power of 2 <= 8: divides bi (16 | bi)
  return s;
}

template <int T, int V, int PF>
void panel_tile(const float* in, int64_t ld_in, const float* const* B, const int64_t* in_off,
                int64_t ne, int64_t bi, int64_t bo, int64_t col0, const float* bias,
                float* out, int64_t ld_out, bool accumulate, bool gelu, bool nt) {
  constexpr int S = chains_for(T * V);
  vec acc[S][T][V];
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
#pragma GCC unroll 8
  for (int c = 0; c < S; ++c)
#pragma GCC unroll 16
    for (int i = 0; i < T; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v)
        acc[c][i][v] = (c == 0 && accumulate) ? load(out + i * ld_out + col0 + v * VW) : vec{};
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
    for (int64_t k0 = 0; k0 < bi; k0 += S) {
#pragma GCC unroll 8
      for (int c = 0; c < S; ++c) {
        const int64_t k = k0 + c;
        vec w[V];
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) w[v] = load(b + k * bo + v * VW);
#pragma GCC unroll 16
        for (int i = 0; i < T; ++i) {
          const float s = a[i * ld_in + k];
#pragma GCC unroll 8
          for (int v = 0; v < V; ++v) acc[c][i][v] += w[v] * s;
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int h = S / 2; h >= 1; h /= 2)  // pairwise: chain c += chain c + h
#pragma GCC unroll 8
    for (int c = 0; c < h; ++c)
#pragma GCC unroll 16
      for (int i = 0; i < T; ++i)
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[c][i][v] += acc[c + h][i][v];
  if (bias) {  // only on the last pass (run_panels passes no bias to the earlier ones)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const vec bv = load(bias + col0 + v * VW);
#pragma GCC unroll 16
      for (int i = 0; i < T; ++i) acc[0][i][v] += bv;
    }
  }
  if (gelu) {  // GELU and store one accumulator at a time: each dies at its store (no spills)
#pragma GCC unroll 16
    for (int i = 0; i < T; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        const vec g = vgelu(acc[0][i][v]);
        float* o = out + i * ld_out + col0 + v * VW;
        if (nt) stream(o, g); else store(o, g);
      }
    return;
  }
  if (nt) {
#pragma GCC unroll 16
    for (int i = 0; i < T; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) stream(out + i * ld_out + col0 + v * VW, acc[0][i][v]);
    return;
  }
#pragma GCC unroll 16
  for (int i = 0; i < T; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) store(out + i * ld_out + col0 + v * VW, acc[0][i][v]);
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

// ---- dot: the forward without transposed weights (few tokens) ------------------------------
//   out[m, n] = bias[n] + sum_e x[m, x_off[e] : x_off[e] + bk] . W_e[n, 0:bk]
// for one block row: W_e = w + e * bn * bk are its kept blocks as stored ([bn, bk] row-major,
// so row n of a block is contiguous in k). Register tile: DT tokens x DU outputs, DT * DU = VW,
// each (token, output) a vector of VW k-lanes accumulated over every kept block of the row;
// one horizontal reduction per tile at the end (reduce_lanes: the VW accumulators -> one vector
// of their sums, DU outputs of each token side by side), then bias, GELU and the stores.
// Per k-vector: DT loads of x, DU loads of W, VW FMAs. Loop order: DU output rows outer, the
// tokens inner, so that slice of W (DU rows of every kept block of the row) is reused from L1
// across all tokens and W is read from memory once per call.
#ifndef SB_DOT_T
#define SB_DOT_T (SB_VW >= 16 ? 4 : 2)
#endif
constexpr int DT = SB_DOT_T;
constexpr int DU = VW / DT;

// c[j] = a[j] + a[j + H] where (j & H) == 0, b[j - H] + b[j] elsewhere: a and b folded by H,
// side by side (two-input shuffles: vpermt2ps on AVX-512). The same masks as transpose_stage.
template <int H>
inline vec fold_pair(vec a, vec b) {
  ivec lo, hi;
#pragma GCC unroll 16
  for (int j = 0; j < VW; ++j) {
    lo[j] = (j & H) ? VW + j - H : j;
    hi[j] = (j & H) ? VW + j : j + H;
  }
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}

template <int H>
inline void fold_level(vec* v, int n) {  // n vectors -> n / 2
#pragma GCC unroll 16
  for (int i = 0; i < n / 2; ++i) v[i] = fold_pair<H>(v[2 * i], v[2 * i + 1]);
}

constexpr int bit_reverse(int j, int bits) {
  int r = 0;
  for (int b = 0; b < bits; ++b) r |= ((j >> b) & 1) << (bits - 1 - b);
  return r;
}

// Lane i of the result = the sum of the VW lanes of acc[i]. log2(VW) levels of fold_pair; the
// level of fold H decides bit log2(VW / H) - 1 of which input a lane ends up holding, so feeding
// the inputs in bit-reversed order puts acc[i] in lane i.
inline vec reduce_lanes(const vec* acc) {
  constexpr int bits = VW == 16 ? 4 : VW == 8 ? 3 : VW == 4 ? 2 : 1;
  vec v[VW];
#pragma GCC unroll 16
  for (int i = 0; i < VW; ++i) v[i] = acc[bit_reverse(i, bits)];
  if constexpr (VW >= 16) fold_level<VW / 2>(v, VW);
  if constexpr (VW >= 8) fold_level<VW >= 16 ? 4 : VW / 2>(v, VW >= 16 ? VW / 2 : VW);
  if constexpr (VW >= 4) fold_level<2>(v, 4);
  fold_level<1>(v, 2);
  return v[0];
}

// BK > 0: the block width known at compile time (the W rows of a tile are then immediate
// offsets from one pointer); 0: bk at run time.
template <int BK>
void dot_bk(const float* x, int64_t ld_x, int64_t M, const float* w, const int64_t* x_off,
            int64_t ne, int64_t bn, int64_t bk_rt, const float* bias, float* out,
            int64_t ld_out) {
  const int64_t bk = BK > 0 ? BK : bk_rt;
  const int64_t stride = bn * bk;  // between the kept blocks of the row
  for (int64_t n0 = 0; n0 < bn; n0 += DU) {  // bn is a multiple of 16, hence of DU
    const float* wn = w + n0 * bk;
    vec b = vec{};  // lane t * DU + u: bias[n0 + u]
    if (bias)
#pragma GCC unroll 16
      for (int i = 0; i < VW; ++i) b[i] = bias[n0 + i % DU];
    for (int64_t m = 0; m < M; m += DT) {
      const int64_t rows = M - m < DT ? M - m : DT;
      const float* xr[DT];  // past the last token: repeat it (computed, not stored)
#pragma GCC unroll 16
      for (int t = 0; t < DT; ++t) xr[t] = x + (m + (t < rows ? t : rows - 1)) * ld_x;
      vec acc[VW];  // acc[t * DU + u]
#pragma GCC unroll 16
      for (int i = 0; i < VW; ++i) acc[i] = vec{};
      for (int64_t e = 0; e < ne; ++e) {
        const int64_t o = x_off[e];
        const float* we = wn + e * stride;
#pragma GCC unroll 4
        for (int64_t k = 0; k < bk; k += VW) {
          vec xv[DT];
#pragma GCC unroll 16
          for (int t = 0; t < DT; ++t) xv[t] = load(xr[t] + o + k);
#pragma GCC unroll 16
          for (int u = 0; u < DU; ++u) {
            const vec wv = load(we + u * bk + k);
#pragma GCC unroll 16
            for (int t = 0; t < DT; ++t) acc[t * DU + u] += xv[t] * wv;
          }
        }
      }
      const vec r = reduce_lanes(acc) + b;
      float lanes[VW];
      store(lanes, r);
      for (int t = 0; t < rows; ++t)
        std::memcpy(out + (m + t) * ld_out + n0, lanes + t * DU, sizeof(float) * DU);
    }
  }
}

void dot(const float* x, int64_t ld_x, int64_t M, const float* w, const int64_t* x_off,
         int64_t ne, int64_t bn, int64_t bk, const float* bias, float* out, int64_t ld_out,
         bool gelu) {
  switch (bk) {
    case 16: dot_bk<16>(x, ld_x, M, w, x_off, ne, bn, bk, bias, out, ld_out); break;
    case 32: dot_bk<32>(x, ld_x, M, w, x_off, ne, bn, bk, bias, out, ld_out); break;
    case 64: dot_bk<64>(x, ld_x, M, w, x_off, ne, bn, bk, bias, out, ld_out); break;
    default: dot_bk<0>(x, ld_x, M, w, x_off, ne, bn, bk, bias, out, ld_out);
  }
  if (gelu) gelu_block(out, ld_out, M, bn);
}

// ---- transpose: dst block [bk, bn] = src block [bn, bk]^T, for n_blocks consecutive blocks ----
// VW x VW tiles transposed in registers: log2(VW) stages, each swapping the off-diagonal
// sub-blocks of size S of every 2S x 2S block with two-input shuffles (vpermt2ps on AVX-512).
template <int S>
inline void transpose_stage(vec* r) {
  ivec lo, hi;
#pragma GCC unroll 16
  for (int j = 0; j < VW; ++j) {
    lo[j] = (j & S) ? VW + j - S : j;
    hi[j] = (j & S) ? VW + j : j + S;
  }
#pragma GCC unroll 16
  for (int i = 0; i < VW; ++i) {
    if (i & S) continue;
    const vec a = r[i], b = r[i + S];
    r[i] = __builtin_shuffle(a, b, lo);
    r[i + S] = __builtin_shuffle(a, b, hi);
  }
}

inline void transpose_tile(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  vec r[VW];
#pragma GCC unroll 16
  for (int i = 0; i < VW; ++i) r[i] = load(src + i * ld_src);
  if constexpr (VW >= 16) transpose_stage<8>(r);
  if constexpr (VW >= 8) transpose_stage<4>(r);
  transpose_stage<2>(r);
  transpose_stage<1>(r);
#pragma GCC unroll 16
  for (int i = 0; i < VW; ++i) store(dst + i * ld_dst, r[i]);
}

void transpose(const float* src, int64_t n_blocks, int64_t bn, int64_t bk, float* dst) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    const float* s = src + b * bn * bk;
    float* d = dst + b * bn * bk;
    for (int64_t n0 = 0; n0 < bn; n0 += VW)    // bn, bk: multiples of 16, hence of VW
      for (int64_t k0 = 0; k0 < bk; k0 += VW) transpose_tile(s + n0 * bk + k0, bk, d + k0 * bn + n0, bn);
  }
}

// dst[c, r] = src[r, c] for r < rows, c < cols (cols a multiple of VW); dst columns rows ..
// round_up(rows, VW) - 1 are zeroed. For the input of tpanel: x [M, K] -> xt [K, Mp].
void transpose_rows(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst,
                    int64_t ld_dst) {
  static const float zeros[VW] = {};
  for (int64_t r0 = 0; r0 < rows; r0 += VW) {
    if (r0 + VW <= rows) {
      for (int64_t c0 = 0; c0 < cols; c0 += VW)
        transpose_tile(src + r0 * ld_src + c0, ld_src, dst + c0 * ld_dst + r0, ld_dst);
      continue;
    }
    for (int64_t c0 = 0; c0 < cols; c0 += VW) {
      vec r[VW];
#pragma GCC unroll 16
      for (int i = 0; i < VW; ++i) r[i] = load(r0 + i < rows ? src + (r0 + i) * ld_src + c0 : zeros);
      if constexpr (VW >= 16) transpose_stage<8>(r);
      if constexpr (VW >= 8) transpose_stage<4>(r);
      transpose_stage<2>(r);
      transpose_stage<1>(r);
#pragma GCC unroll 16
      for (int i = 0; i < VW; ++i) store(dst + (c0 + i) * ld_dst + r0, r[i]);
    }
  }
}

// ---- tpanel: the forward without transposed weights, tokens in the vector lanes ---------------
//   out[m, n] = bias[n] + sum_e sum_k W_e[n, k] * xt[xt_off[e] + k * ld_xt + m]
// for one block row, m < M, n < bn: W_e = w + e * bn * bk its kept blocks as stored, xt the input
// transposed ([K, ld_xt], ld_xt a multiple of VW, zero past M), xt_off[e] = (first column of block
// e) * ld_xt. Register tile: VW outputs (rows of W, broadcast from memory) x VW tokens (one
// vector of xt); the finished tile is transposed in registers (transpose_tile's stages) so each
// token's VW outputs are one contiguous store, with bias and GELU. Per k: 1 load of xt, VW
// broadcasts of W, VW FMAs. W is read as stored, once per call for each VW-token column.
template <int BK>
void tpanel_bk(const float* xt, int64_t ld_xt, int64_t M, const float* w, const int64_t* xt_off,
               int64_t ne, int64_t bn, int64_t bk_rt, const float* bias, float* out,
               int64_t ld_out, bool gelu) {
  const int64_t bk = BK > 0 ? BK : bk_rt;
  const int64_t stride = bn * bk;
  for (int64_t n0 = 0; n0 < bn; n0 += VW) {  // bn is a multiple of 16, hence of VW
    const float* wn = w + n0 * bk;
    const vec b = bias ? load(bias + n0) : vec{};
    for (int64_t m0 = 0; m0 < M; m0 += VW) {
      vec acc[VW];
#pragma GCC unroll 16
      for (int i = 0; i < VW; ++i) acc[i] = vec{};
      for (int64_t e = 0; e < ne; ++e) {
        const float* a = wn + e * stride;
        const float* xb = xt + xt_off[e] + m0;
#pragma GCC unroll 4
        for (int64_t k = 0; k < bk; ++k) {
          const vec xv = load(xb + k * ld_xt);
#pragma GCC unroll 16
          for (int i = 0; i < VW; ++i) acc[i] += xv * a[i * bk + k];
        }
      }
      if constexpr (VW >= 16) transpose_stage<8>(acc);
      if constexpr (VW >= 8) transpose_stage<4>(acc);
      transpose_stage<2>(acc);
      transpose_stage<1>(acc);
      const int64_t rows = M - m0 < VW ? M - m0 : VW;
      for (int64_t j = 0; j < rows; ++j) {  // up to VW independent chains (a post-pass measured no gain)
        vec r = acc[j] + b;
        if (gelu) r = vgelu(r);
        store(out + (m0 + j) * ld_out + n0, r);
      }
    }
  }
}

void tpanel(const float* xt, int64_t ld_xt, int64_t M, const float* w, const int64_t* xt_off,
            int64_t ne, int64_t bn, int64_t bk, const float* bias, float* out, int64_t ld_out,
            bool gelu) {
  switch (bk) {
    case 16: return tpanel_bk<16>(xt, ld_xt, M, w, xt_off, ne, bn, bk, bias, out, ld_out, gelu);
    case 32: return tpanel_bk<32>(xt, ld_xt, M, w, xt_off, ne, bn, bk, bias, out, ld_out, gelu);
    case 64: return tpanel_bk<64>(xt, ld_xt, M, w, xt_off, ne, bn, bk, bias, out, ld_out, gelu);
    default: return tpanel_bk<0>(xt, ld_xt, M, w, xt_off, ne, bn, bk, bias, out, ld_out, gelu);
  }
}

}  // namespace

Kernels SB_KERNELS_FN() {
  return Kernels{&panel<1>, &sdd<true>, SB_NAME, &panel<0>, &sdd<false>, &panel<3>, &panel<2>, &transpose, &dot, &tpanel,
                 &transpose_rows, VW};
}

}  // namespace sparsebert_cpu
