// Body of the fused attention kernels, included by attention_kernels.cpp once per ISA inside
// `namespace SB_ATTN_NS` after a `#pragma GCC target`. The includer defines:
//   SB_VW            floats per SIMD vector (16 AVX-512, 8 AVX2, 4 baseline)
//   SB_QK_MR/NR      score tile: MR queries x NR vectors of keys (register accumulators)
//   SB_PV_ACC        accumulator budget of the output tile (rows x vectors of D)
//   SB_PV_NMAX       most vectors of D per output tile
//   SB_TQ            query rows whose scores are kept at once
//   SB_ATTN_NAME     the kernel set's name
// No torch or standard-library template is used (see attention_kernels.h). The includer
// includes <cmath>, <cstdint> and <cstring> first (not here: this is included inside a namespace).
//
// One work item = queries [q0, q1) of one (batch, head):
//  1. keys: without a mask, or when the mask rows of the item's queries are all equal (a
//     padding mask, as Hugging Face builds it: [B, 1, Sq, Skv] bool, the same row for every
//     query), only the attended keys are kept (a padded batch computes nothing for its padding)
//     and their mask values become a per-key bias. Otherwise every key is kept and each
//     query's mask row is applied to its scores.
//  2. packing: K^T [D, nkp] (keys in the vector lanes, nkp = keys rounded up to a vector, the
//     pad columns zero with bias -inf) and V [nk, Dp] (D rounded up to a vector, zero pad), both
//     in L1/L2 for all the item's queries.
//  3. per tile of SB_TQ queries: scores = (q K^T) * scale + bias into an L1 buffer (register
//     tile SB_QK_MR x SB_QK_NR vectors, q elements broadcast from q as it lies); softmax in place
//     in fp32 (max subtracted; exp(-inf) = 0 exactly); out = (P V) / rowsum, straight into the
//     [B, Sq, H, D] output.
// Every output row is computed by the same sequence of operations whatever the tiling, query
// split or thread count (sums over d and over keys in index order), so results do not depend on
// the number of threads. Dropping a masked key removes a `+ 0 * v` term: the same result unless
// v holds an inf or NaN there.
namespace {  // internal linkage inside SB_ATTN_NS

constexpr int VW = SB_VW;
typedef float vec __attribute__((vector_size(SB_VW * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(SB_VW * sizeof(int32_t))));
typedef uint8_t bvec __attribute__((vector_size(SB_VW)));

inline vec load(const float* p) { vec v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
// *p in every lane. Not `vec{} + *p`: that is an add (0 + x is not x for x = -0) and a
// register broadcast, which takes the shuffle port the FMAs need; this is one load.
// (A lane-by-lane fill compiles to 16 masked broadcasts with GCC 12: intrinsics where we have them.)
__attribute__((always_inline)) inline vec bcast(const float* p) {
#if (defined(__x86_64__) || defined(__i386__)) && SB_VW == 16
  return (vec)_mm512_set1_ps(*p);
#elif (defined(__x86_64__) || defined(__i386__)) && SB_VW == 8
  return (vec)_mm256_set1_ps(*p);
#elif (defined(__x86_64__) || defined(__i386__)) && SB_VW == 4
  return (vec)_mm_set1_ps(*p);
#else
  const float x = *p;
  vec v;
  for (int i = 0; i < VW; ++i) v[i] = x;
  return v;
#endif
}
inline vec splat(float x) { return bcast(&x); }
inline vec vmax(vec a, vec b) { return a > b ? a : b; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
// Lane reductions (once per query row). A lane loop costs GCC 12 a store and reload per lane.
inline float hmax(vec v) {
#if (defined(__x86_64__) || defined(__i386__)) && SB_VW == 16
  return _mm512_reduce_max_ps((__m512)v);
#else
  float m = v[0];
  for (int i = 1; i < VW; ++i) m = v[i] > m ? v[i] : m;
  return m;
#endif
}
inline float hsum(vec v) {  // pairwise, fixed order
#if (defined(__x86_64__) || defined(__i386__)) && SB_VW == 16
  return _mm512_reduce_add_ps((__m512)v);
#else
  for (int w = VW / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) v[i] += v[i + w];
  return v[0];
#endif
}

// 2^t for t <= 0, exactly 0 for t < -125 (so for -inf: masked keys weigh exactly 0; AVX-512; the
// other builds: 0 for t <= -127).
// t = n + f, n = round(t), |f| <= 1/2; 2^f by a degree-6 polynomial (a Lawson fit on
// [-1/2, 1/2], relative error 1e-7 evaluated in fp32, about the fp32 rounding); times 2^n.
// (csrc/cpu/bsr_cpu_kernels_impl.h's vexp, Cephes' exp in natural units, needs a floor by
// conversion, a two-part ln 2 reduction and a bit-built 2^n: ~20 instructions a vector against
// ~11 here with AVX-512's vrndscaleps / vscalefps; at D = 32 the softmax's exps cost about
// as much as one of the two products.)
__attribute__((always_inline)) inline vec vexp2(vec t) {
  static constexpr float c[] = {1.5345812426e-04f, 1.3399930904e-03f, 9.6184890717e-03f,
                                5.5503286421e-02f, 2.4022646248e-01f, 6.9314718246e-01f};
#if (defined(__x86_64__) || defined(__i386__)) && SB_VW == 16
  const __m512 tc = _mm512_max_ps((__m512)t, _mm512_set1_ps(-125.f));
  const __m512 n = _mm512_roundscale_ps(tc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vec f = (vec)tc - (vec)n;
#else
  const vec tc = vmax(t, splat(-127.f));  // n = -127 builds 2^n = +0 below
  const vec n = (tc + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23)
  const vec f = tc - n;
#endif
  vec p = splat(c[0]);
#pragma GCC unroll 8
  for (int j = 1; j < 6; ++j) p = p * f + c[j];
  p = p * f + 1.0f;
#if (defined(__x86_64__) || defined(__i386__)) && SB_VW == 16
  // Below t = -125 the result is set to exactly 0 instead of being scaled down to a denormal (or
  // to 0 by underflow): a vscalefps whose result is denormal or underflows takes a microcode
  // assist. The pad lanes of a key count that is not a multiple of 16 (bias -inf) hit it in every
  // row: ~50% of a padded MiniLM call in perf. A weight under 2^-125 of the row's largest changes
  // no fp32 sum of it.
  const __m512 r = _mm512_scalef_ps((__m512)p, n);
  return (vec)_mm512_maskz_mov_ps(_mm512_cmp_ps_mask((__m512)t, _mm512_set1_ps(-125.f), _CMP_GE_OQ), r);
#else
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;  // 2^n, n in [-127, 0]
  vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
#endif
}

// s[m][0 : N*VW] = (q[m] . kt[:, 0 : N*VW]) * scale + bias, m < M. q rows ld_q apart, kt rows
// (one per d) ld_k apart.
template <int M, int N>
__attribute__((always_inline)) inline void qk_tile(const float* q, int64_t ld_q, const float* kt,
                                                   int64_t ld_k, int64_t D, float* s,
                                                   int64_t ld_s, float scale, const float* bias) {
  vec acc[M][N];
#pragma GCC unroll 32
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < N; ++r) acc[m][r] = vec{};
  for (int64_t d = 0; d < D; ++d) {
    vec kv[N];
#pragma GCC unroll 8
    for (int r = 0; r < N; ++r) kv[r] = load(kt + d * ld_k + r * VW);
#pragma GCC unroll 32
    for (int m = 0; m < M; ++m) {
      const vec qb = bcast(q + m * ld_q + d);
#pragma GCC unroll 8
      for (int r = 0; r < N; ++r) acc[m][r] += qb * kv[r];
    }
  }
#pragma GCC unroll 32
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < N; ++r)
      store(s + m * ld_s + r * VW, acc[m][r] * scale + load(bias + r * VW));
}

// out[m][0 : ncols] = (p[m][0 : nk] @ v[0 : nk, 0 : N*VW]) * inv[m], m < M (ncols <= N*VW:
// the last vector of a row is stored partially when D is not a multiple of VW).
template <int M, int N>
__attribute__((always_inline)) inline void pv_tile(const float* p, int64_t ld_p, const float* v,
                                                   int64_t ld_v, int64_t nk, const float* inv,
                                                   float* out, int64_t ld_o, int64_t ncols) {
  vec acc[M][N];
#pragma GCC unroll 32
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < N; ++r) acc[m][r] = vec{};
  for (int64_t j = 0; j < nk; ++j) {
    vec vv[N];
#pragma GCC unroll 8
    for (int r = 0; r < N; ++r) vv[r] = load(v + j * ld_v + r * VW);
#pragma GCC unroll 32
    for (int m = 0; m < M; ++m) {
      const vec pb = bcast(p + m * ld_p + j);
#pragma GCC unroll 8
      for (int r = 0; r < N; ++r) acc[m][r] += pb * vv[r];
    }
  }
#pragma GCC unroll 32
  for (int m = 0; m < M; ++m) {
    const float s = inv[m];
#pragma GCC unroll 8
    for (int r = 0; r < N; ++r) {
      const vec o = acc[m][r] * s;
      float* dst = out + m * ld_o + r * VW;
      if ((r + 1) * VW <= ncols) {
        store(dst, o);
      } else {
        for (int64_t c = r * VW; c < ncols; ++c) dst[c - r * VW] = o[c - r * VW];
      }
    }
  }
}

// Row tails: qk_tile / pv_tile with M = m (1 <= m <= MAXM), picked at run time.
template <int N, int M>
inline void qk_rows(int m, const float* q, int64_t ld_q, const float* kt, int64_t ld_k,
                    int64_t D, float* s, int64_t ld_s, float scale, const float* bias) {
  if constexpr (M >= 1) {
    if (m == M) return qk_tile<M, N>(q, ld_q, kt, ld_k, D, s, ld_s, scale, bias);
    qk_rows<N, M - 1>(m, q, ld_q, kt, ld_k, D, s, ld_s, scale, bias);
  }
}

template <int N, int M>
inline void pv_rows(int m, const float* p, int64_t ld_p, const float* v, int64_t ld_v,
                    int64_t nk, const float* inv, float* out, int64_t ld_o, int64_t ncols) {
  if constexpr (M >= 1) {
    if (m == M) return pv_tile<M, N>(p, ld_p, v, ld_v, nk, inv, out, ld_o, ncols);
    pv_rows<N, M - 1>(m, p, ld_p, v, ld_v, nk, inv, out, ld_o, ncols);
  }
}

// qk_cols and pv_cols are never inlined into run(): there the softmax's loop-invariant exp
// constants stay live in vector registers, and GCC 12 then spilled five of the 24 accumulators
// of the 12 x 2 PV tile to the stack inside its inner loop (a load and a store per FMA; ~28% of
// a MiniLM-sized call in perf). As a call each tile gets the whole register file.
template <int N>
__attribute__((noinline)) void qk_cols(int n, int m, const float* q, int64_t ld_q, const float* kt, int64_t ld_k,
                    int64_t D, float* s, int64_t ld_s, float scale, const float* bias) {
  if constexpr (N >= 1) {
    if (n == N) return qk_rows<N, SB_QK_MR>(m, q, ld_q, kt, ld_k, D, s, ld_s, scale, bias);
    qk_cols<N - 1>(n, m, q, ld_q, kt, ld_k, D, s, ld_s, scale, bias);
  }
}

constexpr int pv_rows_for(int n) {
  const int r = SB_PV_ACC / n;
  return r > 12 ? 12 : r;
}

template <int N>
__attribute__((noinline)) void pv_cols(int n, int64_t rows, const float* p, int64_t ld_p, const float* v,
                    int64_t ld_v, int64_t nk, const float* inv, float* out, int64_t ld_o,
                    int64_t ncols) {
  if constexpr (N >= 1) {
    if (n == N) {
      constexpr int MR = pv_rows_for(N);
      for (int64_t i = 0; i < rows; i += MR) {
        const int m = static_cast<int>(rows - i < MR ? rows - i : MR);
        pv_rows<N, MR>(m, p + i * ld_p, ld_p, v, ld_v, nk, inv + i, out + i * ld_o, ld_o, ncols);
      }
      return;
    }
    pv_cols<N - 1>(n, rows, p, ld_p, v, ld_v, nk, inv, out, ld_o, ncols);
  }
}

// Mask row of one query applied to its scores x[0:n] (all keys kept, in index order).
inline void apply_mask_row(float* x, int kind, const void* mrow, int64_t sk, int64_t n) {
  const float ninf = -INFINITY;
  if (kind == 1) {
    const uint8_t* mb = static_cast<const uint8_t*>(mrow);
    int64_t j = 0;
    if (sk == 1) {
      for (; j + VW <= n; j += VW) {
        bvec b;
        std::memcpy(&b, mb + j, sizeof b);
        const ivec bi = __builtin_convertvector(b, ivec);
        store(x + j, bi != 0 ? load(x + j) : splat(ninf));
      }
    }
    for (; j < n; ++j)
      if (!mb[j * sk]) x[j] = ninf;
  } else {
    const float* mf = static_cast<const float*>(mrow);
    int64_t j = 0;
    if (sk == 1)
      for (; j + VW <= n; j += VW) store(x + j, load(x + j) + load(mf + j));
    for (; j < n; ++j) x[j] += mf[j * sk];
  }
}

// Are the mask rows of queries [q0, q1) all equal (bitwise) to row q0?
inline bool rows_equal(const AttnArgs& a, const char* m0, int64_t q0, int64_t q1) {
  if (a.m_sq == 0) return true;
  const int64_t es = a.mask_kind == 1 ? 1 : 4;
  const char* first = m0 + q0 * a.m_sq * es;
  for (int64_t i = q0 + 1; i < q1; ++i) {
    const char* row = m0 + i * a.m_sq * es;
    if (a.m_sk == 1) {
      if (std::memcmp(row, first, a.Skv * es) != 0) return false;
    } else {
      for (int64_t j = 0; j < a.Skv; ++j)
        if (std::memcmp(row + j * a.m_sk * es, first + j * a.m_sk * es, es) != 0) return false;
    }
  }
  return true;
}

#if (defined(__x86_64__) || defined(__i386__)) && SB_VW == 16
// dst[c * ld + r] = rows[r][d0 + c] for r, c < 16: 16 keys' 16 elements into 16 rows of K^T
// (in registers: unpack ps, unpack pd, two 128-bit lane shuffles; a scalar transpose is one
// store per element, ~10% of a MiniLM-sized item).
__attribute__((always_inline)) inline void transpose16(const float* const* rows, int64_t d0,
                                                       float* dst, int64_t ld) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(rows[i] + d0);
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  // r[4g + k] holds, in each 128-bit lane L, column 4L + k of rows 4g .. 4g + 3
#pragma GCC unroll 2
  for (int h = 0; h < 16; h += 8) {
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      t[h + k] = _mm512_shuffle_f32x4(r[h + k], r[h + 4 + k], 0x88);
      t[h + 4 + k] = _mm512_shuffle_f32x4(r[h + k], r[h + 4 + k], 0xdd);
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xdd);
  }
  // r[c] = column c (lanes 0x88 / 0xdd pick the even / odd 128-bit lanes of both sources)
#pragma GCC unroll 16
  for (int c = 0; c < 16; ++c) _mm512_storeu_ps(dst + c * ld, r[c]);
}
#endif

struct Layout {  // the workspace, in floats from its 64-byte aligned start
  int64_t skvp, dp, kt, vp, bias, sc, inv, idx, total;
};

inline Layout layout(const AttnArgs& a) {
  Layout l;
  l.skvp = round_up(a.Skv, VW);
  l.dp = round_up(a.D, VW);
  int64_t off = 0;
  auto take = [&](int64_t n) { const int64_t o = off; off += round_up(n, 16); return o; };
  l.kt = take(a.D * l.skvp);
  l.vp = take(a.Skv * l.dp);
  l.bias = take(l.skvp);
  l.sc = take(SB_TQ * l.skvp);
  l.inv = take(SB_TQ);
  l.idx = take(a.Skv);  // int32 key indices
  l.total = off;
  return l;
}

int64_t workspace_bytes(const AttnArgs& a) { return (layout(a).total + 16) * 4; }

// Software prefetch (into L2) of the q, k and v rows of the (batch, head) a thread does next,
// spread over this item's query tiles: those rows lie a whole token row apart (H * D floats),
// which the hardware prefetchers do not follow, and at batch 64 they come from L3 or memory.
struct NextRows {
  const char* base[3];
  int64_t stride[3], rows[3];
  int64_t lines;     // cache lines per row
  int64_t total;     // rows of all three
  int t;             // cursor: tensor t, row r
  int64_t r;
};

inline NextRows next_rows(const AttnArgs& a, int64_t nb, int64_t nh) {
  NextRows n{};
  n.t = 3;
  if (nb < 0) return n;
  n.base[0] = reinterpret_cast<const char*>(a.q + nb * a.q_sb + nh * a.q_sh);
  n.base[1] = reinterpret_cast<const char*>(a.k + nb * a.k_sb + nh * a.k_sh);
  n.base[2] = reinterpret_cast<const char*>(a.v + nb * a.v_sb + nh * a.v_sh);
  n.stride[0] = a.q_ss * 4; n.stride[1] = a.k_ss * 4; n.stride[2] = a.v_ss * 4;
  n.rows[0] = a.Sq; n.rows[1] = a.Skv; n.rows[2] = a.Skv;
  n.lines = (a.D * 4 + 63) / 64;
  n.total = a.Sq + 2 * a.Skv;
  n.t = 0;
  return n;
}

// Prefetch the next `count` rows of `n` (q rows, then k rows, then v rows).
inline void prefetch_next(NextRows& n, int64_t count) {
  for (; count > 0 && n.t < 3; --count) {
    const char* row = n.base[n.t] + n.r * n.stride[n.t];
    for (int64_t l = 0; l < n.lines; ++l) __builtin_prefetch(row + l * 64, 0, 2);
    if (++n.r == n.rows[n.t]) { n.r = 0; ++n.t; }
  }
}

void run(const AttnArgs& a, int64_t b, int64_t h, int64_t q0, int64_t q1, void* ws_raw,
         int64_t nb, int64_t nh) {
  NextRows next = next_rows(a, nb, nh);
  const int64_t n_tiles = (q1 - q0 + SB_TQ - 1) / SB_TQ;
  const int64_t per_tile = (next.total + n_tiles - 1) / n_tiles;
  const Layout L = layout(a);
  float* ws = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(ws_raw) + 63) & ~uintptr_t(63));
  float* kt = ws + L.kt;
  float* vp = ws + L.vp;
  float* bias = ws + L.bias;
  float* sc = ws + L.sc;
  float* inv = ws + L.inv;
  int32_t* idx = reinterpret_cast<int32_t*>(ws + L.idx);
  const float* Q = a.q + b * a.q_sb + h * a.q_sh;
  const float* K = a.k + b * a.k_sb + h * a.k_sh;
  const float* V = a.v + b * a.v_sb + h * a.v_sh;
  const int64_t D = a.D, Skv = a.Skv, ld_o = a.H * D;
  float* O = a.out + (b * a.Sq * a.H + h) * D;  // row s at O + s * ld_o

  // 1. which keys
  const char* m0 = nullptr;  // mask of (b, h), row 0
  if (a.mask_kind != 0)
    m0 = static_cast<const char*>(a.mask) + (b * a.m_sb + h * a.m_sh) * (a.mask_kind == 1 ? 1 : 4);
  const bool row_mask = a.mask_kind != 0 && !rows_equal(a, m0, q0, q1);
  int64_t nk = 0;
  if (a.mask_kind == 0 || row_mask) {
    for (int64_t j = 0; j < Skv; ++j) { idx[j] = static_cast<int32_t>(j); bias[j] = 0.f; }
    nk = Skv;
  } else if (a.mask_kind == 1) {
    const uint8_t* mr = reinterpret_cast<const uint8_t*>(m0) + q0 * a.m_sq;
    for (int64_t j = 0; j < Skv; ++j)
      if (mr[j * a.m_sk]) { idx[nk] = static_cast<int32_t>(j); bias[nk] = 0.f; ++nk; }
  } else {
    const float* mr = reinterpret_cast<const float*>(m0) + q0 * a.m_sq;
    for (int64_t j = 0; j < Skv; ++j) {
      const float x = mr[j * a.m_sk];
      if (x != -INFINITY) { idx[nk] = static_cast<int32_t>(j); bias[nk] = x; ++nk; }
    }
  }
  if (nk == 0) {  // every key masked for all these queries: 0, as torch's CPU SDPA gives
    for (int64_t i = q0; i < q1; ++i) std::memset(O + i * ld_o, 0, D * sizeof(float));
    return;
  }
  const int64_t nkp = round_up(nk, VW), ldk = L.skvp, dp = L.dp;
  for (int64_t j = nk; j < nkp; ++j) bias[j] = -INFINITY;

  // 2. pack K^T and V
  int64_t jj = 0;
#if (defined(__x86_64__) || defined(__i386__)) && SB_VW == 16
  if (D % 16 == 0) {
    for (; jj + 16 <= nk; jj += 16) {
      const float* rows[16];
      for (int r = 0; r < 16; ++r) rows[r] = K + idx[jj + r] * a.k_ss;
      for (int64_t d0 = 0; d0 < D; d0 += 16) transpose16(rows, d0, kt + d0 * ldk + jj, ldk);
    }
  }
#endif
  for (; jj < nk; ++jj) {
    const float* kr = K + idx[jj] * a.k_ss;
    for (int64_t d = 0; d < D; ++d) kt[d * ldk + jj] = kr[d];
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = nk; j < nkp; ++j) kt[d * ldk + j] = 0.f;
  for (int64_t j = 0; j < nk; ++j) {
    const float* vr = V + idx[j] * a.v_ss;
    float* dst = vp + j * dp;
    int64_t d = 0;
    for (; d + VW <= D; d += VW) store(dst + d, load(vr + d));
    for (; d < D; ++d) dst[d] = vr[d];
    for (; d < dp; ++d) dst[d] = 0.f;
  }

  // 3. query tiles
  const int64_t nvk = nkp / VW, nvd = dp / VW;
  for (int64_t t0 = q0; t0 < q1; t0 += SB_TQ) {
    const int64_t rows = q1 - t0 < SB_TQ ? q1 - t0 : SB_TQ;
    prefetch_next(next, per_tile);
    for (int64_t i = 0; i < rows; i += SB_QK_MR) {
      const int m = static_cast<int>(rows - i < SB_QK_MR ? rows - i : SB_QK_MR);
      for (int64_t c = 0; c < nvk; c += SB_QK_NR) {
        const int n = static_cast<int>(nvk - c < SB_QK_NR ? nvk - c : SB_QK_NR);
        qk_cols<SB_QK_NR>(n, m, Q + (t0 + i) * a.q_ss, a.q_ss, kt + c * VW, ldk, D,
                          sc + i * ldk + c * VW, ldk, a.scale, bias + c * VW);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* x = sc + r * ldk;
      if (row_mask) apply_mask_row(x, a.mask_kind, m0 + (t0 + r) * a.m_sq * (a.mask_kind == 1 ? 1 : 4), a.m_sk, nk);
      vec mv = splat(-INFINITY);
      for (int64_t j = 0; j < nkp; j += VW) mv = vmax(mv, load(x + j));
      float mx = hmax(mv);
      const bool dead = mx == -INFINITY;  // every key masked for this query
      if (dead) mx = 0.f;  // exp(-inf - 0) = 0 everywhere, not NaN
      // exp(x - mx) = 2^((x - mx) log2 e). Not one FMA x log2 e - mx log2 e: mx log2 e
      // overflows for a finfo.min mask (then every x is about mx).
      const vec mxv = splat(mx);
      vec sv = vec{};
      for (int64_t j = 0; j < nkp; j += VW) {
        const vec e = vexp2((load(x + j) - mxv) * 1.44269504088896341f);
        store(x + j, e);
        sv += e;
      }
      inv[r] = dead ? 0.f : 1.f / hsum(sv);
    }
    for (int64_t c = 0; c < nvd; c += SB_PV_NMAX) {
      const int n = static_cast<int>(nvd - c < SB_PV_NMAX ? nvd - c : SB_PV_NMAX);
      const int64_t ncols = (D - c * VW) < n * VW ? D - c * VW : n * VW;
      pv_cols<SB_PV_NMAX>(n, rows, sc, ldk, vp + c * VW, dp, nk, inv, O + t0 * ld_o + c * VW,
                          ld_o, ncols);
    }
  }
}

}  // namespace

AttnKernels kernels() { return AttnKernels{workspace_bytes, run, SB_TQ, SB_ATTN_NAME}; }
