// The fused attention kernels (attention_kernels_impl.h) compiled three times: AVX-512, AVX2 +
// FMA and the baseline ISA, each in its own namespace (the body's internal functions and vector
// types must not be shared between the copies). attention.cpp picks one by CPUID.
// Register budgets (accumulators + loaded vectors + one broadcast must fit the register file):
//   AVX-512 (32 zmm): scores 6 queries x 4 vectors of keys (24), output 12 x 2 or 6 x 4 vectors
//   of D (D = 32: 12 queries x 2; D = 64: 6 x 4); 24 queries of scores at a time.
//   AVX2 and baseline (16 registers): scores 5 x 2, output 5 x 2 or 10 x 1; 20 queries.
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "attention_kernels.h"

namespace sparsebert_cpu {

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
namespace attn_avx512 {
#define SB_VW 16
#define SB_QK_MR 6
#define SB_QK_NR 4
#define SB_PV_ACC 24
#define SB_PV_NMAX 4
#define SB_TQ 24
#define SB_ATTN_NAME "avx512"
#include "attention_kernels_impl.h"
#undef SB_VW
#undef SB_QK_MR
#undef SB_QK_NR
#undef SB_PV_ACC
#undef SB_PV_NMAX
#undef SB_TQ
#undef SB_ATTN_NAME
}  // namespace attn_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace attn_avx2 {
#define SB_VW 8
#define SB_QK_MR 5
#define SB_QK_NR 2
#define SB_PV_ACC 10
#define SB_PV_NMAX 2
#define SB_TQ 20
#define SB_ATTN_NAME "avx2"
#include "attention_kernels_impl.h"
#undef SB_VW
#undef SB_QK_MR
#undef SB_QK_NR
#undef SB_PV_ACC
#undef SB_PV_NMAX
#undef SB_TQ
#undef SB_ATTN_NAME
}  // namespace attn_avx2
#pragma GCC pop_options

AttnKernels attn_kernels_avx512() { return attn_avx512::kernels(); }
AttnKernels attn_kernels_avx2() { return attn_avx2::kernels(); }
#endif

namespace attn_generic {
#define SB_VW 4
#define SB_QK_MR 5
#define SB_QK_NR 2
#define SB_PV_ACC 10
#define SB_PV_NMAX 2
#define SB_TQ 20
#define SB_ATTN_NAME "generic"
#include "attention_kernels_impl.h"
#undef SB_VW
#undef SB_QK_MR
#undef SB_QK_NR
#undef SB_PV_ACC
#undef SB_PV_NMAX
#undef SB_TQ
#undef SB_ATTN_NAME
}  // namespace attn_generic

AttnKernels attn_kernels_generic() { return attn_generic::kernels(); }

}  // namespace sparsebert_cpu
