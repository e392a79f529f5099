"""``bsr_linear``: the block-sparse linear op, in three thin layers.

1. private ``torch.library`` custom ops (``sparsebert::bsr_fwd``, ``bsr_grad_input``,
   ``bsr_grad_weight``) with fake implementations, so ``torch.compile`` traces them whole;
2. autograd: registered on the forward op (dX and dW of kept blocks only), and the same
   backward in a plain ``autograd.Function`` that eager mode uses, because the custom-op
   dispatch costs ~100 µs of Python per call — more than a sparse kernel at BERT sizes;
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


def _forward_gelu(name: str, x: Tensor, values: Tensor, bias: Optional[Tensor], lt) -> Tensor:
    mod = backends.get(name)
    if "gelu" in getattr(mod, "ACTIVATIONS", ()):     # the backend fuses it in its epilogue
        return mod.forward(x, values, bias, lt, activation="gelu")
    return torch.nn.functional.gelu(mod.forward(x, values, bias, lt))


@torch.library.custom_op("sparsebert::bsr_fwd_gelu", mutates_args=())
def _bsr_fwd_gelu(x: Tensor, values: Tensor, bias: Optional[Tensor], index: Tensor,
                  N: int, K: int, bn: int, bk: int, backend: str) -> Tensor:
    """Inference only: ``gelu(x Wᵀ + b)``, fused in the kernel's epilogue where the backend can."""
    lt = unpack_index(index, N, K, bn, bk, values.shape[0])
    return _forward_gelu(backends.plan_names(backend)[0], x, values, bias, lt)


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


def _grads(ctx, dy, grad_input, grad_weight, grad_weight_bias=None):
    """(dx, dvalues, dbias) for the inputs that need them; ``grad_input(dy)``/``grad_weight(dy)``
    compute the first two (through the custom ops when traced, the backends directly in eager).
    ``grad_weight_bias(dy)``, where the weight-gradient backend has one, returns dvalues and
    dbias together (the bias gradient fused into the weight-gradient kernel)."""
    dy = dy.contiguous()
    dx = grad_input(dy) if ctx.needs_input_grad[0] else None
    want_bias = ctx.has_bias and ctx.needs_input_grad[2]
    if want_bias and ctx.needs_input_grad[1] and grad_weight_bias is not None:
        dvalues, dbias = grad_weight_bias(dy)
        return dx, dvalues, dbias
    dvalues = grad_weight(dy) if ctx.needs_input_grad[1] else None
    dbias = None
    if want_bias:
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        dbias = dy.sum(0, dtype=acc).to(dy.dtype)
    return dx, dvalues, dbias


def _backward(ctx, dy):
    x, values, index = ctx.saved_tensors
    N, K, bn, bk, plan = ctx.meta
    _, dx_backend, dw_backend = backends.plan_names(plan)
    dx, dvalues, dbias = _grads(
        ctx, dy,
        lambda dy: _bsr_grad_input(dy, values, index, N, K, bn, bk, dx_backend),
        lambda dy: _bsr_grad_weight(x, dy, index, N, K, bn, bk, dw_backend))
    return dx, dvalues, dbias, None, None, None, None, None, None


_bsr_fwd.register_autograd(_backward, setup_context=_setup_context)


class _BsrLinearEager(torch.autograd.Function):
    """The same forward and backward without the custom-op machinery, whose Python overhead
    (~100 µs a call) dominated small-kernel layers in eager mode. ``torch.compile`` traces the
    custom ops instead (see :func:`bsr_linear`)."""

    @staticmethod
    def forward(ctx, x, values, bias, lt, plan):
        ctx.save_for_backward(x, values)
        ctx.lt, ctx.plan, ctx.has_bias = lt, plan, bias is not None
        return backends.get(plan[0]).forward(x, values, bias, lt)

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        lt, (_, dx_backend, dw_backend) = ctx.lt, ctx.plan
        dw_mod = backends.get(dw_backend)
        fused = getattr(dw_mod, "grad_weight_bias", None)
        dx, dvalues, dbias = _grads(
            ctx, dy,
            lambda dy: backends.get(dx_backend).grad_input(dy, values, lt),
            lambda dy: dw_mod.grad_weight(x, dy, lt),
            None if fused is None else (lambda dy: fused(x, dy, lt)))
        return dx, dvalues, dbias, None, None


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
    key = (backend, x2.device, x2.dtype, layout.shape, layout.block)
    if key not in _supported:
        reason = backends.unsupported_reason(backend, x2, values, layout.tensors(x2.device))
        if reason is not None:
            raise RuntimeError(f"backend {backend!r} cannot run this call: {reason}")
        _supported[key] = True
    return backend


_supported = {}   # (backend, device, dtype, shape, block) already checked


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
    needs_grad = torch.is_grad_enabled() and (
        x2.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad))
    fuse_gelu = activation == "gelu" and not needs_grad
    if torch.compiler.is_compiling():
        # Traced: the custom ops (with fake implementations) keep the graph whole.
        args = (x2, values, bias, layout.index(x.device), N, K, bn, bk, name)
        y = _bsr_fwd_gelu(*args) if fuse_gelu else _bsr_fwd(*args)
    else:
        lt, plan = layout.tensors(x.device), backends.plan_names(name)
        if fuse_gelu:
            y = _forward_gelu(plan[0], x2, values, bias, lt)
        elif needs_grad:
            y = _BsrLinearEager.apply(x2, values, bias, lt, plan)
        else:
            y = backends.get(plan[0]).forward(x2, values, bias, lt)
    if activation == "gelu" and not fuse_gelu:
        y = torch.nn.functional.gelu(y)
    return y.reshape(*lead, N)
