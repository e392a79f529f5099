// CPUID tests shared by the baseline translation units that pick an ISA kernel set at run time
// (bsr_cpu.cpp, attention.cpp, add_layernorm.cpp). Only include from baseline-flag files.
#pragma once

namespace sparsebert_cpu {

// The AVX-512 kernels use F/VL/BW/DQ and FMA.
inline bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

inline bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace sparsebert_cpu
