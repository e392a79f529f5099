// Row kernel of the fused residual add + LayerNorm (inference), raw pointers only.
//
// No torch header here (like bsr_cpu_isa_*.cpp): the AVX-512 copy is compiled with
// `#pragma GCC target` and must not instantiate any inline torch function the linker could pick
// for baseline code. add_layernorm.cpp (baseline flags, ATen) picks one at run time.
#include <cmath>
#include <cstdint>

namespace sparsebert_cpu {

// For each of `rows` rows of width h: v = y + r; y = (v - mean(v)) / sqrt(var(v) + eps) * g + b
// (biased variance, as torch.nn.LayerNorm; two passes over the row, which is in L1). g, b may be
// null (1 and 0). ld_y, ld_r: row strides.
#define SB_ADD_LN_BODY                                                                   \
  for (int64_t i = 0; i < rows; ++i) {                                                   \
    float* __restrict__ yi = y + i * ld_y;                                               \
    const float* __restrict__ ri = r + i * ld_r;                                         \
    float s = 0.f;                                                                       \
    _Pragma("omp simd reduction(+ : s)")                                                 \
    for (int64_t j = 0; j < h; ++j) {                                                    \
      const float v = yi[j] + ri[j];                                                     \
      yi[j] = v;                                                                         \
      s += v;                                                                            \
    }                                                                                    \
    const float mean = s / static_cast<float>(h);                                        \
    float q = 0.f;                                                                       \
    _Pragma("omp simd reduction(+ : q)")                                                 \
    for (int64_t j = 0; j < h; ++j) {                                                    \
      const float d = yi[j] - mean;                                                      \
      q += d * d;                                                                        \
    }                                                                                    \
    const float rstd = 1.f / std::sqrt(q / static_cast<float>(h) + eps);                 \
    if (g && b) {                                                                        \
      _Pragma("omp simd")                                                                \
      for (int64_t j = 0; j < h; ++j) yi[j] = (yi[j] - mean) * rstd * g[j] + b[j];       \
    } else {                                                                             \
      for (int64_t j = 0; j < h; ++j) {                                                  \
        const float n = (yi[j] - mean) * rstd;                                           \
        yi[j] = (g ? n * g[j] : n) + (b ? b[j] : 0.f);                                   \
      }                                                                                  \
    }                                                                                    \
  }

void add_layernorm_rows_generic(float* y, int64_t ld_y, const float* r, int64_t ld_r,
                                int64_t rows, int64_t h, const float* g, const float* b,
                                float eps) {
  SB_ADD_LN_BODY
}

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
void add_layernorm_rows_avx512(float* y, int64_t ld_y, const float* r, int64_t ld_r,
                               int64_t rows, int64_t h, const float* g, const float* b,
                               float eps) {
  SB_ADD_LN_BODY
}
#pragma GCC pop_options
#endif

}  // namespace sparsebert_cpu
