// CPU backend of sparsebert: block-sparse linear ops in the `sparsebert_cpu` namespace.
//
//   forward(x, values, bias, index, N, K, bn, bk, activation="none")
//                                                   y  = x W^T + bias [M, N]; "gelu": gelu(y),
//                                                   applied in the register tile before the store
//   grad_input(dy, values, index, N, K, bn, bk)     dx = dy W                  [M, K]
//   grad_weight(x, dy, index, N, K, bn, bk)         dvalues = (dy^T x) on kept blocks [nnz, bn, bk]
//   grad_weight_bias(x, dy, index, N, K, bn, bk)    (dvalues, dy.sum(0)): the bias gradient fused
//   isa() -> str                                    the kernel set in use
//
// `index` is the packed int32 layout index of sparsebert.layout.pack_index:
//   [row_ptr R+1 | col_idx nnz | row_idx nnz | col_ptr C+1 | t_row_idx nnz | t_perm nnz].
//
// Work split (at::parallel_for over independent output tiles, no atomics):
//   forward      M >= 48 tokens: run_panels: items (token tile of <= 256 tokens, chunk of output
//                blocks), token tile first, so a thread keeps its input tile in L2 while it walks
//                the output blocks; a wide input is cut into L2-sized groups, the output tile
//                accumulated over them. Each output block Y[tile, r] accumulates in registers
//                over the kept blocks of row r (CSR). The inner loop is a broadcast-FMA over
//                contiguous outputs, so it wants W blocks as [bk, bn]: each item transposes the
//                blocks of an output block into its own scratch right before using them (in
//                registers, VW x VW tiles; the copy stays in L1/L2). Software prefetch by
//                density; outputs of >= 8 MiB are written with non-temporal stores on their last
//                pass. Fewer tokens: forward_rows, per block row, `dot` (W as stored, one vector
//                of k-lanes per token and output, reduced once at the end) or `tpanel` (x
//                transposed, tokens in the vector lanes); see pick_forward.
//                No transposed copy of W is ever kept between calls: every call reads `values`
//                as it is then. (One used to be cached, keyed by the tensor's version counter;
//                fused optimizers, `.data` and numpy writes change values without bumping it,
//                and the forward then ran on old weights while the backward used new ones.)
//   grad_input   the same panel kernel over the CSC index; W blocks are already [bn, bk] =
//                [in, out] for this product, no packing.
//   grad_weight  token chunks outer (both operands' chunks in L2), each thread owning a range
//                of kept blocks; with too few blocks for the threads the tokens are split and
//                partial sums added. grad_weight_bias adds the bias gradient in the same pass.
// fp32 runs natively; bf16 is converted to fp32 around the fp32 kernels (fp32 accumulation).
// Outputs and fp32 copies of bf16 inputs come from output_pool (freed blocks are reused instead
// of being faulted in afresh: up to a quarter of a forward at 90% sparsity).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bsr_cpu_kernels.h"
#include "cpu_isa.h"
#include "output_pool.h"

namespace sparsebert_cpu {
namespace {

// ---- kernel selection ------------------------------------------------------------------
// The extension is compiled with baseline x86-64 flags; the AVX-512 and AVX2 kernels are
// separate translation units with `#pragma GCC target`, chosen here by CPUID at run time, so
// one binary runs on any x86-64 CPU and uses AVX-512 where present (e.g. the Xeon CI/dev
// machines). SPARSEBERT_CPU_ISA=avx512|avx2|generic|autovec forces a set (benchmarks, tests).
Kernels select_kernels_isa();

// SPARSEBERT_CPU_PREFETCH=panel|sdd|all|none (experiments): which kernels software-prefetch.
Kernels select_kernels() {
  Kernels k = select_kernels_isa();
  const char* env = std::getenv("SPARSEBERT_CPU_PREFETCH");
  if (env && env[0] != '\0') {
    const std::string pf = env;
    if (pf == "panelw" || pf == "allw") k.panel = k.panel_pfw;
    else if (pf == "allo") k.panel = k.panel_pfo;
    else if (pf != "panel" && pf != "all") k.panel = k.panel_nopf;
    if (pf != "sdd" && pf != "all" && pf != "allw" && pf != "allo") k.sdd = k.sdd_nopf;
  }
  return k;
}

Kernels select_kernels_isa() {
  static const bool has512 = cpu_has_avx512();
  static const bool has2 = cpu_has_avx2();
  const char* env = std::getenv("SPARSEBERT_CPU_ISA");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") {
#if defined(__x86_64__) || defined(__i386__)
    if (has512) return kernels_avx512();
    if (has2) return kernels_avx2();
#endif
    return kernels_generic();
  }
  if (want == "generic") return kernels_generic();
#if defined(__x86_64__) || defined(__i386__)
  if (want == "avx512" || want == "autovec") {
    TORCH_CHECK(has512, "sparsebert_cpu: SPARSEBERT_CPU_ISA=", want,
                " but this CPU lacks AVX-512F/VL/BW/DQ");
    return want == "avx512" ? kernels_avx512() : kernels_autovec();
  }
  if (want == "avx2") {
    TORCH_CHECK(has2, "sparsebert_cpu: SPARSEBERT_CPU_ISA=avx2 but this CPU lacks AVX2/FMA");
    return kernels_avx2();
  }
#endif
  TORCH_CHECK(false, "sparsebert_cpu: unknown SPARSEBERT_CPU_ISA='", want,
              "' (expected auto, avx512, avx2, generic or autovec on x86-64; generic elsewhere)");
}

// ---- checks --------------------------------------------------------------------------------
constexpr int64_t kMaxBlock = 256;

void check_geometry(int64_t N, int64_t K, int64_t bn, int64_t bk) {
  TORCH_CHECK(bn > 0 && bk > 0, "sparsebert_cpu: block sizes must be positive, got (", bn, ", ", bk, ")");
  TORCH_CHECK(bn % 16 == 0 && bk % 16 == 0 && bn <= kMaxBlock && bk <= kMaxBlock,
              "sparsebert_cpu: unsupported block (", bn, ", ", bk,
              "): the CPU kernels need both block sizes to be multiples of 16 and at most ",
              kMaxBlock, " (e.g. 16, 32, 64)");
  TORCH_CHECK(N > 0 && K > 0 && N % bn == 0 && K % bk == 0, "sparsebert_cpu: block (", bn, ", ", bk,
              ") does not tile the weight shape (", N, ", ", K, ")");
}

void check_matrix(const at::Tensor& t, const char* name, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu(), "sparsebert_cpu: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "sparsebert_cpu: ", name, " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "sparsebert_cpu: ", name, " must be 2-D [M, ", cols, "], got shape ", t.sizes());
  TORCH_CHECK(t.size(1) == cols, "sparsebert_cpu: ", name, " must have ", cols, " columns, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "sparsebert_cpu: ", name, " must be contiguous");
}

void check_values(const at::Tensor& values, const at::Tensor& like, int64_t bn, int64_t bk) {
  TORCH_CHECK(values.device().is_cpu(), "sparsebert_cpu: values must be a CPU tensor, got ", values.device());
  TORCH_CHECK(values.dim() == 3 && values.size(1) == bn && values.size(2) == bk,
              "sparsebert_cpu: values must be [nnz, ", bn, ", ", bk, "], got shape ", values.sizes());
  TORCH_CHECK(values.scalar_type() == like.scalar_type(), "sparsebert_cpu: values dtype ",
              values.scalar_type(), " differs from the input dtype ", like.scalar_type());
  TORCH_CHECK(values.is_contiguous(), "sparsebert_cpu: values must be contiguous");
}

// Views into the packed index, validated (a bad index must raise, never read out of bounds).
struct Index {
  const int32_t *row_ptr, *col_idx, *row_idx, *col_ptr, *t_row_idx, *t_perm;
  int64_t R, C, nnz;
};

void check_ptr(const int32_t* ptr, int64_t n, int64_t nnz, const char* name) {
  TORCH_CHECK(ptr[0] == 0 && ptr[n] == nnz, "sparsebert_cpu: corrupt layout index: ", name,
              " must run from 0 to nnz=", nnz);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(ptr[i] <= ptr[i + 1], "sparsebert_cpu: corrupt layout index: ", name, " decreases at ", i);
}

void check_range(const int32_t* a, int64_t n, int64_t hi, const char* name) {
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(a[i] >= 0 && a[i] < hi, "sparsebert_cpu: corrupt layout index: ", name, "[", i,
                "] = ", a[i], " is outside [0, ", hi, ")");
}

Index parse_index(const at::Tensor& index, int64_t nnz, int64_t N, int64_t K, int64_t bn,
                  int64_t bk, bool csr, bool csc) {
  TORCH_CHECK(index.device().is_cpu(), "sparsebert_cpu: index must be a CPU tensor, got ", index.device());
  TORCH_CHECK(index.scalar_type() == at::kInt && index.dim() == 1 && index.is_contiguous(),
              "sparsebert_cpu: index must be a contiguous 1-D int32 tensor (layout.index()), got ",
              index.scalar_type(), " of shape ", index.sizes());
  Index ix;
  ix.R = N / bn;
  ix.C = K / bk;
  ix.nnz = nnz;
  const int64_t expect = ix.R + 1 + 4 * nnz + ix.C + 1;
  TORCH_CHECK(index.numel() == expect, "sparsebert_cpu: layout index has ", index.numel(),
              " entries, expected ", expect, " for a [", N, ", ", K, "] weight with block (", bn,
              ", ", bk, ") and ", nnz, " kept blocks");
  const int32_t* p = index.data_ptr<int32_t>();
  ix.row_ptr = p;
  ix.col_idx = ix.row_ptr + ix.R + 1;
  ix.row_idx = ix.col_idx + nnz;
  ix.col_ptr = ix.row_idx + nnz;
  ix.t_row_idx = ix.col_ptr + ix.C + 1;
  ix.t_perm = ix.t_row_idx + nnz;
  if (csr) {
    check_ptr(ix.row_ptr, ix.R, nnz, "row_ptr");
    check_range(ix.col_idx, nnz, ix.C, "col_idx");
    check_range(ix.row_idx, nnz, ix.R, "row_idx");
  }
  if (csc) {
    check_ptr(ix.col_ptr, ix.C, nnz, "col_ptr");
    check_range(ix.t_row_idx, nnz, ix.R, "t_row_idx");
    check_range(ix.t_perm, nnz, nnz, "t_perm");
  }
  return ix;
}

// [M, G*b] -> fp32 [G, M, b]: every block column becomes one contiguous panel, so a register
// tile reads MT*b consecutive floats instead of MT rows K apart (prefetch-friendly), and bf16 is
// widened in the same pass. Costs one copy of the input (parallel, ~1 ms for 2048 x 768).
// Measured (benchmarks/RESULTS.md, CPU section): not worth it with the blocking below, where the strided tiles
// come from L2 anyway -- the copy costs more than it saves (weight gradient at 90% sparsity:
// ~1.45x slower packed). It was 2x faster for the weight gradient under an earlier loop order
// (all tokens per block). Off by default; SPARSEBERT_CPU_PACK=1 turns it on for experiments.
bool pack_enabled(bool by_default) {
  const char* env = std::getenv("SPARSEBERT_CPU_PACK");
  if (env && env[0] != '\0') return env[0] != '0';
  return by_default;
}

at::Tensor pack_panels(const at::Tensor& t, int64_t groups, int64_t b) {
  const int64_t M = t.size(0);
  at::Tensor out = at::empty({groups, M, b}, t.options().dtype(at::kFloat));
  out.copy_(t.view({M, groups, b}).transpose(0, 1));
  return out;
}

at::Tensor as_f32(const at::Tensor& t) {
  return pooled_to(t, at::kFloat);
}

// SPARSEBERT_CPU_STREAM=0|1 forces non-temporal output stores off/on; by default an output of
// 8 MiB or more (larger than the L2s together, so not kept there for its consumer anyway) that
// is written in one pass is streamed (see run_panels for why not when it is accumulated).
bool stream_output(int64_t bytes, bool one_pass) {
  const char* env = std::getenv("SPARSEBERT_CPU_STREAM");
  if (env && env[0] != '\0') return env[0] != '0';
  return one_pass && bytes >= (int64_t(8) << 20);
}

// out[:, j*bo : (j+1)*bo] = bias_j + sum over the entries [ptr[j], ptr[j+1]) of output block j;
// entry e reads input block in_blk[e] (B[e] is its [bi, bo] weight block, off[e] its offset in
// `in`). Blocking, for 2 MB of L2 per core and a shared L3:
//  * work item = (token tile of up to 256 tokens, chunk of output blocks); items are ordered
//    token tile first, so a thread keeps one input tile while it walks the output blocks;
//  * the input blocks are cut into groups so one tile's slice (tm x group width) stays under
//    768 KB, i.e. in L2, while every output block of the item runs over it; the output tile is
//    then accumulated over the groups (one extra load/store of it per group);
//  * the weight panel of one output block is read from L3 once per token tile and then hit
//    in L1/L2 by the tm / MT register tiles.
// An earlier order (output block outer, all tokens inner) re-read the input from L3 once per
// output block and ran at about 60-70% of this speed.
void run_panels(const Kernels& kern, const float* in, int64_t ld_in, int64_t M,
                const std::vector<const float*>& B, const std::vector<int64_t>& off,
                const int32_t* in_blk, int64_t n_in_blocks, const int32_t* ptr,
                int64_t n_out_blocks, int64_t bi, int64_t bo, const float* bias, float* out,
                int64_t ld_out, bool gelu = false, bool transpose_b = false) {
  if (M == 0) return;
  const int64_t threads = at::get_num_threads();
  const int64_t tm = std::min<int64_t>(256, M);
  const int64_t tiles = (M + tm - 1) / tm;
  const int64_t chunks = std::min(n_out_blocks, std::max<int64_t>(1, (4 * threads + tiles - 1) / tiles));

  // Groups of input blocks; the entries of each output block must be sorted by input block
  // (layout.index() guarantees it), otherwise fall back to a single group.
  bool sorted = true;
  for (int64_t j = 0; j < n_out_blocks && sorted; ++j)
    for (int64_t e = ptr[j] + 1; e < ptr[j + 1]; ++e)
      if (in_blk[e] <= in_blk[e - 1]) { sorted = false; break; }
  const int64_t per_group = sorted ? std::max<int64_t>(1, (768 * 1024 / 4) / (tm * bi)) : n_in_blocks;
  const int64_t G = (n_in_blocks + per_group - 1) / per_group;
  std::vector<int64_t> gptr(n_out_blocks * (G + 1));
  for (int64_t j = 0; j < n_out_blocks; ++j) {
    int64_t e = ptr[j];
    for (int64_t g = 0; g < G; ++g) {
      gptr[j * (G + 1) + g] = e;
      while (e < ptr[j + 1] && (sorted ? in_blk[e] < (g + 1) * per_group : true)) ++e;
    }
    gptr[j * (G + 1) + G] = ptr[j + 1];
  }

  // The last group that writes each output block: it applies the GELU epilogue and stores the
  // finished tile (non-temporally, see below).
  std::vector<int64_t> glast(n_out_blocks, 0);
  for (int64_t j = 0; j < n_out_blocks; ++j)
    for (int64_t g = 1; g < G; ++g)
      if (gptr[j * (G + 1) + g] < gptr[j * (G + 1) + g + 1]) glast[j] = g;

  // Software prefetch (measured, 2 threads, interleaved A/B): requesting the next token tile's
  // output lines for writing helps at every density (the output rows are ld_out apart, and the
  // store misses otherwise stall the store buffer: 4-13% at 90% sparsity, 1-6% at 50%);
  // prefetching the next tile's input rows helps only when each output block has few entries
  // (90%: up to 2x on 768->3072), and costs 3-5% when dense enough that the input tile is hot
  // anyway (50%), where it only adds L1 conflicts. SPARSEBERT_CPU_PREFETCH forces a variant.
  //
  // Non-temporal stores of the finished tiles when the output is large (measured, 768->3072 at
  // 90%, M = 2048, forward: 2 threads 4.9-5.6 -> 3.7 ms, 1 thread 7.4 -> 7.0-7.3 ms): the output
  // is written once, and streaming it saves the read-for-ownership of every line and keeps the
  // input tile in L2. The last pass then prefetches no output lines (they are not read).
  // Only when there is one pass (G == 1): after an earlier pass has brought the output lines into
  // the cache, streaming them out again is slower than plain stores (1 thread, 90%, 1536->384:
  // M = 8192 10.3 -> 7.0 ms without; M = 1024 forced on 0.88 -> 1.30 ms). Not below 8 MiB,
  // although the op alone gains (90% 384->1536 + GELU, M = 1024, 6 MiB: 1.18 -> 1.04 ms): its
  // consumer, the next layer, then reads it from memory instead of L3: the 90% MiniLM encoder at
  // batch 8 was 2.7% slower with a 4 MiB threshold (benchmarks/RESULTS.md, 2026-12-02 host).
  const bool nt = stream_output(M * ld_out * int64_t(sizeof(float)), G == 1) &&
                  reinterpret_cast<uintptr_t>(out) % 64 == 0 && ld_out % 16 == 0;
  Kernels::PanelFn panel = kern.panel, panel_last = kern.panel;
  const char* pf_env = std::getenv("SPARSEBERT_CPU_PREFETCH");
  if (!(pf_env && pf_env[0] != '\0')) {
    const int64_t kept = ptr[n_out_blocks];
    const bool few = kept * 10 <= 3 * n_in_blocks * n_out_blocks;
    panel = few ? kern.panel_pfw : kern.panel_pfo;
    panel_last = !nt ? panel : few ? kern.panel : kern.panel_nopf;
  }
  // transpose_b: B[e] are [bo, bi] blocks, those of one output block consecutive in memory;
  // each work item transposes the ones it needs into its thread's slice of `scratch` just
  // before using them (they stay in L1/L2), instead of a transposed copy of all of W.
  int64_t max_entries = 0;
  if (transpose_b)
    for (int64_t j = 0; j < n_out_blocks; ++j)
      for (int64_t g = 0; g < G; ++g)
        max_entries = std::max(max_entries, gptr[j * (G + 1) + g + 1] - gptr[j * (G + 1) + g]);
  const int64_t slice = max_entries * bi * bo;
  at::Tensor scratch = transpose_b ? pooled_empty({threads, std::max<int64_t>(slice, 1)}) : at::Tensor();
  std::vector<const float*> tB(transpose_b ? threads * max_entries : 0);
  at::parallel_for(0, tiles * chunks, 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = transpose_b ? at::get_thread_num() : 0;
    float* mine = transpose_b ? scratch.data_ptr<float>() + tid * slice : nullptr;
    const float** myB = transpose_b ? tB.data() + tid * max_entries : nullptr;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t0 = (item / chunks) * tm, s = item % chunks;
      const int64_t rows = std::min(tm, M - t0);
      const int64_t j0 = s * n_out_blocks / chunks, j1 = (s + 1) * n_out_blocks / chunks;
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t e0 = gptr[j * (G + 1) + g], e1 = gptr[j * (G + 1) + g + 1];
          if (g > 0 && e0 == e1) continue;  // nothing to add; g == 0 always writes (0, or the bias if last)
          const bool last = g == glast[j];
          const float* const* Bj = B.data() + e0;
          if (transpose_b && e1 > e0) {
            kern.transpose(B[e0], e1 - e0, bo, bi, mine);
            for (int64_t e = 0; e < e1 - e0; ++e) myB[e] = mine + e * bi * bo;
            Bj = myB;
          }
          // the bias goes in once, after all the products (the last pass), as oneDNN adds it
          (last ? panel_last : panel)(in + t0 * ld_in, ld_in, rows, Bj, off.data() + e0,
                                      e1 - e0, bi, bo, bias && last ? bias + j * bo : nullptr,
                                      out + t0 * ld_out + j * bo, ld_out, g > 0, gelu && last,
                                      nt && last);
        }
      }
    }
  });
}

// ---- which forward kernel ---------------------------------------------------------------------
// No kernel reads a transposed copy of W kept from an earlier call: each reads `values` as it is
// now (see the note at the top of this file). By token count M (measured against the old cached
// forward: benchmarks/RESULTS.md, "CPU backend — run F", how the replacement was chosen):
//  * dot (M < 16, or M < 48 with long rows): W as stored, reductions over k; W is read once.
//  * tpanel (16 <= M < 48, short rows, i.e. fewer than 128 kept k per output): x transposed
//    (tiny at this M), W broadcast as stored (on such rows dot's reductions cost up to half as
//    much as its products).
//  * tpanel also for 16 x 16 blocks, at least half of them kept, 48 <= M <= 128.
//  * panel (M >= 48 otherwise): the register-blocked panel kernel over W blocks transposed by each
//    work item just before use (run_panels, transpose_b), so the copy stays in L1/L2.
// SPARSEBERT_CPU_FWD=dot|tpanel|panel forces one (tests, benchmarks).
enum class Fwd { kPanel, kDot, kTpanel };

Fwd pick_forward(int64_t M, int64_t R, int64_t C, int64_t nnz, int64_t bn, int64_t bk) {
  const char* env = std::getenv("SPARSEBERT_CPU_FWD");
  if (env && env[0] != '\0') {
    const std::string want = env;
    if (want == "dot") return Fwd::kDot;
    if (want == "tpanel") return Fwd::kTpanel;
    TORCH_CHECK(want == "panel", "sparsebert_cpu: SPARSEBERT_CPU_FWD must be dot, tpanel or panel, got '",
                want, "'");
    return Fwd::kPanel;
  }
  if (M >= 48) {
    // 16 x 16 blocks, at least half kept, up to 128 tokens: tpanel. The panel kernel's 16-wide
    // tile has one FMA per broadcast of x; tpanel was 1.13-1.32x faster there (AVX-512, one thread,
    // MiniLM shapes, M = 64 and 128, 50% and 100% kept); from 256 tokens, or at 10% kept, panel
    // is as fast or faster for some shapes (benchmarks/RESULTS.md, "16 x 16 blocks").
    if (bn == 16 && bk == 16 && M <= 128 && 2 * nnz >= R * C) return Fwd::kTpanel;
    return Fwd::kPanel;
  }
  if (M < 16) return Fwd::kDot;
  const bool long_rows = nnz * bk >= 128 * R;  // mean kept k per output >= 128
  return long_rows ? Fwd::kDot : Fwd::kTpanel;
}

// y[:, r*bn : (r+1)*bn] for every block row r, in parallel over block rows, by kern.dot (x as
// is) or kern.tpanel (x transposed first).
void forward_rows(const Kernels& kern, bool transposed, const float* x, int64_t M, int64_t K,
                  const float* v, const Index& ix, int64_t bn, int64_t bk, const float* bias,
                  float* y, int64_t N, bool gelu) {
  if (M == 0) return;
  at::Tensor xt;
  int64_t ld = K;
  const float* in = x;
  if (transposed) {  // xt [K, M rounded up to the vector width], zero-padded
    ld = (M + kern.lanes - 1) / kern.lanes * kern.lanes;
    xt = pooled_empty({K, ld});
    float* xtp = xt.data_ptr<float>();
    const int64_t cols = K / kern.lanes;  // in vectors
    const int64_t grain = std::max<int64_t>(1, (1 << 17) / (ld * kern.lanes));  // inline below 128K floats
    at::parallel_for(0, cols, grain, [&](int64_t begin, int64_t end) {
      kern.transpose_rows(x + begin * kern.lanes, M, (end - begin) * kern.lanes, K,
                          xtp + begin * kern.lanes * ld, ld);
    });
    in = xtp;
  }
  std::vector<int64_t> off(ix.nnz);
  for (int64_t e = 0; e < ix.nnz; ++e) off[e] = int64_t(ix.col_idx[e]) * bk * (transposed ? ld : 1);
  // Below ~512K multiply-adds (a few us) one thread does it all: a parallel region costs more.
  const int64_t macs = M * std::max<int64_t>(ix.nnz, 1) * bn * bk;
  const int64_t grain = macs < (int64_t(1) << 19) ? ix.R : 1;
  const auto fn = transposed ? kern.tpanel : kern.dot;
  at::parallel_for(0, ix.R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t e0 = ix.row_ptr[r];
      fn(in, ld, M, v + e0 * bn * bk, off.data() + e0, ix.row_ptr[r + 1] - e0, bn, bk,
         bias ? bias + r * bn : nullptr, y + r * bn, N, gelu);
    }
  });
}

// ---- ops -------------------------------------------------------------------------------------
at::Tensor forward(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                   const at::Tensor& index, int64_t N, int64_t K, int64_t bn, int64_t bk,
                   c10::string_view activation) {
  TORCH_CHECK(activation == "none" || activation == "gelu",
              "sparsebert_cpu: activation must be 'none' or 'gelu', got '", std::string(activation), "'");
  check_geometry(N, K, bn, bk);
  check_matrix(x, "x", K);
  check_values(values, x, bn, bk);
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device().is_cpu(), "sparsebert_cpu: bias must be a CPU tensor, got ", b.device());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N, "sparsebert_cpu: bias must be [", N, "], got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "sparsebert_cpu: bias dtype ", b.scalar_type(),
                " differs from the input dtype ", x.scalar_type());
    TORCH_CHECK(b.is_contiguous(), "sparsebert_cpu: bias must be contiguous");
  }
  const int64_t nnz = values.size(0), M = x.size(0);
  const Index ix = parse_index(index, nnz, N, K, bn, bk, /*csr=*/true, /*csc=*/false);
  const Kernels kern = select_kernels();

  at::Tensor bf;
  if (bias.has_value()) bf = as_f32(*bias);
  at::Tensor y = pooled_empty({M, N});
  const Fwd how = pick_forward(M, ix.R, ix.C, nnz, bn, bk);
  if (how != Fwd::kPanel) {
    const at::Tensor xf = as_f32(x), vf = as_f32(values);
    forward_rows(kern, how == Fwd::kTpanel, xf.data_ptr<float>(), M, K, vf.data_ptr<float>(), ix,
                 bn, bk, bf.defined() ? bf.data_ptr<float>() : nullptr, y.data_ptr<float>(), N,
                 activation == "gelu");
    return pooled_to(y, x.scalar_type());
  }

  const bool pack = pack_enabled(false);
  const at::Tensor xf = pack ? pack_panels(x, K / bk, bk) : as_f32(x);  // [C, M, bk] or [M, K]
  const at::Tensor vf = as_f32(values);  // [nnz, bn, bk]; run_panels transposes the blocks it uses

  std::vector<const float*> B(nnz);
  std::vector<int64_t> off(nnz);
  const float* w = vf.data_ptr<float>();
  for (int64_t i = 0; i < nnz; ++i) {
    B[i] = w + i * bn * bk;
    off[i] = int64_t(ix.col_idx[i]) * (pack ? M * bk : bk);
  }
  run_panels(kern, xf.data_ptr<float>(), pack ? bk : K, M, B, off, ix.col_idx, ix.C, ix.row_ptr, ix.R, bk, bn,
             bf.defined() ? bf.data_ptr<float>() : nullptr, y.data_ptr<float>(), N, activation == "gelu",
             /*transpose_b=*/true);
  return pooled_to(y, x.scalar_type());
}

at::Tensor grad_input(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& index,
                      int64_t N, int64_t K, int64_t bn, int64_t bk) {
  check_geometry(N, K, bn, bk);
  check_matrix(dy, "dy", N);
  check_values(values, dy, bn, bk);
  const int64_t nnz = values.size(0), M = dy.size(0);
  const Index ix = parse_index(index, nnz, N, K, bn, bk, /*csr=*/false, /*csc=*/true);
  const Kernels kern = select_kernels();

  const bool pack = pack_enabled(false);
  const at::Tensor dyf = pack ? pack_panels(dy, N / bn, bn) : as_f32(dy);  // [R, M, bn] or [M, N]
  const at::Tensor vf = as_f32(values);
  at::Tensor dx = pooled_empty({M, K});

  std::vector<const float*> B(nnz);
  std::vector<int64_t> off(nnz);
  const float* v = vf.data_ptr<float>();
  for (int64_t j = 0; j < nnz; ++j) {  // column order: W block t_perm[j] = [bn, bk] = [in, out]
    B[j] = v + int64_t(ix.t_perm[j]) * bn * bk;
    off[j] = int64_t(ix.t_row_idx[j]) * (pack ? M * bn : bn);
  }
  run_panels(kern, dyf.data_ptr<float>(), pack ? bn : N, M, B, off, ix.t_row_idx, ix.R, ix.col_ptr, ix.C, bn, bk, nullptr,
             dx.data_ptr<float>(), K);
  return pooled_to(dx, dy.scalar_type());
}

// dvalues, and with want_bias the bias gradient dy.sum(0) too: the first kept block of each row
// block (CSR order) adds its dy columns up in the SDD kernel while they are in L1, so the bias
// gradient costs no extra pass over dy; row blocks that keep nothing are summed separately.
std::tuple<at::Tensor, at::Tensor> grad_weight_impl(const at::Tensor& x, const at::Tensor& dy,
                                                    const at::Tensor& index, int64_t N, int64_t K,
                                                    int64_t bn, int64_t bk, bool want_bias) {
  check_geometry(N, K, bn, bk);
  check_matrix(x, "x", K);
  check_matrix(dy, "dy", N);
  TORCH_CHECK(x.size(0) == dy.size(0), "sparsebert_cpu: x and dy must have the same number of rows, got ",
              x.size(0), " and ", dy.size(0));
  TORCH_CHECK(x.scalar_type() == dy.scalar_type(), "sparsebert_cpu: x dtype ", x.scalar_type(),
              " differs from dy dtype ", dy.scalar_type());
  // nnz is not an argument: infer it from the index length (R + 1 + 4 nnz + C + 1).
  const int64_t R = N / bn, C = K / bk;
  TORCH_CHECK(index.dim() == 1 && (index.numel() - R - C - 2) >= 0 && (index.numel() - R - C - 2) % 4 == 0,
              "sparsebert_cpu: layout index has ", index.numel(), " entries, which is not R + 1 + 4*nnz + C + 1 for a [",
              N, ", ", K, "] weight with block (", bn, ", ", bk, ")");
  const int64_t nnz = (index.numel() - R - C - 2) / 4, M = x.size(0);
  const Index ix = parse_index(index, nnz, N, K, bn, bk, /*csr=*/true, /*csc=*/true);
  const Kernels kern = select_kernels();

  // Bias gradient for the paths below that do not fuse it.
  // (fp32 accumulation without an fp32 copy of dy)
  auto plain_bias = [&] {
    return want_bias ? at::sum(dy, {0}, /*keepdim=*/false, at::kFloat).to(dy.scalar_type()) : at::Tensor();
  };
  if (nnz == 0) return {at::empty({0, bn, bk}, x.options()), plain_bias()};
  const bool pack = pack_enabled(false);
  const at::Tensor xf = pack ? pack_panels(x, C, bk) : as_f32(x);     // [C, M, bk] or [M, K]
  const at::Tensor dyf = pack ? pack_panels(dy, R, bn) : as_f32(dy);  // [R, M, bn] or [M, N]
  const int64_t ldx = pack ? bk : K, ldy = pack ? bn : N;
  const int64_t xcol = pack ? M * bk : bk, ycol = pack ? M * bn : bn;
  at::Tensor dw = pooled_empty({nnz, bn, bk});

  const int64_t threads = at::get_num_threads();
  const float* xp = xf.data_ptr<float>();
  const float* dyp = dyf.data_ptr<float>();
  auto block_args = [&](int64_t i, int64_t m0) {
    return std::make_pair(dyp + m0 * ldy + int64_t(ix.row_idx[i]) * ycol,
                          xp + m0 * ldx + int64_t(ix.col_idx[i]) * xcol);
  };
  if (nnz >= 4 * threads) {
    // Tokens in chunks, outer; the kept blocks of one chunk in parallel. Blocks are walked in
    // CSR order when K <= N (a dy row panel stays in L1 across its row's blocks), in CSC order
    // otherwise (the roles swap). The chunk is sized so both operands' chunks (mc x K of x,
    // mc x N of dy) stay in L2, the wider under 1.5 MB; dvalues is accumulated once per chunk.
    // (Sizing it by the narrower operand alone, 768 KB, left the wide dy chunk in L3: measured
    // 768->3072 at 90%, 2 threads, interleaved: 4.6-5.0 -> 4.1-4.4 ms; at 50% 18.2-19.1 ->
    // 17.5-18.4 ms.)
    const bool csr_order = K <= N;
    const int64_t mc = std::max<int64_t>(64, std::min<int64_t>(1024, (1536 * 1024 / 4) / std::max(K, N)));
    // One parallel region (each thread owns a contiguous range of blocks for all chunks):
    // a region per chunk costs a barrier each, which hurts on a busy 2-core machine.
    float* dwp = dw.data_ptr<float>();
    at::Tensor db = want_bias ? at::zeros({N}, x.options().dtype(at::kFloat)) : at::Tensor();
    float* dbp = want_bias ? db.data_ptr<float>() : nullptr;
    at::parallel_for(0, nnz, 1, [&](int64_t begin, int64_t end) {
      for (int64_t m0 = 0; m0 < M || m0 == 0; m0 += mc) {
        const int64_t rows = std::min(mc, M - m0);
        for (int64_t j = begin; j < end; ++j) {
          const int64_t i = csr_order ? j : int64_t(ix.t_perm[j]);
          const int64_t r = ix.row_idx[i];
          const auto [dyb, xb] = block_args(i, m0);
          kern.sdd(dyb, ldy, xb, ldx, rows, bn, bk, dwp + i * bn * bk, /*accumulate=*/m0 > 0,
                   dbp && i == ix.row_ptr[r] ? dbp + r * bn : nullptr);
        }
        if (M == 0) break;
      }
    });
    if (want_bias) {  // row blocks without a kept block
      std::vector<int64_t> empty_rows;
      for (int64_t r = 0; r < R; ++r)
        if (ix.row_ptr[r] == ix.row_ptr[r + 1]) empty_rows.push_back(r);
      at::parallel_for(0, int64_t(empty_rows.size()), 1, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e) {
          const int64_t r = empty_rows[e];
          float* d = dbp + r * bn;
          for (int64_t m = 0; m < M; ++m) {
            const float* src = dyp + m * ldy + r * ycol;
            for (int64_t n = 0; n < bn; ++n) d[n] += src[n];
          }
        }
      });
      db = pooled_to(db, dy.scalar_type());
    }
    return {pooled_to(dw, x.scalar_type()), db};
  }
  // Few blocks: split the tokens too (>= 4 items per thread) and add the partial sums.
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>((4 * threads + nnz - 1) / nnz, M / 256));
  const int64_t chunk = (M + splits - 1) / splits;
  at::Tensor part = splits == 1 ? dw : pooled_empty({splits, nnz, bn, bk});
  float* pp = part.data_ptr<float>();
  at::parallel_for(0, nnz * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / splits, s = item % splits;
      const int64_t m0 = std::min(M, s * chunk), m1 = std::min(M, m0 + chunk);
      const auto [dyb, xb] = block_args(i, m0);
      kern.sdd(dyb, ldy, xb, ldx, m1 - m0, bn, bk, pp + (s * nnz + i) * bn * bk, /*accumulate=*/false,
               nullptr);
    }
  });
  if (splits > 1) dw = part.sum(0);
  return {pooled_to(dw, x.scalar_type()), plain_bias()};
}

at::Tensor grad_weight(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& index,
                       int64_t N, int64_t K, int64_t bn, int64_t bk) {
  return std::get<0>(grad_weight_impl(x, dy, index, N, K, bn, bk, /*want_bias=*/false));
}

std::tuple<at::Tensor, at::Tensor> grad_weight_bias(const at::Tensor& x, const at::Tensor& dy,
                                                    const at::Tensor& index, int64_t N, int64_t K,
                                                    int64_t bn, int64_t bk) {
  return grad_weight_impl(x, dy, index, N, K, bn, bk, /*want_bias=*/true);
}

std::string isa() { return select_kernels().name; }

}  // namespace
}  // namespace sparsebert_cpu

TORCH_LIBRARY(sparsebert_cpu, m) {
  m.def("forward(Tensor x, Tensor values, Tensor? bias, Tensor index, int N, int K, int bn, int bk, str activation=\"none\") -> Tensor");
  m.def("grad_input(Tensor dy, Tensor values, Tensor index, int N, int K, int bn, int bk) -> Tensor");
  m.def("grad_weight(Tensor x, Tensor dy, Tensor index, int N, int K, int bn, int bk) -> Tensor");
  m.def("grad_weight_bias(Tensor x, Tensor dy, Tensor index, int N, int K, int bn, int bk) -> (Tensor, Tensor)");
  m.def("isa() -> str", &sparsebert_cpu::isa);
  m.def("empty_cache() -> ()", &sparsebert_cpu::pool_empty_cache);
  m.def("pool_stats() -> (int, int, int)", &sparsebert_cpu::pool_stats);
}

TORCH_LIBRARY_IMPL(sparsebert_cpu, CPU, m) {
  m.impl("forward", &sparsebert_cpu::forward);
  m.impl("grad_input", &sparsebert_cpu::grad_input);
  m.impl("grad_weight", &sparsebert_cpu::grad_weight);
  m.impl("grad_weight_bias", &sparsebert_cpu::grad_weight_bias);
}
