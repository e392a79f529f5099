// Fused attention kernels of the CPU backend (fp32, inference), raw pointers only.
//
// attention_kernels.cpp compiles attention_kernels_impl.h once per ISA (`#pragma GCC target`,
// AVX-512 / AVX2 / baseline) and includes no torch header, for the ODR reason given in
// bsr_cpu_kernels.h. attention.cpp (baseline flags, ATen) checks inputs, picks a kernel set by
// CPUID and threads the work items with at::parallel_for.
#pragma once
#include <cstdint>

namespace sparsebert_cpu {

// softmax(q k^T * scale + mask) v for one problem [B, H, S, D]. Element (b, h, s, d) of q is
// q[b * q_sb + h * q_sh + s * q_ss + d] (last dimension contiguous; any other strides, 0 included),
// likewise k and v. out: [B, Sq, H, D] contiguous. mask: broadcast to [B, H, Sq, Skv] by its
// strides (0 along broadcast dimensions); mask_kind 0 none, 1 bool (one byte, nonzero = attend),
// 2 float32 (added to the scaled scores).
struct AttnArgs {
  const float* q; int64_t q_sb, q_sh, q_ss;
  const float* k; int64_t k_sb, k_sh, k_ss;
  const float* v; int64_t v_sb, v_sh, v_ss;
  float* out;
  int64_t B, H, Sq, Skv, D;
  float scale;
  int mask_kind;
  const void* mask; int64_t m_sb, m_sh, m_sq, m_sk;
};

struct AttnKernels {
  // Bytes of scratch one work item needs (the caller allocates it, once per thread).
  int64_t (*workspace_bytes)(const AttnArgs& a);
  // Queries [q0, q1) of head h of batch b: out[b, q0:q1, h, :]. ws: workspace_bytes(a) bytes.
  // (nb, nh): the (batch, head) this thread does next, whose q, k and v rows are prefetched into
  // L2 while this one computes; nb < 0: none (or the same head again).
  void (*run)(const AttnArgs& a, int64_t b, int64_t h, int64_t q0, int64_t q1, void* ws,
              int64_t nb, int64_t nh);
  int64_t query_tile;  // rows of scores kept at a time (splitting queries finer gains nothing)
  const char* name;
};

AttnKernels attn_kernels_avx512();
AttnKernels attn_kernels_avx2();
AttnKernels attn_kernels_generic();

}  // namespace sparsebert_cpu
