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

from .config import SparsityConfig
from .layout import BlockLayout, _as_block
from .nn import BlockSparseLinear, MaskedEmbedding, MaskedLinear, note_replaced
from .ops.backends import check_name as check_backend_name
from .ops.backends import saved_name as saved_backend
from .pruning.scores import block_scores, check_sparsity, element_scores, global_masks, keep_count, topk_mask

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


def keep_template_params(old: nn.Module, new: BlockSparseLinear) -> None:
    """A checkpoint's block-sparse layer ``new`` replacing the template's ``old`` keeps what
    :func:`sparsify` keeps: ``old``'s bias Parameter itself (so bias ties and optimizer
    references survive; the load then fills it) and the weight's ``requires_grad`` (a frozen
    layer stays frozen)."""
    ref = old.weight if isinstance(old, nn.Linear) else old.values
    new.values.requires_grad_(ref.requires_grad)
    b = getattr(old, "bias", None)
    if new.bias is not None and isinstance(b, nn.Parameter) and b.shape == new.bias.shape \
            and b.dtype == new.bias.dtype and b.device == new.bias.device:
        new.bias = b


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
    _record(model)
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
    _record(model)


def sparsify(model: nn.Module, sparsity: Union[float, SparsityConfig], block=(32, 32), mode: str = "block",
             scope: str = "layer", targets: Targets = None, score: str = "magnitude",
             seed: int = 0, backend: str = "auto", embeddings: Optional[bool] = None,
             fuse_activation: bool = True) -> nn.Module:
    """Prune ``model`` by magnitude and swap its target linears for sparse layers, in place.

    ``sparsify(model, config)`` with a :class:`~sparsebert.SparsityConfig` does the same with the
    config's fields (one shot, at ``config.sparsity``; its ``schedule`` is for
    :class:`~sparsebert.hf.PruningCallback`); the other arguments must then be left out. The
    setup (the config, or one built from the arguments) is recorded on the model and saved into
    every checkpoint folder (:func:`get_sparsity_config`).

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
    if isinstance(sparsity, SparsityConfig):
        config = sparsity
        given = {k: v for k, v in (("block", block), ("mode", mode), ("scope", scope), ("targets", targets),
                                  ("score", score), ("seed", seed), ("backend", backend),
                                  ("embeddings", embeddings), ("fuse_activation", fuse_activation))
                 if v != _SPARSIFY_DEFAULTS[k]}
        if given:
            raise ValueError(f"sparsify(model, config): give the setup in the config, not also as "
                             f"arguments ({', '.join(sorted(given))})")
        kw = config.sparsify_kwargs()
        sparsity, block, mode, scope, targets = kw["sparsity"], kw["block"], kw["mode"], kw["scope"], kw["targets"]
        score, seed, backend, embeddings = kw["score"], kw["seed"], kw["backend"], kw["embeddings"]
        fuse_activation = kw["fuse_activation"]
    else:
        config = None
    if mode not in ("block", "unstructured"):
        raise ValueError(f"mode must be 'block' or 'unstructured', got {mode!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    sparsity = check_sparsity(sparsity)
    check_backend_name(backend)      # in every mode: the sparsity config records it
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
    meta = [name for name, m in layers if m.weight.is_meta]
    if meta:
        # no data to score or to copy into the sparse layers
        raise ValueError(f"{meta[0]} has its weights on the meta device (no data): load or "
                         "materialise the model (e.g. from_pretrained, to_empty) before sparsify")
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
            note_replaced(m.weight, _qual(name, "weight"), f"the 'values' of a BlockSparseLinear")
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
    if config is None and not callable(targets):
        try:
            config = SparsityConfig(mode=mode, sparsity=float(sparsity), block=block if mode == "block" else (32, 32),
                                    scope=scope, targets=list(targets) if isinstance(targets, (list, tuple)) else targets,
                                    score=score, embeddings=embeddings, fuse_activation=fuse_activation,
                                    seed=seed, backend=backend)
        except ValueError:
            config = None
    set_sparsity_config(root, config)
    if mode == "block" and fuse_activation:
        fuse_activations(root)
    _record(root)
    return root


_SPARSIFY_DEFAULTS = {"block": (32, 32), "mode": "block", "scope": "layer", "targets": None,
                      "score": "magnitude", "seed": 0, "backend": "auto", "embeddings": None,
                      "fuse_activation": True}


def densify(model: nn.Module) -> nn.Module:
    """Turn every sparse layer back into ``nn.Linear``/``nn.Embedding``, in place.

    Pruned weights are exactly zero and, from here on, free to change (the paper's
    "information deletion" control). Weight ties are kept; fused activations are unfused.
    Returns ``model`` — or, when ``model`` is itself a sparse layer, the new dense layer.
    """
    unfuse_activations(model)
    paths = _module_paths(model)
    root = model
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, _SPARSE_LAYERS)]:
        new = m.to_dense()
        if isinstance(m, BlockSparseLinear):
            # as sparsify did the other way: the bias Parameter itself (ties, optimizer
            # references) and the weight's requires_grad (a frozen layer stays frozen)
            new.weight.requires_grad_(m.values.requires_grad)
            if m.bias is not None:
                new.bias = m.bias
            note_replaced(m.values, _qual(name, "values"), "the weight of an nn.Linear (densify)")
        if _replace(model, paths, m, new):
            root = new
    set_sparsity_config(root, None)
    _record(root)
    return root


def sparse_layers(model: nn.Module):
    """``(name, module)`` of every sparse layer in ``model``."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (MaskedLinear, MaskedEmbedding, BlockSparseLinear))]


def kept_table(model: nn.Module) -> List[Tuple[str, str, Tuple[int, int], float]]:
    """``(name, kind, shape, kept fraction)`` per sparse layer."""
    return [(n, type(m).__name__, m.layout.shape if isinstance(m, BlockSparseLinear) else tuple(m.weight.shape),
             float(m.density)) for n, m in sparse_layers(model)]


# ---- the setup a model was sparsified with, and the Hugging Face folder format ---------------------
HF_KEY = "sparsebert"          # the key of config.json that describes the sparse layers
HF_FORMAT = "sparsebert-hf"
HF_VERSION = 1


def get_sparsity_config(model: nn.Module) -> Optional[SparsityConfig]:
    """The :class:`~sparsebert.SparsityConfig` ``model`` was sparsified (or loaded) with, if any."""
    cfg = getattr(model, "_sparsebert_config", None)
    if cfg is not None:
        return cfg
    info = getattr(getattr(model, "config", None), HF_KEY, None)
    if isinstance(info, dict) and isinstance(info.get("sparsity_config"), dict):
        return SparsityConfig.from_dict(info["sparsity_config"])
    return None


def set_sparsity_config(model: nn.Module, config: Optional[SparsityConfig]) -> None:
    """Record ``config`` as ``model``'s setup (saved into its checkpoints)."""
    if config is not None and not isinstance(config, SparsityConfig):
        raise TypeError(f"expected a SparsityConfig, got {type(config).__name__}")
    if isinstance(model, nn.Module):
        object.__setattr__(model, "_sparsebert_config", config)
    _record(model)


def describe(model: nn.Module) -> Optional[dict]:
    """What ``config.json`` records under ``"sparsebert"``: the format, the setup and, per sparse
    layer, what its state dict does not hold (its kind, block size, backend and fused activation;
    the masks themselves are tensors of the state dict). None for a model without sparse layers."""
    layers = {}
    for name, m in sparse_layers(model):
        if isinstance(m, BlockSparseLinear):
            layers[name] = {"kind": "block", "block": list(m.layout.block), "backend": m.backend,
                            "activation": m.activation}
        else:
            layers[name] = {"kind": "masked_embedding" if isinstance(m, MaskedEmbedding) else "masked_linear"}
    if not layers:
        return None
    cfg = getattr(model, "_sparsebert_config", None)
    return {"format": HF_FORMAT, "version": HF_VERSION,
            "sparsity_config": cfg.to_dict() if cfg is not None else None, "layers": layers}


def _record(model: nn.Module) -> None:
    """Keep ``model.config.sparsebert`` (what save_pretrained writes into config.json) current."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    info = describe(model)
    if info is None:
        if hasattr(config, HF_KEY):
            delattr(config, HF_KEY)
    else:
        setattr(config, HF_KEY, info)


def read_sparsity_config(path) -> Optional[SparsityConfig]:
    """The SparsityConfig recorded in a checkpoint folder (``save_pretrained`` or ``save_sparse``)."""
    import json
    import os
    path = os.fspath(path)
    for file, key in (("sparsebert.json", "sparsity_config"), ("config.json", HF_KEY)):
        f = os.path.join(path, file)
        if os.path.isfile(f):
            with open(f) as fh:
                d = json.load(fh)
            d = d.get(key) if isinstance(d, dict) else None
            if key == HF_KEY and isinstance(d, dict):
                d = d.get("sparsity_config")
            if isinstance(d, dict):
                return SparsityConfig.from_dict(d)
    return None


def _read_hf_tensors(path: str) -> dict:
    import json
    import os

    from safetensors.torch import load_file
    from .checkpoint import CheckpointError
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    try:
        if os.path.isfile(single):
            return load_file(single)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            for name in files:          # shards sit in the folder: an index cannot point elsewhere
                if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                    raise CheckpointError(f"{index} names {name!r} as a shard: not a file of {path}")
            out = {}
            for name in files:
                out.update(load_file(os.path.join(path, name)))
            return out
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read the weights of {path}: {e}") from None
    raise CheckpointError(f"{path} has no model.safetensors (a save_pretrained folder with safetensors)")


def _checked_hf_entry(info, config_file: str) -> dict:
    """The ``layers`` of config.json's ``"sparsebert"`` entry ``info`` (``{}`` without one), each
    an object, or a :class:`~sparsebert.CheckpointError` naming what is malformed."""
    from .checkpoint import CheckpointError
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise CheckpointError(f"malformed {config_file}: its {HF_KEY!r} entry is not an object")
    layers = info.get("layers", {})
    if not isinstance(layers, dict):
        raise CheckpointError(f"malformed {config_file}: {HF_KEY}.layers is not an object")
    for n, e in layers.items():
        if not isinstance(e, dict):
            raise CheckpointError(f"malformed {config_file}: {HF_KEY}.layers[{n!r}] is not an object")
    return layers


def _match_suffix(info_layers: dict, name: str):
    """The config.json entry for layer ``name``: by name, or by a recorded name that ends it (the
    model was sparsified as a sub-module, e.g. ``model.bert``)."""
    if name in info_layers:
        return info_layers[name]
    for n, e in info_layers.items():
        if name.endswith("." + n):
            return e
    return {}


def from_pretrained(path, model: Optional[nn.Module] = None) -> nn.Module:
    """Load a sparse model from a ``save_pretrained`` folder (or a :func:`~sparsebert.save_sparse`
    one, or a ``sparsebert pretrain --out`` folder: its ``encoder/``; the rule is
    :func:`sparsebert.checkpoint.resolve`), exactly as it was saved: the same layers, layouts,
    masks, fused activations and dtypes, in eval mode.

    The sparse layers are found from the state dict (a ``block_mask`` next to a ``weight`` is a
    :class:`BlockSparseLinear`, a ``mask_bits`` a masked layer); ``config.json``'s ``"sparsebert"``
    entry adds their backends and fused activations. Without ``model`` the ``transformers`` class in
    ``config.json``'s ``architectures`` is built; with ``model`` (same architecture) a copy of it is
    filled. Raises :class:`~sparsebert.CheckpointError` for a folder that is not one of these.
    """
    import copy
    import os

    import transformers

    from .checkpoint import META, CheckpointError, _is_hf_folder, _match_dtypes, load_sparse, resolve
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, META)):
        return load_sparse(path, model=model)
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint folder at {path}")
    if not _is_hf_folder(path) and not os.path.isfile(os.path.join(path, "config.json")):
        kind, folder = resolve(path)        # a pretrain --out folder, or an error naming the kinds
        return load_sparse(folder, model=model)
    tensors = _read_hf_tensors(path)
    if model is None:
        try:
            config = transformers.AutoConfig.from_pretrained(path)
        except Exception as e:
            raise CheckpointError(f"cannot read {os.path.join(path, 'config.json')}: {e}") from None
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs and archs[0].isidentifier() else None
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise CheckpointError(f"{path}: config.json names no transformers model class "
                                  f"(architectures={archs!r}): pass model=")
        target = cls(config)
    else:
        target = copy.deepcopy(model)
        densify(target)
    cf = os.path.join(path, "config.json")
    info = getattr(getattr(target, "config", None), HF_KEY, None)
    if model is not None:   # the folder's record, not the template's
        import json
        info = None
        if os.path.isfile(cf):
            try:
                with open(cf, encoding="utf-8") as f:
                    d = json.load(f)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"cannot read {cf}: {e}") from None
            if not isinstance(d, dict):
                raise CheckpointError(f"malformed {cf}: expected a JSON object")
            info = d.get(HF_KEY)
    info_layers = _checked_hf_entry(info, cf)
    block_names = [k[: -len(".block_mask")] for k in tensors if k.endswith(".block_mask")]
    masked_names = [k[: -len(".mask_bits")] for k in tensors if k.endswith(".mask_bits")]
    paths = _module_paths(target)
    masks_by_weight = {}
    for name in block_names:
        try:
            old = target.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: layer {name!r} is not in {type(target).__name__}") from None
        if type(old) is not nn.Linear:
            raise CheckpointError(f"{path}: {name} holds a block mask but is a {type(old).__name__}, not an nn.Linear")
        mask = tensors[name + ".block_mask"]
        N, K = old.weight.shape
        if mask.dim() != 2 or N % mask.shape[0] or K % mask.shape[1]:
            raise CheckpointError(f"{path}: {name}.block_mask of shape {tuple(mask.shape)} does not tile ({N}, {K})")
        layout = BlockLayout.from_mask(mask.bool(), (N // mask.shape[0], K // mask.shape[1]), (N, K))
        entry = _match_suffix(info_layers, name)
        backend = saved_backend(entry.get("backend", "auto"), f"{path}: {name}")
        new = BlockSparseLinear(layout, bias=old.bias is not None, backend=backend,
                                device=old.weight.device, dtype=old.weight.dtype)
        keep_template_params(old, new)
        _replace(target, paths, old, new)
    for name in masked_names:
        try:
            old = target.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: layer {name!r} is not in {type(target).__name__}") from None
        if type(old) not in (nn.Linear, nn.Embedding):
            raise CheckpointError(f"{path}: {name} holds mask bits but is a {type(old).__name__}")
        cls_ = MaskedEmbedding if type(old) is nn.Embedding else MaskedLinear
        new = cls_.from_dense(old, mask=torch.ones(old.weight.shape, dtype=torch.bool))
        shared = masks_by_weight.setdefault(id(old.weight), new.mask)
        new.mask = shared                       # a tied decoder and the embeddings: one mask
        _replace(target, paths, old, new)
    # dtypes as saved (a BlockSparseLinear's "weight" is its values')
    dtypes = {}
    for k, v in tensors.items():
        if k.endswith(".weight") and k[: -len(".weight")] in block_names:
            dtypes[k[: -len(".weight")] + ".values"] = v
        elif not k.endswith((".block_mask", ".mask_bits")):
            dtypes[k] = v
    _match_dtypes(target, dtypes)
    try:
        result = target.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match {type(target).__name__}: {' '.join(str(e).split())}") from None
    loaded = set(tensors)
    params = dict(target.named_parameters(remove_duplicate=False))
    loaded_ids = {id(params[k]) for k in loaded if k in params}
    missing = [k for k in result.missing_keys if not (k in params and id(params[k]) in loaded_ids)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path} does not match {type(target).__name__}: missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    fused = [n for n in block_names if _match_suffix(info_layers, n).get("activation", "none") == "gelu"]
    if fused:
        try:
            fuse_activations(target, names=fused)
        except ValueError as e:
            raise CheckpointError(f"{path}: the fused GELU does not fit the model: {e}") from None
    cfg = info.get("sparsity_config") if isinstance(info, dict) else None
    try:
        sc = SparsityConfig.from_dict(cfg) if isinstance(cfg, dict) else None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"malformed {cf}: its {HF_KEY}.sparsity_config: {e}") from None
    set_sparsity_config(target, sc)
    return target.eval()


# ---- Trainer ---------------------------------------------------------------------------------------
def _last_update_step(schedule, step: int) -> Optional[int]:
    """The last step ``<= step`` at which ``schedule`` recomputes masks (None: none yet)."""
    if step < schedule.start_step:
        return None
    if step >= schedule.end_step:
        return schedule.end_step
    return schedule.start_step + (step - schedule.start_step) // schedule.frequency * schedule.frequency


def _run_first(callback) -> None:
    """Move ``callback`` to the front of the Trainer's callback list, so that its ``on_log`` fills
    the ``logs`` dict before any other callback reads it: Trainer puts the reporting callbacks
    (TensorBoard, W&B, ...) ahead of the ones the user passes. A callback is not told its handler:
    it is the ``self`` of the caller's ``CallbackHandler.call_event`` frame. Moving the current
    entry to the front while that loop iterates leaves every later entry where it was, so each
    callback still runs once. Nothing happens when no handler holding ``callback`` is found."""
    import sys

    from transformers.trainer_callback import CallbackHandler
    frame = sys._getframe(1)
    while frame is not None:
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler):
            cbs = handler.callbacks
            i = next((j for j, c in enumerate(cbs) if c is callback), None)
            if i:
                cbs.insert(0, cbs.pop(i))
            return
        frame = frame.f_back


def _callback_class():
    from transformers import TrainerCallback

    from .pruning import Pruner

    class PruningCallback(TrainerCallback):
        """Gradual magnitude pruning inside ``transformers.Trainer``.

        ``PruningCallback(SparsityConfig(...))`` (or its fields as keyword arguments) prunes the
        model on the config's cubic schedule — from ``schedule["initial_sparsity"]`` at
        ``start_step`` to ``config.sparsity`` at ``end_step`` (``None``: the run's ``max_steps``),
        every ``frequency`` optimizer steps — in block or unstructured mode, layer or global scope.
        It uses Trainer's own optimizer and LR scheduler: pruning keeps every Parameter, and the
        optimizer state follows (:func:`sparsebert.nn.sync_optimizer_state`). The sparsity and the
        kept fraction are added to every log (``sparsity``, ``kept_fraction``): ``state.log_history``,
        the progress printer and every ``report_to`` integration (TensorBoard, W&B, ...) see them
        (the callback moves itself to the front of Trainer's callbacks so it runs before them).

        Pass it to ``Trainer(..., callbacks=[cb])`` with the dense model: it sparsifies the model
        (at the initial sparsity) when the Trainer is built, before the optimizer exists. A model
        sparsified beforehand is used as it is. Resuming from a checkpoint restores the layouts
        from the checkpoint's weights and carries on with the schedule at the checkpoint's step.
        """

        def __init__(self, config: Optional[SparsityConfig] = None, **kwargs):
            if config is None:
                config = SparsityConfig(**kwargs)
            elif kwargs:
                raise ValueError("give a SparsityConfig or its fields as keyword arguments, not both")
            if not isinstance(config, SparsityConfig):
                raise TypeError(f"expected a SparsityConfig, got {type(config).__name__}")
            self.config = config
            self.pruner = None
            self.schedule = None

        def prepare(self, model: nn.Module) -> nn.Module:
            """Sparsify ``model`` in place at the schedule's initial sparsity (a model that already
            has sparse layers of the config's mode is left as it is); returns it."""
            layers = sparse_layers(model)
            want = BlockSparseLinear if self.config.mode == "block" else (MaskedLinear, MaskedEmbedding)
            if layers:
                wrong = [n for n, m in layers if not isinstance(m, want)]
                if wrong:
                    raise ValueError(f"PruningCallback(mode={self.config.mode!r}): {wrong[0]} is a "
                                     f"{type(model.get_submodule(wrong[0])).__name__}")
            else:
                import dataclasses
                model = sparsify(model, dataclasses.replace(self.config, sparsity=self.config.initial_sparsity))
            set_sparsity_config(model, self.config)
            return model

        def on_init_end(self, args, state, control, model=None, **kwargs):
            _run_first(self)
            if model is not None:
                self.prepare(model)

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            _run_first(self)            # also when added with trainer.add_callback after __init__
            if not sparse_layers(model):
                if self.config.mode == "block":
                    raise RuntimeError(
                        "PruningCallback: the model has no sparse layers, and in block mode they cannot be "
                        "made once Trainer has built its optimizer; pass the callback to Trainer(callbacks=[...]) "
                        "with model=, or call callback.prepare(model) before building the Trainer")
                self.prepare(model)
            set_sparsity_config(model, self.config)
            self.schedule = self.config.cubic_schedule(max_steps=state.max_steps)
            if state.max_steps and state.max_steps > 0 and self.schedule.end_step > state.max_steps:
                # Nothing else says so: the run ends below the config's sparsity, which the
                # checkpoints still record as the model's setup.
                import warnings
                last = _last_update_step(self.schedule, state.max_steps)
                reached = self.schedule.sparsity_at(last) if last is not None else self.schedule.initial_sparsity
                warnings.warn(f"PruningCallback: the schedule ends at step {self.schedule.end_step}, after the "
                              f"run's last step ({state.max_steps}): the model reaches sparsity about {reached:.3g}, "
                              f"not the config's {self.config.sparsity:.4g} (set end_step <= max_steps, or None)",
                              stacklevel=2)
            opt = getattr(optimizer, "optimizer", optimizer)   # accelerate's wrapper
            self.pruner = Pruner(model, self.schedule, scope=self.config.scope, score=self.config.score,
                                 optimizer=opt if isinstance(opt, torch.optim.Optimizer) else None,
                                 seed=self.config.seed)
            last = _last_update_step(self.schedule, state.global_step)
            # On resume the checkpoint's weights brought the layouts of that step.
            self.pruner.current_sparsity = (self.schedule.sparsity_at(last) if last is not None
                                            else self.schedule.initial_sparsity)

        def on_step_end(self, args, state, control, **kwargs):
            if self.pruner is not None:
                self.pruner.step(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.pruner is None or logs is None:
                return
            sparsity = round(self.pruner.sparsity(), 6)
            extra = {"sparsity": sparsity, "kept_fraction": round(1.0 - sparsity, 6)}
            logs.update(extra)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(extra)

    PruningCallback.__module__ = __name__
    PruningCallback.__qualname__ = "PruningCallback"
    return PruningCallback


_lazy = {}


def __getattr__(name):
    # PruningCallback subclasses transformers.TrainerCallback: built on first use, so importing
    # sparsebert does not import the Trainer machinery.
    if name == "PruningCallback":
        if name not in _lazy:
            _lazy[name] = _callback_class()
        return _lazy[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
