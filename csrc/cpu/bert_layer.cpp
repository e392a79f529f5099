// One BERT encoder layer at CPU inference in one op: the six block-sparse products, the fused
// attention and the two residual add + LayerNorm passes, called through the dispatcher in the
// order Hugging Face's modules call them. It is sparsebert.optimize's inference path for a layer
// whose six linears all run the cpu backend: at batch 1 (128 tokens) the Python between those nine
// kernel calls cost ~15% of a 90%-sparse MiniLM layer. No kernel of its own: each step is the
// registered op (sparsebert_cpu::forward, ::attention, ::add_layernorm_), which checks its own
// inputs, so the result is the module path's bit for bit.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace sparsebert_cpu {
namespace {

using ForwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                             const at::Tensor&, int64_t, int64_t, int64_t, int64_t, c10::string_view);
using AttentionFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, double);
using AddNormFn = void(at::Tensor, const at::Tensor&, const std::optional<at::Tensor>&,
                       const std::optional<at::Tensor>&, double);

// values, biases, index: the six layers in the order query, key, value, attention output,
// intermediate (GELU fused), output; geometry: their (N, K, bn, bk), 24 numbers.
at::Tensor bert_layer(const at::Tensor& x, at::TensorList values,
                      const c10::List<std::optional<at::Tensor>>& biases, at::TensorList index,
                      at::IntArrayRef geometry, const std::optional<at::Tensor>& mask, int64_t batch,
                      int64_t heads, double scale, const std::optional<at::Tensor>& ln1_weight,
                      const std::optional<at::Tensor>& ln1_bias, double eps1,
                      const std::optional<at::Tensor>& ln2_weight,
                      const std::optional<at::Tensor>& ln2_bias, double eps2) {
  TORCH_CHECK(values.size() == 6 && biases.size() == 6 && index.size() == 6 && geometry.size() == 24,
              "sparsebert_cpu.bert_layer: six layers expected (values, biases, index, 24 geometry numbers)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "sparsebert_cpu.bert_layer: x must be a contiguous [tokens, hidden] tensor");
  TORCH_CHECK(batch > 0 && heads > 0 && x.size(0) % batch == 0 && x.size(1) % heads == 0,
              "sparsebert_cpu.bert_layer: ", x.sizes(), " does not split into ", batch, " sequences and ", heads, " heads");
  static const auto fwd = c10::Dispatcher::singleton()
      .findSchemaOrThrow("sparsebert_cpu::forward", "").typed<ForwardFn>();
  static const auto attn = c10::Dispatcher::singleton()
      .findSchemaOrThrow("sparsebert_cpu::attention", "").typed<AttentionFn>();
  static const auto add_norm = c10::Dispatcher::singleton()
      .findSchemaOrThrow("sparsebert_cpu::add_layernorm_", "").typed<AddNormFn>();
  auto linear = [&](int i, const at::Tensor& in, c10::string_view act) {
    const int64_t* g = geometry.data() + 4 * i;
    return fwd.call(in, values[i], biases.get(i), index[i], g[0], g[1], g[2], g[3], act);
  };
  const int64_t T = x.size(0), S = T / batch;
  auto heads_view = [&](const at::Tensor& t) {   // [T, H] -> [B, heads, S, D], a view
    return t.view({batch, S, heads, -1}).transpose(1, 2);
  };
  const at::Tensor q = heads_view(linear(0, x, "none"));
  const at::Tensor k = heads_view(linear(1, x, "none"));
  const at::Tensor v = heads_view(linear(2, x, "none"));
  at::Tensor ctx = attn.call(q, k, v, mask, scale);       // [B, S, heads, D] contiguous
  at::Tensor h = linear(3, ctx.view({T, -1}), "none");
  add_norm.call(h, x, ln1_weight, ln1_bias, eps1);
  const at::Tensor i = linear(4, h, "gelu");
  at::Tensor y = linear(5, i, "none");
  add_norm.call(y, h, ln2_weight, ln2_bias, eps2);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsebert_cpu, m) {
  m.def("bert_layer(Tensor x, Tensor[] values, Tensor?[] biases, Tensor[] index, int[] geometry, "
        "Tensor? mask, int batch, int heads, float scale, Tensor? ln1_weight, Tensor? ln1_bias, "
        "float eps1, Tensor? ln2_weight, Tensor? ln2_bias, float eps2) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsebert_cpu, CPU, m) {
  m.impl("bert_layer", &bert_layer);
}

}  // namespace sparsebert_cpu
