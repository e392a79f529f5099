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


_SPARSE_LAYERS = (MaskedLinear, MaskedEmbedding, BlockSparseLinear)


def _matcher(targets: Targets) -> Callable[[str, nn.Module], bool]:
    if callable(targets):
        return targets
    if targets is None:
        patterns = BERT_LINEAR_TARGETS
    elif isinstance(targets, str):
        patterns = [targets]
    elif isinstance(targets, (list, tuple)):
        patterns = list(targets)
    else:
        raise ValueError(f"targets must be None, a regex, a list of regexes or a predicate "
                         f"(name, module) -> bool, got {targets!r}")
    compiled = []
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"targets pattern {p!r} is not a string (regexes are matched against module names)")
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"targets pattern {p!r} is not a valid regular expression: {e}") from None
    return lambda name, mod: any(p.search(name) for p in compiled)


def find_targets(model: nn.Module, targets: Targets = None) -> List[Tuple[str, nn.Linear]]:
    """``(name, module)`` of the plain ``nn.Linear`` layers selected by ``targets``.

    ``targets``: None (BERT's Q, K, V, attention output, intermediate, output, pooler; a bare
    ``nn.Linear`` given as the model is its own target), regex patterns searched in module names
    (an invalid one is a ``ValueError`` naming it), or a predicate ``(name, module) -> bool``.
    Raises ``ValueError`` when nothing matches, and when a target is already a sparse layer
    (``sparsify`` converts plain layers only: prune further with a
    :class:`~sparsebert.pruning.Pruner`, or :func:`densify` first).
    """
    match = _matcher(targets)
    found, sparse = [], []
    for n, m in model.named_modules():
        if type(m) is nn.Linear:
            if (n == "" and targets is None) or match(n, m):
                found.append((n, m))
        elif isinstance(m, _SPARSE_LAYERS):
            try:        # a predicate written for nn.Linear may not expect a sparse layer
                hit = (n == "" and targets is None) or match(n, m)
            except Exception:
                hit = False
            if hit:
                sparse.append((n, m))
    if sparse:
        n, m = sparse[0]
        more = f" (and {len(sparse) - 1} more)" if len(sparse) > 1 else ""
        raise ValueError(f"{type(model).__name__} is already sparse: {n or 'the model'!s} is a "
                         f"{type(m).__name__}{more}; sparsify converts plain nn.Linear layers only "
                         "(prune further with sparsebert.pruning.Pruner, or sparsebert.densify first)")
    if not found:
        raise ValueError(f"no nn.Linear layer of {type(model).__name__} matches targets={targets!r}")
    return found


def _module_paths(model: nn.Module):
    """``id(module) -> [names]``: every place a module is registered (a module may sit at several)."""
    paths = {}
    for n, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(n)
    return paths


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _replace(model: nn.Module, paths, old: nn.Module, new: nn.Module) -> bool:
    """Put ``new`` wherever ``old`` is registered; True when ``old`` is ``model`` itself (the
    caller then returns ``new``: a module cannot change class in place)."""
    for name in paths.get(id(old), []):
        if name:
            _set_module(model, name, new)
    return old is model


def _param_users(model: nn.Module):
    """``id(Parameter) -> [(module name, attribute, module)]`` for every registration of it."""
    users = {}
    for n, m in model.named_modules(remove_duplicate=False):
        for attr, p in m._parameters.items():
            if p is not None:
                users.setdefault(id(p), []).append((n, attr, m))
    return users


def _qual(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def _tied_group(name: str, m: nn.Module, users, embeddings: Optional[bool]) -> List[nn.Module]:
    """The modules sharing ``m``'s weight Parameter (``m`` first), for unstructured mode: one mask
    prunes the one tensor in all of them. Refuses a sharer that cannot be masked."""
    group = [m]
    for n, attr, u in users.get(id(m.weight), []):
        if any(u is g for g in group):
            continue
        what = f"{_qual(name, 'weight')} is tied to {_qual(n, attr)}"
        if isinstance(u, _SPARSE_LAYERS):
            raise ValueError(f"{what}, which is already a {type(u).__name__}: sparsify a model once "
                             "(densify it first to start over)")
        if attr != "weight" or type(u) not in (nn.Linear, nn.Embedding):
            raise ValueError(f"{what} ({type(u).__name__}), which cannot be masked: untie them or "
                             f"leave {name} out of targets")
        if type(u) is nn.Embedding and embeddings is False:
            raise ValueError(f"{what}, an embedding that embeddings=False keeps dense: pruning one "
                             "tensor in one place only is not possible; leave embeddings at its default "
                             f"(the tied pair is pruned together), or leave {name} out of targets")
        group.append(u)
    return group


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
        block: ``(bn, bk)`` or an int (positive ints only); must divide every target weight
            (mode ``"block"``).
        mode: ``"block"`` -> :class:`BlockSparseLinear` (fast); ``"unstructured"`` ->
            :class:`MaskedLinear` (the paper's exact setting) and, by default, the word
            embeddings -> :class:`MaskedEmbedding` (a tied MLM decoder shares their mask).
        scope: ``"layer"`` (the paper) or ``"global"``.
        targets: which linears (see :func:`find_targets`). Already sparse layers are refused.
        score: ``"magnitude"`` or ``"random"`` (the paper's control).
        embeddings: prune the word embeddings too (default: True in unstructured mode with the
            default targets).
        fuse_activation: in block mode, run BERT's intermediate GELU inside the sparse layer's
            kernel (:func:`fuse_activations`; same outputs, one pass over the activations saved).

    Tied weights (one Parameter used by several modules, like an MLM decoder tied to the word
    embeddings) stay tied. In unstructured mode a tied weight is one tensor pruned once: one mask
    (scored once, counted once by ``scope="global"``), shared by every module using it, each of
    which becomes a masked layer and applies it in its forward — so a targeted tied decoder also
    masks the embedding lookup and nothing regrows through it (refused with ``embeddings=False``).
    Block mode refuses a target whose weight is tied: a :class:`BlockSparseLinear` stores its own
    copy of the kept blocks, which would silently untie it. Biases are kept as they are (the same
    Parameter, so bias ties and ``requires_grad`` survive), and so is ``requires_grad`` of every
    weight (a frozen layer stays frozen).

    Returns:
        the same ``model`` — or, when ``model`` is itself an ``nn.Linear`` (which cannot change
        class in place), the new sparse layer.
    """
    if mode not in ("block", "unstructured"):
        raise ValueError(f"mode must be 'block' or 'unstructured', got {mode!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if mode == "block":
        bn, bk = _as_block(block)
    gen = torch.Generator().manual_seed(seed)
    layers: List[Tuple[str, nn.Module]] = list(find_targets(model, targets))
    prune_embeddings = mode == "unstructured" and targets is None if embeddings is None else embeddings
    if prune_embeddings:
        if mode == "block":
            raise ValueError("word embeddings can only be pruned in unstructured mode")
        layers += [(n, m) for n, m in model.named_modules()
                   if type(m) is nn.Embedding and re.search(WORD_EMBEDDINGS, n)]
    users = _param_users(model)

    if mode == "block":
        for name, m in layers:
            tied = [_qual(n, a) for n, a, u in users.get(id(m.weight), []) if u is not m]
            if tied:
                raise ValueError(
                    f"{_qual(name, 'weight')} is tied to {tied[0]} (one Parameter): block mode would "
                    "untie it, since a BlockSparseLinear stores its own copy of the kept blocks; leave "
                    f"{name} out of targets, or use mode='unstructured' (which prunes a tied weight "
                    "once, for all its users)")
            N, K = m.weight.shape
            if N % bn or K % bk:
                raise ValueError(f"block ({bn}, {bk}) does not divide {name}'s weight ({N}, {K})")
        groups = [[m] for _, m in layers]
        scores = [block_scores(m.weight, (bn, bk), score, gen) for _, m in layers]
        unit = [bn * bk] * len(layers)
    else:
        # One unit per weight tensor: a tied decoder and the embeddings it shares are one unit.
        units, groups, seen = [], [], set()
        for name, m in layers:
            if id(m.weight) in seen:
                continue
            seen.add(id(m.weight))
            units.append((name, m))
            groups.append(_tied_group(name, m, users, embeddings))
        layers = units
        scores = [element_scores(m.weight, score, gen) for _, m in layers]
        unit = [1] * len(layers)

    if scope == "global":
        masks = global_masks(scores, sparsity, weights=unit)
    else:
        masks = [topk_mask(s, keep_count(s.numel(), sparsity)) for s in scores]

    paths = _module_paths(model)
    root = model
    for (name, m), group, mask in zip(layers, groups, masks):
        if mode == "block":
            new = BlockSparseLinear.from_dense(m, mask=mask, block=(bn, bk), backend=backend)
            if m.bias is not None:
                new.bias = m.bias            # the same Parameter: bias ties, optimizer references
            if _replace(model, paths, m, new):
                root = new
            continue
        shared = None
        for u in group:
            cls = MaskedEmbedding if isinstance(u, nn.Embedding) else MaskedLinear
            new = cls.from_dense(u, mask=mask)
            if shared is None:
                shared = new.mask
            else:
                new.mask = shared            # one mask buffer for the tied group
            if _replace(model, paths, u, new):
                root = new
    if mode == "block" and fuse_activation:
        fuse_activations(root)
    return root


def densify(model: nn.Module) -> nn.Module:
    """Turn every sparse layer back into ``nn.Linear``/``nn.Embedding``, in place.

    Pruned weights are exactly zero and, from here on, free to change (the paper's
    "information deletion" control). Weight ties are kept; fused activations are unfused.
    Returns ``model`` — or, when ``model`` is itself a sparse layer, the new dense layer.
    """
    unfuse_activations(model)
    paths = _module_paths(model)
    root = model
    for m in [m for _, m in model.named_modules() if isinstance(m, _SPARSE_LAYERS)]:
        new = m.to_dense()
        if _replace(model, paths, m, new):
            root = new
    return root


def sparse_layers(model: nn.Module):
    """``(name, module)`` of every sparse layer in ``model``."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (MaskedLinear, MaskedEmbedding, BlockSparseLinear))]


def kept_table(model: nn.Module) -> List[Tuple[str, str, Tuple[int, int], float]]:
    """``(name, kind, shape, kept fraction)`` per sparse layer."""
    return [(n, type(m).__name__, m.layout.shape if isinstance(m, BlockSparseLinear) else tuple(m.weight.shape),
             float(m.density)) for n, m in sparse_layers(model)]
