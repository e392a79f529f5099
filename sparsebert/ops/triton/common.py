"""What the DSD and SDD kernels share: availability, input checks, precision, shared-memory fit,
tensor descriptors, the device guard, and the choice of a kernel configuration (tuned data file,
else autotuning on the GPU, else the first default that fits)."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings

import torch

from ...layout import LayoutTensors

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    _IMPORT_ERROR = f"triton not installed ({type(e).__name__}: {e})"

try:  # host-side tensor descriptors (TMA on sm_90+): Triton >= 3.4, same API in 3.6 and 3.7
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - older Triton
    TensorDescriptor = None

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_BLOCKS = (16, 32, 64, 128)
SMEM_BUDGET = 227 * 1024          # H100/H200 per-block maximum (bytes)


def acc_fits_registers(rows: int, cols: int, num_warps: int, per_thread: int = 64) -> bool:
    """Whether an fp32 ``[rows, cols]`` accumulator leaves ptxas room: at most ``per_thread``
    values per thread. Set from the sm_90a compile (``python -m sparsebert.ops.triton.inspect``):
    128x128 accumulators on 4 warps (128 per thread) spilled in bf16, 64 per thread did not, except
    the fp32 (TF32) input gradient, which spilled at 64 and not at 32."""
    return rows * cols <= per_thread * 32 * num_warps


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Read once, like Triton itself: whether the kernels were decorated for the interpreter.
INTERPRET = _interpreting()
# SPARSEBERT_TRITON_AUTOTUNE=0: untuned shapes take the first default config that fits, untimed.
AUTOTUNE = os.environ.get("SPARSEBERT_TRITON_AUTOTUNE", "1") != "0"


# ---- availability -----------------------------------------------------------------------------
def unavailable_reason(device: torch.device | None = None) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    device = torch.device(device) if device is not None else None
    if device is None:
        if torch.cuda.is_available() or INTERPRET:
            return None
        return "no CUDA device and TRITON_INTERPRET is not set"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if INTERPRET:
            return None
        if _interpreting():
            return ("TRITON_INTERPRET=1 was set after sparsebert.ops.triton was imported; "
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


def check(name, lt: LayoutTensors, *, tensors, values=None):
    """Raise a one-line ValueError/RuntimeError for anything the kernels cannot take."""
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


# ---- precision, devices -----------------------------------------------------------------------
def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 through TF32 only when torch allows TF32 for matmuls."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not INTERPRET else "ieee"
    return "ieee"  # ignored for half types


def upcast(dtype: torch.dtype) -> bool:
    # tl.dot on bf16 is wrong in the interpreter (it multiplies the raw bits); fp32 there is exact.
    return INTERPRET and dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors (persistent programs are a multiple of it); 4 on the CPU."""
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(device_index: int):
    return torch.cuda.get_device_capability(device_index)


def tma_supported(device: torch.device) -> bool:
    """Tensor-descriptor loads run under the interpreter and on sm_90+ (Hopper's TMA)."""
    if TensorDescriptor is None:
        return False
    if device.type != "cuda":
        return INTERPRET
    return _capability(device.index if device.index is not None else torch.cuda.current_device())[0] >= 9


def tma_ok(*tensors) -> bool:
    """TMA needs 16-byte aligned bases (the row strides are multiples of a block: aligned)."""
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def device_guard(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def nonempty(t: torch.Tensor) -> torch.Tensor:
    """Kernels never read an empty tensor, but their pointer must still be valid."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def descriptor(t: torch.Tensor, block_shape):
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block_shape))


# ---- configuration choice ---------------------------------------------------------------------
# A config is a dict of meta-parameters (see dsd.CONFIGS / sdd.CONFIGS). Order of choice:
#   1. tuned.json (written by benchmarks/tune_triton.py on a GPU), keyed by
#      (GPU name, dtype, op, tokens bucket, shape, block, density bucket);
#   2. on a GPU, autotuning over the op's configs that fit (once per key, cached in-process),
#      with a one-time warning that the shape is untuned;
#   3. the first config that fits (interpreter, SPARSEBERT_TRITON_AUTOTUNE=0).
TUNED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned.json")
_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def m_bucket(M: int) -> int:
    """Token-count bucket: the next power of two (at least 16)."""
    return 1 << max(4, (max(M, 1) - 1).bit_length())


def density_bucket(lt: LayoutTensors) -> float:
    """Kept fraction rounded to 0.05."""
    total = lt.n_row_blocks * lt.n_col_blocks
    return round(round(20 * lt.nnz / max(total, 1)) / 20, 2)


def tune_key(gpu: str, dtype: torch.dtype, op: str, M: int, lt: LayoutTensors) -> str:
    """The data file's key: ``gpu|dtype|op|M bucket|NxK|bnxbk|density bucket`` (dtype bf16,
    fp16, fp32, or tf32 for fp32 tensors while torch allows TF32)."""
    name = "tf32" if dtype == torch.float32 and precision(dtype) == "tf32" else _DTYPE_NAME[dtype]
    return (f"{gpu}|{name}|{op}|{m_bucket(M)}|{lt.N}x{lt.K}|{lt.bn}x{lt.bk}"
            f"|{density_bucket(lt):.2f}")


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    return dict(data.get("entries", {}))


def tuned_table() -> dict:
    """``{key: {"config": {...}, ...}}`` of the data file (read once per path)."""
    return _load_table(TUNED_PATH)


def tuned_config(gpu: str, dtype, op: str, M: int, lt: LayoutTensors):
    """The tuned config of this key, else of the same key at the nearest token bucket, else None."""
    table = tuned_table()
    if not table:
        return None
    key = tune_key(gpu, dtype, op, M, lt)
    if key in table:
        return dict(table[key]["config"])
    p0 = key.split("|")
    best, best_d = None, None
    for k, v in table.items():
        p = k.split("|")
        if len(p) == len(p0) and p[:3] == p0[:3] and p[4:] == p0[4:]:
            d = abs(int(p[3]).bit_length() - m_bucket(M).bit_length())
            if best_d is None or d < best_d:
                best, best_d = v, d
    return dict(best["config"]) if best is not None else None


_warned: set = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


_autotuned: dict = {}


def device_name(device: torch.device) -> str:
    """The GPU's name as the data file keys it ("cpu" under the interpreter)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def choose_config(op: str, dtype, M: int, lt: LayoutTensors, device: torch.device, candidates, run):
    """The config ``op`` runs with. ``candidates``: the configs that fit, in preference order;
    ``run(cfg)`` launches the kernel once with ``cfg`` (used for timing when autotuning)."""
    if device.type != "cuda":
        return candidates[0]
    gpu = device_name(device)
    hit = tuned_config(gpu, dtype, op, M, lt)
    if hit is not None:
        return hit
    key = tune_key(gpu, dtype, op, M, lt)
    if key in _autotuned:
        return _autotuned[key]
    if not AUTOTUNE or len(candidates) == 1:
        warn_once(key, f"sparsebert triton: no tuned config for {key} (in {TUNED_PATH}); "
                       f"using the default {candidates[0]} (run benchmarks/tune_triton.py on this GPU)")
        _autotuned[key] = candidates[0]
        return candidates[0]
    warn_once(key, f"sparsebert triton: no tuned config for {key} (in {TUNED_PATH}); autotuning "
                   f"{len(candidates)} configs once in this process (run benchmarks/tune_triton.py "
                   f"on this GPU to store the choice)")
    best, best_t = candidates[0], float("inf")
    for cfg in candidates:
        try:
            t = triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median")
        except Exception as e:   # e.g. out of resources: not a candidate here
            warn_once(key + repr(cfg), f"sparsebert triton: config {cfg} failed for {key}: "
                                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if t < best_t:
            best, best_t = cfg, t
    _autotuned[key] = best
    return best
