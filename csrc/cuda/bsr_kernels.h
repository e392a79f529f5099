// Host entry points of the block-sparse CUDA kernels (csrc/cuda/*.cu).
//
// Plain C++: raw device pointers, sizes, a stream and a dtype tag; no torch headers, so the .cu
// files compile in about a second each. The torch binding (bsr_cuda.cpp) checks inputs, allocates
// outputs and calls these. Every function returns cudaGetLastError() after its launches
// (cudaSuccess when there was nothing to launch).
//
// Shapes (row-major, contiguous):  x [M, K], dy [M, N], y [M, N], dx [M, K],
// values / dvalues [nnz, bn, bk]; block (r, c) covers W[r*bn : +bn, c*bk : +bk].
// Index arrays (int32, device) are those of sparsebert.layout (docs/CONTRACT.md):
// row_ptr [R+1], col_idx [nnz], row_idx [nnz], col_ptr [C+1], t_row_idx [nnz], t_perm [nnz].
// Pointers must be 16-byte aligned. M may be anything >= 0 (tails are masked).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace sparsebert {
namespace cuda {

enum class BsrDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Block sizes the kernels are instantiated for: bn, bk each in {32, 64}.
inline bool bsr_block_supported(int bn, int bk) {
  return (bn == 32 || bn == 64) && (bk == 32 || bk == 64);
}

// y = x W^T + bias   (bias may be nullptr). Empty row-blocks give bias (or zeros).
cudaError_t bsr_forward(BsrDtype dtype, const void* x, const void* values, const void* bias,
                        const int32_t* row_ptr, const int32_t* col_idx, void* y,
                        int64_t M, int N, int K, int bn, int bk, cudaStream_t stream);

// dx = dy W   (walks the transposed index).
cudaError_t bsr_grad_input(BsrDtype dtype, const void* dy, const void* values,
                           const int32_t* col_ptr, const int32_t* t_row_idx, const int32_t* t_perm,
                           void* dx, int64_t M, int N, int K, int bn, int bk, cudaStream_t stream);

// dvalues[i] = dy[:, row_idx[i]*bn : +bn]^T x[:, col_idx[i]*bk : +bk]   (kept blocks only).
// `workspace`: nnz*bn*bk floats of device memory for the fp32 split-M reduction; needed for
// fp16/bf16 (ignored for fp32, which accumulates into dvalues directly).
cudaError_t bsr_grad_weight(BsrDtype dtype, const void* x, const void* dy,
                            const int32_t* row_idx, const int32_t* col_idx, int64_t nnz,
                            void* dvalues, float* workspace,
                            int64_t M, int N, int K, int bn, int bk, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparsebert
