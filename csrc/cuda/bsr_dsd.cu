// Dense x block-sparse products ("DSD"): the forward y = x W^T + bias and the input gradient
// dx = dy W. Both walk a compressed list of kept blocks per output block-column:
//
//   forward    : output block o = row-block r of W (width bn); entries row_ptr[r]..row_ptr[r+1];
//                entry e multiplies x[:, col_idx[e]*bk : +bk] by values[e]^T  (values[e] is
//                [bn][bk] = [n][k], k contiguous)
//   grad_input : output block o = col-block c of W (width bk); entries col_ptr[c]..col_ptr[c+1];
//                entry e multiplies dy[:, t_row_idx[e]*bn : +bn] by values[t_perm[e]]
//                ([bn][bk] = [k][n], n contiguous: "B_TRANS")
//
// fp16 / bf16: tensor cores (mma.sync m16n8k16, fp32 accumulation): one CTA = 128 tokens x one
// output block, each kept block one step of a cp.async pipeline (cp_async_pipeline in
// bsr_common.cuh); the warp layout and depth per block size are DsdShape's. smem rows padded by
// 16 bytes so ldmatrix and cp.async are bank-conflict free.
// fp32: a plain FMA kernel (64 tokens x one output block, 256 threads), exact fp32.
// Tokens past M are zero-filled on load and never stored.
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

struct DsdParams {
  const void* A;         // [M, lda] dense operand (x or dy)
  int64_t lda;
  const void* values;    // [nnz, bn, bk]
  const void* bias;      // [n_out_blocks * BNO] or nullptr
  const int32_t* ptr;    // [n_out_blocks + 1]
  const int32_t* a_blk;  // [nnz] block-column of A for each entry
  const int32_t* perm;   // [nnz] entry -> index into values, or nullptr (identity)
  void* out;             // [M, ldo]
  int64_t ldo;
  int64_t M;
};

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel (fp16 / bf16): one CTA = BM = 128 tokens x one output block (BNO wide); each
// kept block of the output block's list is one step of the cp.async pipeline (the A tile
// [128, BKB] at its column block, the weight block [BNO, BKB]), WARPS_M x WARPS_N warps over the
// [128, BNO] accumulator tile. Two tile shapes, chosen per block size by DsdShape below.
template <typename T, int BNO, int BKB, bool B_TRANS, int WARPS_M_, int WARPS_N_, int STAGES_>
struct DsdCfg {
  static constexpr int BM = 128;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M, WN = BNO / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;
  static constexpr int A_LD = BKB + 8;                   // padded rows: conflict-free ldmatrix
  static constexpr int B_ROWS = B_TRANS ? BKB : BNO;     // rows of the weight block in memory
  static constexpr int B_COLS = B_TRANS ? BNO : BKB;
  static constexpr int B_LD = B_COLS + 8;
  static constexpr int A_ELEMS = BM * A_LD;
  static constexpr int B_ELEMS = B_ROWS * B_LD;
  static constexpr int SMEM_BYTES = STAGES * (A_ELEMS + B_ELEMS) * (int)sizeof(T);
  static_assert(WM % 16 == 0 && WN % 16 == 0 && BKB % 16 == 0, "tile shapes");
  static_assert(SMEM_BYTES <= 227 * 1024, "shared memory");
};

// The tile shape per (BNO, BKB), from the H200 run 2 timings of the then four variants
// (benchmarks/RESULTS.md, results/h200_run2_cuda_variants.*; bf16, BERT-Base shapes, 50/75/90%):
//   32x32 blocks: 8 warps of 32x32 tiles, 3 stages (run 2's variant 0: fastest in 9/9 forward and
//     8/9 input-gradient cases; variant 1, 4 warps with two blocks per stage, geomean 0.95/0.98 of it)
//   64x64 blocks: 4 warps of 64x32 tiles, 4 stages (variant 1: 6/9 and 9/9; variant 0 0.98/0.97)
// Variants 2 (256 tokens) and 3 (128-deep stages) never won and are gone. The mixed blocks
// (32x64, 64x32) were not timed: they take the 8-warp shape.
template <int BNO, int BKB>
struct DsdShape {
  static constexpr bool kWide = BNO == 64 && BKB == 64;
  static constexpr int WARPS_M = kWide ? 2 : 4, WARPS_N = 2, STAGES = kWide ? 4 : 3;
};

template <typename T, int BNO, int BKB, bool B_TRANS>
using DsdMmaCfg = DsdCfg<T, BNO, BKB, B_TRANS, DsdShape<BNO, BKB>::WARPS_M, DsdShape<BNO, BKB>::WARPS_N,
                         DsdShape<BNO, BKB>::STAGES>;

template <typename T, int BNO, int BKB, bool B_TRANS>
__global__ void __launch_bounds__(DsdMmaCfg<T, BNO, BKB, B_TRANS>::THREADS, 2) dsd_mma_kernel(const DsdParams p) {
  using Cfg = DsdMmaCfg<T, BNO, BKB, B_TRANS>;
  constexpr int BM = Cfg::BM, THREADS = Cfg::THREADS;
  constexpr int MI = Cfg::MI, NI = Cfg::NI;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);
  T* sB = sA + Cfg::STAGES * Cfg::A_ELEMS;

  const int o = blockIdx.x;
  const int64_t m_base = (int64_t)blockIdx.y * BM;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp % Cfg::WARPS_M, warp_n = warp / Cfg::WARPS_M;
  const int begin = p.ptr[o], nblk = p.ptr[o + 1] - begin;
  const T* A = static_cast<const T*>(p.A);
  const T* V = static_cast<const T*>(p.values);

  auto load = [&](int slot, int step) {
    const int e = begin + step;
    const int64_t a_col = (int64_t)p.a_blk[e] * BKB;
    const int64_t vi = p.perm ? p.perm[e] : e;
    T* dA = sA + slot * Cfg::A_ELEMS;
    constexpr int A_CPR = BKB / 8;  // 16-byte chunks per row
#pragma unroll
    for (int c = tid; c < BM * A_CPR; c += THREADS) {
      const int row = c / A_CPR, col = (c % A_CPR) * 8;
      const int64_t m = m_base + row;
      const bool ok = m < p.M;
      cp_async16(dA + row * Cfg::A_LD + col, ok ? A + m * p.lda + a_col + col : A, ok);
    }
    T* dB = sB + slot * Cfg::B_ELEMS;
    const T* gB = V + vi * (BNO * BKB);
    constexpr int B_CPR = Cfg::B_COLS / 8;
#pragma unroll
    for (int c = tid; c < Cfg::B_ROWS * B_CPR; c += THREADS) {
      const int row = c / B_CPR, col = (c % B_CPR) * 8;
      cp_async16(dB + row * Cfg::B_LD + col, gB + row * Cfg::B_COLS + col, true);
    }
  };

  float acc[MI][NI][4];
  zero_acc(acc);
  cp_async_pipeline<Cfg::STAGES>(nblk, load, [&](int slot) {
    const T* tA = sA + slot * Cfg::A_ELEMS;
    const T* tB = sB + slot * Cfg::B_ELEMS;
#pragma unroll
    for (int kk = 0; kk < BKB; kk += 16)
      warp_mma_k16<T, MI, NI, false, B_TRANS>(tA, Cfg::A_LD, tB, Cfg::B_LD, warp_m * Cfg::WM,
                                               warp_n * Cfg::WN, kk, acc, lane);
  });

  // Epilogue: + bias, convert, store rows < M.
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int ni = 0; ni < NI; ++ni) {
    const int64_t col = (int64_t)o * BNO + warp_n * Cfg::WN + ni * 8 + 2 * t;
    float b0 = 0.f, b1 = 0.f;
    if (bias) {
      b0 = TypeTraits<T>::to_float(bias[col]);
      b1 = TypeTraits<T>::to_float(bias[col + 1]);
    }
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m_base + warp_m * Cfg::WM + mi * 16 + g + h * 8;
        if (row < p.M) {
          const uint32_t v = TypeTraits<T>::pack2(acc[mi][ni][2 * h] + b0, acc[mi][ni][2 * h + 1] + b1);
          *reinterpret_cast<uint32_t*>(out + row * p.ldo + col) = v;
        }
      }
  }
}

// ---------------------------------------------------------------------------------------------
// FMA kernel (fp32): 64 tokens x one output block, k in chunks of 32.
template <int BNO, int BKB, bool B_TRANS>
__global__ void __launch_bounds__(256, 2) dsd_simt_kernel(const DsdParams p) {
  constexpr int BM = 64, KT = 32, THREADS = 256, TM = BM / 16, TN = BNO / 16;
  __shared__ float As[BM][KT + 1];
  __shared__ float Bs[BNO][KT + 1];  // Bs[n][k]
  const int o = blockIdx.x;
  const int64_t m_base = (int64_t)blockIdx.y * BM;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int begin = p.ptr[o], end = p.ptr[o + 1];
  const float* A = static_cast<const float*>(p.A);
  const float* V = static_cast<const float*>(p.values);

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

  for (int e = begin; e < end; ++e) {
    const int64_t a_col = (int64_t)p.a_blk[e] * BKB;
    const float* gB = V + (int64_t)(p.perm ? p.perm[e] : e) * (BNO * BKB);
    for (int k0 = 0; k0 < BKB; k0 += KT) {
      __syncthreads();
      for (int c = tid; c < BM * KT; c += THREADS) {
        const int r = c / KT, kk = c % KT;
        const int64_t m = m_base + r;
        As[r][kk] = m < p.M ? A[m * p.lda + a_col + k0 + kk] : 0.f;
      }
      for (int c = tid; c < BNO * KT; c += THREADS) {
        if (!B_TRANS) {  // memory [n][k]
          const int n = c / KT, kk = c % KT;
          Bs[n][kk] = gB[n * BKB + k0 + kk];
        } else {         // memory [k][n]
          const int kk = c / BNO, n = c % BNO;
          Bs[n][kk] = gB[(k0 + kk) * BNO + n];
        }
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < KT; ++kk) {
        float a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = As[ty * TM + i][kk];
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = Bs[tx + 16 * j][kk];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
  }
  float* out = static_cast<float*>(p.out);
  const float* bias = static_cast<const float*>(p.bias);
#pragma unroll
  for (int j = 0; j < TN; ++j) {
    const int64_t col = (int64_t)o * BNO + tx + 16 * j;
    const float bj = bias ? bias[col] : 0.f;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t row = m_base + ty * TM + i;
      if (row < p.M) out[row * p.ldo + col] = acc[i][j] + bj;
    }
  }
}

// ---------------------------------------------------------------------------------------------
constexpr int64_t kMaxGridY = 65535;

// Launches `kernel` over all M (in chunks of kMaxGridY row tiles), grid (n_out_blocks, tiles).
template <typename T>
cudaError_t launch_grid(void (*kernel)(const DsdParams), const DsdParams& p, int n_out_blocks, int bm,
                        int threads, int smem, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const int64_t rows_per_launch = kMaxGridY * bm;
  for (int64_t start = 0; start < p.M; start += rows_per_launch) {
    DsdParams q = p;
    q.A = static_cast<const T*>(p.A) + start * p.lda;
    q.out = static_cast<T*>(p.out) + start * p.ldo;
    q.M = std::min(rows_per_launch, p.M - start);
    const dim3 grid(n_out_blocks, (unsigned)((q.M + bm - 1) / bm));
    kernel<<<grid, threads, smem, stream>>>(q);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T, int BNO, int BKB, bool B_TRANS>
cudaError_t launch_dsd(const DsdParams& p, int n_out_blocks, cudaStream_t stream) {
  if (p.M <= 0 || n_out_blocks <= 0) return cudaSuccess;
  if constexpr (TypeTraits<T>::kDtype == BsrDtype::kFloat32) {
    return launch_grid<T>(dsd_simt_kernel<BNO, BKB, B_TRANS>, p, n_out_blocks, 64, 256, 0, stream);
  } else {
    using Cfg = DsdMmaCfg<T, BNO, BKB, B_TRANS>;
    return launch_grid<T>(dsd_mma_kernel<T, BNO, BKB, B_TRANS>, p, n_out_blocks, Cfg::BM, Cfg::THREADS,
                          Cfg::SMEM_BYTES, stream);
  }
}

// Calls launch_dsd<T, BNO, BKB, B_TRANS> for the run-time block sizes.
template <typename T, bool B_TRANS>
cudaError_t dispatch_blocks(const DsdParams& p, int n_out_blocks, int bno, int bkb, cudaStream_t s) {
  if (bno == 64 && bkb == 64) return launch_dsd<T, 64, 64, B_TRANS>(p, n_out_blocks, s);
  if (bno == 64 && bkb == 32) return launch_dsd<T, 64, 32, B_TRANS>(p, n_out_blocks, s);
  if (bno == 32 && bkb == 64) return launch_dsd<T, 32, 64, B_TRANS>(p, n_out_blocks, s);
  if (bno == 32 && bkb == 32) return launch_dsd<T, 32, 32, B_TRANS>(p, n_out_blocks, s);
  return cudaErrorInvalidValue;
}

template <bool B_TRANS>
cudaError_t dispatch(BsrDtype dtype, const DsdParams& p, int n_out_blocks, int bno, int bkb, cudaStream_t s) {
  switch (dtype) {
    case BsrDtype::kFloat16: return dispatch_blocks<__half, B_TRANS>(p, n_out_blocks, bno, bkb, s);
    case BsrDtype::kBFloat16: return dispatch_blocks<__nv_bfloat16, B_TRANS>(p, n_out_blocks, bno, bkb, s);
    case BsrDtype::kFloat32: return dispatch_blocks<float, B_TRANS>(p, n_out_blocks, bno, bkb, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t bsr_forward(BsrDtype dtype, const void* x, const void* values, const void* bias,
                        const int32_t* row_ptr, const int32_t* col_idx, void* y,
                        int64_t M, int N, int K, int bn, int bk, cudaStream_t stream) {
  if (!bsr_block_supported(bn, bk) || N <= 0 || K <= 0 || N % bn || K % bk || M < 0) return cudaErrorInvalidValue;
  DsdParams p{x, K, values, bias, row_ptr, col_idx, nullptr, y, N, M};
  return dispatch<false>(dtype, p, N / bn, /*bno=*/bn, /*bkb=*/bk, stream);
}

cudaError_t bsr_grad_input(BsrDtype dtype, const void* dy, const void* values,
                           const int32_t* col_ptr, const int32_t* t_row_idx, const int32_t* t_perm,
                           void* dx, int64_t M, int N, int K, int bn, int bk, cudaStream_t stream) {
  if (!bsr_block_supported(bn, bk) || N <= 0 || K <= 0 || N % bn || K % bk || M < 0) return cudaErrorInvalidValue;
  DsdParams p{dy, N, values, nullptr, col_ptr, t_row_idx, t_perm, dx, K, M};
  return dispatch<true>(dtype, p, K / bk, /*bno=*/bk, /*bkb=*/bn, stream);
}

}  // namespace cuda
}  // namespace sparsebert
