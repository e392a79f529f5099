"""CPU dropout with cheaper random numbers, and BERT attention that uses it.

Profile (MiniLM-size BERT, batch 8 x 128, CPU, see RESULTS): PyTorch's CPU dropout draws one
random number per element through ``bernoulli_`` (a serial per-element loop), then divides and
multiplies in two more passes; the attention-probability dropout covers ``[8, 12, 128, 128]`` per
layer and cost several times the layer's softmax. Here a mask costs one 64-bit draw per **two**
elements: ``int64.random_(-2**63, 2**63 - 1)`` gives 64 uniform bits (the one value 2**64 - 1
folds onto 0: a 2**-63 bias), read as two int32 lanes uniform on ``[-2**31, 2**31)``; an element
is kept when its lane is below ``floor(keep * 2**32) - 2**31``. Each element is kept
independently with probability ``keep = 1 - p`` to within ``2**-32`` — finer than a float32 ``p``
can be written (0.1 in fp32 is off by 1.5e-9) — the same distribution as ``F.dropout``, from
different random numbers of the same global CPU generator (seeded by ``torch.manual_seed``). The
mask is kept as bool (1 byte an element) and applied with float multiplies (bool-tensor ops such
as ``masked_fill`` run several times slower than a float multiply on this CPU).

Used only on CPU tensors in training with ``0 < p < 1``; everything else goes to PyTorch's ops.
"""
from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as _fwad
import torch.nn.functional as F
from torch import nn

ATTENTION_NAME = "sparsebert_sdpa"              # fast CPU dropout
ATTENTION_NAME_TORCH_DROPOUT = "sparsebert_sdpa_torch_dropout"


def keep_mask(shape, p: float, device=None) -> torch.Tensor:
    """A bool tensor of ``shape``: True where an element is kept, each with probability ``1 - p``
    (to within 2**-32; see the module docstring)."""
    n = math.prod(shape)
    keep = 1.0 - float(p)
    thr = min(math.floor(keep * 2.0 ** 32), 2 ** 32 - 1) - 2 ** 31
    draws = -(-n // 2)
    # 64 uniform bits a draw (``random_()`` alone gives 63), read as two int32 lanes; one scalar
    # compare (a per-lane threshold broadcast was 10x slower).
    u = torch.empty(draws, dtype=torch.int64, device=device).random_(-2 ** 63, 2 ** 63 - 1).view(torch.int32)
    return (u < thr)[:n].view(shape)


def _scaled(keep: torch.Tensor, p: float, dtype) -> torch.Tensor:
    # bool -> float through uint8: the direct conversion is several times slower here
    return keep.view(torch.uint8).to(dtype).mul_(1.0 / (1.0 - p))


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        keep = keep_mask(x.shape, p, x.device)
        ctx.p = p
        ctx.save_for_backward(keep)
        return x * _scaled(keep, p, x.dtype)

    @staticmethod
    def backward(ctx, dy):
        (keep,) = ctx.saved_tensors
        return dy * _scaled(keep, ctx.p, dy.dtype), None


def _fast_ok(x: torch.Tensor, p: float, training: bool) -> bool:
    # not under forward AD or torch.func (_Dropout has neither a jvp nor a vmap rule): F.dropout
    return (training and 0.0 < p < 1.0 and x.device.type == "cpu"
            and not torch.compiler.is_compiling() and _fwad._current_level < 0
            and not torch._C._are_functorch_transforms_active())


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` in distribution (see the module docstring); differentiable."""
    if not _fast_ok(x, p, training):
        return F.dropout(x, p, training)
    return _Dropout.apply(x, float(p))


class FastDropout(nn.Dropout):
    """``nn.Dropout`` drawing its CPU training masks with :func:`keep_mask` (same distribution).
    :func:`sparsebert.optimize` swaps the class of a model's ``nn.Dropout`` modules to this one."""

    def forward(self, x):
        if self.inplace or not _fast_ok(x, self.p, self.training):
            return F.dropout(x, self.p, self.training, self.inplace)
        return _Dropout.apply(x, float(self.p))


def attention_math(query, key, value, attention_mask, scaling, p, return_weights=False, fast=True):
    """softmax(q kᵀ · scaling + mask) with :func:`dropout` (``fast=False``: ``F.dropout``), times
    v: ``[B, H, T, D]`` in and out; with ``return_weights``, also the probabilities (after the
    dropout, as Hugging Face's eager attention returns them). ``attention_mask``: None, a bool
    mask (True = attend) or an additive float mask."""
    w = torch.matmul(query, key.transpose(-2, -1))
    w.mul_(scaling)
    empty = None
    if attention_mask is not None:
        # A fully masked row (every key masked: an all-padding example) gives output 0, as SDPA
        # does (see ops/cpu_attention). Masking with finfo.min, not -inf, keeps its softmax
        # finite: -inf made the row NaN, and in training one NaN row poisoned the loss and every
        # gradient. Elsewhere nothing changes (exp(finfo.min - row max) is 0).
        lowest = torch.finfo(w.dtype).min
        if attention_mask.dtype == torch.bool:
            empty = ~attention_mask.any(-1, keepdim=True)
            w = w.masked_fill(~attention_mask, lowest)
        else:
            empty = (attention_mask == float("-inf")).all(-1, keepdim=True)
            w = w + attention_mask.clamp(min=lowest)
    w = torch.softmax(w, dim=-1)
    if p > 0.0:
        w = dropout(w, p, True) if fast else F.dropout(w, p, True)
    out = torch.matmul(w, value)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
        if return_weights:
            w = w.masked_fill(empty, 0.0)
    return (out, w) if return_weights else out


def _causal(module, is_causal) -> bool:
    """Whether the call is causal: its ``is_causal``, else the module's attribute (False without one)."""
    return is_causal if is_causal is not None else getattr(module, "is_causal", False)


def _attention_with_weights(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                            fast_dropout):
    """``output_attentions=True``: SDPA returns no probabilities (Hugging Face's sdpa then returns
    an empty ``attentions`` tuple with a warning about "sdpa", although the user's model was
    eager before :func:`sparsebert.optimize`), so compute them as the eager attention does."""
    T, S = query.shape[-2], key.shape[-2]
    causal = _causal(module, is_causal)
    if attention_mask is None and causal and T > 1:
        # what SDPA's is_causal computes (top-left aligned), which sdpa_attention_forward asks for
        attention_mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril()
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    out, w = attention_math(query, key, value, attention_mask, scaling, dropout,
                            return_weights=True, fast=fast_dropout and _fast_ok(query, dropout, True))
    return out.transpose(1, 2).contiguous(), w


def _attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs, fast_dropout):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from .ops import cpu_attention
    if query.is_cpu and not torch.compiler.is_compiling():
        # CPU inference: the fused kernel where it applies
        if cpu_attention.applies(module, query, key, value, attention_mask, dropout, is_causal, **kwargs):
            return cpu_attention.attention(query, key, value, attention_mask, scaling), None
    # what attention_math computes: one key/value head per query head, no bias or softcap
    plain = (getattr(module, "num_key_value_groups", 1) == 1 and kwargs.get("position_bias") is None
             and kwargs.get("softcap") is None and query.shape[1] == key.shape[1])
    if plain and cpu_attention.wants_weights(module, kwargs):
        return _attention_with_weights(module, query, key, value, attention_mask, dropout, scaling,
                                       is_causal, fast_dropout)
    if plain and _fwad._current_level >= 0:
        # forward-mode AD: torch's CPU SDPA kernel has no forward-AD formula (it raises), the fused
        # one drops the tangents; attention_math is plain torch ops (and PyTorch's dropout)
        return _attention_with_weights(module, query, key, value, attention_mask, dropout, scaling,
                                       is_causal, False)[0], None
    simple = (plain and fast_dropout and _fast_ok(query, dropout, True)
              and not _causal(module, is_causal))
    if not simple:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    out = attention_math(query, key, value, attention_mask, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


def sdpa_fast_dropout(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling=None, is_causal=None, **kwargs):
    """A Hugging Face attention function: SDPA, except (1) CPU training with attention dropout,
    which runs :func:`attention_math` (SDPA's CPU path materialises the probabilities there too),
    and (2) CPU inference (fp32, no gradient, no dropout), which runs sparsebert's fused kernel
    (:mod:`sparsebert.ops.cpu_attention`) where it is built."""
    return _attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs, True)


def sdpa_torch_dropout(module, query, key, value, attention_mask, dropout: float = 0.0,
                       scaling=None, is_causal=None, **kwargs):
    """As :func:`sdpa_fast_dropout` with PyTorch's own dropout: SDPA everywhere except CPU
    inference (the fused kernel, which draws no random numbers)."""
    return _attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs, False)


_registered = False


def register_attention(fast_dropout: bool = True) -> str:
    """Register :func:`sdpa_fast_dropout` and :func:`sdpa_torch_dropout` with Hugging Face
    (attention and SDPA-style masks) as ``"sparsebert_sdpa"`` and
    ``"sparsebert_sdpa_torch_dropout"``; returns the name of the one ``fast_dropout`` asks for."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        for name, fn in ((ATTENTION_NAME, sdpa_fast_dropout), (ATTENTION_NAME_TORCH_DROPOUT, sdpa_torch_dropout)):
            AttentionInterface.register(name, fn)
            AttentionMaskInterface.register(name, sdpa_mask)
        _registered = True
    return ATTENTION_NAME if fast_dropout else ATTENTION_NAME_TORCH_DROPOUT
