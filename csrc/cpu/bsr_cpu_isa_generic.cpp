// Baseline (x86-64 SSE2 or any other architecture) build of the block kernels.
// Tile 4 tokens x 8 outputs = 8 xmm accumulators.
#define SB_VW 4
#define SB_MT 4
#define SB_NV 2
#define SB_NR 4
#ifndef SB_PREFETCH
#define SB_PREFETCH 1
#endif
#define SB_KERNELS_FN kernels_generic
#define SB_NAME "generic"
#include "bsr_cpu_kernels_impl.h"
