"""Compiled CPU backend: block-sparse linear kernels from ``sparsebert._C`` (``csrc/cpu``).

Ops ``torch.ops.sparsebert_cpu.{forward, grad_input, grad_weight}`` take the packed int32 layout
index (:func:`sparsebert.layout.pack_index`). Kernels: register-blocked fp32 micro-kernels
(8 tokens x 32 outputs of AVX-512 FMA accumulators), chosen at run time by CPUID among AVX-512,
AVX2 and a baseline build (``SPARSEBERT_CPU_ISA`` overrides), threaded with ``at::parallel_for``.
Blocks: both sizes multiples of 16, at most 256. Dtypes: float32; bfloat16 is converted to
float32 around the kernels (fp32 accumulation). See ``csrc/cpu/bsr_cpu.cpp`` for the design.

The forward reads ``values`` as they are at every call: no transposed copy of the weights is kept
between calls, so no way of updating them (optimizer steps, fused optimizers, ``.data``, numpy
views) can be served stale. By token count it uses one of three kernels (``csrc/cpu/bsr_cpu.cpp``,
``pick_forward``): with few tokens, dot products over the blocks as stored, or the input
transposed with the tokens in the vector lanes; otherwise the panel kernel, whose work items
transpose the blocks they need just before use. ``SPARSEBERT_CPU_FWD=dot|tpanel|panel`` forces
one and ``SPARSEBERT_CPU_PREFETCH`` a prefetch variant (tests, experiments).

Outputs come from a small caching allocator in ``csrc/cpu/output_pool.cpp``: a fresh
multi-megabyte tensor costs a page fault per few pages on first touch, up to a quarter of a
forward at 90% sparsity, so freed outputs of 1 MiB or more are kept and reused. The memory kept
while unused is capped by ``SPARSEBERT_CPU_POOL_MB`` (default 256, 0 = off, read once);
:func:`empty_cache` releases it. Outputs of 8 MiB or more are written with non-temporal stores
(``SPARSEBERT_CPU_STREAM=0|1`` forces them off or on). The forward can apply the exact GELU in its
register tile (``activation="gelu"``); :func:`grad_weight_bias` returns the bias gradient with the
weight gradient, from the same pass over dy.
"""
from __future__ import annotations

import threading

import torch

from ..layout import LayoutTensors

NAME = "cpu"
DTYPES = (torch.float32, torch.bfloat16)
ACTIVATIONS = ("none", "gelu")  # "gelu" is applied in the forward's register tile, before the store
MAX_BLOCK = 256

_load_error: str | None = None
_loaded = False
_load_lock = threading.Lock()


def _load() -> str | None:
    """Import ``sparsebert._C`` once (it registers the ops); return why it failed, or None.
    Thread-safe: a second thread waits until the first has finished loading (it must not see
    "loaded" before the ops are registered)."""
    global _loaded, _load_error
    if _loaded:
        return _load_error
    with _load_lock:
        if not _loaded:
            try:
                from .. import _C  # noqa: F401  (import registers torch.ops.sparsebert_cpu)
                torch.ops.sparsebert_cpu.forward  # noqa: B018  (raises if the CPU ops are missing)
                _register_fakes()
            except Exception as e:  # ImportError, undefined symbol from a torch ABI mismatch, ...
                _load_error = (
                    f"sparsebert._C is not built or does not load ({type(e).__name__}: {e}); build "
                    "it with `pip install --no-build-isolation -e .` against the torch that runs it"
                )
            _loaded = True
    return _load_error


def _register_fakes():
    """Shape-only implementations, so meta tensors and torch.compile can trace the ops."""
    def fake_forward(x, values, bias, index, N, K, bn, bk, activation="none"):
        torch._check(x.dim() == 2 and x.shape[1] == K, lambda: f"sparsebert_cpu: x must be [M, {K}]")
        return x.new_empty(x.shape[0], N)

    def fake_grad_input(dy, values, index, N, K, bn, bk):
        torch._check(dy.dim() == 2 and dy.shape[1] == N, lambda: f"sparsebert_cpu: dy must be [M, {N}]")
        return dy.new_empty(dy.shape[0], K)

    def fake_grad_weight(x, dy, index, N, K, bn, bk):
        nnz = (index.shape[0] - N // bn - K // bk - 2) // 4
        return x.new_empty(nnz, bn, bk)

    def fake_grad_weight_bias(x, dy, index, N, K, bn, bk):
        return fake_grad_weight(x, dy, index, N, K, bn, bk), dy.new_empty(N)

    for name, fn in (("forward", fake_forward), ("grad_input", fake_grad_input),
                     ("grad_weight", fake_grad_weight), ("grad_weight_bias", fake_grad_weight_bias)):
        try:
            torch.library.register_fake(f"sparsebert_cpu::{name}")(fn)
        except RuntimeError:  # already registered (module reloaded, or by the op layer)
            pass


def unavailable_reason(device: torch.device | None = None) -> str | None:
    if device is not None and torch.device(device).type != "cpu":
        return f"the cpu backend runs on CPU tensors only, not {torch.device(device).type}"
    return _load()


def unsupported_reason(x, values, lt: LayoutTensors) -> str | None:
    if x.device.type != "cpu":
        return f"the cpu backend runs on CPU tensors only, got {x.device}"
    if x.dtype not in DTYPES:
        return f"the cpu backend supports float32 and bfloat16, got {x.dtype}"
    if lt.bn % 16 or lt.bk % 16 or lt.bn > MAX_BLOCK or lt.bk > MAX_BLOCK:
        return (f"the cpu backend needs block sizes that are multiples of 16 and at most "
                f"{MAX_BLOCK}, got ({lt.bn}, {lt.bk})")
    return None


def isa() -> str:
    """The kernel set the compiled ops use here (``avx512``, ``avx2``, ``generic``, ``autovec``)."""
    reason = _load()
    if reason is not None:
        raise RuntimeError(reason)
    return torch.ops.sparsebert_cpu.isa()


def empty_cache() -> None:
    """Release the memory the CPU kernels' output pool keeps for reuse."""
    _require().empty_cache()


def pool_stats() -> dict:
    """The output pool's idle bytes and its hits and misses so far."""
    idle, hits, misses = _require().pool_stats()
    return {"idle_bytes": idle, "hits": hits, "misses": misses}


def _require():
    reason = _load()
    if reason is not None:
        raise RuntimeError(reason)
    return torch.ops.sparsebert_cpu


_fwd_op = None


def forward(x, values, bias, lt: LayoutTensors, activation: str = "none"):
    global _fwd_op
    if activation not in ACTIVATIONS:
        raise ValueError(f"forward: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if _fwd_op is None:
        # the OpOverload itself: calling it skips the packet's lookup, ~10 us of a ~40 us call
        # at 128 tokens (a BERT-sized layer at 90% sparsity), 36 calls per MiniLM forward
        _fwd_op = _require().forward.default
    return _fwd_op(x, values, bias, lt.packed(), lt.N, lt.K, lt.bn, lt.bk, activation)


def grad_input(dy, values, lt: LayoutTensors):
    return _require().grad_input(dy, values, lt.packed(), lt.N, lt.K, lt.bn, lt.bk)


def grad_weight(x, dy, lt: LayoutTensors):
    return _require().grad_weight(x, dy, lt.packed(), lt.N, lt.K, lt.bn, lt.bk)


def grad_weight_bias(x, dy, lt: LayoutTensors):
    """``(grad_weight(x, dy, lt), dy.sum(0))`` with the bias gradient summed inside the weight
    gradient kernel, while the dy rows are in L1, instead of in another pass over dy."""
    return _require().grad_weight_bias(x, dy, lt.packed(), lt.N, lt.K, lt.bn, lt.bk)


def add_layernorm_(y, residual, weight, bias, eps: float):
    """``y = layer_norm(y + residual, weight, bias, eps)`` over the last dim, **in place** (fp32,
    CPU, contiguous; no autograd): the end of BERT's attention-output and output blocks at
    inference, one pass per row and no new tensor (``csrc/cpu/add_layernorm.cpp``). Returns ``y``."""
    _require().add_layernorm_(y, residual, weight, bias, float(eps))
    return y


_layer_op: list = []   # [the bert_layer OpOverload, or None where sparsebert._C has none]


def layer_op():
    """``torch.ops.sparsebert_cpu.bert_layer`` (``csrc/cpu/bert_layer.cpp``: a BERT layer's nine
    kernel calls at inference in one op), or None (a build from before it, or no attention op)."""
    if not _layer_op:
        ok = _load() is None and hasattr(torch.ops.sparsebert_cpu, "bert_layer")
        if ok:
            from . import cpu_attention
            ok = cpu_attention._load() is None
        _layer_op.append(torch.ops.sparsebert_cpu.bert_layer.default if ok else None)
    return _layer_op[0]
