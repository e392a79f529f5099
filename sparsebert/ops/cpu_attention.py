"""Fused CPU attention for inference: ``softmax(q kᵀ · scaling + mask) v`` in one kernel.

``torch.ops.sparsebert_cpu.attention`` (``csrc/cpu/attention.cpp``): fp32, one work item per
(batch, head) (split along the queries when there are fewer items than 4 per thread), threaded
with ``at::parallel_for`` (``torch.set_num_threads`` applies). Each item packs Kᵀ and V once into
L1/L2, keeps a tile of scores in L1, and takes the softmax in fp32 with the row maximum subtracted.
AVX-512, AVX2 and a baseline build are picked by CPUID (``SPARSEBERT_CPU_ISA=avx512|avx2|generic``
forces one); any S and D work.

Inputs are what transformers' attention functions receive: ``query``/``key``/``value``
``[B, H, S, D]`` with any strides but a contiguous last dimension (BERT's are transposed views of
its projections and are read in place, not copied). The output is ``[B, Sq, H, D]`` contiguous,
what those functions return after their transpose.

Masks: ``None``; ``bool`` (True = attend, the SDPA / Hugging Face convention); or float32
(added to the scaled scores), broadcastable to ``[B, H, Sq, Skv]`` and read through its strides
(never expanded into memory). transformers 5.x with ``attn_implementation="sdpa"`` passes no mask
for an unpadded batch and, for a padded one, a bool ``[B, 1, Sq, Skv]`` mask whose rows are all
equal (the padding of the keys). The kernel detects rows that are equal for its queries and then
skips the masked keys altogether (nothing computed for padding).

Fully masked rows (every key masked for a query): the output row is **0**, as torch's CPU
``scaled_dot_product_attention`` gives in torch 2.13 for a bool mask and for a float mask of
``-inf`` (checked in tests). A float mask of ``finfo.min`` instead of ``-inf`` masks nothing away
exactly: such a row averages v uniformly, in SDPA and here alike.

:func:`unsupported_reason` says when the kernel does not apply (the caller then runs SDPA);
:func:`attention` runs it and raises a one-line ``ValueError`` for bad input.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad

from . import cpu_bsr

_op_state: list = []     # [why the op is unusable, or None]: decided once


def _load() -> str | None:
    """Why the attention op cannot run here, or None. ``sparsebert._C`` is loaded by the cpu
    backend's own loader (:func:`sparsebert.ops.cpu_bsr._load`); a build from before the op
    existed loads without it."""
    if not _op_state:
        err = cpu_bsr._load()
        if err is None:
            if hasattr(torch.ops.sparsebert_cpu, "attention"):
                _register_fake()
            else:
                err = "sparsebert._C was built without the attention op: rebuild it (make install)"
        _op_state.append(err)
    return _op_state[0]


def _register_fake():
    """Shape-only implementation, so meta tensors and torch.compile can trace the op."""
    def fake(query, key, value, mask, scale):
        b, h, s, d = query.shape
        return query.new_empty(b, s, h, d)

    try:
        torch.library.register_fake("sparsebert_cpu::attention", fake)
    except RuntimeError:  # already registered (a second copy of this module)
        pass


def available() -> bool:
    return _load() is None


def isa() -> str:
    """The kernel set a call would use now (``avx512``, ``avx2`` or ``generic``)."""
    err = _load()
    if err is not None:
        raise RuntimeError(err)
    return torch.ops.sparsebert_cpu.attention_isa()


def _shape_reason(query, key, value, attention_mask) -> str | None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            return f"{name} is not a tensor"
        if t.dim() != 4:
            return f"{name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}"
    b, h, sq, d = query.shape
    if key.shape[0] != b or key.shape[1] != h or key.shape[3] != d or value.shape != key.shape:
        return (f"query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                f"{tuple(value.shape)} do not match (same B, H, D; key and value the same shape)")
    if key.shape[2] == 0:
        return "key has no positions"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.stride(3) != 1 and t.shape[3] != 1:
            return f"{name} must have a contiguous last dimension, got strides {t.stride()}"
    return mask_reason(attention_mask, (b, h, sq, key.shape[2]))


def mask_reason(attention_mask, want) -> str | None:
    """Why the kernel cannot take ``attention_mask`` for scores of shape ``want`` = (B, H, Sq, Skv),
    or None."""
    if attention_mask is None:
        return None
    m = attention_mask
    if not isinstance(m, torch.Tensor):
        return f"attention_mask must be a tensor or None, got {type(m).__name__}"
    if m.dtype not in (torch.bool, torch.float32):
        return f"attention_mask must be bool or float32, got {m.dtype}"
    if m.device.type != "cpu":
        return f"attention_mask must be on the CPU, got {m.device}"
    if m.dim() > 4 or any(s != w and s != 1 for s, w in zip(reversed(m.shape), reversed(want))):
        return f"attention_mask of shape {tuple(m.shape)} does not broadcast to [B, H, Sq, Skv] = {list(want)}"
    return None


def unsupported_reason(query, key, value, attention_mask=None, dropout=0.0) -> str | None:
    """None when :func:`attention` applies to these inputs, else a short reason (use SDPA)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if isinstance(t, torch.Tensor):
            if t.device.type != "cpu":
                return f"{name} is on {t.device}, not the CPU"
            if t.dtype != torch.float32:
                return f"{name} is {t.dtype}, not float32"
    if dropout:
        return f"dropout {dropout} > 0"
    if torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad
            for t in (query, key, value, attention_mask)):
        return "autograd needs a gradient (the fused kernel has no backward)"
    if _fwad._current_level >= 0:     # dual tensors possible: the kernel would drop their tangents
        return "forward-mode AD is active (the fused kernel has no forward-AD formula)"
    if torch._C._are_functorch_transforms_active():
        return "a torch.func transform is active (the fused kernel has no batching rule)"
    reason = _shape_reason(query, key, value, attention_mask)
    if reason is not None:
        return reason
    return _load()


def attention(query, key, value, attention_mask=None, scaling=None) -> torch.Tensor:
    """``softmax(query @ keyᵀ * scaling + mask) @ value`` as ``[B, Sq, H, D]`` contiguous.

    query/key/value ``[B, H, S, D]`` float32 CPU tensors (any strides, last one 1); mask None,
    bool (True = attend) or float32 additive, broadcastable to ``[B, H, Sq, Skv]``; ``scaling``
    defaults to ``D ** -0.5``. No autograd (see :func:`unsupported_reason`).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"cpu_attention: {name} is not a tensor")
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise ValueError(f"cpu_attention: {name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    reason = _shape_reason(query, key, value, attention_mask)
    if reason is not None:
        raise ValueError(f"cpu_attention: {reason}")
    if torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad
            for t in (query, key, value, attention_mask)):
        raise ValueError("cpu_attention: inputs require grad; the fused kernel has no backward "
                         "(use torch.no_grad() or scaled_dot_product_attention)")
    if _fwad._current_level >= 0 and any(
            isinstance(t, torch.Tensor) and _fwad.unpack_dual(t).tangent is not None
            for t in (query, key, value, attention_mask)):
        raise ValueError("cpu_attention: inputs are forward-AD dual tensors; the fused kernel has no "
                         "forward-AD formula (use sparsebert.fused.attention_math)")
    err = _load()
    if err is not None:
        raise RuntimeError(err)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return torch.ops.sparsebert_cpu.attention(query, key, value, attention_mask, float(scaling))


def wants_weights(module, kwargs) -> bool:
    """Whether the call must return the attention probabilities: ``output_attentions`` passed, or
    set in the module's config (transformers then captures them from the module's output without
    passing the argument down)."""
    return bool(kwargs.get("output_attentions", False)
                or getattr(getattr(module, "config", None), "output_attentions", False))


def applies(module, query, key, value, attention_mask, dropout=0.0, is_causal=None, **kwargs) -> bool:
    """Whether a call of a transformers attention function (same arguments) may run the fused
    kernel: not for a causal call without a mask (SDPA's ``is_causal``), ``position_bias``,
    ``softcap``, ``output_attentions``, nor whatever :func:`unsupported_reason` names."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return (not (query.shape[2] > 1 and attention_mask is None and causal)
            and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None
            and not wants_weights(module, kwargs)
            and unsupported_reason(query, key, value, attention_mask, dropout) is None)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers' attention-function signature (``AttentionInterface``): the fused kernel where
    it :func:`applies`, else ``transformers.integrations.sdpa_attention.sdpa_attention_forward``.

    Registering it under a new name needs a mask function too (see the module tests):
    ``AttentionMaskInterface.register(name, sdpa_mask)``; without one transformers passes *no*
    mask for a padded batch.
    """
    if not applies(module, query, key, value, attention_mask, dropout, is_causal, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    return attention(query, key, value, attention_mask, scaling), None
