"""Sparse checkpoints: only kept blocks (or kept weights) on disk, exact round trip.

A checkpoint folder holds
* ``sparse_model.safetensors`` — block-sparse layers as ``<name>.values`` [nnz, bn, bk] and
  ``<name>.block_mask``; masked layers as ``<name>.kept`` (the kept weights, row-major) and
  ``<name>.mask_bits`` (the mask, bit-packed); every other tensor of the state dict as is
  (tensors shared by several names are stored once);
* ``sparsebert.json`` — format version, model class, the sparse layers, aliases, and the
  SHA-256 of the tensor file (a truncated or corrupt file is refused);
* ``config.json`` — the Hugging Face config (when the model has one).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from .layout import BlockLayout
from .nn import BlockSparseLinear, MaskedEmbedding, MaskedLinear
from .hf import _set_module, fuse_activations, sparse_layers, unfuse_activations

FORMAT = "sparsebert-checkpoint"
VERSION = 1
TENSORS = "sparse_model.safetensors"
META = "sparsebert.json"


class CheckpointError(ValueError):
    """A sparse checkpoint is missing, corrupt or does not match the model."""


def sha256_file(path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().astype(np.uint8).ravel()))


def _unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    n = int(np.prod(shape))
    flat = np.unpackbits(bits.numpy())[:n]
    if flat.size != n:
        raise CheckpointError(f"mask bits hold {flat.size} entries, expected {n}")
    return torch.from_numpy(flat.astype(bool)).view(*shape)


def save_sparse(model: nn.Module, path: str) -> None:
    """Write ``model`` (with sparse layers) to the folder ``path``."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors: Dict[str, torch.Tensor] = {}
    layers = []
    covered = set()
    mask_owner: Dict[int, str] = {}
    for name, m in sparse_layers(model):
        p = f"{name}." if name else ""
        if isinstance(m, BlockSparseLinear):
            tensors[p + "values"] = m.values.detach()
            tensors[p + "block_mask"] = m.layout.block_mask.to(torch.uint8)
            layers.append({"name": name, "kind": "block", "shape": list(m.layout.shape),
                           "block": list(m.layout.block), "nnz": m.layout.nnz,
                           "bias": m.bias is not None, "backend": m.backend,
                           "activation": m.activation})
            covered.update({p + "values", p + "_extra_state"})
        else:
            entry = {"name": name, "kind": "masked_embedding" if isinstance(m, MaskedEmbedding) else "masked_linear",
                     "shape": list(m.weight.shape)}
            if id(m.mask) in mask_owner:        # a tied decoder: same weight, same mask
                entry["tied_to"] = mask_owner[id(m.mask)]
            else:
                mask_owner[id(m.mask)] = name
                tensors[p + "kept"] = m.weight.detach()[m.mask]
                tensors[p + "mask_bits"] = _pack_bits(m.mask)
            if isinstance(m, MaskedLinear):
                entry["bias"] = m.bias is not None
            layers.append(entry)
            covered.update({p + "weight", p + "mask"})

    aliases: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if key in covered or key.endswith("_extra_state") or not torch.is_tensor(t):
            continue
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.detach()

    tensor_file = os.path.join(path, TENSORS)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tensor_file)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(path)
    meta = {"format": FORMAT, "version": VERSION, "model_class": type(model).__name__,
            "model_module": type(model).__module__, "layers": layers, "aliases": aliases,
            "sha256": sha256_file(tensor_file)}
    with open(os.path.join(path, META), "w") as f:
        json.dump(meta, f, indent=1)


def _read_meta(path: str) -> dict:
    meta_file = os.path.join(path, META)
    if not os.path.isfile(meta_file):
        raise CheckpointError(f"{path} is not a sparsebert checkpoint: {META} is missing")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint: {meta_file} is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file} is not a sparsebert checkpoint (format={meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint format version {meta.get('version')} is not supported (expected {VERSION})")
    tensor_file = os.path.join(path, TENSORS)
    if not os.path.isfile(tensor_file):
        raise CheckpointError(f"corrupt checkpoint: {tensor_file} is missing")
    if sha256_file(tensor_file) != meta.get("sha256"):
        raise CheckpointError(f"corrupt checkpoint: {tensor_file} does not match its recorded SHA-256 "
                              "(truncated or modified)")
    return meta


def _build_model(path: str, meta: dict) -> nn.Module:
    import transformers

    cls = getattr(transformers, meta["model_class"], None)
    if cls is None:
        raise CheckpointError(f"model class {meta['model_class']!r} is not a transformers class: "
                              "pass model= to load_sparse")
    config = transformers.AutoConfig.from_pretrained(path)
    return cls(config)


def load_sparse(path: str, model: Optional[nn.Module] = None) -> nn.Module:
    """Load a checkpoint written by :func:`save_sparse`.

    Without ``model`` a fresh ``transformers`` model is built from the saved config; with
    ``model`` (same architecture, any module) a copy of it is converted and filled, and
    ``model`` itself is left untouched. The result is returned only when everything loaded; a
    truncated, corrupt or mismatched checkpoint raises :class:`CheckpointError` (a ``ValueError``).
    """
    from safetensors.torch import load_file

    meta = _read_meta(path)
    try:
        tensors = load_file(os.path.join(path, TENSORS))
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint: cannot read {TENSORS}: {e}") from None
    target = _build_model(path, meta) if model is None else copy.deepcopy(model)
    staged = _convert(target, meta, tensors)
    state = dict(tensors)
    for key, src in meta["aliases"].items():
        if src not in state:
            raise CheckpointError(f"checkpoint alias {key} -> {src} names a missing tensor")
        state[key] = state[src]
    for entry in meta["layers"]:
        p = f"{entry['name']}." if entry["name"] else ""
        if entry["kind"] == "block":
            state.pop(p + "block_mask")
        elif "tied_to" not in entry:
            weight = torch.zeros(entry["shape"], dtype=tensors[p + "kept"].dtype)
            mask = _unpack_bits(state.pop(p + "mask_bits"), entry["shape"])
            if int(mask.sum()) != tensors[p + "kept"].numel():
                raise CheckpointError(f"{entry['name']}: mask keeps {int(mask.sum())} weights but "
                                      f"{tensors[p + 'kept'].numel()} are stored")
            weight[mask] = state.pop(p + "kept")
            state[p + "weight"], state[p + "mask"] = weight, mask
    for entry in meta["layers"]:
        if "tied_to" in entry:
            p, q = f"{entry['name']}.", f"{entry['tied_to']}."
            state[p + "weight"], state[p + "mask"] = state[q + "weight"], state[q + "mask"]
    expected = staged.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("_extra_state")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for k, v in expected.items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{k}: checkpoint has shape {tuple(state[k].shape)}, model needs {tuple(v.shape)}")
    staged.load_state_dict(state, strict=False)
    return staged


def _convert(model: nn.Module, meta: dict, tensors: Dict[str, torch.Tensor]) -> nn.Module:
    """Swap ``model``'s layers for the checkpoint's sparse ones (shapes checked)."""
    unfuse_activations(model)   # a model that was sparsified before: back to its plain modules
    replacements = []
    for entry in meta["layers"]:
        name = entry["name"]
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"checkpoint layer {name!r} does not exist in {type(model).__name__}") from None
        shape = tuple(entry["shape"])
        if entry["kind"] == "block":
            if not isinstance(old, (nn.Linear, BlockSparseLinear)) or \
                    (old.out_features, old.in_features) != shape:
                raise CheckpointError(f"{name}: checkpoint holds a {shape} linear, model has {old}")
            p = f"{name}." if name else ""
            bmask = tensors.get(p + "block_mask")
            if bmask is None:
                raise CheckpointError(f"{name}: block_mask missing from checkpoint")
            try:
                layout = BlockLayout.from_mask(bmask.bool(), tuple(entry["block"]), shape)
            except ValueError as e:
                raise CheckpointError(f"{name}: {e}") from None
            if layout.nnz != entry["nnz"]:
                raise CheckpointError(f"{name}: layout keeps {layout.nnz} blocks, metadata says {entry['nnz']}")
            ref = old.weight if isinstance(old, nn.Linear) else old.values
            new = BlockSparseLinear(layout, bias=entry["bias"], backend=entry.get("backend", "auto"),
                                    device=ref.device, dtype=tensors[p + "values"].dtype)
        else:
            kind = nn.Embedding if entry["kind"] == "masked_embedding" else nn.Linear
            if not isinstance(old, kind) or tuple(old.weight.shape) != shape:
                raise CheckpointError(f"{name}: checkpoint holds a {shape} {kind.__name__}, model has {old}")
            cls = MaskedEmbedding if kind is nn.Embedding else MaskedLinear
            if isinstance(old, cls):
                new = old
            else:
                new = cls.from_dense(old, mask=torch.ones(shape, dtype=torch.bool))
        replacements.append((name, new))
    for name, new in replacements:
        _set_module(model, name, new)
    for entry in meta["layers"]:
        if "tied_to" in entry:
            model.get_submodule(entry["name"]).mask = model.get_submodule(entry["tied_to"]).mask
    fused = [e["name"] for e in meta["layers"] if e.get("activation", "none") != "none"]
    if any(e.get("activation", "none") not in ("none", "gelu") for e in meta["layers"]):
        raise CheckpointError(f"unknown activation in {sorted({e.get('activation') for e in meta['layers']})}")
    if fused:
        try:
            fuse_activations(model, names=fused)
        except ValueError as e:
            raise CheckpointError(f"the checkpoint's fused GELU does not fit the model: {e}") from None
    return model
