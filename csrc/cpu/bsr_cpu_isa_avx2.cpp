// AVX2 + FMA build of the block kernels. Tile 6 tokens x 16 outputs = 12 ymm accumulators
// + 2 weight registers (of 16); weight-gradient tile 4 x 16.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt,f16c")
#define SB_VW 8
#define SB_MT 6
#define SB_NV 2
#define SB_NR 4
#ifndef SB_PREFETCH
#define SB_PREFETCH 1
#endif
#define SB_KERNELS_FN kernels_avx2
#define SB_NAME "avx2"
#include "bsr_cpu_kernels_impl.h"
#endif
