"""``bsr_linear``: the block-sparse linear op, in three thin layers.

1. private ``torch.library`` custom ops (``sparsebert::bsr_fwd``, ``bsr_grad_input``,
   ``bsr_grad_weight``) with fake implementations, so ``torch.compile`` traces them whole;
2. autograd registered on the forward op: dX and dW (kept blocks only) through the same backend;
3. the public :func:`bsr_linear`, which validates, flattens leading dims and picks the backend.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ..layout import BlockLayout, unpack_index
from . import backends

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _nnz_of(index: Tensor, N: int, K: int, bn: int, bk: int) -> int:
    # The packed index holds row_ptr (R+1), col_ptr (C+1) and four arrays of nnz entries.
    return (index.shape[0] - (N // bn) - (K // bk) - 2) // 4


# ---- 1. custom ops ----------------------------------------------------------------------------
@torch.library.custom_op("sparsebert::bsr_fwd", mutates_args=())
def _bsr_fwd(x: Tensor, values: Tensor, bias: Optional[Tensor], index: Tensor,
             N: int, K: int, bn: int, bk: int, backend: str) -> Tensor:
    lt = unpack_index(index, N, K, bn, bk, values.shape[0])
    return backends.get(backends.plan_names(backend)[0]).forward(x, values, bias, lt)


@_bsr_fwd.register_fake
def _(x, values, bias, index, N, K, bn, bk, backend):
    return x.new_empty(x.shape[0], N)


@torch.library.custom_op("sparsebert::bsr_fwd_gelu", mutates_args=())
def _bsr_fwd_gelu(x: Tensor, values: Tensor, bias: Optional[Tensor], index: Tensor,
                  N: int, K: int, bn: int, bk: int, backend: str) -> Tensor:
    """Inference only: ``gelu(x Wᵀ + b)``, fused in the kernel's epilogue where the backend can."""
    lt = unpack_index(index, N, K, bn, bk, values.shape[0])
    mod = backends.get(backends.plan_names(backend)[0])
    if "gelu" in getattr(mod, "ACTIVATIONS", ()):     # the backend fuses it
        return mod.forward(x, values, bias, lt, activation="gelu")
    return torch.nn.functional.gelu(mod.forward(x, values, bias, lt))


@_bsr_fwd_gelu.register_fake
def _(x, values, bias, index, N, K, bn, bk, backend):
    return x.new_empty(x.shape[0], N)


@torch.library.custom_op("sparsebert::bsr_grad_input", mutates_args=())
def _bsr_grad_input(dy: Tensor, values: Tensor, index: Tensor,
                    N: int, K: int, bn: int, bk: int, backend: str) -> Tensor:
    lt = unpack_index(index, N, K, bn, bk, values.shape[0])
    return backends.get(backend).grad_input(dy, values, lt)


@_bsr_grad_input.register_fake
def _(dy, values, index, N, K, bn, bk, backend):
    return dy.new_empty(dy.shape[0], K)


@torch.library.custom_op("sparsebert::bsr_grad_weight", mutates_args=())
def _bsr_grad_weight(x: Tensor, dy: Tensor, index: Tensor,
                     N: int, K: int, bn: int, bk: int, backend: str) -> Tensor:
    lt = unpack_index(index, N, K, bn, bk, _nnz_of(index, N, K, bn, bk))
    return backends.get(backend).grad_weight(x, dy, lt)


@_bsr_grad_weight.register_fake
def _(x, dy, index, N, K, bn, bk, backend):
    return x.new_empty(_nnz_of(index, N, K, bn, bk), bn, bk)


# ---- 2. autograd ------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, values, bias, index, N, K, bn, bk, backend = inputs
    ctx.save_for_backward(x, values, index)
    ctx.meta = (N, K, bn, bk, backend)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, values, index = ctx.saved_tensors
    N, K, bn, bk, plan = ctx.meta
    _, dx_backend, dw_backend = backends.plan_names(plan)
    dy = dy.contiguous()
    dx = dvalues = dbias = None
    if ctx.needs_input_grad[0]:
        dx = _bsr_grad_input(dy, values, index, N, K, bn, bk, dx_backend)
    if ctx.needs_input_grad[1]:
        dvalues = _bsr_grad_weight(x, dy, index, N, K, bn, bk, dw_backend)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        dbias = dy.sum(0, dtype=acc).to(dy.dtype)
    return dx, dvalues, dbias, None, None, None, None, None, None


_bsr_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- 3. public function -----------------------------------------------------------------------
def _check(x: Tensor, values: Tensor, layout: BlockLayout, bias: Optional[Tensor]) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a sparsebert.BlockLayout, got {type(layout).__name__}")
    N, K = layout.shape
    if x.dtype not in _DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; bsr_linear supports float16, bfloat16, float32, float64")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dim must be in_features={K} of the layout")
    layout.check_values(values)
    if values.dtype != x.dtype:
        raise TypeError(f"values dtype {values.dtype} does not match x dtype {x.dtype}")
    if values.device != x.device:
        raise ValueError(f"values on {values.device} but x on {x.device}")
    if bias is not None:
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},)")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"bias is {bias.dtype} on {bias.device}; expected {x.dtype} on {x.device}")


def resolve_backend(backend: str, x2: Tensor, values: Tensor, layout: BlockLayout) -> str:
    """The concrete backend plan for ``backend`` ("auto" or a name) on these inputs: one name, or
    ``"fwd,dx,dw"`` names when ``auto`` found different backends fastest for different ops.

    ``SPARSEBERT_BACKEND`` (environment) replaces ``"auto"`` with a fixed backend everywhere."""
    if backend == "auto":
        backend = os.environ.get("SPARSEBERT_BACKEND", "auto") or "auto"
    if backend == "auto":
        train = torch.is_grad_enabled() and (x2.requires_grad or values.requires_grad)
        if torch.compiler.is_compiling():
            return backends.traced_choice(x2, layout, train)
        return backends.choose(x2, values, layout, train=train)
    if torch.compiler.is_compiling():
        return backend
    reason = backends.unsupported_reason(backend, x2, values, layout.tensors(x2.device))
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run this call: {reason}")
    return backend


ACTIVATIONS = ("none", "gelu")


def bsr_linear(x: Tensor, values: Tensor, layout: BlockLayout, bias: Optional[Tensor] = None,
               backend: str = "auto", activation: str = "none") -> Tensor:
    """Block-sparse linear ``y = x @ W.T + bias``.

    Args:
        x: ``[..., K]`` input (any leading dims), float16/bfloat16/float32/float64.
        values: ``[nnz, bn, bk]`` kept blocks of ``W`` (``[N, K]``) in the layout's row-major
            block order; same dtype and device as ``x``.
        layout: the :class:`~sparsebert.BlockLayout` of ``W``.
        bias: optional ``[N]``.
        backend: ``"auto"`` (fastest usable, dense included), ``"reference"``, ``"dense"``,
            ``"triton"``, ``"cuda"`` or ``"cpu"``.
        activation: ``"none"`` or ``"gelu"`` (exact, as ``nn.GELU()``): applied to the output. Without
            autograd it is fused into the kernel's epilogue where the backend supports it (one pass
            over ``y`` saved); with autograd it runs as a separate op.

    Returns:
        ``[..., N]``. Differentiable in ``x``, ``values`` (kept blocks only) and ``bias``.
    """
    _check(x, values, layout, bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    N, K = layout.shape
    bn, bk = layout.block
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    values = values.contiguous()
    name = resolve_backend(backend, x2, values, layout)
    args = (x2, values, bias, layout.index(x.device), N, K, bn, bk, name)
    needs_grad = torch.is_grad_enabled() and (
        x2.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad))
    if activation == "gelu" and not needs_grad:
        y = _bsr_fwd_gelu(*args)
    else:
        y = _bsr_fwd(*args)
        if activation == "gelu":
            y = torch.nn.functional.gelu(y)
    return y.reshape(*lead, N)
