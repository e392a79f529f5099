// Raw-pointer fp32 block kernels of the CPU backend, compiled once per ISA.
//
// Each ISA translation unit (bsr_cpu_isa_*.cpp) sets `#pragma GCC target(...)` and includes
// bsr_cpu_kernels_impl.h; it includes no torch header, so no inline torch function is ever
// compiled with AVX-512 and picked by the linker for baseline code (the usual ODR trap of
// per-file ISA flags). bsr_cpu.cpp (baseline flags) picks one table at run time with
// __builtin_cpu_supports and does the threading (at::parallel_for) and the checks.
#pragma once
#include <cstdint>

namespace sparsebert_cpu {

struct Kernels {
  using PanelFn = void (*)(const float*, int64_t, int64_t, const float* const*, const int64_t*,
                           int64_t, int64_t, int64_t, const float*, float*, int64_t, bool, bool, bool);
  // "Panel" product, shared by the forward and the input gradient:
  //   out[m, 0:bo] = bias[0:bo] + sum_e  in[m, in_off[e] : in_off[e] + bi] @ B[e]
  // for m in [0, M); B[e] is a row-major [bi, bo] block; bias may be null (then 0) and is added
  // after the products. accumulate: start from the current `out` instead of 0 (K split into
  // groups; the caller passes the bias to the last group only).
  // gelu: apply the exact GELU to the finished tile before storing it (forward epilogue; only
  // on the last accumulation pass). nt: store the finished tile with non-temporal stores (out
  // and ld_out aligned to the vector size; only on the last pass). bo must be a multiple of 16. Forward: in = x, B = W block
  // transposed; grad_input: in = dy, B = W block as stored.
  void (*panel)(const float* in, int64_t ld_in, int64_t M, const float* const* B,
                const int64_t* in_off, int64_t n_entries, int64_t bi, int64_t bo,
                const float* bias, float* out, int64_t ld_out, bool accumulate, bool gelu,
                bool nt);
  // Weight-gradient block (SDD): out[n, k] (+)= sum_{m < M} dy[m, n] * x[m, k],
  // n < bn, k < bk (out row-major [bn, bk]); bn and bk multiples of 16. dbias, unless null:
  // dbias[n] += sum_{m < M} dy[m, n] (the bias gradient, fused: dy is read once).
  void (*sdd)(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x, int64_t M,
              int64_t bn, int64_t bk, float* out, bool accumulate, float* dbias);
  const char* name;
  // The same kernels without software prefetch (null where a kernel set has no such variant).
  decltype(panel) panel_nopf;
  decltype(sdd) sdd_nopf;
  // The panel kernel that also prefetches the next token tile's output lines for writing.
  decltype(panel) panel_pfw;
  // The panel kernel that prefetches only the output lines.
  decltype(panel) panel_pfo;
  // dst[b] = src[b]^T for n_blocks consecutive row-major [bn, bk] blocks (dst blocks [bk, bn]);
  // bn and bk multiples of 16.
  void (*transpose)(const float* src, int64_t n_blocks, int64_t bn, int64_t bk, float* dst);
  // Forward of one block row without transposed weights (for few tokens):
  //   out[m, n] = bias[n] + sum_e x[m, x_off[e] : x_off[e] + bk] . w[e][n, 0:bk]
  // for m < M, n < bn; w[e] = w + e * bn * bk is the row's e-th kept block as stored ([bn, bk]);
  // bias may be null; gelu: the exact GELU applied before the store.
  void (*dot)(const float* x, int64_t ld_x, int64_t M, const float* w, const int64_t* x_off,
              int64_t ne, int64_t bn, int64_t bk, const float* bias, float* out, int64_t ld_out,
              bool gelu);
  // The same product with the input transposed: xt [K, ld_xt] (ld_xt a multiple of `lanes`,
  // zero past M), xt_off[e] = (first input column of block e) * ld_xt.
  decltype(dot) tpanel;
  // dst[c, r] = src[r, c], r < rows, c < cols (a multiple of `lanes`); dst columns past rows,
  // up to the next multiple of `lanes`, are zeroed.
  void (*transpose_rows)(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst,
                         int64_t ld_dst);
  int64_t lanes;  // floats per vector (tpanel's token granule)
};

// Register-blocked micro-kernels (GCC vector extensions, one TU per ISA).
Kernels kernels_avx512();
Kernels kernels_avx2();
Kernels kernels_generic();
// Plain loops left to the compiler's auto-vectoriser (AVX-512 target), kept for comparison.
Kernels kernels_autovec();

}  // namespace sparsebert_cpu
