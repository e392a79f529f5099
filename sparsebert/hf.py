"""One call to turn a model's linears (Hugging Face BERT by default) sparse, and back.

Pruning picks what to keep (``sparsebert.pruning``); this module swaps layers so the kept
structure turns into speed: ``nn.Linear`` -> :class:`BlockSparseLinear` (mode ``"block"``) or
:class:`MaskedLinear` (mode ``"unstructured"``, the paper's setting).
"""
from __future__ import annotations

import re
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .layout import _as_block
from .nn import BlockSparseLinear, MaskedEmbedding, MaskedLinear
from .pruning.scores import block_scores, element_scores, global_masks, keep_count, topk_mask

# The paper's pruned matrices: Q, K, V, attention output, intermediate, output, pooler.
BERT_LINEAR_TARGETS = (
    r"(^|\.)attention\.self\.(query|key|value)$",
    r"(^|\.)attention\.output\.dense$",
    r"(^|\.)intermediate\.dense$",
    r"(^|\.)layer\.\d+\.output\.dense$",
    r"(^|\.)pooler\.dense$",
)
WORD_EMBEDDINGS = r"(^|\.)embeddings\.word_embeddings$"

Targets = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]


def _matcher(targets: Targets) -> Callable[[str, nn.Module], bool]:
    if callable(targets):
        return targets
    patterns = BERT_LINEAR_TARGETS if targets is None else ([targets] if isinstance(targets, str) else list(targets))
    compiled = [re.compile(p) for p in patterns]
    return lambda name, mod: any(p.search(name) for p in compiled)


def find_targets(model: nn.Module, targets: Targets = None) -> List[Tuple[str, nn.Linear]]:
    """``(name, module)`` of the plain ``nn.Linear`` layers selected by ``targets``.

    ``targets``: None (BERT's Q, K, V, attention output, intermediate, output, pooler), regex
    patterns matched against module names, or a predicate ``(name, module) -> bool``.
    """
    match = _matcher(targets)
    found = [(n, m) for n, m in model.named_modules()
             if type(m) is nn.Linear and match(n, m)]
    if not found:
        raise ValueError(f"no nn.Linear layer of {type(model).__name__} matches targets={targets!r}")
    return found


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _tied_decoders(model: nn.Module, emb: nn.Module) -> List[Tuple[str, nn.Linear]]:
    """Linears sharing the word-embedding weight (an MLM head's tied decoder)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight is emb.weight]


# ---- activation fusion ------------------------------------------------------------------------
# Hugging Face's BERT-style intermediate block is `act(dense(x))`: with `dense` block-sparse, the
# GELU can run in the kernel's epilogue (one pass over the [tokens, 4 x hidden] output saved).
class FusedActivation(nn.Module):
    """Identity, standing where an activation now runs inside the preceding sparse layer
    (``into``); keeps the original module so :func:`unfuse_activations` can put it back."""

    def __init__(self, original: nn.Module, into: str):
        super().__init__()
        self.original = original
        self.into = into

    def forward(self, x):
        return x

    def extra_repr(self):
        return f"fused into {self.into!r}"


def _is_exact_gelu(act) -> bool:
    """nn.GELU() or transformers' GELUActivation ("gelu"): the erf form, which the kernels compute.
    The tanh approximations ("gelu_new", GELU(approximate="tanh")) are left alone."""
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    if type(act).__name__ == "GELUActivation":
        fn = getattr(act, "act", None)
        return fn is nn.functional.gelu or getattr(fn, "__name__", "") == "_gelu_python"
    return False


def fuse_activations(model: nn.Module, names: Optional[Sequence[str]] = None) -> List[str]:
    """Fuse the exact GELU of every BERT-style intermediate block (a module with a ``dense``
    :class:`BlockSparseLinear` and an ``intermediate_act_fn``) into that layer, in place.

    Returns the names of the sparse layers that now apply the GELU. ``names`` restricts it to those
    layers (and then each must be fusable). Outputs are unchanged: under autograd the layer applies
    the GELU as a separate op, without autograd inside its kernel where the backend can.
    """
    fused = []
    want = None if names is None else set(names)
    for parent_name, parent in model.named_modules():
        dense, act = getattr(parent, "dense", None), getattr(parent, "intermediate_act_fn", None)
        name = f"{parent_name}.dense" if parent_name else "dense"
        if want is not None and name not in want:
            continue
        if not isinstance(dense, BlockSparseLinear) or not _is_exact_gelu(act):
            if want is not None:
                raise ValueError(f"{name}: not a block-sparse layer followed by an exact GELU "
                                 f"(intermediate_act_fn={act!r})")
            continue
        dense.activation = "gelu"
        parent.intermediate_act_fn = FusedActivation(act, into="dense")
        fused.append(name)
    if want is not None and set(fused) != want:
        raise ValueError(f"no BERT-style intermediate block holds {sorted(want - set(fused))}")
    return fused


def unfuse_activations(model: nn.Module) -> None:
    """Undo :func:`fuse_activations`: the activation modules go back in place, in place."""
    for parent_name, parent in model.named_modules():
        act = getattr(parent, "intermediate_act_fn", None)
        if isinstance(act, FusedActivation):
            layer = getattr(parent, act.into)
            if isinstance(layer, BlockSparseLinear):
                layer.activation = "none"
            parent.intermediate_act_fn = act.original


def sparsify(model: nn.Module, sparsity: float, block=(32, 32), mode: str = "block",
             scope: str = "layer", targets: Targets = None, score: str = "magnitude",
             seed: int = 0, backend: str = "auto", embeddings: Optional[bool] = None,
             fuse_activation: bool = True) -> nn.Module:
    """Prune ``model`` by magnitude and swap its target linears for sparse layers, in place.

    Args:
        sparsity: fraction of weights to remove, in ``[0, 1]``; per layer it is rounded to whole
            blocks (mode ``"block"``) or weights; with ``scope="global"`` one threshold is used
            across layers and the total is exact to within one block.
        block: ``(bn, bk)`` or an int; must divide every target weight (mode ``"block"``).
        mode: ``"block"`` -> :class:`BlockSparseLinear` (fast); ``"unstructured"`` ->
            :class:`MaskedLinear` (the paper's exact setting) and, by default, the word
            embeddings -> :class:`MaskedEmbedding` (a tied MLM decoder shares their mask).
        scope: ``"layer"`` (the paper) or ``"global"``.
        targets: which linears (see :func:`find_targets`).
        score: ``"magnitude"`` or ``"random"`` (the paper's control).
        embeddings: prune the word embeddings too (default: True in unstructured mode).
        fuse_activation: in block mode, run BERT's intermediate GELU inside the sparse layer's
            kernel (:func:`fuse_activations`; same outputs, one pass over the activations saved).
    Returns:
        the same ``model``.
    """
    if mode not in ("block", "unstructured"):
        raise ValueError(f"mode must be 'block' or 'unstructured', got {mode!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    gen = torch.Generator().manual_seed(seed)
    layers: List[Tuple[str, nn.Module]] = list(find_targets(model, targets))
    if embeddings is None:
        embeddings = mode == "unstructured" and targets is None
    if embeddings:
        if mode == "block":
            raise ValueError("word embeddings can only be pruned in unstructured mode")
        layers += [(n, m) for n, m in model.named_modules()
                   if type(m) is nn.Embedding and re.search(WORD_EMBEDDINGS, n)]

    if mode == "block":
        bn, bk = _as_block(block)
        for name, m in layers:
            N, K = m.weight.shape
            if N % bn or K % bk:
                raise ValueError(f"block ({bn}, {bk}) does not divide {name}'s weight ({N}, {K})")
        scores = [block_scores(m.weight, (bn, bk), score, gen) for _, m in layers]
        unit = [bn * bk] * len(layers)
    else:
        scores = [element_scores(m.weight, score, gen) for _, m in layers]
        unit = [1] * len(layers)

    if scope == "global":
        masks = global_masks(scores, sparsity, weights=unit)
    else:
        masks = [topk_mask(s, keep_count(s.numel(), sparsity)) for s in scores]

    for (name, m), mask in zip(layers, masks):
        if mode == "block":
            new = BlockSparseLinear.from_dense(m, mask=mask, block=block, backend=backend)
        elif isinstance(m, nn.Embedding):
            new = MaskedEmbedding.from_dense(m, mask=mask)
            for dec_name, dec in _tied_decoders(model, m):
                tied = MaskedLinear.from_dense(dec, mask=mask)
                tied.mask = new.mask          # one mask buffer for the tied pair
                _set_module(model, dec_name, tied)
        else:
            new = MaskedLinear.from_dense(m, mask=mask)
        _set_module(model, name, new)
    if mode == "block" and fuse_activation:
        fuse_activations(model)
    return model


def densify(model: nn.Module) -> nn.Module:
    """Turn every sparse layer back into ``nn.Linear``/``nn.Embedding``, in place.

    Pruned weights are exactly zero and, from here on, free to change (the paper's
    "information deletion" control). Weight ties are kept; fused activations are unfused.
    """
    unfuse_activations(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, (MaskedLinear, MaskedEmbedding, BlockSparseLinear)):
            _set_module(model, name, m.to_dense())
    return model


def sparse_layers(model: nn.Module):
    """``(name, module)`` of every sparse layer in ``model``."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (MaskedLinear, MaskedEmbedding, BlockSparseLinear))]


def kept_table(model: nn.Module) -> List[Tuple[str, str, Tuple[int, int], float]]:
    """``(name, kind, shape, kept fraction)`` per sparse layer."""
    return [(n, type(m).__name__, m.layout.shape if isinstance(m, BlockSparseLinear) else tuple(m.weight.shape),
             float(m.density)) for n, m in sparse_layers(model)]
