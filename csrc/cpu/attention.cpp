// torch.ops.sparsebert_cpu.attention(q, k, v, mask, scale) -> out: fused softmax(q k^T * scale +
// mask) v on the CPU (fp32, inference), out [B, Sq, H, D] contiguous (the layout transformers'
// attention functions return). q, k, v: [B, H, S, D] with any strides but a contiguous last
// dimension (BERT passes views of its [B, S, H * D] projections, not copied here). mask: none,
// bool (true = attend) or float32 (additive), broadcastable to [B, H, Sq, Skv] (read through
// its strides, never expanded into memory).
//
// Why: at MiniLM shapes torch's CPU SDPA runs at ~40 GF/s; a 90% block-sparse encoder spends
// about half its CPU time there. The kernels (attention_kernels_impl.h) keep one (batch, head)'s
// K^T and V packed in L1/L2 and a tile of scores in L1, and drop the keys a padding mask hides.
// sparsebert/ops/cpu_attention.py is the Python entry point (checks, autograd exclusion).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "attention_kernels.h"
#include "cpu_isa.h"
#include "output_pool.h"

namespace sparsebert_cpu {
namespace {

// SPARSEBERT_CPU_ISA (read at every call, so tests can switch): auto (default), avx512 (also
// for "autovec", which has no attention variant), avx2, generic.
AttnKernels pick_kernels() {
  static const bool k512 = cpu_has_avx512();
  static const bool k2 = cpu_has_avx2();
  const char* env = std::getenv("SPARSEBERT_CPU_ISA");
  const std::string want = env ? env : "";
#if defined(__x86_64__) || defined(__i386__)
  if (want.empty() || want == "auto") {
    if (k512) return attn_kernels_avx512();
    if (k2) return attn_kernels_avx2();
    return attn_kernels_generic();
  }
  if (want == "avx512" || want == "autovec") {
    TORCH_CHECK(k512, "sparsebert_cpu.attention: SPARSEBERT_CPU_ISA=", want,
                " but this CPU lacks AVX-512F/VL/BW/DQ");
    return attn_kernels_avx512();
  }
  if (want == "avx2") {
    TORCH_CHECK(k2, "sparsebert_cpu.attention: SPARSEBERT_CPU_ISA=avx2 but this CPU lacks AVX2/FMA");
    return attn_kernels_avx2();
  }
#else
  if (want.empty() || want == "auto") return attn_kernels_generic();
#endif
  TORCH_CHECK(want == "generic", "sparsebert_cpu.attention: unknown SPARSEBERT_CPU_ISA='", want,
              "' (expected auto, avx512, avx2 or generic)");
  return attn_kernels_generic();
}

void check_qkv(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "sparsebert_cpu.attention: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "sparsebert_cpu.attention: ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, "sparsebert_cpu.attention: ", name, " must be [B, H, S, D], got shape ",
              t.sizes());
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, "sparsebert_cpu.attention: ", name,
              " must have a contiguous last dimension, got strides ", t.strides());
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& mask, double scale) {
  check_qkv(q, "query");
  check_qkv(k, "key");
  check_qkv(v, "value");
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Skv = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes(),
              "sparsebert_cpu.attention: query ", q.sizes(), ", key ", k.sizes(), " and value ",
              v.sizes(), " do not match (same B, H, D; key and value the same shape)");
  TORCH_CHECK(Skv > 0 || B * H * Sq * D == 0, "sparsebert_cpu.attention: key has no positions");
  AttnArgs a{};
  a.B = B; a.H = H; a.Sq = Sq; a.Skv = Skv; a.D = D;
  a.scale = static_cast<float>(scale);
  a.q = q.data_ptr<float>(); a.q_sb = q.stride(0); a.q_sh = q.stride(1); a.q_ss = q.stride(2);
  a.k = k.data_ptr<float>(); a.k_sb = k.stride(0); a.k_sh = k.stride(1); a.k_ss = k.stride(2);
  a.v = v.data_ptr<float>(); a.v_sb = v.stride(0); a.v_sh = v.stride(1); a.v_ss = v.stride(2);
  at::Tensor m;  // the mask broadcast to [B, H, Sq, Skv] as a view (strides 0), no copy
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m0 = *mask;
    TORCH_CHECK(m0.device().is_cpu(), "sparsebert_cpu.attention: mask must be a CPU tensor");
    TORCH_CHECK(m0.scalar_type() == at::kBool || m0.scalar_type() == at::kFloat,
                "sparsebert_cpu.attention: mask must be bool or float32, got ", m0.scalar_type());
    const int64_t want[4] = {B, H, Sq, Skv};
    bool ok = m0.dim() <= 4;
    for (int64_t i = 0; ok && i < m0.dim(); ++i) {
      const int64_t s = m0.size(m0.dim() - 1 - i), w = want[3 - i];
      ok = s == w || s == 1;
    }
    TORCH_CHECK(ok, "sparsebert_cpu.attention: mask of shape ", m0.sizes(),
                " does not broadcast to [B, H, Sq, Skv] = [", B, ", ", H, ", ", Sq, ", ", Skv, "]");
    m = m0.expand({B, H, Sq, Skv});
    a.mask_kind = m.scalar_type() == at::kBool ? 1 : 2;
    a.mask = m.data_ptr();
    // a broadcast dimension (size 1 or expanded) is read with stride 0
    a.m_sb = B == 1 ? 0 : m.stride(0);
    a.m_sh = H == 1 ? 0 : m.stride(1);
    a.m_sq = Sq == 1 ? 0 : m.stride(2);
    a.m_sk = Skv == 1 ? 0 : m.stride(3);
  }
  at::Tensor out = pooled_empty({B, Sq, H, D});
  if (out.numel() == 0) return out;
  a.out = out.data_ptr<float>();

  const AttnKernels kern = pick_kernels();
  const int64_t ws_bytes = kern.workspace_bytes(a);
  // Work items: (batch, head), split along the queries only when there are too few for the
  // threads (each piece packs its own K^T and V). The split does not change any result.
  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  if (B * H < 4 * threads) {
    const int64_t by_threads = (4 * threads + B * H - 1) / (B * H);
    const int64_t by_rows = std::max<int64_t>(1, Sq / (2 * kern.query_tile));
    chunks = std::min(by_threads, by_rows);
  }
  const int64_t rows = (Sq + chunks - 1) / chunks;
  // Software prefetch of the next item's q, k, v rows: only when the inputs are large (more than
  // 8 MiB of q, k and v per thread, so they come from L3 or memory). Measured, MiniLM shapes, 1
  // thread, interleaved A/B: batch 64 (38 MiB) 19.9 -> 16.8 ms; batch 8 (4.7 MiB) and 1 a few
  // per cent slower with it. SPARSEBERT_CPU_ATTN_PREFETCH=0|1 forces it off/on (experiments).
  const char* pf_env = std::getenv("SPARSEBERT_CPU_ATTN_PREFETCH");
  const int64_t in_bytes = 4 * (B * H * Sq * D + 2 * B * H * Skv * D);
  const bool prefetch = pf_env && pf_env[0] != '\0' ? pf_env[0] != '0'
                                                     : in_bytes > (int64_t(8) << 20) * threads;
  at::parallel_for(0, B * H * chunks, 1, [&](int64_t i0, int64_t i1) {
    // one scratch buffer per thread, kept between calls (no allocation, no page faults)
    static thread_local std::vector<char> ws;
    if (static_cast<int64_t>(ws.size()) < ws_bytes) ws.resize(ws_bytes);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t bh = it / chunks, c = it % chunks;
      const int64_t q0 = c * rows, q1 = std::min(Sq, q0 + rows);
      // the next item of this thread, when it is another head (chunks == 1)
      const int64_t next = prefetch && chunks == 1 && it + 1 < i1 ? bh + 1 : -1;
      if (q0 < q1) kern.run(a, bh / H, bh % H, q0, q1, ws.data(), next < 0 ? -1 : next / H, next % H);
    }
  });
  return out;
}

std::string attention_isa() { return pick_kernels().name; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsebert_cpu, m) {
  m.def("attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor");
  m.def("attention_isa() -> str", &attention_isa);  // the kernel set a call would use now
}

TORCH_LIBRARY_IMPL(sparsebert_cpu, CPU, m) {
  m.impl("attention", &attention);
}

}  // namespace sparsebert_cpu
