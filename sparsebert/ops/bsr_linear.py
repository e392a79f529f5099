"""``bsr_linear``: the block-sparse linear op, in three thin layers.

1. private ``torch.library`` custom ops (``sparsebert::bsr_fwd``, ``bsr_grad_input``,
   ``bsr_grad_weight``) with fake implementations, so ``torch.compile`` traces them whole;
2. autograd: registered on the forward op (dX and dW of kept blocks only), and the same
   backward in a plain ``autograd.Function`` that eager mode uses, because the custom-op
   dispatch costs ~100 µs of Python per call — more than a sparse kernel at BERT sizes;
3. the public :func:`bsr_linear`, which validates, flattens leading dims and picks the backend.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor
from torch._functorch import utils as _functorch_utils

from ..layout import BlockLayout, unpack_index
from . import backends

# Forward-mode AD: the compiled kernels have no forward-AD formula, and called on dual tensors
# they return no tangent, silently. Dual tensors exist only inside a forward_ad.dual_level
# (torch.func.jvp enters one too), whose module global ``_current_level`` is -1 outside one, so
# ``_fwad._current_level >= 0`` (one attribute read, tens of ns) sends such calls through
# _BsrLinearEager, whose jvp runs the same kernels on the tangents.

# True inside a torch.func transform (grad, vmap, jvp, ...): one C call, ~30 ns. Such calls go
# through the eager Functions too (their vmap rules; the kernels do not take wrapped tensors).
_transforms_active = torch._C._are_functorch_transforms_active

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _nnz_of(index: Tensor, N: int, K: int, bn: int, bk: int) -> int:
    # The packed index holds row_ptr (R+1), col_ptr (C+1) and four arrays of nnz entries.
    return (index.shape[0] - (N // bn) - (K // bk) - 2) // 4


# ---- backend plans ----------------------------------------------------------------------------
# Every op takes the whole plan ("name" or "fwd,dx,dw") and runs its own slot of it, so that the
# gradient formulas (which call the other ops) use the backends the plan chose for those ops.
_FWD, _DX, _DW = 0, 1, 2
# What ``backend="auto"`` becomes inside ``torch.compile``: the op resolves it at run time, on the
# real inputs, with the same cache (and the same timing, on a new key) as eager mode.
_AUTO, _AUTO_TRAIN = "auto", "auto:train"


def _check_supported(name: str, a: Tensor, values: Optional[Tensor], lt) -> None:
    """Raise a one-line error if backend ``name`` cannot run these inputs (cached per key)."""
    key = (name, a.device, a.dtype, (lt.N, lt.K), (lt.bn, lt.bk))
    if key in _supported:
        return
    if values is None:
        values = a.new_empty(lt.nnz, lt.bn, lt.bk)
    reason = backends.unsupported_reason(name, a, values, lt)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run this call: {reason}")
    _supported[key] = True


def _op_backend(plan: str, slot: int, a: Tensor, values: Optional[Tensor], lt) -> str:
    """The backend for op ``slot`` of ``plan`` inside a custom op, where the inputs are real.

    ``a`` is the op's token-major input (x for the forward and the weight gradient, dy for the
    input gradient); ``values`` the blocks, or None (the weight gradient has none)."""
    if plan in (_AUTO, _AUTO_TRAIN):
        train = plan == _AUTO_TRAIN or slot != _FWD
        M = a.shape[0]
        chosen = backends.cached_choice(a.device.type, a.dtype, M, lt, train)
        if chosen is None:   # not timed yet (eager mode never saw this key): time it now
            x = a if slot != _DX else torch.randn(M, lt.K, dtype=a.dtype, device=a.device)
            v = values if values is not None else torch.randn(
                lt.nnz, lt.bn, lt.bk, dtype=a.dtype, device=a.device) / max(1, lt.K) ** 0.5
            chosen = backends.choose(x, v, lt, train=train)
        plan = chosen
    name = backends.plan_names(plan)[slot]
    _check_supported(name, a, values, lt)
    return name


def _no_autocast(device_type: str):
    """The backends run with autocast off: the op layer has already cast their inputs, and the
    reference/dense backends' own torch calls must not be re-cast."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NULL_CONTEXT


_NULL_CONTEXT = contextlib.nullcontext()   # stateless: one instance serves every call
# True when autocast is on for some device type (one C call; x.device.type alone costs more).
# Eager code only: the traced path asks torch.is_autocast_enabled, which dynamo folds.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _eager_no_autocast(x: Tensor):
    """``_no_autocast(x.device.type)`` in eager code, without building the device type string
    when no autocast is on at all (the usual case)."""
    return _no_autocast(x.device.type) if _any_autocast() else _NULL_CONTEXT


def _bias_grad(dy: Tensor) -> Tensor:
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    return dy.sum(0, dtype=acc).to(dy.dtype)


# ---- 1. custom ops ----------------------------------------------------------------------------
@torch.library.custom_op("sparsebert::bsr_fwd", mutates_args=())
def _bsr_fwd(x: Tensor, values: Tensor, bias: Optional[Tensor], index: Tensor,
             N: int, K: int, bn: int, bk: int, backend: str) -> Tensor:
    lt = unpack_index(index, N, K, bn, bk, values.shape[0])
    with _no_autocast(x.device.type):
        return backends.get(_op_backend(backend, _FWD, x, values, lt)).forward(x, values, bias, lt)


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
    with _no_autocast(x.device.type):
        return _forward_gelu(_op_backend(backend, _FWD, x, values, lt), x, values, bias, lt)


@_bsr_fwd_gelu.register_fake
def _(x, values, bias, index, N, K, bn, bk, backend):
    return x.new_empty(x.shape[0], N)


@torch.library.custom_op("sparsebert::bsr_grad_input", mutates_args=())
def _bsr_grad_input(dy: Tensor, values: Tensor, index: Tensor,
                    N: int, K: int, bn: int, bk: int, backend: str) -> Tensor:
    lt = unpack_index(index, N, K, bn, bk, values.shape[0])
    with _no_autocast(dy.device.type):
        return backends.get(_op_backend(backend, _DX, dy, values, lt)).grad_input(dy, values, lt)


@_bsr_grad_input.register_fake
def _(dy, values, index, N, K, bn, bk, backend):
    return dy.new_empty(dy.shape[0], K)


@torch.library.custom_op("sparsebert::bsr_grad_weight", mutates_args=())
def _bsr_grad_weight(x: Tensor, dy: Tensor, index: Tensor,
                     N: int, K: int, bn: int, bk: int, backend: str) -> Tensor:
    lt = unpack_index(index, N, K, bn, bk, _nnz_of(index, N, K, bn, bk))
    with _no_autocast(x.device.type):
        return backends.get(_op_backend(backend, _DW, x, None, lt)).grad_weight(x, dy, lt)


@_bsr_grad_weight.register_fake
def _(x, dy, index, N, K, bn, bk, backend):
    return x.new_empty(_nnz_of(index, N, K, bn, bk), bn, bk)


# ---- 2. autograd ------------------------------------------------------------------------------
# The three products are linear in each argument, and each one's derivative is another of the
# three (with W = scatter(values), y = x Wᵀ, dx = dy W, dvalues = gather(dyᵀ x)):
#   forward     (x, values)  <- g: d x = grad_input(g, values),  d values = grad_weight(x, g)
#   grad_input  (dy, values) <- g: d dy = forward(g, values),     d values = grad_weight(g, dy)
#   grad_weight (x, dy)      <- g: d x = grad_input(dy, g),       d dy = forward(x, g)
# so gradients of any order run on the same kernels. When a backward runs with grad mode on
# (``create_graph=True``) it calls the differentiable form of each op (the custom op with its
# autograd, or the autograd.Function below), so the second-order gradients are real, never zero.
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
    dbias = _bias_grad(dy) if want_bias else None
    return dx, dvalues, dbias


def _setup_context(ctx, inputs, output):
    x, values, bias, index, N, K, bn, bk, backend = inputs
    ctx.save_for_backward(x, values, index)
    ctx.meta = (N, K, bn, bk, backend)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, values, index = ctx.saved_tensors
    N, K, bn, bk, plan = ctx.meta
    dx, dvalues, dbias = _grads(
        ctx, dy,
        lambda dy: _bsr_grad_input(dy, values, index, N, K, bn, bk, plan),
        lambda dy: _bsr_grad_weight(x, dy, index, N, K, bn, bk, plan))
    return dx, dvalues, dbias, None, None, None, None, None, None


_bsr_fwd.register_autograd(_backward, setup_context=_setup_context)


def _setup_pair(ctx, inputs, output):
    a, b, index, N, K, bn, bk, backend = inputs
    ctx.save_for_backward(a, b, index)
    ctx.meta = (N, K, bn, bk, backend)


def _grad_input_backward(ctx, g):
    dy, values, index = ctx.saved_tensors
    N, K, bn, bk, plan = ctx.meta
    g = g.contiguous()
    d_dy = _bsr_fwd(g, values, None, index, N, K, bn, bk, plan) if ctx.needs_input_grad[0] else None
    d_values = _bsr_grad_weight(g, dy, index, N, K, bn, bk, plan) if ctx.needs_input_grad[1] else None
    return d_dy, d_values, None, None, None, None, None, None


def _grad_weight_backward(ctx, g):
    x, dy, index = ctx.saved_tensors
    N, K, bn, bk, plan = ctx.meta
    g = g.contiguous()
    d_x = _bsr_grad_input(dy, g, index, N, K, bn, bk, plan) if ctx.needs_input_grad[0] else None
    d_dy = _bsr_fwd(x, g, None, index, N, K, bn, bk, plan) if ctx.needs_input_grad[1] else None
    return d_x, d_dy, None, None, None, None, None, None


_bsr_grad_input.register_autograd(_grad_input_backward, setup_context=_setup_pair)
_bsr_grad_weight.register_autograd(_grad_weight_backward, setup_context=_setup_pair)


def _vmap_rule(apply, info, in_dims, tensors, rest, flat):
    """The vmap rule of the eager Functions below: ``apply(*tensors, *rest)`` per example. Where
    only ``tensors[0]`` (a token-major ``[M, ·]`` input) is batched and ``flat``, the batch is
    folded into its rows (one kernel call: each row's output depends on that row alone); else
    one call per example, stacked (batched weights, per-example weight gradients)."""
    B = info.batch_size
    if flat and in_dims[0] is not None and all(d is None for d in in_dims[1:len(tensors)]):
        a = tensors[0].movedim(in_dims[0], 0)
        y = apply(a.reshape(B * a.shape[1], a.shape[2]).contiguous(), *tensors[1:], *rest)
        return y.view(B, a.shape[1], y.shape[-1]), 0
    outs = [apply(*(t if d is None else t.select(d, i).contiguous() for t, d in zip(tensors, in_dims)), *rest)
            for i in range(B)]
    return torch.stack(outs), 0


# (what Function.apply does first outside torch.func: a tensor escaped from a finished transform
# is unwrapped; identity where this torch has no such helper)
_unwrap_dead = getattr(_functorch_utils, "unwrap_dead_wrappers", lambda args: args)
_base_apply = torch._C._FunctionBase.__dict__.get("apply")     # the C apply (a classmethod descriptor)


class EagerFunction(torch.autograd.Function):
    """A new-style ``autograd.Function`` (forward without ctx, ``setup_context``: what torch.func
    requires) at the old style's per-call cost. ``Function.apply`` binds a new-style forward's
    arguments with ``inspect.signature`` on every call to fill in defaults (~15-40 µs, more than
    a small kernel); these forwards have no defaults and are always called with every argument
    positionally, so outside torch.func ``apply`` goes to the C apply directly, after the same
    dead-wrapper unwrapping ``Function.apply`` does; inside, through ``Function.apply``."""

    @classmethod
    def apply(cls, *args):
        if _base_apply is None or _transforms_active():     # (a torch without that C apply: the slow way)
            return super().apply(*args)
        return _base_apply.__get__(None, cls)(*_unwrap_dead(args))


class _BsrLinearEager(EagerFunction):
    """The same forward and backward without the custom-op machinery, whose Python overhead
    (~100 µs a call) dominated small-kernel layers in eager mode. ``torch.compile`` traces the
    custom ops instead (see :func:`bsr_linear`). ``plan`` is the (fwd, dx, dw) name tuple."""

    @staticmethod
    def forward(x, values, bias, lt, plan):
        with _eager_no_autocast(x):
            return backends.get(plan[_FWD]).forward(x, values, bias, lt)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, values, bias, lt, plan = inputs
        ctx.save_for_backward(x, values)
        ctx.lt, ctx.plan, ctx.has_bias = lt, plan, bias is not None
        if _fwad._current_level >= 0:
            ctx.save_for_forward(x, values)

    @staticmethod
    def vmap(info, in_dims, x, values, bias, lt, plan):
        return _vmap_rule(_BsrLinearEager.apply, info, in_dims, (x, values, bias), (lt, plan), True)

    @staticmethod
    def jvp(ctx, tx, tvalues, tbias, _lt, _plan):
        # y = x Wᵀ + b is bilinear in (x, W): dy = dx Wᵀ + x dWᵀ + db, each term the forward op
        # (through apply, so that tangents of tangents and gradients of the JVP are tracked too)
        x, values = ctx.saved_tensors
        lt, plan = ctx.lt, ctx.plan
        ty = None
        if tx is not None:
            ty = _BsrLinearEager.apply(tx.contiguous(), values, None, lt, plan)
        if tvalues is not None:
            t = _BsrLinearEager.apply(x, tvalues.contiguous(), None, lt, plan)
            ty = t if ty is None else ty + t
        if tbias is not None:
            ty = tbias.expand(x.shape[0], -1) if ty is None else ty + tbias
        return ty.contiguous()

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        lt, plan = ctx.lt, ctx.plan
        with _eager_no_autocast(dy):
            # create_graph=True, or forward AD through the backward (dual saved tensors or dy):
            # differentiable gradients
            if torch.is_grad_enabled() or _fwad._current_level >= 0:
                dx, dvalues, dbias = _grads(
                    ctx, dy,
                    lambda dy: _GradInputEager.apply(dy, values, lt, plan),
                    lambda dy: _GradWeightEager.apply(x, dy, lt, plan))
            else:
                dw_mod = backends.get(plan[_DW])
                fused = getattr(dw_mod, "grad_weight_bias", None)
                dx, dvalues, dbias = _grads(
                    ctx, dy,
                    lambda dy: backends.get(plan[_DX]).grad_input(dy, values, lt),
                    lambda dy: dw_mod.grad_weight(x, dy, lt),
                    None if fused is None else (lambda dy: fused(x, dy, lt)))
        return dx, dvalues, dbias, None, None


def _bilinear_jvp(f, ctx, ta, tb):
    """The tangent of ``f(a, b)``, bilinear in its two saved inputs: ``f(ta, b) + f(a, tb)``
    (terms of absent tangents left out; None when both are), through ``apply`` so that tangents
    of tangents and gradients of the JVP are tracked too."""
    a, b = ctx.saved_tensors
    t = None if ta is None else f(ta.contiguous(), b)
    if tb is not None:
        t2 = f(a, tb.contiguous())
        t = t2 if t is None else t + t2
    return t


class _GradInputEager(EagerFunction):
    """``dx = grad_input(dy, values)`` as a differentiable op (double backward, eager mode)."""

    @staticmethod
    def forward(dy, values, lt, plan):
        with _eager_no_autocast(dy):
            return backends.get(plan[_DX]).grad_input(dy, values, lt)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, values, lt, plan = inputs
        ctx.save_for_backward(dy, values)
        ctx.lt, ctx.plan = lt, plan
        if _fwad._current_level >= 0:
            ctx.save_for_forward(dy, values)

    @staticmethod
    def vmap(info, in_dims, dy, values, lt, plan):
        return _vmap_rule(_GradInputEager.apply, info, in_dims, (dy, values), (lt, plan), True)

    @staticmethod
    def jvp(ctx, tdy, tvalues, _lt, _plan):
        # bilinear: d(dy W) = d(dy) W + dy dW
        return _bilinear_jvp(lambda a, b: _GradInputEager.apply(a, b, ctx.lt, ctx.plan), ctx, tdy, tvalues)

    @staticmethod
    def backward(ctx, g):
        dy, values = ctx.saved_tensors
        lt, plan = ctx.lt, ctx.plan
        g = g.contiguous()
        d_dy = _BsrLinearEager.apply(g, values, None, lt, plan) if ctx.needs_input_grad[0] else None
        d_values = _GradWeightEager.apply(g, dy, lt, plan) if ctx.needs_input_grad[1] else None
        return d_dy, d_values, None, None


class _GradWeightEager(EagerFunction):
    """``dvalues = grad_weight(x, dy)`` as a differentiable op (double backward, eager mode)."""

    @staticmethod
    def forward(x, dy, lt, plan):
        with _eager_no_autocast(x):
            return backends.get(plan[_DW]).grad_weight(x, dy, lt)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, dy, lt, plan = inputs
        ctx.save_for_backward(x, dy)
        ctx.lt, ctx.plan = lt, plan
        if _fwad._current_level >= 0:
            ctx.save_for_forward(x, dy)

    @staticmethod
    def vmap(info, in_dims, x, dy, lt, plan):
        # a sum over the rows of both inputs: never folded (per-example gradients need one each)
        return _vmap_rule(_GradWeightEager.apply, info, in_dims, (x, dy), (lt, plan), False)

    @staticmethod
    def jvp(ctx, tx, tdy, _lt, _plan):
        # bilinear: d(gather(dyᵀ x)) = gather(dyᵀ dx) + gather(d(dy)ᵀ x)
        return _bilinear_jvp(lambda a, b: _GradWeightEager.apply(a, b, ctx.lt, ctx.plan), ctx, tx, tdy)

    @staticmethod
    def backward(ctx, g):
        x, dy = ctx.saved_tensors
        lt, plan = ctx.lt, ctx.plan
        g = g.contiguous()
        d_x = _GradInputEager.apply(dy, g, lt, plan) if ctx.needs_input_grad[0] else None
        d_dy = _BsrLinearEager.apply(x, g, None, lt, plan) if ctx.needs_input_grad[1] else None
        return d_x, d_dy, None, None


# ---- 3. public function -----------------------------------------------------------------------
def _check(x: Tensor, values: Tensor, layout: BlockLayout, bias: Optional[Tensor]) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a sparsebert.BlockLayout, got {type(layout).__name__}")
    N, K = layout.shape
    for what, t in (("x", x), ("values", values), ("bias", bias)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
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


class _LayoutConsts:
    """What the checks and the eager dispatch read of one :class:`BlockLayout`, computed once per
    layout object. Layouts are immutable (a layer that prunes or loads gets a new layout object,
    with an empty cache), so nothing here can go stale; what the inputs are is read every call."""

    __slots__ = ("N", "K", "values_shape", "bias_shape")

    def __init__(self, layout: BlockLayout):
        self.N, self.K = layout.shape
        bn, bk = layout.block
        self.values_shape = (layout.nnz, bn, bk)
        self.bias_shape = (self.N,)


def _consts(layout) -> Optional[_LayoutConsts]:
    if not isinstance(layout, BlockLayout):
        return None
    consts = layout._cache.get("bsr_linear")
    if consts is None:
        consts = layout._cache["bsr_linear"] = _LayoutConsts(layout)
    return consts


_DTYPE_SET = frozenset(_DTYPES)


def _accepts(x, values, bias, c: _LayoutConsts) -> bool:
    """True only where :func:`_check` passes: the common case, tested with fewer lookups. Anything
    it does not accept goes through :func:`_check`, which raises the one-line error."""
    if not (isinstance(x, Tensor) and isinstance(values, Tensor)):
        return False
    dtype, device = x.dtype, x.device
    if (dtype not in _DTYPE_SET or x.dim() < 1 or x.shape[-1] != c.K or values.dtype != dtype
            or values.shape != c.values_shape or values.device != device):
        return False
    return bias is None or (isinstance(bias, Tensor) and bias.shape == c.bias_shape
                            and bias.dtype == dtype and bias.device == device)


def resolve_backend(backend: str, x2: Tensor, values: Tensor, layout: BlockLayout) -> str:
    """The concrete backend plan for ``backend`` ("auto" or a name) on these inputs: one name, or
    ``"fwd,dx,dw"`` names when ``auto`` found different backends fastest for different ops.

    Inside ``torch.compile`` nothing can run at trace time, so ``"auto"`` stays ``"auto"`` (or
    ``"auto:train"``) in the graph and the custom op resolves it on its real inputs when it runs
    (the same cache and timing as eager mode; see :func:`backends.choose`).

    ``SPARSEBERT_BACKEND`` (environment) replaces ``"auto"`` with a fixed backend everywhere."""
    train = torch.is_grad_enabled() and (x2.requires_grad or values.requires_grad)
    return _resolve(backend, x2, values, layout, train, torch.compiler.is_compiling())


def _resolve(backend: str, x2: Tensor, values: Tensor, layout: BlockLayout, train: bool,
             compiling: bool) -> str:
    if backend == "auto":
        backend = _env_backend()
    if backend == "auto":
        if compiling:
            return _AUTO_TRAIN if train else _AUTO
        if _transforms_active():
            return _choose_untransformed(x2, values, layout, train)
        return backends.choose(x2, values, layout, train=train)
    if compiling:
        return backend   # checked by the custom op, on its real inputs
    key = (backend, x2.device, x2.dtype, layout.shape, layout.block)
    if key not in _supported:
        reason = backends.unsupported_reason(backend, x2, values, layout.tensors(x2.device))
        if reason is not None:
            raise RuntimeError(f"backend {backend!r} cannot run this call: {reason}")
        _supported[key] = True
    return backend


_supported = {}   # (backend, device, dtype, shape, block) already checked


def _choose_untransformed(x2: Tensor, values: Tensor, layout: BlockLayout, train: bool) -> str:
    """``backends.choose`` inside a torch.func transform: a cached choice, else one timed on plain
    random tensors of the same (per-example) shapes outside the transforms; the wrapped inputs
    cannot run every backend (vmap refuses ``.item()`` and in-place ops into unbatched tensors)."""
    device = x2.device
    hit = backends.cached_choice("cpu" if x2.is_cpu else device.type, x2.dtype, x2.shape[0], layout, train)
    if hit is not None:
        return hit
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack
    with temporarily_clear_interpreter_stack(), torch.no_grad():
        x = torch.randn(tuple(x2.shape), dtype=x2.dtype, device=device)
        v = torch.randn(tuple(values.shape), dtype=values.dtype, device=device) / max(1, x.shape[1]) ** 0.5
        return backends.choose(x, v, layout, train=train)


_ENV_NAME = "SPARSEBERT_BACKEND"
try:   # CPython's os.environ keeps its entries, encoded, in a dict that every write updates
    _environ, _environ_data = os.environ, os.environ._data
    _environ_key, _environ_decode = os.environ.encodekey(_ENV_NAME), os.environ.decodevalue
except AttributeError:   # pragma: no cover - another os.environ
    _environ = None


def _env_backend() -> str:
    """``SPARSEBERT_BACKEND`` or ``"auto"``, read at every call. From os.environ's own dict where
    it has one: ``os.environ.get`` goes through the Mapping machinery (~1 us, once per layer call)."""
    if os.environ is _environ:
        raw = _environ_data.get(_environ_key)
        value = None if raw is None else _environ_decode(raw)
    else:
        value = os.environ.get(_ENV_NAME)
    return value or "auto"


ACTIVATIONS = ("none", "gelu")


def _autocast_cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    # As autocast casts an nn.Linear's arguments: floating tensors other than float64.
    if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def bsr_linear(x: Tensor, values: Tensor, layout: BlockLayout, bias: Optional[Tensor] = None,
               backend: str = "auto", activation: str = "none") -> Tensor:
    """Block-sparse linear ``y = x @ W.T + bias``.

    Args:
        x: ``[..., K]`` input (any leading dims), float16/bfloat16/float32/float64.
        values: ``[nnz, bn, bk]`` kept blocks of ``W`` (``[N, K]``) in the layout's row-major
            block order; same dtype and device as ``x``.
        layout: the :class:`~sparsebert.BlockLayout` of ``W``.
        bias: optional ``[N]`` (any strides).
        backend: ``"auto"`` (fastest usable, dense included), ``"reference"``, ``"dense"``,
            ``"triton"``, ``"cuda"`` or ``"cpu"``.
        activation: ``"none"`` or ``"gelu"`` (exact, as ``nn.GELU()``): applied to the output. Without
            autograd it is fused into the kernel's epilogue where the backend supports it (one pass
            over ``y`` saved); with autograd it runs as a separate op.

    Under ``torch.autocast`` it behaves like ``nn.Linear``: ``x``, ``values`` and ``bias`` are cast
    to the autocast dtype (float64 ones are left alone), the kernels accumulate in fp32 and the
    output has the autocast dtype; gradients of fp32 ``values``/``bias`` come back in fp32.

    Pruned blocks are structural zeros: a NaN/Inf in ``x`` reaches exactly the outputs whose kept
    blocks read it, whichever backend runs (``docs/CONTRACT.md``).

    Returns:
        ``[..., N]``. Differentiable in ``x``, ``values`` (kept blocks only) and ``bias``, to any
        order (``create_graph=True`` gives real second-order gradients).
    """
    # The per-call cost matters: a MiniLM forward at 128 tokens makes 37 calls of ~40 us kernels.
    # Every check runs on every call; only facts of the (immutable) layout are computed once.
    compiling = torch.compiler.is_compiling()
    if ((compiling or _any_autocast()) and isinstance(x, Tensor)
            and torch.is_autocast_enabled(x.device.type)):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, values, bias = (_autocast_cast(t, dtype) for t in (x, values, bias))
    consts = None if compiling else _consts(layout)
    if consts is None or not _accepts(x, values, bias, consts):
        _check(x, values, layout, bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    N, K = layout.shape
    lead = x.shape[:-1]
    # Backends get contiguous inputs (docs/CONTRACT.md): these are no-ops when they already are.
    x2 = x.reshape(-1, K).contiguous()
    values = values.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    grad_mode = torch.is_grad_enabled()
    name = _resolve(backend, x2, values, layout,
                    grad_mode and (x2.requires_grad or values.requires_grad), compiling)
    needs_grad = grad_mode and (
        x2.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad))
    # Forward AD and torch.func transforms: through _BsrLinearEager (its jvp and vmap rules; the
    # kernels called directly would drop tangents or see wrapped tensors), the GELU as F.gelu
    via_fn = needs_grad or _fwad._current_level >= 0 or _transforms_active()
    fuse_gelu = activation == "gelu" and not via_fn
    if compiling:
        # Traced: the custom ops (with fake implementations) keep the graph whole.
        bn, bk = layout.block
        args = (x2, values, bias, layout.index(x.device), N, K, bn, bk, name)
        y = _bsr_fwd_gelu(*args) if fuse_gelu else _bsr_fwd(*args)
    else:
        lt = layout.tensors(x2.device)
        plan = backends.plan_names(name)
        with _eager_no_autocast(x2):
            if fuse_gelu:
                y = _forward_gelu(plan[_FWD], x2, values, bias, lt)
            elif via_fn:
                y = _BsrLinearEager.apply(x2, values, bias, lt, plan)
            else:
                y = backends.get(plan[_FWD]).forward(x2, values, bias, lt)
    if activation == "gelu" and not fuse_gelu:
        y = torch.nn.functional.gelu(y)
    return y.reshape(*lead, N)


def infer_2d(x2: Tensor, values: Tensor, layout: BlockLayout, bias: Optional[Tensor] = None,
             backend: str = "auto", activation: str = "none") -> Tensor:
    """``bsr_linear(x2, values, layout, bias, backend, activation)`` for a caller that has checked
    that no gradient is wanted, no autocast is on and nothing is being compiled or exported
    (:func:`sparsebert.optimize`'s CPU inference layer): the same checks of the inputs, the same
    dispatch and the same backend call, without the tests that cannot apply there. Anything
    :func:`_accepts` does not take (errors included), and any call under forward AD or a
    torch.func transform (whose tangents / wrapped tensors the kernel call would not handle),
    goes through :func:`bsr_linear`."""
    c = _consts(layout)
    if (c is None or _fwad._current_level >= 0 or _transforms_active() or activation not in ACTIVATIONS
            or not _accepts(x2, values, bias, c) or x2.dim() != 2 or not x2.is_contiguous()):
        return bsr_linear(x2, values, layout, bias, backend=backend, activation=activation)
    values = values.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    name = backends.plan_names(_resolve(backend, x2, values, layout, False, False))[_FWD]
    lt = layout.tensors(x2.device)
    if activation == "gelu":
        return _forward_gelu(name, x2, values, bias, lt)
    return backends.get(name).forward(x2, values, bias, lt)


def settled_backend(backend: str, M: int, x: Tensor, layout: BlockLayout) -> Optional[str]:
    """The backend :func:`bsr_linear` would run for an inference call of ``M`` rows like ``x``
    (dtype, device), where that is already settled — ``auto``'s choice for this key timed, or a
    named backend already checked for these inputs — else None (nothing is timed or checked here)."""
    if backend == "auto":
        backend = _env_backend()
    if backend == "auto":
        return backends.cached_choice("cpu" if x.is_cpu else x.device.type, x.dtype, M, layout, False)
    return backend if (backend, x.device, x.dtype, layout.shape, layout.block) in _supported else None
