// Weight gradient over kept blocks only ("SDD"):
//   dvalues[i] = dy[:, row_idx[i]*bn : +bn]^T  x[:, col_idx[i]*bk : +bk]      ([bn, bk], sum over M)
//
// The M (token) dimension is the reduction; it is split across CTAs (grid = nnz x splits), each
// CTA reduces its token range in registers and adds its [bn, bk] tile into an fp32 buffer with
// atomicAdd (zeroed first); fp16/bf16 then convert the buffer into the output.
// fp16 / bf16: tensor cores (mma.sync m16n8k16), 4 warps (2 x 2 over the block), 64 tokens per
// step of a 3-stage cp.async pipeline (cp_async_pipeline, bsr_common.cuh); both operands are token-major in memory, so A and B use
// ldmatrix.trans. fp32: a plain FMA kernel, 32 tokens per step. Tokens >= M load as zeros.
#include <algorithm>
#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "bsr_common.cuh"
#include "bsr_kernels.h"

namespace sparsebert {
namespace cuda {
namespace {

using namespace detail;

struct SddParams {
  const void* x;          // [M, K]
  const void* dy;         // [M, N]
  const int32_t* row_idx; // [nnz]
  const int32_t* col_idx; // [nnz]
  float* acc;             // [nnz, bn, bk] fp32, zeroed
  int64_t M;
  int64_t N, K;
  int chunks_per_cta;     // token chunks (of the kernel's MC) per CTA
};

constexpr int kMmaTokensPerStage = 64;
constexpr int kSimtTokensPerStep = 32;

template <typename T, int BN_, int BK_>
struct SddMmaCfg {
  static constexpr int MC = kMmaTokensPerStage;
  static constexpr int THREADS = 128;
  static constexpr int WARPS_M = 2, WARPS_N = 2;
  static constexpr int WM = BN_ / WARPS_M, WN = BK_ / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;
  static constexpr int STAGES = 3;
  static constexpr int A_LD = BN_ + 8, B_LD = BK_ + 8;
  static constexpr int A_ELEMS = MC * A_LD, B_ELEMS = MC * B_LD;
  static constexpr int SMEM_BYTES = STAGES * (A_ELEMS + B_ELEMS) * (int)sizeof(T);
  static_assert(WM % 16 == 0 && WN % 16 == 0, "tile shapes");
};

template <typename T, int BN_, int BK_>
__global__ void __launch_bounds__(128) sdd_mma_kernel(const SddParams p) {
  using Cfg = SddMmaCfg<T, BN_, BK_>;
  constexpr int MC = Cfg::MC, THREADS = Cfg::THREADS, STAGES = Cfg::STAGES;
  constexpr int MI = Cfg::MI, NI = Cfg::NI;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);  // dy tile [MC][BN_]   (A^T: k = token, m = row in block)
  T* sB = sA + STAGES * Cfg::A_ELEMS;      // x tile  [MC][BK_]   (B:   k = token, n = col in block)

  const int64_t i = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp % Cfg::WARPS_M, warp_n = warp / Cfg::WARPS_M;
  const int64_t n_chunks = (p.M + MC - 1) / MC;
  const int64_t c_begin = (int64_t)blockIdx.y * p.chunks_per_cta;
  const int64_t c_end = std::min<int64_t>(n_chunks, c_begin + p.chunks_per_cta);
  if (c_begin >= c_end) return;  // whole CTA: uniform
  const int nsteps = (int)(c_end - c_begin);
  const T* X = static_cast<const T*>(p.x);
  const T* DY = static_cast<const T*>(p.dy);
  const int64_t dy_col = (int64_t)p.row_idx[i] * BN_;
  const int64_t x_col = (int64_t)p.col_idx[i] * BK_;

  auto load_stage = [&](int slot, int step) {
    const int64_t m0 = (c_begin + step) * MC;
    T* dA = sA + slot * Cfg::A_ELEMS;
    constexpr int A_CPR = BN_ / 8;
#pragma unroll
    for (int c = tid; c < MC * A_CPR; c += THREADS) {
      const int row = c / A_CPR, col = (c % A_CPR) * 8;
      const int64_t m = m0 + row;
      const bool ok = m < p.M;
      cp_async16(dA + row * Cfg::A_LD + col, ok ? DY + m * p.N + dy_col + col : DY, ok);
    }
    T* dB = sB + slot * Cfg::B_ELEMS;
    constexpr int B_CPR = BK_ / 8;
#pragma unroll
    for (int c = tid; c < MC * B_CPR; c += THREADS) {
      const int row = c / B_CPR, col = (c % B_CPR) * 8;
      const int64_t m = m0 + row;
      const bool ok = m < p.M;
      cp_async16(dB + row * Cfg::B_LD + col, ok ? X + m * p.K + x_col + col : X, ok);
    }
  };

  float acc[MI][NI][4];
  zero_acc(acc);
  cp_async_pipeline<STAGES>(nsteps, load_stage, [&](int slot) {
    const T* tA = sA + slot * Cfg::A_ELEMS;
    const T* tB = sB + slot * Cfg::B_ELEMS;
#pragma unroll
    for (int kk = 0; kk < MC; kk += 16)
      warp_mma_k16<T, MI, NI, true, true>(tA, Cfg::A_LD, tB, Cfg::B_LD, warp_m * Cfg::WM,
                                           warp_n * Cfg::WN, kk, acc, lane);
  });

  float* out = p.acc + i * (BN_ * BK_);
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int a = warp_m * Cfg::WM + mi * 16 + g + h * 8;
        const int b = warp_n * Cfg::WN + ni * 8 + 2 * t;
        atomicAdd(out + a * BK_ + b, acc[mi][ni][2 * h]);
        atomicAdd(out + a * BK_ + b + 1, acc[mi][ni][2 * h + 1]);
      }
}

// fp32: FMA kernel, 32 tokens per step, 256 threads; thread (tx, ty) owns rows ty + 16 i and
// columns tx + 16 j of the block.
template <int BN_, int BK_>
__global__ void __launch_bounds__(256) sdd_simt_kernel(const SddParams p) {
  constexpr int MC = kSimtTokensPerStep, THREADS = 256, TA = BN_ / 16, TB = BK_ / 16;
  __shared__ float As[MC][BN_ + 1];
  __shared__ float Bs[MC][BK_ + 1];
  const int64_t i = blockIdx.x;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t n_chunks = (p.M + MC - 1) / MC;
  const int64_t c_begin = (int64_t)blockIdx.y * p.chunks_per_cta;
  const int64_t c_end = std::min<int64_t>(n_chunks, c_begin + p.chunks_per_cta);
  const float* X = static_cast<const float*>(p.x);
  const float* DY = static_cast<const float*>(p.dy);
  const int64_t dy_col = (int64_t)p.row_idx[i] * BN_;
  const int64_t x_col = (int64_t)p.col_idx[i] * BK_;

  float acc[TA][TB];
#pragma unroll
  for (int a = 0; a < TA; ++a)
#pragma unroll
    for (int b = 0; b < TB; ++b) acc[a][b] = 0.f;

  for (int64_t chunk = c_begin; chunk < c_end; ++chunk) {
    const int64_t m0 = chunk * MC;
    __syncthreads();
    for (int c = tid; c < MC * BN_; c += THREADS) {
      const int r = c / BN_, col = c % BN_;
      const int64_t m = m0 + r;
      As[r][col] = m < p.M ? DY[m * p.N + dy_col + col] : 0.f;
    }
    for (int c = tid; c < MC * BK_; c += THREADS) {
      const int r = c / BK_, col = c % BK_;
      const int64_t m = m0 + r;
      Bs[r][col] = m < p.M ? X[m * p.K + x_col + col] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < MC; ++kk) {
      float av[TA], bv[TB];
#pragma unroll
      for (int a = 0; a < TA; ++a) av[a] = As[kk][ty + 16 * a];
#pragma unroll
      for (int b = 0; b < TB; ++b) bv[b] = Bs[kk][tx + 16 * b];
#pragma unroll
      for (int a = 0; a < TA; ++a)
#pragma unroll
        for (int b = 0; b < TB; ++b) acc[a][b] = fmaf(av[a], bv[b], acc[a][b]);
    }
  }
  float* out = p.acc + i * (BN_ * BK_);
#pragma unroll
  for (int a = 0; a < TA; ++a)
#pragma unroll
    for (int b = 0; b < TB; ++b) atomicAdd(out + (ty + 16 * a) * BK_ + tx + 16 * b, acc[a][b]);
}

template <typename T>
__global__ void convert_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (int64_t)gridDim.x * blockDim.x)
    dst[j] = TypeTraits<T>::from_float(src[j]);
}

constexpr int64_t kMaxGridY = 65535;

template <typename T, int BN_, int BK_>
cudaError_t launch_sdd(SddParams p, int64_t nnz, void* dvalues, cudaStream_t stream) {
  constexpr bool kFp32 = TypeTraits<T>::kDtype == BsrDtype::kFloat32;
  const int64_t n_out = nnz * BN_ * BK_;
  cudaError_t err = cudaMemsetAsync(p.acc, 0, n_out * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  if (p.M > 0) {
    const int mc = kFp32 ? kSimtTokensPerStep : kMmaTokensPerStage;
    const int64_t n_chunks = (p.M + mc - 1) / mc;
    // Split M deep: ~16 CTAs per SM in total (several waves, so the last partial wave costs
    // little; 4 CTAs of the MMA kernel fit an SM), each CTA keeping >= 4 chunks (256 tokens) when
    // it can. Few kept blocks (768x768 at 90%: 14 blocks of 64x64) get splits up to n_chunks / 4;
    // the extra atomics are cheap (one red.add per output element per CTA).
    const int64_t target = 16LL * num_sms();
    int64_t splits = std::max<int64_t>(1, (target + nnz - 1) / nnz);
    splits = std::min<int64_t>(splits, std::max<int64_t>(1, n_chunks / 4));
    int64_t cps = (n_chunks + splits - 1) / splits;
    cps = std::max<int64_t>(cps, (n_chunks + kMaxGridY - 1) / kMaxGridY);
    splits = (n_chunks + cps - 1) / cps;
    p.chunks_per_cta = (int)cps;
    const dim3 grid((unsigned)nnz, (unsigned)splits);
    if constexpr (kFp32) {
      sdd_simt_kernel<BN_, BK_><<<grid, 256, 0, stream>>>(p);
    } else {
      using Cfg = SddMmaCfg<T, BN_, BK_>;
      auto kernel = sdd_mma_kernel<T, BN_, BK_>;
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM_BYTES);
      if (err != cudaSuccess) return err;
      kernel<<<grid, Cfg::THREADS, Cfg::SMEM_BYTES, stream>>>(p);
    }
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if constexpr (!kFp32) {
    const int64_t blocks = std::min<int64_t>((n_out + 255) / 256, 8LL * num_sms());
    convert_kernel<T><<<(unsigned)blocks, 256, 0, stream>>>(p.acc, static_cast<T*>(dvalues), n_out);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_blocks(const SddParams& p, int64_t nnz, void* dvalues, int bn, int bk, cudaStream_t s) {
  if (bn == 64 && bk == 64) return launch_sdd<T, 64, 64>(p, nnz, dvalues, s);
  if (bn == 64 && bk == 32) return launch_sdd<T, 64, 32>(p, nnz, dvalues, s);
  if (bn == 32 && bk == 64) return launch_sdd<T, 32, 64>(p, nnz, dvalues, s);
  if (bn == 32 && bk == 32) return launch_sdd<T, 32, 32>(p, nnz, dvalues, s);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t bsr_grad_weight(BsrDtype dtype, const void* x, const void* dy,
                            const int32_t* row_idx, const int32_t* col_idx, int64_t nnz,
                            void* dvalues, float* workspace,
                            int64_t M, int N, int K, int bn, int bk, cudaStream_t stream) {
  if (!bsr_block_supported(bn, bk) || N % bn || K % bk) return cudaErrorInvalidValue;
  if (nnz <= 0) return cudaSuccess;
  if (nnz > 0x7fffffffLL) return cudaErrorInvalidValue;
  float* acc = dtype == BsrDtype::kFloat32 ? static_cast<float*>(dvalues) : workspace;
  if (acc == nullptr) return cudaErrorInvalidValue;
  SddParams p{x, dy, row_idx, col_idx, acc, M, N, K, 1};
  switch (dtype) {
    case BsrDtype::kFloat16: return dispatch_blocks<__half>(p, nnz, dvalues, bn, bk, stream);
    case BsrDtype::kBFloat16: return dispatch_blocks<__nv_bfloat16>(p, nnz, dvalues, bn, bk, stream);
    case BsrDtype::kFloat32: return dispatch_blocks<float>(p, nnz, dvalues, bn, bk, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sparsebert
