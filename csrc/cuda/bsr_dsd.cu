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
// fp16 / bf16: tensor cores (mma.sync m16n8k16, fp32 accumulation), variants (bsr_kernels.h):
//   0 (legacy): one CTA = 128 tokens x one output block, 8 warps (4 along tokens x 2 along the
//     block), each kept block is one stage of a 3-deep cp.async pipeline.
//   1..3 (dsd_tile_kernel): each stage gathers G kept blocks (KS = G*bk deep), 64x32 warp tiles.
// smem rows padded by 16 bytes so ldmatrix and cp.async are bank-conflict free.
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
// Tensor-core kernel (fp16 / bf16).
template <typename T, int BNO, int BKB, bool B_TRANS>
struct DsdMmaCfg {
  static constexpr int BM = 128;
  static constexpr int THREADS = 256;
  static constexpr int WARPS_M = 4, WARPS_N = 2;
  static constexpr int WM = BM / WARPS_M;        // 32
  static constexpr int WN = BNO / WARPS_N;       // 32 or 16
  static constexpr int MI = WM / 16, NI = WN / 8;
  static constexpr int STAGES = 3;
  static constexpr int A_LD = BKB + 8;                   // padded row (elements)
  static constexpr int B_ROWS = B_TRANS ? BKB : BNO;     // rows of the weight block in memory
  static constexpr int B_COLS = B_TRANS ? BNO : BKB;
  static constexpr int B_LD = B_COLS + 8;
  static constexpr int A_ELEMS = BM * A_LD;
  static constexpr int B_ELEMS = B_ROWS * B_LD;
  static constexpr int SMEM_BYTES = STAGES * (A_ELEMS + B_ELEMS) * (int)sizeof(T);
  static_assert(WARPS_M * WARPS_N * 32 == THREADS, "warp layout");
  static_assert(WN % 16 == 0 && BKB % 16 == 0, "tile shapes");
};

template <typename T, int BNO, int BKB, bool B_TRANS>
__global__ void __launch_bounds__(256, 2) dsd_mma_kernel(const DsdParams p) {
  using Cfg = DsdMmaCfg<T, BNO, BKB, B_TRANS>;
  constexpr int BM = Cfg::BM, THREADS = Cfg::THREADS, STAGES = Cfg::STAGES;
  constexpr int MI = Cfg::MI, NI = Cfg::NI;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);
  T* sB = sA + STAGES * Cfg::A_ELEMS;

  const int o = blockIdx.x;
  const int64_t m_base = (int64_t)blockIdx.y * BM;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp % Cfg::WARPS_M, warp_n = warp / Cfg::WARPS_M;
  const int begin = p.ptr[o], nblk = p.ptr[o + 1] - begin;
  const T* A = static_cast<const T*>(p.A);
  const T* V = static_cast<const T*>(p.values);

  auto load_stage = [&](int slot, int e) {
    const int64_t a_col = (int64_t)p.a_blk[e] * BKB;
    const int64_t vi = p.perm ? p.perm[e] : e;
    T* dA = sA + slot * Cfg::A_ELEMS;
    constexpr int A_CPR = BKB / 8;  // 16-byte chunks per row
#pragma unroll
    for (int c = tid; c < BM * A_CPR; c += THREADS) {
      const int row = c / A_CPR, col = (c % A_CPR) * 8;
      const int64_t m = m_base + row;
      const bool ok = m < p.M;
      const T* src = ok ? A + m * p.lda + a_col + col : A;
      cp_async16(dA + row * Cfg::A_LD + col, src, ok);
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
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.f;

  // Prologue: stages 0 .. STAGES-2 (one commit group each, empty when past the end).
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nblk) load_stage(s, begin + s);
    cp_async_commit();
  }
  for (int it = 0; it < nblk; ++it) {
    cp_async_wait<STAGES - 2>();  // stage `it` has landed (for this thread) ...
    __syncthreads();              // ... for all threads; and everyone is done with stage it-1
    const int pre = it + STAGES - 1;
    if (pre < nblk) load_stage(pre % STAGES, begin + pre);
    cp_async_commit();
    const int slot = it % STAGES;
    const T* tA = sA + slot * Cfg::A_ELEMS;
    const T* tB = sB + slot * Cfg::B_ELEMS;
#pragma unroll
    for (int kk = 0; kk < BKB; kk += 16)
      warp_mma_k16<T, MI, NI, false, B_TRANS>(tA, Cfg::A_LD, tB, Cfg::B_LD, warp_m * Cfg::WM,
                                               warp_n * Cfg::WN, kk, acc, lane);
  }
  cp_async_wait<0>();

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
// Tensor-core kernel, variants 1..3 (fp16 / bf16): each pipeline stage is KS deep in k, i.e. it
// gathers G = KS / BKB consecutive kept blocks (their A column blocks side by side in one smem
// tile, their weight blocks stacked along k), so one __syncthreads covers KS/16 k16 steps of
// (WM x 32) warp tiles. A stage past the end of the list is zero-filled (A and B), so partial
// last stages are exact. Warps: BNO/32 along the output block, the rest along tokens.
template <typename T, int BNO, int BKB, bool B_TRANS, int BM, int WARPS, int KS, int STAGES>
struct DsdTileCfg {
  static constexpr int THREADS = WARPS * 32;
  static constexpr int WARPS_N = BNO / 32;            // 64 -> 2, 32 -> 1
  static constexpr int WARPS_M = WARPS / WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BNO / WARPS_N;  // WN = 32
  static constexpr int MI = WM / 16, NI = WN / 8;
  static constexpr int G = KS / BKB;                  // kept blocks per stage
  static constexpr int A_LD = KS + 8;                 // padded rows: conflict-free ldmatrix
  static constexpr int B_ROWS = B_TRANS ? KS : BNO;
  static constexpr int B_COLS = B_TRANS ? BNO : KS;
  static constexpr int B_LD = B_COLS + 8;
  static constexpr int A_ELEMS = BM * A_LD;
  static constexpr int B_ELEMS = B_ROWS * B_LD;
  static constexpr int SMEM_BYTES = STAGES * (A_ELEMS + B_ELEMS) * (int)sizeof(T);
  static_assert(KS % BKB == 0 && G >= 1, "stage depth must be a multiple of the block depth");
  static_assert(WARPS % WARPS_N == 0 && BM % (WARPS_M * 16) == 0 && WN == 32, "warp layout");
  static_assert(SMEM_BYTES <= 227 * 1024, "shared memory");
};

template <typename T, int BNO, int BKB, bool B_TRANS, int BM, int WARPS, int KS, int STAGES, int MINB>
__global__ void __launch_bounds__(WARPS * 32, MINB) dsd_tile_kernel(const DsdParams p) {
  using Cfg = DsdTileCfg<T, BNO, BKB, B_TRANS, BM, WARPS, KS, STAGES>;
  constexpr int THREADS = Cfg::THREADS, MI = Cfg::MI, NI = Cfg::NI, G = Cfg::G;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);
  T* sB = sA + STAGES * Cfg::A_ELEMS;

  const int o = blockIdx.x;
  const int64_t m_base = (int64_t)blockIdx.y * BM;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp % Cfg::WARPS_M, warp_n = warp / Cfg::WARPS_M;
  const int begin = p.ptr[o], nblk = p.ptr[o + 1] - begin;
  const int nst = (nblk + G - 1) / G;
  const T* A = static_cast<const T*>(p.A);
  const T* V = static_cast<const T*>(p.values);

  auto load_stage = [&](int slot, int st) {
    T* dA = sA + slot * Cfg::A_ELEMS;
    T* dB = sB + slot * Cfg::B_ELEMS;
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const int e = st * G + j;
      const bool have = e < nblk;
      const int64_t a_col = have ? (int64_t)p.a_blk[begin + e] * BKB : 0;
      const int64_t vi = have ? (p.perm ? p.perm[begin + e] : begin + e) : 0;
      constexpr int A_CPR = BKB / 8;  // 16-byte chunks per row
#pragma unroll
      for (int c = tid; c < BM * A_CPR; c += THREADS) {
        const int row = c / A_CPR, col = (c % A_CPR) * 8;
        const int64_t m = m_base + row;
        const bool ok = have && m < p.M;
        cp_async16(dA + row * Cfg::A_LD + j * BKB + col, ok ? A + m * p.lda + a_col + col : A, ok);
      }
      const T* gB = V + vi * (BNO * BKB);
      if (!B_TRANS) {  // memory [BNO][BKB] (n rows, k contiguous) -> sB[n][j*BKB + k]
        constexpr int CPR = BKB / 8;
#pragma unroll
        for (int c = tid; c < BNO * CPR; c += THREADS) {
          const int n = c / CPR, k = (c % CPR) * 8;
          cp_async16(dB + n * Cfg::B_LD + j * BKB + k, have ? gB + n * BKB + k : V, have);
        }
      } else {         // memory [BKB][BNO] (k rows, n contiguous) -> sB[j*BKB + k][n]
        constexpr int CPR = BNO / 8;
#pragma unroll
        for (int c = tid; c < BKB * CPR; c += THREADS) {
          const int k = c / CPR, n = (c % CPR) * 8;
          cp_async16(dB + (j * BKB + k) * Cfg::B_LD + n, have ? gB + k * BNO + n : V, have);
        }
      }
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nst) load_stage(s, s);
    cp_async_commit();
  }
  for (int it = 0; it < nst; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int pre = it + STAGES - 1;
    if (pre < nst) load_stage(pre % STAGES, pre);
    cp_async_commit();
    const int slot = it % STAGES;
    const T* tA = sA + slot * Cfg::A_ELEMS;
    const T* tB = sB + slot * Cfg::B_ELEMS;
#pragma unroll
    for (int kk = 0; kk < KS; kk += 16)
      warp_mma_k16<T, MI, NI, false, B_TRANS>(tA, Cfg::A_LD, tB, Cfg::B_LD, warp_m * Cfg::WM,
                                               warp_n * Cfg::WN, kk, acc, lane);
  }
  cp_async_wait<0>();

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

template <typename T, int BNO, int BKB, bool B_TRANS, int BM, int WARPS, int KS, int STAGES, int MINB>
cudaError_t launch_tile(const DsdParams& p, int n_out_blocks, cudaStream_t stream) {
  using Cfg = DsdTileCfg<T, BNO, BKB, B_TRANS, BM, WARPS, KS, STAGES>;
  return launch_grid<T>(dsd_tile_kernel<T, BNO, BKB, B_TRANS, BM, WARPS, KS, STAGES, MINB>, p, n_out_blocks,
                        BM, Cfg::THREADS, Cfg::SMEM_BYTES, stream);
}

template <typename T, int BNO, int BKB, bool B_TRANS>
cudaError_t launch_dsd(const DsdParams& p, int n_out_blocks, int variant, cudaStream_t stream) {
  if (p.M <= 0 || n_out_blocks <= 0) return cudaSuccess;
  if constexpr (TypeTraits<T>::kDtype == BsrDtype::kFloat32) {
    return launch_grid<T>(dsd_simt_kernel<BNO, BKB, B_TRANS>, p, n_out_blocks, 64, 256, 0, stream);
  } else {
    switch (variant) {
      case 0: {
        using Cfg = DsdMmaCfg<T, BNO, BKB, B_TRANS>;
        return launch_grid<T>(dsd_mma_kernel<T, BNO, BKB, B_TRANS>, p, n_out_blocks, Cfg::BM, Cfg::THREADS,
                              Cfg::SMEM_BYTES, stream);
      }
      //                                          BM  WARPS KS  STAGES MINB
      case 1: return launch_tile<T, BNO, BKB, B_TRANS, 128, 4, 64, 4, 2>(p, n_out_blocks, stream);
      case 2: return launch_tile<T, BNO, BKB, B_TRANS, 256, 8, 64, 3, 1>(p, n_out_blocks, stream);
      case 3: return launch_tile<T, BNO, BKB, B_TRANS, 128, 4, 128, 3, 1>(p, n_out_blocks, stream);
      default: return cudaErrorInvalidValue;
    }
  }
}

// Calls launch_dsd<T, BNO, BKB, B_TRANS> for the run-time block sizes.
template <typename T, bool B_TRANS>
cudaError_t dispatch_blocks(const DsdParams& p, int n_out_blocks, int bno, int bkb, int v, cudaStream_t s) {
  if (bno == 64 && bkb == 64) return launch_dsd<T, 64, 64, B_TRANS>(p, n_out_blocks, v, s);
  if (bno == 64 && bkb == 32) return launch_dsd<T, 64, 32, B_TRANS>(p, n_out_blocks, v, s);
  if (bno == 32 && bkb == 64) return launch_dsd<T, 32, 64, B_TRANS>(p, n_out_blocks, v, s);
  if (bno == 32 && bkb == 32) return launch_dsd<T, 32, 32, B_TRANS>(p, n_out_blocks, v, s);
  return cudaErrorInvalidValue;
}

template <bool B_TRANS>
cudaError_t dispatch(BsrDtype dtype, const DsdParams& p, int n_out_blocks, int bno, int bkb, int variant,
                     cudaStream_t s) {
  if (variant < 0) variant = kDsdDefaultVariant;
  if (variant >= kDsdNumVariants) return cudaErrorInvalidValue;
  switch (dtype) {
    case BsrDtype::kFloat16: return dispatch_blocks<__half, B_TRANS>(p, n_out_blocks, bno, bkb, variant, s);
    case BsrDtype::kBFloat16: return dispatch_blocks<__nv_bfloat16, B_TRANS>(p, n_out_blocks, bno, bkb, variant, s);
    case BsrDtype::kFloat32: return dispatch_blocks<float, B_TRANS>(p, n_out_blocks, bno, bkb, variant, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t bsr_forward(BsrDtype dtype, const void* x, const void* values, const void* bias,
                        const int32_t* row_ptr, const int32_t* col_idx, void* y,
                        int64_t M, int N, int K, int bn, int bk, cudaStream_t stream, int variant) {
  if (!bsr_block_supported(bn, bk) || N <= 0 || K <= 0 || N % bn || K % bk || M < 0) return cudaErrorInvalidValue;
  DsdParams p{x, K, values, bias, row_ptr, col_idx, nullptr, y, N, M};
  return dispatch<false>(dtype, p, N / bn, /*bno=*/bn, /*bkb=*/bk, variant, stream);
}

cudaError_t bsr_grad_input(BsrDtype dtype, const void* dy, const void* values,
                           const int32_t* col_ptr, const int32_t* t_row_idx, const int32_t* t_perm,
                           void* dx, int64_t M, int N, int K, int bn, int bk, cudaStream_t stream,
                           int variant) {
  if (!bsr_block_supported(bn, bk) || N <= 0 || K <= 0 || N % bn || K % bk || M < 0) return cudaErrorInvalidValue;
  DsdParams p{dy, N, values, nullptr, col_ptr, t_row_idx, t_perm, dx, K, M};
  return dispatch<true>(dtype, p, K / bk, /*bno=*/bk, /*bkb=*/bn, variant, stream);
}

}  // namespace cuda
}  // namespace sparsebert
