"""CUDA C++ backend (``backend="cuda"``): the nvcc-built kernels in ``sparsebert._C``.

Kernels (``csrc/cuda``): fp16/bf16 on tensor cores (``mma.sync`` m16n8k16, fp32 accumulation,
cp.async pipeline), fp32 on plain FMA (exact fp32, no TF32); one kernel per product (forward and
input gradient share the DSD kernel, the weight gradient is the SDD kernel), its tile shape per
block size fixed at compile time from the H200 timings (``csrc/cuda/bsr_dsd.cu``). Block sizes
``bn, bk`` in {32, 64}. The ops live under ``torch.ops.sparsebert_cuda`` and take the packed
layout index (:func:`sparsebert.layout.pack_index`)::

    forward(x, values, bias, index, N, K, bn, bk)   -> y  [M, N]     y = x Wᵀ + bias
    grad_input(dy, values, index, N, K, bn, bk)     -> dx [M, K]     dx = dy W
    grad_weight(x, dy, index, N, K, bn, bk)         -> dvalues [nnz, bn, bk]

The backend functions (``forward``/``grad_input``/``grad_weight``) follow ``docs/CONTRACT.md``;
``*_packed`` forms take the packed index directly (what the custom-op layer already holds).
``sparsebert._C`` is imported lazily; when it cannot be used, :func:`unavailable_reason` says why.
"""
from __future__ import annotations

import torch

from ..layout import LayoutTensors

NAME = "cuda"
SUPPORTED_BLOCKS = (32, 64)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_lib = None          # the loaded sparsebert._C, once loaded
_lib_error = None    # why it could not be loaded / used (str), once tried


def _load():
    """Import ``sparsebert._C`` once; returns ``(module or None, reason or None)``."""
    global _lib, _lib_error
    if _lib is None and _lib_error is None:
        try:
            from .. import _C  # noqa: WPS433 (lazy on purpose)
        except Exception as e:  # ImportError, or an undefined symbol from an ABI mismatch
            _lib_error = (
                f"sparsebert._C is not built or failed to load ({type(e).__name__}: {e}); "
                "build it with `pip install --no-build-isolation -e .` against a CUDA build of torch "
                "with nvcc available (see docs/BUILD_CUDA.md)"
            )
        else:
            if not getattr(_C, "with_cuda", False):
                _lib_error = (
                    "sparsebert._C was built without CUDA kernels (torch was a CPU build, nvcc/CUDA_HOME "
                    "was not found, or SPARSEBERT_SKIP_CUDA was set); rebuild with a CUDA torch and "
                    "CUDA_HOME set (see docs/BUILD_CUDA.md)"
                )
            elif not hasattr(torch.ops, "sparsebert_cuda") or not hasattr(torch.ops.sparsebert_cuda, "forward"):
                _lib_error = "sparsebert._C loaded but registered no torch.ops.sparsebert_cuda ops"
            else:
                _lib = _C
    return _lib, _lib_error


def unavailable_reason(device: torch.device | None = None) -> str | None:
    """None when the CUDA kernels can run on ``device`` (default: the current CUDA device)."""
    if device is not None and torch.device(device).type != "cuda":
        return f"the cuda backend runs on CUDA devices only, not {torch.device(device).type}"
    lib, reason = _load()
    if lib is None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    return None


def unsupported_reason(x, values, lt: LayoutTensors) -> str | None:
    """None when these inputs are handled; otherwise why not (dtype, block size, device)."""
    if x.device.type != "cuda":
        return f"inputs are on {x.device}, the cuda backend needs CUDA tensors"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} not supported (float16, bfloat16, float32)"
    if lt.bn not in SUPPORTED_BLOCKS or lt.bk not in SUPPORTED_BLOCKS:
        return (f"block ({lt.bn}, {lt.bk}) not supported: the CUDA kernels are built for "
                f"bn, bk in {SUPPORTED_BLOCKS}")
    return None


def _ops():
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(f"cuda backend unavailable: {reason}")
    return torch.ops.sparsebert_cuda


# ---- packed-index entry points (what the custom op holds) ----------------------------------
def forward_packed(x, values, bias, index, N: int, K: int, bn: int, bk: int):
    return _ops().forward(x, values, bias, index, N, K, bn, bk)


def grad_input_packed(dy, values, index, N: int, K: int, bn: int, bk: int):
    return _ops().grad_input(dy, values, index, N, K, bn, bk)


def grad_weight_packed(x, dy, index, N: int, K: int, bn: int, bk: int):
    return _ops().grad_weight(x, dy, index, N, K, bn, bk)


def _check_index_device(lt: LayoutTensors, ref: torch.Tensor):
    # The kernels read the index on the GPU: a CPU index would be a host pointer there.
    if lt.row_ptr.device != ref.device:
        raise ValueError(f"cuda backend: layout index is on {lt.row_ptr.device} but the inputs are on "
                         f"{ref.device}; use layout.tensors({str(ref.device)!r})")


# ---- backend contract -------------------------------------------------------------------------
def forward(x, values, bias, lt: LayoutTensors):
    _check_index_device(lt, x)
    return forward_packed(x, values, bias, lt.packed(), lt.N, lt.K, lt.bn, lt.bk)


def grad_input(dy, values, lt: LayoutTensors):
    _check_index_device(lt, dy)
    return grad_input_packed(dy, values, lt.packed(), lt.N, lt.K, lt.bn, lt.bk)


def grad_weight(x, dy, lt: LayoutTensors):
    _check_index_device(lt, x)
    return grad_weight_packed(x, dy, lt.packed(), lt.N, lt.K, lt.bn, lt.bk)
