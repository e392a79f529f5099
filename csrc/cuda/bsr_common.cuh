// Device helpers shared by the block-sparse kernels: cp.async, ldmatrix, mma.sync m16n8k16,
// one warp-level 16-deep MMA step over shared-memory tiles, and the multi-stage cp.async main loop
// of the tensor-core kernels. CUDA headers only.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   A 16x16 (row): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B 16x8  (col): b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C 16x8       : c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// ldmatrix.x4: lanes 8i..8i+7 give the 8 row addresses of matrix i; result register i holds, per
// lane, row lane/4, columns 2(lane%4)..+1 of matrix i (".trans": row 2(lane%4)..+1, column lane/4).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "bsr_kernels.h"

namespace sparsebert {
namespace cuda {
namespace detail {

template <typename T> struct TypeTraits;
template <> struct TypeTraits<__half> {
  static constexpr BsrDtype kDtype = BsrDtype::kFloat16;
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static uint32_t pack2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct TypeTraits<__nv_bfloat16> {
  static constexpr BsrDtype kDtype = BsrDtype::kBFloat16;
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static uint32_t pack2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct TypeTraits<float> {
  static constexpr BsrDtype kDtype = BsrDtype::kFloat32;
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; when !pred the 16 bytes are zero-filled (src not read,
// but must still be a valid address: callers pass the tensor's base pointer).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]);
template <>
__device__ __forceinline__ void mma_16816<__half>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// One k16 step of a warp tile (MI x 16 rows) x (NI x 8 cols) from shared memory.
//   A element (m, k) is at As[m * lda + k]  (A_TRANS: As[k * lda + m])
//   B element (k, n) is at Bs[n * ldb + k]  (B_TRANS: Bs[k * ldb + n])
// m0 / n0 / k0: the warp tile's origin in the shared tiles. NI must be even.
template <typename T, int MI, int NI, bool A_TRANS, bool B_TRANS>
__device__ __forceinline__ void warp_mma_k16(const T* As, int lda, const T* Bs, int ldb, int m0,
                                             int n0, int k0, float (&acc)[MI][NI][4], int lane) {
  static_assert(NI % 2 == 0, "NI must be even (B is loaded two n8 tiles at a time)");
  uint32_t a[MI][4];
  uint32_t b[NI][2];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
    if (!A_TRANS) {
      const int m = m0 + mi * 16 + (lane % 16);
      const int k = k0 + (lane / 16) * 8;
      ldmatrix_x4(a[mi], As + m * lda + k);
    } else {
      const int k = k0 + (lane % 8) + (lane / 16) * 8;
      const int m = m0 + mi * 16 + ((lane / 8) % 2) * 8;
      ldmatrix_x4_trans(a[mi], As + k * lda + m);
    }
  }
#pragma unroll
  for (int nj = 0; nj < NI / 2; ++nj) {
    uint32_t r[4];
    if (!B_TRANS) {
      const int n = n0 + nj * 16 + (lane % 8) + (lane / 16) * 8;
      const int k = k0 + ((lane / 8) % 2) * 8;
      ldmatrix_x4(r, Bs + n * ldb + k);
    } else {
      const int k = k0 + (lane % 8) + ((lane / 8) % 2) * 8;
      const int n = n0 + nj * 16 + (lane / 16) * 8;
      ldmatrix_x4_trans(r, Bs + k * ldb + n);
    }
    b[2 * nj][0] = r[0];
    b[2 * nj][1] = r[1];
    b[2 * nj + 1][0] = r[2];
    b[2 * nj + 1][1] = r[3];
  }
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) mma_16816<T>(acc[mi][ni], a[mi], b[ni]);
}

template <int MI, int NI>
__device__ __forceinline__ void zero_acc(float (&acc)[MI][NI][4]) {
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.f;
}

// The software-pipelined main loop of every tensor-core kernel: `n_steps` steps over a ring of
// STAGES shared-memory slots, STAGES - 1 steps in flight.
//   load(slot, step): every thread issues its cp.async copies of step `step` into ring slot `slot`
//   compute(slot):    every thread consumes the (landed) slot
// One commit group per step (empty past the end), so cp.async.wait_group<STAGES - 2> at the top
// of iteration `it` means step `it` has landed for this thread; the barrier after it makes that
// true for all threads, and also guarantees that all are done computing on slot (it - 1) % STAGES,
// the slot the prefetch of step it + STAGES - 1 overwrites. Ends with no copies in flight.
template <int STAGES, typename Load, typename Compute>
__device__ __forceinline__ void cp_async_pipeline(int n_steps, Load&& load, Compute&& compute) {
  static_assert(STAGES >= 2, "a pipeline needs at least two stages");
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_steps) load(s, s);
    cp_async_commit();
  }
  for (int it = 0; it < n_steps; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int pre = it + STAGES - 1;
    if (pre < n_steps) load(pre % STAGES, pre);
    cp_async_commit();
    compute(it % STAGES);
  }
  cp_async_wait<0>();
}

inline int num_sms() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 108;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) return 108;
  return n;
}

}  // namespace detail
}  // namespace cuda
}  // namespace sparsebert
