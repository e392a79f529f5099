// torch.ops.sparsebert_cpu.add_layernorm_(y, residual, weight, bias, eps): y = LayerNorm(y +
// residual) in place, in one pass per row (fp32, CPU, inference).
//
// Why: in BERT inference each layer ends twice with `LayerNorm(dropout(dense(h)) + h_in)`; in
// eval mode the dropout is the identity and `dense(h)` is a fresh tensor nobody else holds, so
// the sum and the normalised rows can overwrite it: no output allocated (fresh multi-megabyte
// tensors from glibc cost page faults on first touch, see output_pool.h) and one read of y and
// residual instead of an add pass plus a LayerNorm pass. sparsebert.optimize uses it for
// BertSelfOutput / BertOutput when no gradient is wanted.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include "cpu_isa.h"

namespace sparsebert_cpu {

void add_layernorm_rows_generic(float*, int64_t, const float*, int64_t, int64_t, int64_t,
                                const float*, const float*, float);
#if defined(__x86_64__) || defined(__i386__)
void add_layernorm_rows_avx512(float*, int64_t, const float*, int64_t, int64_t, int64_t,
                               const float*, const float*, float);
#endif

namespace {

using RowsFn = void (*)(float*, int64_t, const float*, int64_t, int64_t, int64_t, const float*,
                        const float*, float);

RowsFn pick_rows() {
#if defined(__x86_64__) || defined(__i386__)
  const char* env = std::getenv("SPARSEBERT_CPU_ISA");
  const std::string want = env ? env : "";
  const bool has512 = cpu_has_avx512();
  if (has512 && (want.empty() || want == "auto" || want == "avx512" || want == "autovec"))
    return add_layernorm_rows_avx512;
#endif
  return add_layernorm_rows_generic;
}

void add_layernorm_(at::Tensor y, const at::Tensor& residual, const c10::optional<at::Tensor>& weight,
                    const c10::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(y.device().is_cpu() && residual.device().is_cpu(),
              "sparsebert_cpu.add_layernorm_: CPU tensors only");
  TORCH_CHECK(y.scalar_type() == at::kFloat && residual.scalar_type() == at::kFloat,
              "sparsebert_cpu.add_layernorm_: float32 only, got ", y.scalar_type(), " and ",
              residual.scalar_type());
  TORCH_CHECK(y.sizes() == residual.sizes(), "sparsebert_cpu.add_layernorm_: y has shape ",
              y.sizes(), " but residual ", residual.sizes());
  TORCH_CHECK(y.dim() >= 1 && y.is_contiguous() && residual.is_contiguous(),
              "sparsebert_cpu.add_layernorm_: y and residual must be contiguous");
  const int64_t h = y.size(-1);
  for (const auto* t : {&weight, &bias}) {
    if (t->has_value()) {
      const at::Tensor& p = **t;
      TORCH_CHECK(p.scalar_type() == at::kFloat && p.dim() == 1 && p.size(0) == h &&
                      p.is_contiguous() && p.device().is_cpu(),
                  "sparsebert_cpu.add_layernorm_: weight and bias must be contiguous float32 [",
                  h, "] CPU tensors");
    }
  }
  if (y.numel() == 0) return;
  const int64_t rows = y.numel() / h;
  static const RowsFn fn = pick_rows();
  float* py = y.data_ptr<float>();
  const float* pr = residual.data_ptr<float>();
  const float* pg = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  const float* pb = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    fn(py + r0 * h, h, pr + r0 * h, h, r1 - r0, h, pg, pb, e);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsebert_cpu, m) {
  m.def("add_layernorm_(Tensor(a!) y, Tensor residual, Tensor? weight, Tensor? bias, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(sparsebert_cpu, CPU, m) {
  m.impl("add_layernorm_", &add_layernorm_);
}

}  // namespace sparsebert_cpu
