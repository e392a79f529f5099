"""Layers: the paper's masked layers and the compact block-sparse linear.

* :class:`MaskedLinear` / :class:`MaskedEmbedding` — dense weight times a fixed boolean mask
  (the paper's unstructured setting: exact, no speedup).
* :class:`BlockSparseLinear` — only the kept ``[bn, bk]`` blocks are stored and trained, so
  weights, gradients and optimizer state scale with the kept fraction.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layout import BlockLayout, _as_block
from .ops import bsr_linear
from .ops.bsr_linear import ACTIVATIONS
from .pruning.scores import block_scores, element_scores, keep_count, topk_mask


def _check_mask(mask, shape, what: str) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what} mask has shape {tuple(mask.shape)}, weight has {tuple(shape)}")
    return mask.to(torch.bool)


def _magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    return topk_mask(element_scores(weight), keep_count(weight.numel(), sparsity))


def _resolve_mask(weight: torch.Tensor, sparsity, mask, what: str) -> torch.Tensor:
    """The boolean mask for ``from_dense``: given, or by magnitude at ``sparsity`` (exactly one)."""
    if (sparsity is None) == (mask is None):
        raise ValueError("give exactly one of sparsity= or mask=")
    if mask is None:
        mask = _magnitude_mask(weight, sparsity)
    return _check_mask(mask, weight.shape, what)


_LINEAR_ATTRS = ("in_features", "out_features", "weight", "bias")
_EMBEDDING_ATTRS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                    "scale_grad_by_freq", "sparse", "weight")


def _sharing(cls, src: nn.Module, attrs) -> nn.Module:
    """A ``cls`` module (not initialised: no new Parameters) that shares ``attrs`` with ``src``."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for attr in attrs:
        setattr(module, attr, getattr(src, attr))
    return module


class _MaskedMixin:
    """Shared by the masked layers: a boolean ``mask`` buffer applied in the forward."""

    def _init_mask(self, mask: torch.Tensor) -> None:
        self.register_buffer("mask", mask.to(device=self.weight.device, dtype=torch.bool))
        self.apply_mask_()

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero the pruned weights in place (they then stay zero: their gradient is zero)."""
        self.weight.mul_(self.mask)

    @torch.no_grad()
    def set_mask(self, mask) -> None:
        self.mask.copy_(_check_mask(mask, self.weight.shape, type(self).__name__))
        self.apply_mask_()

    @property
    def density(self) -> float:
        return float(self.mask.float().mean())

    def masked_weight(self) -> torch.Tensor:
        # where, not weight * mask: the product first widens the bool mask to the weight's dtype
        # (a second full-size pass; 20% slower on a 30522 x 384 table, measured).
        return torch.where(self.mask, self.weight, 0.0)


class MaskedLinear(nn.Linear, _MaskedMixin):
    """``nn.Linear`` whose weight is multiplied by a fixed boolean mask in every forward."""

    def __init__(self, in_features, out_features, bias=True, mask=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        mask = torch.ones(out_features, in_features, dtype=torch.bool) if mask is None else mask
        self._init_mask(_check_mask(mask, self.weight.shape, "MaskedLinear"))

    @classmethod
    def from_dense(cls, linear: nn.Linear, sparsity: Optional[float] = None, mask=None) -> "MaskedLinear":
        """Wrap ``linear`` (sharing its parameters), pruned by magnitude to ``sparsity`` or to ``mask``."""
        mask = _resolve_mask(linear.weight, sparsity, mask, "MaskedLinear")
        layer = _sharing(cls, linear, _LINEAR_ATTRS)
        layer._init_mask(mask)
        return layer

    def forward(self, x):
        return F.linear(x, self.masked_weight(), self.bias)

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the pruned weights zero (free to regrow from here on).

        It shares this layer's Parameters, so weight ties and optimizer references survive."""
        self.apply_mask_()
        return _sharing(nn.Linear, self, _LINEAR_ATTRS)

    def extra_repr(self):
        return super().extra_repr() + f", density={self.density:.3f}"


class MaskedEmbedding(nn.Embedding, _MaskedMixin):
    """``nn.Embedding`` whose table is multiplied by a fixed boolean mask."""

    @classmethod
    def from_dense(cls, emb: nn.Embedding, sparsity: Optional[float] = None, mask=None) -> "MaskedEmbedding":
        """Wrap ``emb`` (sharing its table), pruned by magnitude to ``sparsity`` or to ``mask``."""
        mask = _resolve_mask(emb.weight, sparsity, mask, "MaskedEmbedding")
        layer = _sharing(cls, emb, _EMBEDDING_ATTRS)
        layer._init_mask(mask)
        return layer

    def forward(self, ids):
        if self.max_norm is not None:   # renormalises rows in place: mask the table first
            return F.embedding(ids, self.masked_weight(), self.padding_idx, self.max_norm,
                               self.norm_type, self.scale_grad_by_freq, self.sparse)
        # Mask only the looked-up rows: the same values and gradients as embedding the masked
        # table, without a pass over the whole table (30522 x 768 for BERT) every step.
        rows = F.embedding(ids, self.weight, self.padding_idx, None, 2.0,
                           self.scale_grad_by_freq, self.sparse)
        return torch.where(self.mask[ids], rows, 0.0)

    def to_dense(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` sharing this layer's (masked, zeroed) weight Parameter."""
        self.apply_mask_()
        return _sharing(nn.Embedding, self, _EMBEDDING_ATTRS)

    def extra_repr(self):
        return super().extra_repr() + f", density={self.density:.3f}"


class BlockSparseLinear(nn.Module):
    """A linear layer storing only its kept ``[bn, bk]`` weight blocks.

    ``values`` (the only weight parameter) is ``[nnz, bn, bk]`` in the layout's row-major block
    order, so gradients and optimizer state scale with the kept fraction. The forward calls
    :func:`sparsebert.ops.bsr_linear` with ``backend`` ("auto" picks the fastest, dense included).
    ``activation="gelu"`` makes the layer compute ``gelu(x Wᵀ + b)``, fused into the kernel's
    epilogue where the backend can (inference); :func:`sparsebert.sparsify` sets it on BERT's
    intermediate layers (see :func:`sparsebert.hf.fuse_activations`).
    """

    def __init__(self, layout: BlockLayout, bias: bool = True, backend: str = "auto",
                 device=None, dtype=None, activation: str = "none"):
        super().__init__()
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.out_features, self.in_features = layout.shape
        self.layout = layout
        self.backend = backend
        self.activation = activation
        bn, bk = layout.block
        self.values = nn.Parameter(torch.empty(layout.nnz, bn, bk, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype)) if bias else None
        with torch.no_grad():
            bound = 1.0 / max(1, self.in_features) ** 0.5
            self.values.uniform_(-bound, bound)

    @classmethod
    def from_dense(cls, linear: nn.Linear, sparsity: Optional[float] = None, block=(32, 32),
                   mask=None, backend: str = "auto", score: str = "magnitude",
                   generator: Optional[torch.Generator] = None) -> "BlockSparseLinear":
        """Convert ``linear``: keep blocks by L2 norm at ``sparsity`` (rounded to whole blocks),
        or as given by ``mask`` — a boolean block mask ``[N // bn, K // bk]``, an element mask
        ``[N, K]`` constant on blocks, or a :class:`BlockLayout`."""
        if (sparsity is None) == (mask is None):
            raise ValueError("give exactly one of sparsity= or mask=")
        bn, bk = _as_block(block)
        N, K = linear.weight.shape
        if isinstance(mask, BlockLayout):
            layout = mask
            if layout.shape != (N, K):
                raise ValueError(f"layout shape {layout.shape} does not match the weight ({N}, {K})")
        elif mask is not None:
            mask = torch.as_tensor(mask)
            if tuple(mask.shape) == (N, K):
                layout = BlockLayout.from_element_mask(mask, (bn, bk))
            else:
                layout = BlockLayout.from_mask(mask, (bn, bk), (N, K))
        else:
            scores = block_scores(linear.weight, (bn, bk), score, generator)
            layout = BlockLayout.from_mask(topk_mask(scores, keep_count(scores.numel(), sparsity)),
                                           (bn, bk), (N, K))
        w = linear.weight.detach()
        layer = cls(layout, bias=linear.bias is not None, backend=backend,
                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.values.copy_(layout.gather(w))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @property
    def block(self):
        return self.layout.block

    @property
    def density(self) -> float:
        return self.layout.density

    def dense_weight(self) -> torch.Tensor:
        """The ``[N, K]`` weight with zeros in pruned blocks (differentiable)."""
        return self.layout.scatter(self.values)

    def forward(self, x):
        return bsr_linear(x, self.values, self.layout, self.bias, backend=self.backend,
                          activation=self.activation)

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (zeros in pruned blocks). A fused activation is not part of
        it: :func:`sparsebert.densify` puts the model's activation module back first."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    @torch.no_grad()
    def set_layout(self, layout: BlockLayout, optimizer: Optional[torch.optim.Optimizer] = None) -> torch.Tensor:
        """Shrink to ``layout`` (a sub-layout: blocks are only ever removed).

        ``values`` becomes a new, smaller Parameter holding the kept blocks (a new object, so an
        autograd graph still alive from the last step cannot clash with the new shape). Pass the
        optimizer: the new Parameter takes the old one's place in its param groups, and its
        per-parameter state (AdamW's moments) is gathered the same way, so training continues as
        if the dropped blocks never existed. Returns the indices (into the old values) kept.
        """
        keep = self.layout.positions_in(layout)
        old = self.values
        idx = keep.to(old.device)
        new = nn.Parameter(old.detach().index_select(0, idx).contiguous(), requires_grad=old.requires_grad)
        if old.grad is not None:
            new.grad = old.grad.index_select(0, idx).contiguous()
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [new if p is old else p for p in group["params"]]
            state = optimizer.state.pop(old, None)
            if state:
                optimizer.state[new] = {
                    k: v.index_select(0, idx.to(v.device)).contiguous()
                    if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == old.shape[0] else v
                    for k, v in state.items()}
        self.values = new
        self.layout = layout
        return keep

    def extra_repr(self):
        bn, bk = self.layout.block
        return (f"in_features={self.in_features}, out_features={self.out_features}, block=({bn}, {bk}), "
                f"kept={self.layout.nnz}/{self.layout.grid[0] * self.layout.grid[1]} "
                f"({self.density:.3f}), bias={self.bias is not None}, backend={self.backend!r}"
                + (f", activation={self.activation!r}" if self.activation != "none" else ""))

    # The layout is part of the state: saved as a block mask next to the values.
    def get_extra_state(self):
        return {"block_mask": self.layout.block_mask, "shape": self.layout.shape, "block": self.layout.block}

    def set_extra_state(self, state):
        layout = BlockLayout.from_mask(state["block_mask"], tuple(state["block"]), tuple(state["shape"]))
        if layout.nnz != self.values.shape[0]:
            raise ValueError(f"state's layout keeps {layout.nnz} blocks but values has {self.values.shape[0]}")
        self.layout = layout
