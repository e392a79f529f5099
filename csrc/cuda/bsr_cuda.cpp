// Torch bindings of the block-sparse CUDA kernels: namespace `sparsebert_cuda`.
//
//   forward(x, values, bias, index, N, K, bn, bk)   -> y  [M, N]   y = x W^T + bias
//   grad_input(dy, values, index, N, K, bn, bk)     -> dx [M, K]   dx = dy W
//   grad_weight(x, dy, index, N, K, bn, bk)         -> dvalues [nnz, bn, bk]
//
// `index` is the packed int32 layout index of sparsebert.layout.pack_index:
//   [row_ptr R+1 | col_idx nnz | row_idx nnz | col_ptr C+1 | t_row_idx nnz | t_perm nnz]
// with R = N / bn, C = K / bk. Its contents are trusted (built by BlockLayout); its length,
// dtype and device are checked. Every entry point checks its inputs, runs on the inputs' device
// and the current stream, and checks the launch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "bsr_kernels.h"

namespace sparsebert {
namespace cuda {
namespace {

#define CHECK_DEVICE(x) TORCH_CHECK((x).is_cuda(), "sparsebert_cuda: " #x " must be a CUDA tensor, got device ", (x).device())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), "sparsebert_cuda: " #x " must be contiguous")
#define CHECK_SAME_DEVICE(x, ref)                                                                  \
  TORCH_CHECK((x).device() == (ref).device(), "sparsebert_cuda: " #x " is on ", (x).device(), " but " #ref " is on ", (ref).device())
#define CHECK_ALIGNED(x)                                                                           \
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>((x).data_ptr()) % 16 == 0,                          \
              "sparsebert_cuda: " #x " must be 16-byte aligned (its storage offset is ", (x).storage_offset(), \
              "); pass a fresh contiguous tensor (.contiguous() of a copy)")

BsrDtype to_bsr_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kHalf: return BsrDtype::kFloat16;
    case at::kBFloat16: return BsrDtype::kBFloat16;
    case at::kFloat: return BsrDtype::kFloat32;
    default:
      TORCH_CHECK(false, "sparsebert_cuda: ", name, " must be float16, bfloat16 or float32, got ", t);
  }
}

void check_layout_args(int64_t N, int64_t K, int64_t bn, int64_t bk) {
  TORCH_CHECK(bsr_block_supported((int)bn, (int)bk) && bn == (int)bn && bk == (int)bk,
              "sparsebert_cuda: block (", bn, ", ", bk, ") is not supported; the CUDA kernels are built for "
              "bn and bk in {32, 64} (use another backend for other block sizes)");
  TORCH_CHECK(N > 0 && K > 0 && N <= std::numeric_limits<int>::max() && K <= std::numeric_limits<int>::max(),
              "sparsebert_cuda: weight shape (", N, ", ", K, ") out of range");
  TORCH_CHECK(N % bn == 0 && K % bk == 0, "sparsebert_cuda: block (", bn, ", ", bk,
              ") does not divide the weight shape (", N, ", ", K, ")");
}

void check_dense(const at::Tensor& t, const char* name, int64_t cols) {
  TORCH_CHECK(t.dim() == 2, "sparsebert_cuda: ", name, " must be 2-D [M, ", cols, "], got shape ", t.sizes());
  TORCH_CHECK(t.size(1) == cols, "sparsebert_cuda: ", name, " must have ", cols, " columns, got shape ", t.sizes());
}

// Rows of M elements of a 2-byte / 4-byte dtype whose length is a multiple of 32 elements are
// 64-byte multiples, so 16-byte alignment of the base pointer (checked) is all cp.async needs.
void check_rows_aligned(const at::Tensor& t, const char* name) {
  TORCH_CHECK((t.size(1) * t.element_size()) % 16 == 0, "sparsebert_cuda: ", name, " rows of ", t.size(1),
              " elements are not a multiple of 16 bytes");
}

struct Index {
  const int32_t *row_ptr, *col_idx, *row_idx, *col_ptr, *t_row_idx, *t_perm;
  int64_t nnz;
};

// Views into the packed index. nnz < 0: derive it from the index length.
Index unpack(const at::Tensor& index, const at::Tensor& ref, int64_t N, int64_t K, int64_t bn, int64_t bk,
             int64_t nnz) {
  CHECK_DEVICE(index);
  CHECK_SAME_DEVICE(index, ref);
  CHECK_CONTIGUOUS(index);
  TORCH_CHECK(index.scalar_type() == at::kInt, "sparsebert_cuda: index must be int32, got ", index.scalar_type());
  TORCH_CHECK(index.dim() == 1, "sparsebert_cuda: index must be 1-D, got shape ", index.sizes());
  const int64_t R = N / bn, C = K / bk, len = index.numel();
  if (nnz < 0) {
    const int64_t rest = len - (R + 1) - (C + 1);
    TORCH_CHECK(rest >= 0 && rest % 4 == 0, "sparsebert_cuda: index has ", len,
                " entries, which is not (R+1) + (C+1) + 4*nnz for R = ", R, ", C = ", C,
                " (weight (", N, ", ", K, "), block (", bn, ", ", bk, "))");
    nnz = rest / 4;
  }
  TORCH_CHECK(nnz >= 0 && nnz <= R * C, "sparsebert_cuda: ", nnz, " kept blocks, but the weight has only ", R * C);
  TORCH_CHECK(nnz <= std::numeric_limits<int32_t>::max(), "sparsebert_cuda: too many kept blocks (", nnz, ")");
  const int64_t expected = (R + 1) + (C + 1) + 4 * nnz;
  TORCH_CHECK(len == expected, "sparsebert_cuda: index has ", len, " entries, expected ", expected,
              " for a (", N, ", ", K, ") weight with block (", bn, ", ", bk, ") and ", nnz, " kept blocks");
  // Device pointers: only offsets are computed here, the contents are never read on the host.
  const int32_t* p = index.data_ptr<int32_t>();
  TORCH_CHECK(p != nullptr, "sparsebert_cuda: index has no storage");
  Index ix;
  ix.row_ptr = p;
  ix.col_idx = ix.row_ptr + (R + 1);
  ix.row_idx = ix.col_idx + nnz;
  ix.col_ptr = ix.row_idx + nnz;
  ix.t_row_idx = ix.col_ptr + (C + 1);
  ix.t_perm = ix.t_row_idx + nnz;
  ix.nnz = nnz;
  return ix;
}

void check_values(const at::Tensor& values, const at::Tensor& ref, int64_t bn, int64_t bk) {
  CHECK_DEVICE(values);
  CHECK_SAME_DEVICE(values, ref);
  TORCH_CHECK(values.scalar_type() == ref.scalar_type(), "sparsebert_cuda: values has dtype ",
              values.scalar_type(), " but the activations have ", ref.scalar_type());
  TORCH_CHECK(values.dim() == 3 && values.size(1) == bn && values.size(2) == bk,
              "sparsebert_cuda: values must be [nnz, ", bn, ", ", bk, "], got shape ", values.sizes());
  CHECK_CONTIGUOUS(values);
  CHECK_ALIGNED(values);
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias_opt,
                   const at::Tensor& index, int64_t N, int64_t K, int64_t bn, int64_t bk) {
  check_layout_args(N, K, bn, bk);
  CHECK_DEVICE(x);
  const BsrDtype dt = to_bsr_dtype(x.scalar_type(), "x");
  check_dense(x, "x", K);
  CHECK_CONTIGUOUS(x);
  CHECK_ALIGNED(x);
  check_rows_aligned(x, "x");
  check_values(values, x, bn, bk);
  const void* bias_ptr = nullptr;
  if (bias_opt.has_value()) {
    const at::Tensor& bias = *bias_opt;
    CHECK_DEVICE(bias);
    CHECK_SAME_DEVICE(bias, x);
    TORCH_CHECK(bias.scalar_type() == x.scalar_type(), "sparsebert_cuda: bias has dtype ", bias.scalar_type(),
                " but x has ", x.scalar_type());
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == N, "sparsebert_cuda: bias must have shape (", N,
                "), got ", bias.sizes());
    CHECK_CONTIGUOUS(bias);
    bias_ptr = bias.data_ptr();
  }
  const Index ix = unpack(index, x, N, K, bn, bk, values.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  C10_CUDA_CHECK(bsr_forward(dt, x.data_ptr(), values.data_ptr(), bias_ptr, ix.row_ptr, ix.col_idx,
                             y.data_ptr(), M, (int)N, (int)K, (int)bn, (int)bk,
                             at::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor grad_input(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& index, int64_t N,
                      int64_t K, int64_t bn, int64_t bk) {
  check_layout_args(N, K, bn, bk);
  CHECK_DEVICE(dy);
  const BsrDtype dt = to_bsr_dtype(dy.scalar_type(), "dy");
  check_dense(dy, "dy", N);
  CHECK_CONTIGUOUS(dy);
  CHECK_ALIGNED(dy);
  check_rows_aligned(dy, "dy");
  check_values(values, dy, bn, bk);
  const Index ix = unpack(index, dy, N, K, bn, bk, values.size(0));
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t M = dy.size(0);
  at::Tensor dx = at::empty({M, K}, dy.options());
  if (M == 0) return dx;
  C10_CUDA_CHECK(bsr_grad_input(dt, dy.data_ptr(), values.data_ptr(), ix.col_ptr, ix.t_row_idx, ix.t_perm,
                                dx.data_ptr(), M, (int)N, (int)K, (int)bn, (int)bk,
                                at::cuda::getCurrentCUDAStream()));
  return dx;
}

at::Tensor grad_weight(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& index, int64_t N,
                       int64_t K, int64_t bn, int64_t bk) {
  check_layout_args(N, K, bn, bk);
  CHECK_DEVICE(x);
  CHECK_DEVICE(dy);
  CHECK_SAME_DEVICE(dy, x);
  const BsrDtype dt = to_bsr_dtype(x.scalar_type(), "x");
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "sparsebert_cuda: dy has dtype ", dy.scalar_type(),
              " but x has ", x.scalar_type());
  check_dense(x, "x", K);
  check_dense(dy, "dy", N);
  TORCH_CHECK(x.size(0) == dy.size(0), "sparsebert_cuda: x has ", x.size(0), " rows but dy has ", dy.size(0));
  CHECK_CONTIGUOUS(x);
  CHECK_CONTIGUOUS(dy);
  CHECK_ALIGNED(x);
  CHECK_ALIGNED(dy);
  check_rows_aligned(x, "x");
  check_rows_aligned(dy, "dy");
  const Index ix = unpack(index, x, N, K, bn, bk, /*nnz=*/-1);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dvalues = at::empty({ix.nnz, bn, bk}, x.options());
  if (ix.nnz == 0) return dvalues;
  at::Tensor workspace;
  float* ws = nullptr;
  if (dt != BsrDtype::kFloat32) {
    workspace = at::empty({ix.nnz, bn, bk}, x.options().dtype(at::kFloat));
    ws = workspace.data_ptr<float>();
  }
  C10_CUDA_CHECK(bsr_grad_weight(dt, x.data_ptr(), dy.data_ptr(), ix.row_idx, ix.col_idx, ix.nnz,
                                 dvalues.data_ptr(), ws, x.size(0), (int)N, (int)K, (int)bn, (int)bk,
                                 at::cuda::getCurrentCUDAStream()));
  return dvalues;
}

}  // namespace
}  // namespace cuda
}  // namespace sparsebert

TORCH_LIBRARY(sparsebert_cuda, m) {
  m.def("forward(Tensor x, Tensor values, Tensor? bias, Tensor index, int N, int K, int bn, int bk) -> Tensor");
  m.def("grad_input(Tensor dy, Tensor values, Tensor index, int N, int K, int bn, int bk) -> Tensor");
  m.def("grad_weight(Tensor x, Tensor dy, Tensor index, int N, int K, int bn, int bk) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsebert_cuda, CUDA, m) {
  m.impl("forward", &sparsebert::cuda::forward);
  m.impl("grad_input", &sparsebert::cuda::grad_input);
  m.impl("grad_weight", &sparsebert::cuda::grad_weight);
}
