"""SDD: sparse = dense · dense on the kept blocks only — the weight gradient.

``dvalues[i] = dy[:, row_idx[i]*bn : +bn]ᵀ · x[:, col_idx[i]*bk : +bk]`` (and, fused, the bias
gradient ``dbias = dy.sum(0)``).

Work list: items ``(split s, group g)``, group fastest. A group is up to ``G`` consecutive kept
blocks of one row block (CSR order): its program loads each ``dy`` tile once and computes one
``[bn, G*bk]`` product per step (``[G*bk, bn]`` when ``bn < 64``, so that wgmma's M side is >= 64).
Example, mask ``[[1, 1, 1], [0, 0, 0], [0, 1, 0]]`` with ``G = 2``::

    groups:  (row 0: blocks 0, 1), (row 0: block 2), (row 2: block 3)      [+ (row 1: none)
             only when the bias gradient is fused: its dy columns still need summing]

The reduction over the M tokens is split into ``split`` chunks (split-K) so that the work list
fills the GPU even with a handful of kept blocks; chunk partial sums go to an fp32
``[split, nnz, bn, bk]`` buffer summed afterwards (deterministic, no atomics). Programs are
persistent (``PROGS_PER_SM`` × SMs; 0 = one per item). ``TMA``: ``dy`` tiles (and ``x`` tiles when
``G == 1``) come through tensor descriptors; a gathered ``[BLOCK_M, G*bk]`` ``x`` tile from several
column blocks is one pointer load.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ...layout import LayoutTensors
from . import common as C
from .common import tl, triton

CONFIGS = [
    dict(BLOCK_M=64, num_warps=4, num_stages=4, G=2, TMA=True, WAVES=2, PROGS_PER_SM=2),
    dict(BLOCK_M=128, num_warps=4, num_stages=3, G=1, TMA=True, WAVES=2, PROGS_PER_SM=2),
    dict(BLOCK_M=128, num_warps=8, num_stages=3, G=4, TMA=True, WAVES=2, PROGS_PER_SM=0),
    dict(BLOCK_M=64, num_warps=4, num_stages=4, G=1, TMA=False, WAVES=4, PROGS_PER_SM=0),
]
INTERP_CONFIG = dict(BLOCK_M=128, num_warps=4, num_stages=2, G=2, TMA=True, WAVES=1, PROGS_PER_SM=0)
CHUNK_ALIGN = 256       # split-K chunks are multiples of this (and so of every BLOCK_M)


def t_acc(BN: int, BK: int, G: int) -> bool:
    """Accumulate ``[G*BK, BN] = xᵀ dy`` instead of ``[BN, G*BK]``: wgmma needs >= 64 rows."""
    return BN < 64 and G * BK >= 64


def smem_bytes(cfg: dict, elem: int, BN: int, BK: int) -> int:
    """Upper bound: ``num_stages`` copies of the dy and x tiles plus an fp32 output tile."""
    return (cfg["num_stages"] * cfg["BLOCK_M"] * (BN + cfg["G"] * BK) * elem
            + BN * cfg["G"] * BK * 4)


def fit(cfg: dict, elem: int, BN: int, BK: int):
    """``cfg`` adapted to the block, or None. With ``BN < 64`` the group is widened to
    ``G*BK >= 64`` so that the transposed accumulator gets wgmma (64-row M side); then a narrower
    group or more warps until the accumulator fits in registers, and fewer stages, a narrower
    group, a smaller M tile until the buffers fit in shared memory."""
    cfg = dict(cfg)
    if BN < 64 and cfg["G"] * BK < 64:
        cfg["G"] = 64 // BK
    while not C.acc_fits_registers(BN, cfg["G"] * BK, cfg["num_warps"]):
        if cfg["G"] > 1 and (BN >= 64 or cfg["G"] * BK > 64):
            cfg["G"] //= 2
        elif cfg["num_warps"] < 8:
            cfg["num_warps"] *= 2
        else:
            return None
    while smem_bytes(cfg, elem, BN, BK) > C.SMEM_BUDGET:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif cfg["G"] > 1:
            cfg["G"] //= 2
        elif cfg["BLOCK_M"] > 32:
            cfg["BLOCK_M"] //= 2
        else:
            return None
    return cfg


def candidates(elem: int, BN: int, BK: int):
    out = []
    for c in CONFIGS:
        f = fit(c, elem, BN, BK)
        if f is not None and f not in out:
            out.append(f)
    return out


if triton is not None:

    @triton.jit(do_not_specialize=["M", "n_groups", "n_items", "n_progs", "nnz", "chunk"])
    def _sdd_kernel(
        # operands (pointers, and descriptors when TMA), outputs
        x_ptr, x_desc, dy_ptr, dy_desc, out_ptr, dbias_ptr,
        # work list: group g is blocks gstart[g] .. min(gstart[g] + G, row_ptr[grow[g] + 1])
        gstart_ptr, grow_ptr, row_ptr_ptr, col_idx_ptr,
        # dimensions
        M, N, n_groups, n_items, n_progs, nnz, ldx, ldy, chunk,
        # meta-parameters
        BN: tl.constexpr, BK: tl.constexpr, G: tl.constexpr, T_ACC: tl.constexpr,
        PARTIAL: tl.constexpr, HAS_DBIAS: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, TMA: tl.constexpr,
    ):
        """out[s?, i] = dy[m0:m1, r*BN : +BN]ᵀ @ x[m0:m1, col_idx[i]*BK : +BK] for the blocks i of
        each group, [m0, m1) = split s's chunk; PARTIAL: fp32 into slice s of [split, nnz, BN, BK].
        HAS_DBIAS: the first group of each row also writes dy[m0:m1, r*BN : +BN].sum(0) to
        dbias[s, r*BN : +BN] (fp32)."""
        pid = tl.program_id(0)
        q = tl.arange(0, G * BK)
        gq = q // BK
        kq = q % BK
        offs_n = tl.arange(0, BN)
        offs_mm = tl.arange(0, BLOCK_M)
        for item in tl.range(pid, n_items, n_progs):
            s = item // n_groups               # group fastest: one M chunk at a time
            gi = item % n_groups
            i0 = tl.load(gstart_ptr + gi)
            r = tl.load(grow_ptr + gi)
            iend = tl.load(row_ptr_ptr + r + 1)
            m_start = s * chunk
            m_end = tl.minimum(m_start + chunk, M)
            vq = tl.max_constancy((i0 + gq) < iend, [BK])
            cols = tl.load(col_idx_ptr + i0 + gq, mask=vq, other=0)
            x_col = tl.max_contiguous(tl.multiple_of(cols * BK + kq, [BK]), [BK])
            c0 = tl.load(col_idx_ptr + i0, mask=i0 < iend, other=0)
            if T_ACC:
                acc = tl.zeros((G * BK, BN), dtype=tl.float32)
            else:
                acc = tl.zeros((BN, G * BK), dtype=tl.float32)
            db = tl.zeros((BN,), dtype=tl.float32)
            for m0 in range(m_start, m_end, BLOCK_M):
                offs_m = m0 + offs_mm
                mask_m = offs_m < m_end
                offs_m64 = offs_m.to(tl.int64)
                if TMA:   # chunks are multiples of BLOCK_M: only rows >= M are out of range
                    dy = dy_desc.load([m0, r * BN])                              # [BLOCK_M, BN]
                else:
                    dy = tl.load(dy_ptr + offs_m64[:, None] * ldy + (r * BN + offs_n)[None, :],
                                 mask=mask_m[:, None], other=0.0)
                if TMA and G == 1:
                    x = x_desc.load([m0, c0 * BK])                               # [BLOCK_M, BK]
                else:
                    x = tl.load(x_ptr + offs_m64[:, None] * ldx + x_col[None, :],
                                mask=mask_m[:, None] & vq[None, :], other=0.0)   # [BLOCK_M, G*BK]
                if HAS_DBIAS:
                    db += tl.sum(dy.to(tl.float32), axis=0)
                if UPCAST:
                    dy = dy.to(tl.float32)
                    x = x.to(tl.float32)
                if T_ACC:
                    acc = tl.dot(tl.trans(x), dy, acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION)

            base = out_ptr
            if PARTIAL:
                base = out_ptr + s.to(tl.int64) * nnz * (BN * BK)
            o_q = tl.max_contiguous(tl.multiple_of((i0 + gq).to(tl.int64) * (BN * BK) + kq, [BK]), [BK])
            if T_ACC:
                tl.store(base + o_q[:, None] + offs_n[None, :] * BK,
                         acc.to(out_ptr.dtype.element_ty), mask=vq[:, None])
            else:
                tl.store(base + offs_n[:, None] * BK + o_q[None, :],
                         acc.to(out_ptr.dtype.element_ty), mask=vq[None, :])
            if HAS_DBIAS:
                first = tl.load(row_ptr_ptr + r)
                if i0 == first:
                    tl.store(dbias_ptr + s.to(tl.int64) * N + r * BN + offs_n, db)


_GROUP_CACHE: "OrderedDict" = OrderedDict()
_GROUP_CACHE_SIZE = 256


def group_index(lt: LayoutTensors, G: int, with_empty_rows: bool):
    """Groups of up to G consecutive kept blocks of one row block: ``(gstart, grow, n_groups)``.
    ``with_empty_rows``: a row block without kept blocks still gets one (empty) group, whose
    program only sums its dy columns for the bias gradient."""
    key = (G, with_empty_rows, lt.row_ptr.data_ptr(), lt.col_idx.data_ptr(), lt.nnz, lt.N, lt.K,
           lt.bn, lt.bk, str(lt.row_ptr.device))
    hit = _GROUP_CACHE.get(key)
    if hit is not None:
        _GROUP_CACHE.move_to_end(key)
        return hit[1]
    dev = lt.row_ptr.device
    counts = (lt.row_ptr[1:] - lt.row_ptr[:-1]).long()
    ng = (counts + G - 1) // G
    if with_empty_rows:
        ng = ng.clamp_min(1)
    total = int(ng.sum().item())
    rows = torch.repeat_interleave(torch.arange(lt.n_row_blocks, device=dev), ng)
    first = torch.cumsum(ng, 0) - ng
    local = torch.arange(total, device=dev) - torch.repeat_interleave(first, ng)
    gstart = (lt.row_ptr.long()[rows] + local * G).to(torch.int32).contiguous()
    val = (gstart, rows.to(torch.int32).contiguous(), total)
    # The entry keeps the layout tensors alive, so their addresses cannot be reused while cached.
    _GROUP_CACHE[key] = ((lt.row_ptr, lt.col_idx), val)
    while len(_GROUP_CACHE) > _GROUP_CACHE_SIZE:
        _GROUP_CACHE.popitem(last=False)
    return val


def pick_split(M: int, n_groups: int, device: torch.device, waves: int) -> int:
    """Chunks of the M reduction: enough items for ``waves`` × SMs, each chunk >= 512 tokens."""
    target = waves * C.num_sms(device)
    return max(1, min(triton.cdiv(target, max(n_groups, 1)), triton.cdiv(M, 512)))


def launch(x, dy, lt: LayoutTensors, cfg: dict, *, with_bias: bool, split: int | None = None,
           n_progs: int | None = None):
    """``(dvalues, dbias or None)`` with ``cfg`` (already fitted). ``split`` and ``n_progs``
    (tests) force the split-K factor and the number of persistent programs."""
    M, nnz, bn, bk = x.shape[0], lt.nnz, lt.bn, lt.bk
    G, bm = cfg["G"], cfg["BLOCK_M"]
    gstart, grow, n_groups = group_index(lt, G, with_bias)
    if split is None:
        split = pick_split(M, n_groups, x.device, cfg["WAVES"])
    chunk = triton.cdiv(triton.cdiv(M, split), CHUNK_ALIGN) * CHUNK_ALIGN
    assert chunk % bm == 0
    split = triton.cdiv(M, chunk)
    partial = split > 1
    if partial:
        out = torch.empty(split, nnz, bn, bk, device=x.device, dtype=torch.float32)
    else:
        out = torch.empty(nnz, bn, bk, device=x.device, dtype=x.dtype)
    dbias = (torch.zeros(split, lt.N, device=x.device, dtype=torch.float32) if with_bias else None)
    n_items = n_groups * split       # > 0: run() handles nnz == 0 without a bias gradient
    if n_progs is None:
        per_sm = cfg["PROGS_PER_SM"]
        n_progs = n_items if per_sm == 0 else min(n_items, per_sm * C.num_sms(x.device))
    n_progs = max(1, min(n_progs, n_items))
    use_tma = cfg["TMA"] and C.tma_supported(x.device) and C.tma_ok(x, dy)
    if use_tma:
        x_desc = C.descriptor(x, [bm, bk])
        dy_desc = C.descriptor(dy, [bm, bn])
    else:
        x_desc = dy_desc = None
    kw = {} if C.INTERPRET else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    with C.device_guard(x):
        _sdd_kernel[(n_progs,)](
            x, x_desc, dy, dy_desc, C.nonempty(out), dbias if dbias is not None else out,
            gstart, grow, lt.row_ptr, C.nonempty(lt.col_idx),
            M, lt.N, n_groups, n_items, n_progs, nnz, x.stride(0), dy.stride(0), chunk,
            BN=bn, BK=bk, G=G, T_ACC=t_acc(bn, bk, G), PARTIAL=partial, HAS_DBIAS=with_bias,
            UPCAST=C.upcast(x.dtype), PRECISION=C.precision(x.dtype), BLOCK_M=bm, TMA=use_tma, **kw)
    dv = out.sum(0).to(x.dtype) if partial else out
    db = dbias.sum(0).to(x.dtype) if with_bias else None
    return dv, db


def run(x, dy, lt: LayoutTensors, *, with_bias: bool, config: dict | None = None,
        split: int | None = None, n_progs: int | None = None):
    """``(dvalues, dbias or None)``; inputs already checked."""
    M, nnz = x.shape[0], lt.nnz
    if M == 0 or (nnz == 0 and not with_bias):
        dv = torch.zeros(nnz, lt.bn, lt.bk, device=x.device, dtype=x.dtype)
        return dv, (torch.zeros(lt.N, device=x.device, dtype=x.dtype) if with_bias else None)
    elem = x.element_size()
    if config is not None:
        cfg = fit(dict(config), elem, lt.bn, lt.bk)
        if cfg is None:
            raise ValueError(f"grad_weight: config {config} does not fit block ({lt.bn}, {lt.bk})")
    elif C.INTERPRET:
        cfg = INTERP_CONFIG
    else:
        cands = candidates(elem, lt.bn, lt.bk)
        cfg = C.choose_config("grad_weight", x.dtype, M, lt, x.device, cands,
                              lambda c: launch(x, dy, lt, c, with_bias=with_bias))
        cfg = fit(cfg, elem, lt.bn, lt.bk) or cands[0]      # a tuned entry may predate a budget change
    return launch(x, dy, lt, cfg, with_bias=with_bias, split=split, n_progs=n_progs)
