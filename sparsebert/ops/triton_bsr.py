"""Triton backend (``backend="triton"``): block-sparse linear on the GPU, or on the CPU under
``TRITON_INTERPRET=1`` (slow; for tests).

Three kernels, one per product, all reading the index arrays of :class:`~sparsebert.layout.LayoutTensors`:

* **DSD** ``_dsd_kernel`` — ``out[M, n_out*BO] = a[M, n_red*BR] · (block-sparse W)``, one kernel for
  both the forward (``y = x Wᵀ``: output blocks are W's row blocks, walked with ``row_ptr/col_idx``)
  and the input gradient (``dx = dy W``: output blocks are W's column blocks, walked with
  ``col_ptr/t_row_idx/t_perm``). Example, the layout of ``sparsebert/layout.py``
  (mask ``[[1, 0], [1, 1]]``, 2×2 blocks)::

      forward, output row-block 1:   entries row_ptr[1]:row_ptr[2] = 1, 2
                                     y[:, 2:4] = x[:, 0:2] @ values[1]ᵀ + x[:, 2:4] @ values[2]ᵀ
      grad_input, output col-block 0: entries col_ptr[0]:col_ptr[1] = 0, 1 (t_perm 0, 1)
                                     dx[:, 0:2] = dy[:, 0:2] @ values[0] + dy[:, 2:4] @ values[1]

  Each program owns a ``[BLOCK_M, BO]`` output tile; programs are ordered M-tile-major (output block
  fastest) so all programs sharing one ``BLOCK_M`` slice of ``a`` run together and re-read it from L2,
  not from HBM. The loop over the kept blocks of one output block is software-pipelined
  (``num_stages``); bias and an optional exact-erf GELU are fused in the epilogue.
* **SDD** ``_sdd_kernel`` — ``dvalues[i] = dy[:, rows_i]ᵀ · x[:, cols_i]`` for kept blocks only. The
  ``M`` reduction is split over ``SPLIT`` programs per block (chosen to fill the GPU when ``nnz`` is
  small); with ``SPLIT > 1`` partial sums go to an fp32 buffer by atomics and are cast at the end.

fp16/bf16 accumulate in fp32; fp32 uses TF32 iff ``torch.backends.cuda.matmul.allow_tf32``. Block sizes
16, 32, 64, 128 (``bn`` and ``bk`` independently). Meta-parameters are autotuned on the GPU
(keyed on an M bucket, the shapes, the block and ``nnz``) and fixed under the interpreter.
"""
from __future__ import annotations

import functools
import os

import torch

from ..layout import LayoutTensors

NAME = "triton"

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    _IMPORT_ERROR = f"triton not installed ({type(e).__name__}: {e})"

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_BLOCKS = (16, 32, 64, 128)
ACTIVATIONS = ("none", "gelu")

# ---------------------------------------------------------------------------------------------
# Variant choice: EDIT HERE after a benchmarks/triton_variants.py run.
#
# Kernel variants are named by short spec strings (see _parse_dsd / _parse_sdd):
#   DSD (forward, grad_input): "legacy" (the first kernel: 1 kept block per step, autotuned) or
#       "g{G}r{R}m{BLOCK_M}w{num_warps}s{num_stages}": G kept blocks gathered per K step (one tl.dot
#       with K = G*block), R consecutive output blocks per program sharing each X tile (merged
#       column lists; missing blocks are zero-filled), BLOCK_M tokens per program.
#   SDD (grad_weight): "legacy" (1 block per program, atomics when split) or
#       "g{G}m{BLOCK_M}w{num_warps}s{num_stages}{a|p}{waves}": G consecutive kept blocks of one row
#       block per program (dy tile loaded once, one tl.dot with N = G*bk); the M reduction split
#       so that about waves x SMs programs run; partial sums by fp32 atomics (a) or into a
#       [split, nnz, bn, bk] fp32 buffer summed afterwards (p, deterministic).
# _VARIANT_OVERRIDES: exact (op, K, N, block, sparsity percent) -> spec, checked first
#   (triton_variants.py prints a ready-to-paste dict of the measured winners; K = in_features,
#   N = out_features of the weight, sparsity percent = round(100 * (1 - density))).
# _VARIANT_TABLE: (op, block) -> [(max_density, spec), ...], first entry with density <= max_density;
#   block = min(bn, bk) rounded into 16/32/64/128. The op is "forward", "grad_input" or "grad_weight".
# SPARSEBERT_TRITON_VARIANT=<spec> forces one spec for every DSD op, and
# SPARSEBERT_TRITON_SDD_VARIANT=<spec> for grad_weight (tests, benchmarks).
# ---------------------------------------------------------------------------------------------
_VARIANT_OVERRIDES: dict = {
    # Measured winners where they are not "legacy" (H200, bf16, M = 16384, 2026-11-26,
    # benchmarks/triton_variants.py; benchmarks/RESULTS.md has the table).
    ("forward", 768, 768, 64, 90): "g1r1m128w4s3",
    ("grad_input", 768, 768, 64, 90): "g1r1m128w4s3",
    ("grad_weight", 768, 768, 32, 50): "g2m128w4s3p2",
    ("grad_weight", 768, 768, 32, 75): "g8m128w8s3p2",
    ("grad_weight", 768, 768, 64, 50): "g2m64w4s3p1",
    ("grad_weight", 768, 768, 64, 75): "g2m128w4s3p4",
    ("grad_weight", 768, 768, 64, 90): "g2m64w4s3p1",
    ("grad_weight", 768, 3072, 32, 50): "g4m64w4s3p1",
    ("grad_weight", 768, 3072, 32, 75): "g2m128w4s3p2",
    ("grad_weight", 768, 3072, 32, 90): "g2m128w4s3p2",
    ("grad_weight", 3072, 768, 32, 50): "g4m64w4s3p1",
    ("grad_weight", 3072, 768, 32, 75): "g2m128w4s3p2",
    ("grad_weight", 3072, 768, 32, 90): "g4m64w4s3p1",
}
_VARIANT_TABLE: dict = {
    # Measured on the H200 (see above): the autotuned one-block-per-step kernel ("legacy") won
    # forward and grad_input at every BERT shape, block 32/64 and sparsity 50/75/90% but one; the
    # grouped weight-gradient kernel won with 32-wide blocks, legacy with 64.
    ("forward", 16): [(1.0, "legacy")],
    ("forward", 32): [(1.0, "legacy")],
    ("forward", 64): [(1.0, "legacy")],
    ("forward", 128): [(1.0, "legacy")],
    ("grad_input", 16): [(1.0, "legacy")],
    ("grad_input", 32): [(1.0, "legacy")],
    ("grad_input", 64): [(1.0, "legacy")],
    ("grad_input", 128): [(1.0, "legacy")],
    ("grad_weight", 16): [(1.0, "g4m64w4s3p1")],
    ("grad_weight", 32): [(1.0, "g2m128w4s3p2")],
    ("grad_weight", 64): [(1.0, "legacy")],
    ("grad_weight", 128): [(1.0, "legacy")],
}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Read once, like Triton itself: whether the kernels below were decorated for the interpreter.
_INTERPRET = _interpreting()
_AUTOTUNE = os.environ.get("SPARSEBERT_TRITON_AUTOTUNE", "1") != "0"


# ---------------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------------
def unavailable_reason(device: torch.device | None = None) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    device = torch.device(device) if device is not None else None
    if device is None:
        if torch.cuda.is_available() or _INTERPRET:
            return None
        return "no CUDA device and TRITON_INTERPRET is not set"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if _INTERPRET:
            return None
        if _interpreting():
            return ("TRITON_INTERPRET=1 was set after sparsebert.ops.triton_bsr was imported; "
                    "set it before importing")
        return "CPU tensors need TRITON_INTERPRET=1 (no CUDA device and TRITON_INTERPRET is not set)"
    return f"device type {device.type!r} is not supported by the Triton backend"


def unsupported_reason(x, values, lt: LayoutTensors) -> str | None:
    reason = unavailable_reason(x.device)
    if reason is not None:
        return reason
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} not supported (fp16, bf16, fp32)"
    if values.dtype != x.dtype:
        return f"values dtype {values.dtype} differs from input dtype {x.dtype}"
    if lt.bn not in SUPPORTED_BLOCKS or lt.bk not in SUPPORTED_BLOCKS:
        return f"block ({lt.bn}, {lt.bk}) not supported: each side must be one of {SUPPORTED_BLOCKS}"
    return None


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _gelu(x):
        # Exact GELU (nn.GELU() default): 0.5 x (1 + erf(x / sqrt(2))).
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

    @triton.jit
    def _dsd_kernel(
        # pointers
        a_ptr, w_ptr, bias_ptr, out_ptr,
        ptr_ptr, red_idx_ptr, perm_ptr,
        # dimensions
        M, n_out_blocks, lda, ldo,
        M_BUCKET, NNZ,  # autotune keys only
        # meta-parameters
        BO: tl.constexpr, BR: tl.constexpr, W_TRANS: tl.constexpr, USE_PERM: tl.constexpr,
        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """out[m, o*BO + i] = act(bias + sum_e sum_j a[m, red_idx[e]*BR + j] * Wblk(e)[i, j]),
        e over ptr[o]:ptr[o+1]. Wblk(e) is values[perm[e]] ([BO, BR], W_TRANS=False: forward)
        or values[perm[e]]ᵀ (values block is [BR, BO], W_TRANS=True: input gradient)."""
        pid = tl.program_id(0)
        pid_m = pid // n_out_blocks           # output block fastest: one M slice at a time
        o = pid % n_out_blocks

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        offs_m64 = offs_m.to(tl.int64)
        offs_r = tl.arange(0, BR)
        offs_o = tl.arange(0, BO)

        a_rows = a_ptr + offs_m64[:, None] * lda + offs_r[None, :]             # [BLOCK_M, BR]
        if W_TRANS:   # value block [BR, BO] row-major: Wt[j, i] at j*BO + i
            w_tile = offs_r[:, None] * BO + offs_o[None, :]
        else:         # value block [BO, BR] row-major: Wt[j, i] at i*BR + j
            w_tile = offs_o[None, :] * BR + offs_r[:, None]

        start = tl.load(ptr_ptr + o)
        end = tl.load(ptr_ptr + o + 1)
        acc = tl.zeros((BLOCK_M, BO), dtype=tl.float32)
        for e in range(start, end):
            rb = tl.load(red_idx_ptr + e)
            if USE_PERM:
                p = tl.load(perm_ptr + e)
            else:
                p = e
            a = tl.load(a_rows + rb * BR, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptr + p.to(tl.int64) * (BO * BR) + w_tile)            # [BR, BO]
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)

        if HAS_BIAS:
            b = tl.load(bias_ptr + o * BO + offs_o).to(tl.float32)
            acc = acc + b[None, :]
        if ACT == "gelu":
            acc = _gelu(acc)
        out_ptrs = out_ptr + offs_m64[:, None] * ldo + (o * BO + offs_o)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])

    @triton.jit
    def _sdd_kernel(
        # pointers
        x_ptr, dy_ptr, out_ptr, row_idx_ptr, col_idx_ptr,
        # dimensions
        M, nnz, ldx, ldy, chunk,
        M_BUCKET, SPLIT,  # autotune keys only
        # meta-parameters
        BN: tl.constexpr, BK: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """out[i] (+)= dy[m0:m1, row_idx[i]*BN : +BN]ᵀ @ x[m0:m1, col_idx[i]*BK : +BK],
        [m0, m1) the program's slice of ``chunk`` tokens."""
        pid = tl.program_id(0)
        s = pid // nnz                        # block fastest: programs of one M slice run together
        i = pid % nnz
        r = tl.load(row_idx_ptr + i)
        c = tl.load(col_idx_ptr + i)
        m_start = s * chunk
        m_end = tl.minimum(m_start + chunk, M)

        offs_n = tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        offs_mm = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + offs_mm
            mask_m = offs_m < m_end
            offs_m64 = offs_m.to(tl.int64)
            dy = tl.load(dy_ptr + offs_m64[:, None] * ldy + (r * BN + offs_n)[None, :],
                         mask=mask_m[:, None], other=0.0)                       # [BLOCK_M, BN]
            x = tl.load(x_ptr + offs_m64[:, None] * ldx + (c * BK + offs_k)[None, :],
                        mask=mask_m[:, None], other=0.0)                        # [BLOCK_M, BK]
            if UPCAST:
                dy = dy.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION)

        out_ptrs = out_ptr + i.to(tl.int64) * (BN * BK) + offs_n[:, None] * BK + offs_k[None, :]
        if ATOMIC:
            tl.atomic_add(out_ptrs, acc)
        else:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty))

    # Sizes are not specialised (one compile serves every shape); leading dimensions are.
    @triton.jit(do_not_specialize=["M", "n_super"])
    def _dsdv_kernel(
        a_ptr, w_ptr, bias_ptr, out_ptr,
        sptr_ptr, scol_ptr, sval_ptr,
        M, n_super, lda, ldo,
        BO: tl.constexpr, BR: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
        W_TRANS: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """DSD with G kept blocks per K step and R output blocks per program.

        Program (pid_m, s) owns out[pid_m*BLOCK_M : +BLOCK_M, s*R*BO : +R*BO]. Its merged reduction
        list is e in sptr[s]:sptr[s+1]: reduction block scol[e], and sval[e*R + r] = the value
        block of output block s*R + r at that reduction block, or -1 (zero-filled). Each step
        gathers G entries into one [BLOCK_M, G*BR] a-tile and one [G*BR, R*BO] W-tile."""
        pid = tl.program_id(0)
        pid_m = pid // n_super               # output super-block fastest: one M slice at a time
        s = pid % n_super

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        offs_m64 = offs_m.to(tl.int64)
        k = tl.arange(0, G * BR)
        kg = k // BR
        kj = k % BR
        n = tl.arange(0, R * BO)
        nr = n // BO
        ni = n % BO
        if W_TRANS:   # value block [BR, BO] row-major
            w_in = kj[:, None] * BO + ni[None, :]
        else:         # value block [BO, BR] row-major
            w_in = ni[None, :] * BR + kj[:, None]

        start = tl.load(sptr_ptr + s)
        end = tl.load(sptr_ptr + s + 1)
        acc = tl.zeros((BLOCK_M, R * BO), dtype=tl.float32)
        for e in range(start, end, G):
            ek = e + kg
            vk = tl.max_constancy(ek < end, [BR])
            col = tl.load(scol_ptr + ek, mask=vk, other=0)
            a_off = tl.max_contiguous(tl.multiple_of(col * BR + kj, [BR]), [BR])
            a = tl.load(a_ptr + offs_m64[:, None] * lda + a_off[None, :],
                        mask=mask_m[:, None] & vk[None, :], other=0.0)          # [BLOCK_M, G*BR]
            p2 = tl.full((G * BR, R * BO), -1, tl.int32)
            for r in tl.static_range(R):
                pr = tl.load(sval_ptr + ek * R + r, mask=vk, other=-1)
                p2 = tl.where(nr[None, :] == r, pr[:, None], p2)
            p2 = tl.max_constancy(p2, [BR, BO])
            w_off = p2.to(tl.int64) * (BO * BR) + w_in
            if W_TRANS:
                w_off = tl.max_contiguous(tl.multiple_of(w_off, [1, BO]), [1, BO])
            else:
                w_off = tl.max_contiguous(tl.multiple_of(w_off, [BR, 1]), [BR, 1])
            w = tl.load(w_ptr + w_off, mask=p2 >= 0, other=0.0)                  # [G*BR, R*BO]
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)

        offs_out = s * (R * BO) + n
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_out).to(tl.float32)
            acc = acc + b[None, :]
        if ACT == "gelu":
            acc = _gelu(acc)
        out_ptrs = out_ptr + offs_m64[:, None] * ldo + offs_out[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])

    @triton.jit(do_not_specialize=["M", "n_groups", "nnz", "chunk"])
    def _sddv_kernel(
        x_ptr, dy_ptr, out_ptr, gstart_ptr, grow_ptr, row_ptr_ptr, col_idx_ptr,
        M, n_groups, nnz, ldx, ldy, chunk,
        BN: tl.constexpr, BK: tl.constexpr, G: tl.constexpr, MODE: tl.constexpr,
        T_ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """SDD over groups of up to G consecutive kept blocks of one row block: out[i0+g] (+)=
        dy[m0:m1, row*BN : +BN]ᵀ @ x[m0:m1, col_idx[i0+g]*BK : +BK] as one [BN, G*BK] tl.dot per step.
        MODE 0: store; 1: fp32 atomic add; 2: fp32 store into slice s of a [split, nnz, BN, BK] buffer.
        T_ACC: accumulate the transpose ([G*BK, BN] = xᵀ dy) so that BN < 64 still gets wgmma."""
        pid = tl.program_id(0)
        s = pid // n_groups                  # group fastest: programs of one M slice run together
        gi = pid % n_groups
        i0 = tl.load(gstart_ptr + gi)
        r = tl.load(grow_ptr + gi)
        iend = tl.load(row_ptr_ptr + r + 1)
        m_start = s * chunk
        m_end = tl.minimum(m_start + chunk, M)

        q = tl.arange(0, G * BK)
        gq = q // BK
        kq = q % BK
        vq = tl.max_constancy((i0 + gq) < iend, [BK])
        cols = tl.load(col_idx_ptr + i0 + gq, mask=vq, other=0)
        x_col = tl.max_contiguous(tl.multiple_of(cols * BK + kq, [BK]), [BK])
        offs_n = tl.arange(0, BN)
        offs_mm = tl.arange(0, BLOCK_M)
        if T_ACC:
            acc = tl.zeros((G * BK, BN), dtype=tl.float32)
        else:
            acc = tl.zeros((BN, G * BK), dtype=tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + offs_mm
            mask_m = offs_m < m_end
            offs_m64 = offs_m.to(tl.int64)
            dy = tl.load(dy_ptr + offs_m64[:, None] * ldy + (r * BN + offs_n)[None, :],
                         mask=mask_m[:, None], other=0.0)                       # [BLOCK_M, BN]
            x = tl.load(x_ptr + offs_m64[:, None] * ldx + x_col[None, :],
                        mask=mask_m[:, None] & vq[None, :], other=0.0)          # [BLOCK_M, G*BK]
            if UPCAST:
                dy = dy.to(tl.float32)
                x = x.to(tl.float32)
            if T_ACC:
                acc = tl.dot(tl.trans(x), dy, acc, input_precision=PRECISION)
            else:
                acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION)

        o_q = tl.max_contiguous(tl.multiple_of((i0 + gq).to(tl.int64) * (BN * BK) + kq, [BK]), [BK])
        if T_ACC:
            out_ptrs = out_ptr + o_q[:, None] + offs_n[None, :] * BK
            vmask = vq[:, None]
        else:
            out_ptrs = out_ptr + offs_n[:, None] * BK + o_q[None, :]
            vmask = vq[None, :]
        if MODE == 1:
            tl.atomic_add(out_ptrs, acc, mask=vmask)
        elif MODE == 2:
            tl.store(out_ptrs + s.to(tl.int64) * nnz * (BN * BK), acc, mask=vmask)
        else:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=vmask)

    # ---- autotuning (GPU only) -----------------------------------------------------------
    # Small lists: every config is one compile (~1 s) per block size, and each new key benchmarks
    # all of them. SPARSEBERT_TRITON_AUTOTUNE=0 uses the first config that fits, untimed.
    def _dsd_configs():
        c = lambda bm, w, s: triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        return [c(128, 4, 3), c(128, 4, 4), c(128, 8, 3), c(256, 8, 3), c(64, 4, 4)]

    def _sdd_configs():
        c = lambda bm, w, s: triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        return [c(64, 4, 4), c(128, 4, 3), c(128, 8, 3), c(64, 8, 4)]

    _SMEM_BUDGET = 227 * 1024   # H100/H200 per-block maximum
    _FALLBACK = dict(BLOCK_M=64, num_warps=4, num_stages=2)

    def _fit(configs, elem, tile_elems, buffers):
        """Configs whose pipelined operand buffers fit in shared memory (the compiler would
        reject the rest at launch), plus a small fallback when none does. ``buffers(num_stages)``
        is how many copies of the operand tiles the compiled kernel holds (measured with
        :func:`compile_for_sm90`: DSD max(2, stages - 1), SDD max(2, stages))."""
        keep = [c for c in configs
                if buffers(c.num_stages) * tile_elems(c.kwargs["BLOCK_M"]) * elem <= _SMEM_BUDGET]
        if not keep:
            f = _FALLBACK
            keep = [triton.Config({"BLOCK_M": f["BLOCK_M"]}, num_warps=f["num_warps"],
                                  num_stages=f["num_stages"])]
        return keep if _AUTOTUNE else keep[:1]

    def _prune_dsd(configs, named_args, **kwargs):
        bo, br = kwargs["BO"], kwargs["BR"]
        return _fit(configs, named_args["a_ptr"].element_size(), lambda bm: bm * br + br * bo,
                    lambda st: max(2, st - 1))

    def _prune_sdd(configs, named_args, **kwargs):
        bn, bk = kwargs["BN"], kwargs["BK"]
        return _fit(configs, named_args["x_ptr"].element_size(), lambda bm: bm * (bn + bk),
                    lambda st: max(2, st))

    def _quick_bench(kernel_call, quantiles):
        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)

    def _autotune(configs, **kw):
        try:
            return triton.autotune(configs=configs, do_bench=_quick_bench, **kw)
        except TypeError:  # a Triton without the do_bench argument
            return triton.autotune(configs=configs, **kw)

    if _INTERPRET:
        _dsd_launch = _dsd_kernel
        _sdd_launch = _sdd_kernel
    else:
        _dsd_launch = _autotune(
            _dsd_configs(),
            key=["M_BUCKET", "n_out_blocks", "lda", "BO", "BR", "NNZ"],
            prune_configs_by={"early_config_prune": _prune_dsd},
        )(_dsd_kernel)
        _sdd_launch = _autotune(
            _sdd_configs(),
            key=["M_BUCKET", "nnz", "ldx", "ldy", "BN", "BK", "SPLIT"],
            reset_to_zero=["out_ptr"],
            prune_configs_by={"early_config_prune": _prune_sdd},
        )(_sdd_kernel)


# Interpreter: one program loop step costs about a millisecond, so use large M tiles.
_INTERP_BLOCK_M = 128


# ---------------------------------------------------------------------------------------------
# Launchers: check -> allocate -> launch
# ---------------------------------------------------------------------------------------------
def _m_bucket(M: int) -> int:
    """Autotune key for M: the next power of two (at least 16)."""
    return 1 << max(4, (max(M, 1) - 1).bit_length())


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not _INTERPRET else "ieee"
    return "ieee"  # ignored for half types


def _upcast(dtype: torch.dtype) -> bool:
    # tl.dot on bf16 is wrong in the interpreter (it multiplies the raw bits); fp32 there is exact.
    return _INTERPRET and dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check(name, lt: LayoutTensors, *, tensors, values=None):
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"triton backend unavailable: {_IMPORT_ERROR}")
    if not isinstance(lt, LayoutTensors):
        raise ValueError(f"{name}: lt must be a LayoutTensors, got {type(lt).__name__}")
    ref = tensors[0][1]
    reason = unavailable_reason(ref.device)
    if reason is not None:
        raise RuntimeError(f"triton backend unavailable for {ref.device}: {reason}")
    if ref.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: dtype {ref.dtype} not supported by the triton backend (fp16, bf16, fp32)")
    if lt.bn not in SUPPORTED_BLOCKS or lt.bk not in SUPPORTED_BLOCKS:
        raise ValueError(f"{name}: block ({lt.bn}, {lt.bk}) not supported; each side must be one of "
                         f"{SUPPORTED_BLOCKS}")
    if lt.N % lt.bn or lt.K % lt.bk:
        raise ValueError(f"{name}: block ({lt.bn}, {lt.bk}) does not divide the weight ({lt.N}, {lt.K})")
    for arg, t in tensors:
        if t.device != ref.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, expected {ref.device}")
        if t.dtype != ref.dtype:
            raise ValueError(f"{name}: {arg} has dtype {t.dtype}, expected {ref.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: {arg} must be contiguous")
    for field in ("row_ptr", "col_idx", "row_idx", "col_ptr", "t_row_idx", "t_perm"):
        t = getattr(lt, field)
        if t.device != ref.device or t.dtype != torch.int32:
            raise ValueError(f"{name}: layout index {field} must be int32 on {ref.device} "
                             f"(got {t.dtype} on {t.device}); use layout.tensors(device)")
    if values is not None and tuple(values.shape) != (lt.nnz, lt.bn, lt.bk):
        raise ValueError(f"{name}: values has shape {tuple(values.shape)}, expected "
                         f"[nnz={lt.nnz}, bn={lt.bn}, bk={lt.bk}]")


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """Kernels never read an empty tensor, but their pointer must still be valid."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def _dsd(a, values, bias, out, ptr, red_idx, perm, *, BO, BR, w_trans, use_perm, activation, nnz):
    M = a.shape[0]
    n_out_blocks = out.shape[1] // BO
    args = (a, _nonempty(values), bias if bias is not None else out, out,
            ptr, _nonempty(red_idx), _nonempty(perm),
            M, n_out_blocks, a.stride(0), out.stride(0), _m_bucket(M), nnz)
    meta = dict(BO=BO, BR=BR, W_TRANS=w_trans, USE_PERM=use_perm, HAS_BIAS=bias is not None,
                ACT=activation, UPCAST=_upcast(a.dtype), PRECISION=_precision(a.dtype))
    if _INTERPRET:
        meta["BLOCK_M"] = _INTERP_BLOCK_M
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * n_out_blocks,)
    with _device_guard(a):
        _dsd_launch[grid](*args, **meta)
    return out


# ---------------------------------------------------------------------------------------------
# Variants: parsing, choice, index structures
# ---------------------------------------------------------------------------------------------
import re as _re
from collections import OrderedDict as _OrderedDict

_DSD_RE = _re.compile(r"^g(\d+)r(\d+)m(\d+)w(\d+)s(\d+)$")
_SDD_RE = _re.compile(r"^g(\d+)m(\d+)w(\d+)s(\d+)([ap])(\d+)$")


def _pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


def _parse_dsd(spec: str):
    """``"legacy"`` -> None; ``"g2r1m128w8s3"`` -> dict(G, R, BLOCK_M, num_warps, num_stages)."""
    if spec == "legacy":
        return None
    m = _DSD_RE.match(spec)
    if not m:
        raise ValueError(f"bad DSD variant {spec!r}: want 'legacy' or 'g<G>r<R>m<BLOCK_M>w<warps>s<stages>'")
    G, R, bm, w, st = map(int, m.groups())
    if not all(_pow2(v) for v in (G, R, bm, w)) or bm < 16 or st < 1:
        raise ValueError(f"bad DSD variant {spec!r}: G, R, BLOCK_M, warps must be powers of two")
    return dict(G=G, R=R, BLOCK_M=bm, num_warps=w, num_stages=st)


def _parse_sdd(spec: str):
    """``"legacy"`` -> None; ``"g2m128w4s3p2"`` -> dict(G, BLOCK_M, num_warps, num_stages, mode, waves)."""
    if spec == "legacy":
        return None
    m = _SDD_RE.match(spec)
    if not m:
        raise ValueError(f"bad SDD variant {spec!r}: want 'legacy' or 'g<G>m<BLOCK_M>w<warps>s<stages><a|p><waves>'")
    G, bm, w, st, mode, waves = m.groups()
    G, bm, w, st, waves = int(G), int(bm), int(w), int(st), int(waves)
    if not all(_pow2(v) for v in (G, bm, w)) or bm < 16 or st < 1 or waves < 1:
        raise ValueError(f"bad SDD variant {spec!r}")
    return dict(G=G, BLOCK_M=bm, num_warps=w, num_stages=st, mode=mode, waves=waves)


def _block_class(bn: int, bk: int) -> int:
    b = min(bn, bk)
    return min((c for c in SUPPORTED_BLOCKS if c >= b), default=SUPPORTED_BLOCKS[-1])


def choose_variant(op: str, lt: LayoutTensors) -> str:
    """The spec used for ``op`` ("forward", "grad_input", "grad_weight") on this layout:
    env override, then _VARIANT_OVERRIDES (exact shape), then _VARIANT_TABLE (block, density)."""
    env = os.environ.get("SPARSEBERT_TRITON_SDD_VARIANT" if op == "grad_weight"
                         else "SPARSEBERT_TRITON_VARIANT")
    if env:
        return env
    total = (lt.N // lt.bn) * (lt.K // lt.bk)
    density = lt.nnz / total if total else 0.0
    sp = int(round(100 * (1 - density)))
    block = lt.bn if lt.bn == lt.bk else _block_class(lt.bn, lt.bk)
    hit = _VARIANT_OVERRIDES.get((op, lt.K, lt.N, block, sp))
    if hit:
        return hit
    rows = _VARIANT_TABLE.get((op, _block_class(lt.bn, lt.bk)))
    if rows:
        for max_d, spec in rows:
            if density <= max_d + 1e-9:
                return spec
        return rows[-1][1]
    return "legacy"


def _fit_dsd(cfg: dict, elem: int, BO: int, BR: int) -> dict:
    """Shrink a DSD config until its pipelined operand buffers fit in shared memory."""
    cfg = dict(cfg)
    smem = lambda c: max(2, c["num_stages"] - 1) * (c["BLOCK_M"] * c["G"] * BR
                                                  + c["G"] * BR * c["R"] * BO) * elem
    while smem(cfg) > _SMEM_BUDGET_BYTES:
        if cfg["num_stages"] > 3:
            cfg["num_stages"] -= 1
        elif cfg["G"] > 1 and cfg["G"] * BR > 64:
            cfg["G"] //= 2
        elif cfg["BLOCK_M"] > 64:
            cfg["BLOCK_M"] //= 2
        elif cfg["R"] > 1:
            cfg["R"] //= 2
        elif cfg["G"] > 1:
            cfg["G"] //= 2
        else:
            cfg["num_stages"] = 2
            break
    return cfg


def _fit_sdd(cfg: dict, elem: int, BN: int, BK: int) -> dict:
    cfg = dict(cfg)
    smem = lambda c: max(2, c["num_stages"]) * c["BLOCK_M"] * (BN + c["G"] * BK) * elem
    while smem(cfg) > _SMEM_BUDGET_BYTES:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif cfg["BLOCK_M"] > 32:
            cfg["BLOCK_M"] //= 2
        elif cfg["G"] > 1:
            cfg["G"] //= 2
        else:
            break
    return cfg


_SMEM_BUDGET_BYTES = 227 * 1024
_INDEX_CACHE: "_OrderedDict" = _OrderedDict()
_INDEX_CACHE_SIZE = 256


def _cached(key, anchor_tensors, build):
    """Small LRU keyed on the layout tensors' storage (kept alive by the entry, so a key's
    pointers cannot be reused while it is cached)."""
    hit = _INDEX_CACHE.get(key)
    if hit is not None:
        _INDEX_CACHE.move_to_end(key)
        return hit[1]
    val = build()
    _INDEX_CACHE[key] = (anchor_tensors, val)
    while len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
        _INDEX_CACHE.popitem(last=False)
    return val


def _lt_key(lt: LayoutTensors):
    return (lt.row_ptr.data_ptr(), lt.col_idx.data_ptr(), lt.t_perm.data_ptr(), lt.nnz, lt.N,
            lt.K, lt.bn, lt.bk, str(lt.row_ptr.device))


def _super_index(lt: LayoutTensors, R: int, transposed: bool):
    """Merged reduction lists for groups of R output blocks: (sptr [S+1], scol [U], sval [U*R], S).

    Forward (transposed=False): output blocks = W's row blocks, reduction = column blocks.
    grad_input (transposed=True): output blocks = W's column blocks, reduction = row blocks.
    With R == 1 this is exactly the CSR (resp. CSC + t_perm) index."""
    if R == 1:
        if transposed:
            return lt.col_ptr, lt.t_row_idx, lt.t_perm, lt.n_col_blocks
        return lt.row_ptr, lt.col_idx, torch.arange(lt.nnz, dtype=torch.int32,
                                                     device=lt.row_ptr.device), lt.n_row_blocks

    def build():
        dev = lt.row_ptr.device
        nR, nC = lt.n_row_blocks, lt.n_col_blocks
        grid = torch.full((nR, nC), -1, dtype=torch.int64, device=dev)
        if lt.nnz:
            grid[lt.row_idx.long(), lt.col_idx.long()] = torch.arange(lt.nnz, device=dev)
        if transposed:
            grid = grid.t()
        n_out, n_red = grid.shape
        S = -(-n_out // R)
        if S * R != n_out:
            grid = torch.cat([grid, grid.new_full((S * R - n_out, n_red), -1)])
        g = grid.view(S, R, n_red).permute(0, 2, 1)            # [S, n_red, R]
        keep = (g >= 0).any(-1)                                 # [S, n_red]
        counts = keep.sum(1)
        sptr = torch.zeros(S + 1, dtype=torch.int32, device=dev)
        sptr[1:] = counts.cumsum(0).to(torch.int32)
        scol = keep.nonzero()[:, 1].to(torch.int32).contiguous()
        sval = g[keep].to(torch.int32).contiguous().view(-1)   # [U*R]
        return sptr, scol, sval, S

    return _cached(("super", R, transposed) + _lt_key(lt), (lt.row_ptr, lt.col_idx, lt.t_perm), build)


def _group_index(lt: LayoutTensors, G: int):
    """Groups of up to G consecutive kept blocks of one row block: (gstart, grow, n_groups)."""
    def build():
        dev = lt.row_ptr.device
        counts = (lt.row_ptr[1:] - lt.row_ptr[:-1]).long()
        ng = (counts + G - 1) // G
        total = int(ng.sum().item())
        rows = torch.repeat_interleave(torch.arange(lt.n_row_blocks, device=dev), ng)
        first = torch.cumsum(ng, 0) - ng
        local = torch.arange(total, device=dev) - torch.repeat_interleave(first, ng)
        gstart = (lt.row_ptr.long()[rows] + local * G).to(torch.int32).contiguous()
        return gstart, rows.to(torch.int32).contiguous(), total

    if G == 1:
        return _cached(("group1",) + _lt_key(lt), (lt.row_ptr, lt.col_idx, lt.t_perm),
                       lambda: (torch.arange(lt.nnz, dtype=torch.int32, device=lt.row_ptr.device),
                                lt.row_idx, lt.nnz))
    return _cached(("group", G) + _lt_key(lt), (lt.row_ptr, lt.col_idx, lt.t_perm), build)


def _dsdv(a, values, bias, out, lt, *, transposed, activation, cfg):
    BO, BR = (lt.bk, lt.bn) if transposed else (lt.bn, lt.bk)
    cfg = _fit_dsd(cfg, a.element_size(), BO, BR)
    n_out_blocks = out.shape[1] // BO
    R = min(cfg["R"], 1 << max(0, (n_out_blocks - 1).bit_length()))
    if n_out_blocks % R:   # R output blocks per program must tile the output exactly
        R = 1
    if R > 1 and _has_nonfinite(a):
        # R > 1 merges the column lists of R output blocks and zero-fills the blocks one of them
        # lacks: 0 * inf = nan would reach an output through a pruned block (docs/CONTRACT.md).
        R = 1
    sptr, scol, sval, S = _super_index(lt, R, transposed)
    M = a.shape[0]
    bm = _INTERP_BLOCK_M if _INTERPRET else cfg["BLOCK_M"]
    kw = {} if _INTERPRET else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    grid = (triton.cdiv(M, bm) * S,)
    with _device_guard(a):
        _dsdv_kernel[grid](a, _nonempty(values), bias if bias is not None else out, out,
                           sptr, _nonempty(scol), _nonempty(sval),
                           M, S, a.stride(0), out.stride(0),
                           BO=BO, BR=BR, G=cfg["G"], R=R, W_TRANS=transposed,
                           HAS_BIAS=bias is not None, ACT=activation, UPCAST=_upcast(a.dtype),
                           PRECISION=_precision(a.dtype), BLOCK_M=bm, **kw)
    return out


def _has_nonfinite(t: torch.Tensor) -> bool:
    """Whether ``t`` may hold a NaN/Inf (one reduction; a host sync on the GPU, so it is only used
    by the R > 1 variants, which the default variant table never picks)."""
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return True
    s = t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()
    return not bool(torch.isfinite(s))


def _sdd_t_acc(bn: int, bk: int, G: int) -> bool:
    """Accumulate [G*bk, bn] (xᵀ dy) instead of [bn, G*bk]: wgmma needs >= 64 accumulator rows."""
    return bn < 64 and G * bk >= 64


def _sddv(x, dy, lt, cfg, split=None):
    M, nnz = x.shape[0], lt.nnz
    cfg = _fit_sdd(cfg, x.element_size(), lt.bn, lt.bk)
    G = cfg["G"]
    gstart, grow, n_groups = _group_index(lt, G)
    if split is None:
        if x.device.type == "cuda":
            target = cfg["waves"] * _num_sms(x.device.index if x.device.index is not None
                                             else torch.cuda.current_device())
        else:
            target = 4
        split = max(1, min(triton.cdiv(target, max(n_groups, 1)), triton.cdiv(M, 512)))
    if split < 1:
        raise ValueError(f"grad_weight: split must be >= 1, got {split}")
    chunk = triton.cdiv(triton.cdiv(M, split), 128) * 128
    split = triton.cdiv(M, chunk)
    mode = 0 if split == 1 else (1 if cfg["mode"] == "a" else 2)
    if mode == 0:
        out = torch.empty(nnz, lt.bn, lt.bk, device=x.device, dtype=x.dtype)
    elif mode == 1:
        out = torch.zeros(nnz, lt.bn, lt.bk, device=x.device, dtype=torch.float32)
    else:
        out = torch.empty(split, nnz, lt.bn, lt.bk, device=x.device, dtype=torch.float32)
    bm = _INTERP_BLOCK_M if _INTERPRET else cfg["BLOCK_M"]
    kw = {} if _INTERPRET else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    with _device_guard(x):
        _sddv_kernel[(n_groups * split,)](x, dy, out, gstart, grow, lt.row_ptr, lt.col_idx,
                                          M, n_groups, nnz, x.stride(0), dy.stride(0), chunk,
                                          BN=lt.bn, BK=lt.bk, G=G, MODE=mode,
                                          T_ACC=_sdd_t_acc(lt.bn, lt.bk, G),
                                          UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype),
                                          BLOCK_M=bm, **kw)
    if mode == 0:
        return out
    if mode == 2:
        out = out.sum(0)
    return out.to(x.dtype)


def _device_guard(t):
    if t.is_cuda:
        return torch.cuda.device(t.device)
    import contextlib
    return contextlib.nullcontext()


def forward(x, values, bias, lt: LayoutTensors, activation: str = "none", variant: str | None = None):
    """``act(x @ Wᵀ + bias)``: x ``[M, K]``, values ``[nnz, bn, bk]``, bias ``[N]`` or None -> ``[M, N]``."""
    tensors = [("x", x), ("values", values)] + ([("bias", bias)] if bias is not None else [])
    _check("forward", lt, tensors=tensors, values=values)
    if activation not in ACTIVATIONS:
        raise ValueError(f"forward: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 2 or x.shape[1] != lt.K:
        raise ValueError(f"forward: x must be [M, K={lt.K}], got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (lt.N,):
        raise ValueError(f"forward: bias must be [N={lt.N}], got {tuple(bias.shape)}")
    M = x.shape[0]
    y = torch.empty(M, lt.N, device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    cfg = _parse_dsd(variant or choose_variant("forward", lt))
    if cfg is None:
        return _dsd(x, values, bias, y, lt.row_ptr, lt.col_idx, lt.col_idx, BO=lt.bn, BR=lt.bk,
                    w_trans=False, use_perm=False, activation=activation, nnz=lt.nnz)
    return _dsdv(x, values, bias, y, lt, transposed=False, activation=activation, cfg=cfg)


def grad_input(dy, values, lt: LayoutTensors, variant: str | None = None):
    """``dy @ W``: dy ``[M, N]`` -> dx ``[M, K]``."""
    _check("grad_input", lt, tensors=[("dy", dy), ("values", values)], values=values)
    if dy.dim() != 2 or dy.shape[1] != lt.N:
        raise ValueError(f"grad_input: dy must be [M, N={lt.N}], got {tuple(dy.shape)}")
    M = dy.shape[0]
    dx = torch.empty(M, lt.K, device=dy.device, dtype=dy.dtype)
    if M == 0:
        return dx
    cfg = _parse_dsd(variant or choose_variant("grad_input", lt))
    if cfg is None:
        return _dsd(dy, values, None, dx, lt.col_ptr, lt.t_row_idx, lt.t_perm, BO=lt.bk, BR=lt.bn,
                    w_trans=True, use_perm=True, activation="none", nnz=lt.nnz)
    return _dsdv(dy, values, None, dx, lt, transposed=True, activation="none", cfg=cfg)


def _split_for(M: int, nnz: int, device: torch.device) -> int:
    """How many programs share one block's M reduction: enough for ~4 programs per SM, each
    reducing at least 256 tokens."""
    if device.type == "cuda":
        target = 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    return max(1, min(triton.cdiv(target, max(nnz, 1)), triton.cdiv(M, 256)))


def grad_weight(x, dy, lt: LayoutTensors, split: int | None = None, variant: str | None = None):
    """``(dyᵀ @ x)`` on the kept blocks: x ``[M, K]``, dy ``[M, N]`` -> ``[nnz, bn, bk]``.

    ``split`` (tests) forces the number of programs per block (group) along M; ``variant`` (tests,
    benchmarks) forces a kernel variant spec (see _VARIANT_TABLE)."""
    _check("grad_weight", lt, tensors=[("x", x), ("dy", dy)])
    if x.dim() != 2 or dy.dim() != 2 or x.shape[0] != dy.shape[0] or x.shape[1] != lt.K \
            or dy.shape[1] != lt.N:
        raise ValueError(f"grad_weight: need x [M, K={lt.K}] and dy [M, N={lt.N}], got "
                         f"{tuple(x.shape)} and {tuple(dy.shape)}")
    M, nnz = x.shape[0], lt.nnz
    if M == 0 or nnz == 0:
        return torch.zeros(nnz, lt.bn, lt.bk, device=x.device, dtype=x.dtype)
    if split is not None and split < 1:
        raise ValueError(f"grad_weight: split must be >= 1, got {split}")
    cfg = _parse_sdd(variant or choose_variant("grad_weight", lt))
    if cfg is not None:
        return _sddv(x, dy, lt, cfg, split)
    if split is None:
        split = _split_for(M, nnz, x.device)
    if split < 1:
        raise ValueError(f"grad_weight: split must be >= 1, got {split}")
    chunk = triton.cdiv(triton.cdiv(M, split), 64) * 64
    split = triton.cdiv(M, chunk)
    atomic = split > 1
    out = torch.zeros(nnz, lt.bn, lt.bk, device=x.device,
                      dtype=torch.float32 if atomic else x.dtype)
    meta = dict(BN=lt.bn, BK=lt.bk, ATOMIC=atomic, UPCAST=_upcast(x.dtype),
                PRECISION=_precision(x.dtype))
    if _INTERPRET:
        meta["BLOCK_M"] = _INTERP_BLOCK_M
    with _device_guard(x):
        _sdd_launch[(nnz * split,)](x, dy, out, lt.row_idx, lt.col_idx,
                                    M, nnz, x.stride(0), dy.stride(0), chunk,
                                    _m_bucket(M), split, **meta)
    return out.to(x.dtype) if atomic else out


# ---------------------------------------------------------------------------------------------
# Compile check without a GPU
# ---------------------------------------------------------------------------------------------
_ALIGNED_INTS = ("lda", "ldo", "ldx", "ldy", "chunk")
_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_for_sm90(dtype: torch.dtype = torch.bfloat16, bn: int = 64, bk: int = 64,
                     block_m: int = 128, num_warps: int = 4, num_stages: int = 3, arch: int = 90):
    """Compile the three kernels with Triton's real compiler for ``sm_<arch>`` (no GPU needed).

    Must run with the interpreter off (``TRITON_INTERPRET`` unset before this module is imported).
    Returns ``{kernel name: compiled kernel}``; raises if the compiler rejects a kernel.
    """
    if _IMPORT_ERROR is not None:
        raise RuntimeError(_IMPORT_ERROR)
    if _INTERPRET:
        raise RuntimeError("compile_for_sm90 needs TRITON_INTERPRET unset (run it in a subprocess)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t = _TL_DTYPE[dtype]
    prec = "tf32" if dtype == torch.float32 else "ieee"
    target = GPUTarget("cuda", arch, 32)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    out = {}

    def build(fn, sig, constexprs, name):
        signature = dict(sig)
        for k in constexprs:
            signature[k] = "constexpr"
        # What a real launch specialises: pointers from torch and the leading dimensions (multiples
        # of the block) are 16-divisible. Without it loads are not vectorised and not pipelined.
        aligned = [n for n, ty in sig.items() if ty.startswith("*") or n in _ALIGNED_INTS]
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        out[name] = triton.compile(src, target=target, options=opts)

    dsd_sig = {"a_ptr": f"*{t}", "w_ptr": f"*{t}", "bias_ptr": f"*{t}", "out_ptr": f"*{t}",
               "ptr_ptr": "*i32", "red_idx_ptr": "*i32", "perm_ptr": "*i32",
               "M": "i32", "n_out_blocks": "i32", "lda": "i32", "ldo": "i32",
               "M_BUCKET": "i32", "NNZ": "i32"}
    for name, bo, br, trans in (("forward", bn, bk, False), ("grad_input", bk, bn, True)):
        build(_dsd_kernel, dsd_sig,
              {"BO": bo, "BR": br, "W_TRANS": trans, "USE_PERM": trans, "HAS_BIAS": not trans,
               "ACT": "gelu" if not trans else "none", "UPCAST": False, "PRECISION": prec,
               "BLOCK_M": block_m}, name)
    for atomic in (False, True):
        sdd_sig = {"x_ptr": f"*{t}", "dy_ptr": f"*{t}", "out_ptr": "*fp32" if atomic else f"*{t}",
                   "row_idx_ptr": "*i32", "col_idx_ptr": "*i32",
                   "M": "i32", "nnz": "i32", "ldx": "i32", "ldy": "i32", "chunk": "i32",
                   "M_BUCKET": "i32", "SPLIT": "i32"}
        build(_sdd_kernel, sdd_sig,
              {"BN": bn, "BK": bk, "ATOMIC": atomic, "UPCAST": False, "PRECISION": prec,
               "BLOCK_M": min(block_m, 128)}, f"grad_weight{'_atomic' if atomic else ''}")
    return out


def compile_variant_for_sm90(op: str, spec: str, dtype: torch.dtype = torch.bfloat16, bn: int = 64,
                             bk: int = 64, arch: int = 90):
    """Compile one variant kernel (op "forward" | "grad_input" | "grad_weight") for sm_<arch>
    exactly as the launcher would configure it (shared-memory fitting included). No GPU needed;
    interpreter must be off. Returns the compiled kernel."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(_IMPORT_ERROR)
    if _INTERPRET:
        raise RuntimeError("compile_variant_for_sm90 needs TRITON_INTERPRET unset")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t = _TL_DTYPE[dtype]
    elem = torch.empty(0, dtype=dtype).element_size()
    prec = "tf32" if dtype == torch.float32 else "ieee"
    if op == "grad_weight":
        cfg = _fit_sdd(_parse_sdd(spec), elem, bn, bk)
        fn = _sddv_kernel
        sig = {"x_ptr": f"*{t}", "dy_ptr": f"*{t}", "out_ptr": "*fp32", "gstart_ptr": "*i32",
               "grow_ptr": "*i32", "row_ptr_ptr": "*i32", "col_idx_ptr": "*i32",
               "M": "i32", "n_groups": "i32", "nnz": "i32", "ldx": "i32", "ldy": "i32", "chunk": "i32"}
        consts = {"BN": bn, "BK": bk, "G": cfg["G"], "MODE": 2 if cfg["mode"] == "p" else 1,
                  "T_ACC": _sdd_t_acc(bn, bk, cfg["G"]),
                  "UPCAST": False, "PRECISION": prec, "BLOCK_M": cfg["BLOCK_M"]}
    else:
        trans = op == "grad_input"
        BO, BR = (bk, bn) if trans else (bn, bk)
        cfg = _fit_dsd(_parse_dsd(spec), elem, BO, BR)
        fn = _dsdv_kernel
        sig = {"a_ptr": f"*{t}", "w_ptr": f"*{t}", "bias_ptr": f"*{t}", "out_ptr": f"*{t}",
               "sptr_ptr": "*i32", "scol_ptr": "*i32", "sval_ptr": "*i32",
               "M": "i32", "n_super": "i32", "lda": "i32", "ldo": "i32"}
        consts = {"BO": BO, "BR": BR, "G": cfg["G"], "R": cfg["R"], "W_TRANS": trans,
                  "HAS_BIAS": not trans, "ACT": "gelu" if not trans else "none", "UPCAST": False,
                  "PRECISION": prec, "BLOCK_M": cfg["BLOCK_M"]}
    signature = dict(sig)
    for k in consts:
        signature[k] = "constexpr"
    aligned = [n for n, ty in sig.items() if ty.startswith("*") or n in ("lda", "ldo", "ldx", "ldy")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})


def kernel_report(k) -> dict:
    """What a compiled kernel does: wgmma, pipelined (async) loads, widest cp.async, shared memory."""
    ttgir, ptx = k.asm["ttgir"], k.asm.get("ptx", "")
    widths = [int(w, 0) for w in _re.findall(
        r"cp\.async\.c[ag]\.shared\.global(?:\.L2::\w+)?\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)", ptx)]
    return {"wgmma": "warp_group_dot" in ttgir, "pipelined": "async_copy_global_to_local" in ttgir,
            "cp_async_max_bytes": max(widths, default=0), "cp_async_min_bytes": min(widths, default=0),
            "shared": k.metadata.shared, "spills": getattr(k, "n_spills", None)}
