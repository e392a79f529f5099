// AVX-512 build of the block kernels (selected at run time when the CPU has AVX-512F/VL/BW/DQ).
// Tile 8 tokens x 32 outputs = 16 zmm accumulators + 2 weight registers (of 32).
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi,bmi2,popcnt,f16c")
#define SB_VW 16
#ifndef SB_MT
#define SB_MT 8
#endif
#define SB_NV 2
#define SB_NR 8
#ifndef SB_PREFETCH
#define SB_PREFETCH 1
#endif
#define SB_KERNELS_FN kernels_avx512
#define SB_NAME "avx512"
#include "bsr_cpu_kernels_impl.h"
#endif
