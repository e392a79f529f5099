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


def _device_guard(t):
    if t.is_cuda:
        return torch.cuda.device(t.device)
    import contextlib
    return contextlib.nullcontext()


def forward(x, values, bias, lt: LayoutTensors, activation: str = "none"):
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
    return _dsd(x, values, bias, y, lt.row_ptr, lt.col_idx, lt.col_idx, BO=lt.bn, BR=lt.bk,
                w_trans=False, use_perm=False, activation=activation, nnz=lt.nnz)


def grad_input(dy, values, lt: LayoutTensors):
    """``dy @ W``: dy ``[M, N]`` -> dx ``[M, K]``."""
    _check("grad_input", lt, tensors=[("dy", dy), ("values", values)], values=values)
    if dy.dim() != 2 or dy.shape[1] != lt.N:
        raise ValueError(f"grad_input: dy must be [M, N={lt.N}], got {tuple(dy.shape)}")
    M = dy.shape[0]
    dx = torch.empty(M, lt.K, device=dy.device, dtype=dy.dtype)
    if M == 0:
        return dx
    return _dsd(dy, values, None, dx, lt.col_ptr, lt.t_row_idx, lt.t_perm, BO=lt.bk, BR=lt.bn,
                w_trans=True, use_perm=True, activation="none", nnz=lt.nnz)


def _split_for(M: int, nnz: int, device: torch.device) -> int:
    """How many programs share one block's M reduction: enough for ~4 programs per SM, each
    reducing at least 256 tokens."""
    if device.type == "cuda":
        target = 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    return max(1, min(triton.cdiv(target, max(nnz, 1)), triton.cdiv(M, 256)))


def grad_weight(x, dy, lt: LayoutTensors, split: int | None = None):
    """``(dyᵀ @ x)`` on the kept blocks: x ``[M, K]``, dy ``[M, N]`` -> ``[nnz, bn, bk]``.

    ``split`` (tests) forces the number of programs per block along M."""
    _check("grad_weight", lt, tensors=[("x", x), ("dy", dy)])
    if x.dim() != 2 or dy.dim() != 2 or x.shape[0] != dy.shape[0] or x.shape[1] != lt.K \
            or dy.shape[1] != lt.N:
        raise ValueError(f"grad_weight: need x [M, K={lt.K}] and dy [M, N={lt.N}], got "
                         f"{tuple(x.shape)} and {tuple(dy.shape)}")
    M, nnz = x.shape[0], lt.nnz
    if M == 0 or nnz == 0:
        return torch.zeros(nnz, lt.bn, lt.bk, device=x.device, dtype=x.dtype)
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
