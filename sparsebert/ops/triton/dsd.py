"""DSD: dense = dense · block-sparse. One kernel for the forward and the input gradient.

``out[M, n_out*BO] = a[M, n_red*BR] · (block-sparse W)``:

* forward ``y = x Wᵀ (+ bias, GELU)``: output blocks are W's row blocks, walked with
  ``row_ptr/col_idx`` (BO = bn, BR = bk);
* input gradient ``dx = dy W``: output blocks are W's column blocks, walked with the transposed
  index ``col_ptr/t_row_idx/t_perm`` (BO = bk, BR = bn).

Example, the layout of ``sparsebert/layout.py`` (mask ``[[1, 0], [1, 1]]``, 2×2 blocks)::

    forward, output row-block 1:    entries row_ptr[1]:row_ptr[2] = 1, 2
                                    y[:, 2:4] = x[:, 0:2] @ values[1]ᵀ + x[:, 2:4] @ values[2]ᵀ
    grad_input, output col-block 0: entries col_ptr[0]:col_ptr[1] = 0, 1 (t_perm 0, 1)
                                    dx[:, 0:2] = dy[:, 0:2] @ values[0] + dy[:, 2:4] @ values[1]

Work list: tiles ``(m tile, output block)``, output block fastest, so tiles processed at the same
time share one ``BLOCK_M`` slice of ``a`` in L2. Programs are persistent (``PROGS_PER_SM`` × SMs
programs stride over the tiles; 0 = one program per tile). Per tile the loop over the output
block's kept blocks is software-pipelined (``num_stages``). Meta-parameters:

* ``TMA``: ``a`` tiles and value blocks come through tensor descriptors (``cp.async.bulk.tensor``
  on sm_90; out-of-range token rows are zero-filled by the copy engine) instead of pointer loads.
* ``SWAP``: accumulate ``outᵀ = W_blk · aᵀ`` (``[BO, BLOCK_M]``): tokens on the wide N side of
  wgmma, which needs its M side >= 64, so only offered for BO >= 64.

Pruned blocks are never read (docs/CONTRACT.md, non-finite values); an output block with nothing
kept gets exactly ``act(bias)``.
"""
from __future__ import annotations

import torch

from ...layout import LayoutTensors
from . import common as C
from .common import tl, triton

OPS = ("forward", "grad_input")

# Candidate configs, in preference order (the first that fits is the untuned default). Small on
# purpose: each is one compile per block size and dtype, and autotuning times all of them.
CONFIGS = [
    dict(BLOCK_M=128, num_warps=4, num_stages=3, TMA=True, SWAP=False, PROGS_PER_SM=2),
    dict(BLOCK_M=128, num_warps=4, num_stages=3, TMA=False, SWAP=False, PROGS_PER_SM=0),
    dict(BLOCK_M=64, num_warps=4, num_stages=4, TMA=True, SWAP=False, PROGS_PER_SM=4),
    dict(BLOCK_M=256, num_warps=8, num_stages=3, TMA=True, SWAP=True, PROGS_PER_SM=1),
    dict(BLOCK_M=128, num_warps=4, num_stages=4, TMA=True, SWAP=True, PROGS_PER_SM=2),
]
# Interpreter: one loop step costs about a millisecond, so large M tiles.
INTERP_CONFIG = dict(BLOCK_M=128, num_warps=4, num_stages=2, TMA=True, SWAP=False, PROGS_PER_SM=0)


def smem_bytes(cfg: dict, elem: int, BO: int, BR: int) -> int:
    """Upper bound on the shared memory of a config: ``num_stages`` copies of the operand tiles
    plus an fp32 output tile for the epilogue's layout conversion (checked against the compiled
    kernels in tests/test_triton.py)."""
    return cfg["num_stages"] * (cfg["BLOCK_M"] * BR + BR * BO) * elem + cfg["BLOCK_M"] * BO * 4


def fit(cfg: dict, elem: int, BO: int, BR: int, exact_fp32: bool = False):
    """``cfg`` adapted to the blocks, or None when it cannot be: more warps (then a smaller M
    tile) until the accumulator fits in registers, fewer stages (then a smaller M tile) until the
    buffers fit in shared memory; SWAP configs need BO >= 64 (wgmma's M side). ``exact_fp32``
    (fp32 without TF32: FMA dots): pointer loads, since descriptor-loaded operands spilled 14-34 KB
    in every sm_90a compile tried (BLOCK_M 32-64, 4-8 warps, blocks 64-128) and pointer loads none."""
    if cfg["SWAP"] and (BO < 64 or exact_fp32):   # no wgmma to feed in exact fp32 (and it spilled)
        return None
    cfg = dict(cfg)
    if exact_fp32:
        cfg["TMA"] = False
    # accumulator values per thread: 64 for half types, 32 for TF32, 16 for FMA dots (whose
    # operands sit in registers too; no wgmma there, so M tiles down to 32)
    per_thread, min_m = (16, 32) if exact_fp32 else (64 if elem <= 2 else 32, 64)
    while not C.acc_fits_registers(cfg["BLOCK_M"], BO, cfg["num_warps"], per_thread):
        if cfg["num_warps"] < 8:
            cfg["num_warps"] *= 2
        elif cfg["BLOCK_M"] > min_m:
            cfg["BLOCK_M"] //= 2
        else:
            return None
    while smem_bytes(cfg, elem, BO, BR) > C.SMEM_BUDGET:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif cfg["BLOCK_M"] > 64:
            cfg["BLOCK_M"] //= 2
        else:
            return None
    return cfg


def candidates(elem: int, BO: int, BR: int, exact_fp32: bool = False):
    out = []
    for c in CONFIGS:
        f = fit(c, elem, BO, BR, exact_fp32)
        if f is not None and f not in out:
            out.append(f)
    return out


if triton is not None:

    @triton.jit
    def _gelu(x):
        # Exact GELU (nn.GELU() default): 0.5 x (1 + erf(x / sqrt(2))).
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

    @triton.jit(do_not_specialize=["M", "n_tiles", "n_progs"])
    def _dsd_kernel(
        # operands: pointers, and the same tensors as descriptors when TMA
        a_ptr, a_desc, w_ptr, w_desc, bias_ptr, out_ptr,
        # index: output block o has entries ptr[o]:ptr[o+1], reduction block red_idx[e],
        # value block perm[e] (USE_PERM) or e
        ptr_ptr, red_idx_ptr, perm_ptr,
        # dimensions
        M, n_out_blocks, n_tiles, n_progs, lda, ldo,
        # meta-parameters
        BO: tl.constexpr, BR: tl.constexpr, W_TRANS: tl.constexpr, USE_PERM: tl.constexpr,
        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, TMA: tl.constexpr, SWAP: tl.constexpr,
    ):
        """out[m, o*BO + i] = act(bias + sum_e sum_j a[m, red_idx[e]*BR + j] * Wt(e)[j, i]) where
        Wt(e) ([BR, BO]) is values[p]ᵀ (forward, values block [BO, BR]) or values[p] (W_TRANS,
        input gradient, values block [BR, BO])."""
        pid = tl.program_id(0)
        offs_r = tl.arange(0, BR)
        offs_o = tl.arange(0, BO)
        offs_mm = tl.arange(0, BLOCK_M)
        if W_TRANS:   # value block [BR, BO] row-major: Wt[j, i] at j*BO + i
            w_tile = offs_r[:, None] * BO + offs_o[None, :]
        else:         # value block [BO, BR] row-major: Wt[j, i] at i*BR + j
            w_tile = offs_o[None, :] * BR + offs_r[:, None]

        for tile in tl.range(pid, n_tiles, n_progs):
            pid_m = tile // n_out_blocks       # output block fastest: one M slice at a time
            o = tile % n_out_blocks
            m0 = pid_m * BLOCK_M
            offs_m = m0 + offs_mm
            mask_m = offs_m < M
            offs_m64 = offs_m.to(tl.int64)
            start = tl.load(ptr_ptr + o)
            end = tl.load(ptr_ptr + o + 1)
            if SWAP:
                acc = tl.zeros((BO, BLOCK_M), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BO), dtype=tl.float32)
            for e in range(start, end):
                rb = tl.load(red_idx_ptr + e)
                if USE_PERM:
                    p = tl.load(perm_ptr + e)
                else:
                    p = e
                if TMA:
                    a = a_desc.load([m0, rb * BR])                          # [BLOCK_M, BR]
                    if W_TRANS:
                        wt = w_desc.load([p * BR, 0])                       # [BR, BO]
                    else:
                        wt = tl.trans(w_desc.load([p * BO, 0]))             # [BO, BR] -> [BR, BO]
                else:
                    a = tl.load(a_ptr + offs_m64[:, None] * lda + (rb * BR + offs_r)[None, :],
                                mask=mask_m[:, None], other=0.0)
                    wt = tl.load(w_ptr + p.to(tl.int64) * (BO * BR) + w_tile)
                if UPCAST:
                    a = a.to(tl.float32)
                    wt = wt.to(tl.float32)
                if SWAP:
                    acc = tl.dot(tl.trans(wt), tl.trans(a), acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(a, wt, acc, input_precision=PRECISION)

            if SWAP:
                if HAS_BIAS:
                    acc = acc + tl.load(bias_ptr + o * BO + offs_o).to(tl.float32)[:, None]
                if ACT == "gelu":
                    acc = _gelu(acc)
                out_ptrs = out_ptr + offs_m64[None, :] * ldo + (o * BO + offs_o)[:, None]
                tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[None, :])
            else:
                if HAS_BIAS:
                    acc = acc + tl.load(bias_ptr + o * BO + offs_o).to(tl.float32)[None, :]
                if ACT == "gelu":
                    acc = _gelu(acc)
                out_ptrs = out_ptr + offs_m64[:, None] * ldo + (o * BO + offs_o)[None, :]
                tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


def launch(a, values, bias, out, lt: LayoutTensors, *, transposed: bool, activation: str,
           cfg: dict, n_progs: int | None = None):
    """Run the DSD kernel with ``cfg`` (already fitted). ``n_progs`` (tests) forces the number of
    persistent programs."""
    if transposed:
        BO, BR, ptr, red, perm = lt.bk, lt.bn, lt.col_ptr, lt.t_row_idx, lt.t_perm
    else:
        BO, BR, ptr, red, perm = lt.bn, lt.bk, lt.row_ptr, lt.col_idx, lt.col_idx
    M = a.shape[0]
    bm = cfg["BLOCK_M"]
    n_out = out.shape[1] // BO
    n_tiles = triton.cdiv(M, bm) * n_out
    if n_progs is None:
        per_sm = cfg["PROGS_PER_SM"]
        n_progs = n_tiles if per_sm == 0 else min(n_tiles, per_sm * C.num_sms(a.device))
    n_progs = max(1, min(n_progs, n_tiles))
    use_tma = (cfg["TMA"] and lt.nnz > 0 and C.tma_supported(a.device) and C.tma_ok(a, values))
    if use_tma:
        a_desc = C.descriptor(a, [bm, BR])
        w_desc = C.descriptor(values.view(lt.nnz * lt.bn, lt.bk), [lt.bn, lt.bk])
    else:
        a_desc = w_desc = None
    kw = {} if C.INTERPRET else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    with C.device_guard(a):
        _dsd_kernel[(n_progs,)](
            a, a_desc, C.nonempty(values), w_desc, bias if bias is not None else out, out,
            ptr, C.nonempty(red), C.nonempty(perm),
            M, n_out, n_tiles, n_progs, a.stride(0), out.stride(0),
            BO=BO, BR=BR, W_TRANS=transposed, USE_PERM=transposed, HAS_BIAS=bias is not None,
            ACT=activation, UPCAST=C.upcast(a.dtype), PRECISION=C.precision(a.dtype),
            BLOCK_M=bm, TMA=use_tma, SWAP=cfg["SWAP"], **kw)
    return out


def run(op: str, a, values, bias, lt: LayoutTensors, *, activation: str = "none",
        config: dict | None = None, n_progs: int | None = None):
    """Allocate and compute ``op`` ("forward" or "grad_input"); inputs already checked."""
    transposed = op == "grad_input"
    BO, BR = (lt.bk, lt.bn) if transposed else (lt.bn, lt.bk)
    M = a.shape[0]
    out = torch.empty(M, lt.K if transposed else lt.N, device=a.device, dtype=a.dtype)
    if M == 0:
        return out
    elem = a.element_size()
    exact = a.dtype == torch.float32 and C.precision(a.dtype) == "ieee"
    if config is not None:
        cfg = fit(dict(config), elem, BO, BR, exact)
        if cfg is None:
            raise ValueError(f"{op}: config {config} does not fit blocks ({BO}, {BR}) in {a.dtype}")
    elif C.INTERPRET:
        cfg = INTERP_CONFIG
    else:
        cands = candidates(elem, BO, BR, exact)
        cfg = C.choose_config(op, a.dtype, M, lt, a.device, cands,
                              lambda c: launch(a, values, bias, out, lt, transposed=transposed,
                                               activation=activation, cfg=c))
        cfg = fit(cfg, elem, BO, BR, exact) or cands[0]      # a tuned entry may predate a budget change
    return launch(a, values, bias, out, lt, transposed=transposed, activation=activation, cfg=cfg,
                  n_progs=n_progs)
