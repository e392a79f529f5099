"""Sparse checkpoints: only kept blocks (or kept weights) on disk, exact round trip.

A checkpoint folder (format version 2) holds
* ``sparse_model.safetensors`` — block-sparse layers as ``<name>.values`` [nnz, bn, bk] and
  ``<name>.block_mask``; masked layers as ``<name>.kept`` (the kept weights, row-major) and
  ``<name>.mask_bits`` (the mask, bit-packed); every other tensor of the state dict as is
  (tensors shared by several names are stored once). Every tensor keeps its dtype (fp32, fp16,
  bf16, ...), and :func:`load_sparse` gives each parameter and buffer the dtype it was saved in;
* ``sparsebert.json`` — format version, model class, the sparse layers and the aliases;
* ``config.json`` — the Hugging Face config (when the model has one);
* ``manifest.json`` — the SHA-256 of every other file above, written last. The loader checks
  every file against it before using any of them, so a truncated, corrupt or edited file (a
  changed ``hidden_act`` in ``config.json``, an alias pointing at another tensor) is refused.

Saving is atomic: the checkpoint is written into a temporary folder beside the target and renamed
into place only when complete, so a failed save leaves a previous checkpoint there as it was.
Files in the target folder that are not part of a checkpoint (a tokenizer, notes) are kept.

:func:`load_sparse` also takes a ``save_pretrained`` folder of a sparse model and a
``sparsebert pretrain --out`` folder (it loads the ``encoder/`` checkpoint inside): :func:`resolve`.

Version-1 checkpoints (no manifest; ``sparsebert.json`` records the tensor file's SHA-256 only)
still load, with a warning that their JSON files are not covered.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from .layout import BlockLayout
from .nn import BlockSparseLinear, MaskedEmbedding, MaskedLinear
from .ops.backends import saved_name as saved_backend
from .hf import _set_module, fuse_activations, keep_template_params, sparse_layers, unfuse_activations

FORMAT = "sparsebert-checkpoint"
VERSION = 2
VERSIONS = (1, 2)                  # what load_sparse reads
TENSORS = "sparse_model.safetensors"
META = "sparsebert.json"
CONFIG = "config.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "sparsebert-manifest"
PRETRAIN_ENCODER = "encoder"       # the checkpoint inside a `sparsebert pretrain --out` folder
CHECKPOINT_FILES = (TENSORS, META, CONFIG, MANIFEST)   # replaced by a save; anything else is kept
KINDS = ("block", "masked_linear", "masked_embedding")
ACTIVATIONS = ("none", "gelu")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


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


# ---- saving -------------------------------------------------------------------------------------
def _collect(model: nn.Module):
    """``(tensors, meta)`` to write for ``model`` (nothing written yet)."""
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
            covered.update({p + "values", p + "weight", p + "block_mask", p + "_extra_state"})
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
            covered.update({p + "weight", p + "mask", p + "mask_bits"})

    aliases: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if key in covered or key.endswith(("_extra_state", ".block_mask", ".mask_bits")) or not torch.is_tensor(t):
            continue
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.detach()
    from .hf import get_sparsity_config
    cfg = get_sparsity_config(model)
    meta = {"format": FORMAT, "version": VERSION, "model_class": type(model).__name__,
            "model_module": type(model).__module__, "layers": layers, "aliases": aliases,
            "sparsity_config": cfg.to_dict() if cfg is not None else None}
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, meta


def _fsync(path: str) -> None:
    """Flush a file or folder to disk (best effort: not every filesystem allows it on folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: str, new: str) -> None:
    """Hard-link (or copy) into ``new`` every entry of ``old`` that the save did not write anew
    (a ``config.json`` is written only for a model with a Hugging Face config: a user's own one
    beside a bare layer's checkpoint stays)."""
    for entry in os.scandir(old):
        if entry.name in CHECKPOINT_FILES and os.path.lexists(os.path.join(new, entry.name)):
            continue
        dst = os.path.join(new, entry.name)
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, dst)


def _swap_into_place(tmp: str, target: str) -> None:
    """Rename the complete folder ``tmp`` to ``target``; an existing ``target`` is renamed aside
    first and removed only once the new one is in place (put back if the rename fails)."""
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return
    old = tmp + "-old"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _cwd() -> Optional[str]:
    try:
        return os.path.realpath(os.getcwd())
    except OSError:
        return None


def save_sparse(model: nn.Module, path) -> None:
    """Write ``model`` (with sparse layers) to the folder ``path``, atomically.

    Everything is written into a temporary folder beside ``path`` and renamed into place when
    complete: if anything fails, an existing checkpoint at ``path`` is left as it was. Other
    files in an existing ``path`` (not ``sparse_model.safetensors``, ``sparsebert.json``,
    ``manifest.json``, nor ``config.json`` when the model has a Hugging Face config to write) are
    kept. Raises :class:`CheckpointError` when ``path``
    is a file, ``OSError`` when it cannot be written.
    """
    from safetensors.torch import save_file

    if not os.fspath(path):
        # realpath("") is the working directory, which the save would then replace
        raise CheckpointError("cannot save a checkpoint to '': the path is empty")
    tensors, meta = _collect(model)
    target = os.path.realpath(os.fspath(path))
    if os.path.exists(target) and not os.path.isdir(target):
        raise CheckpointError(f"cannot save a checkpoint to {os.fspath(path)}: it exists and is not a folder")
    cwd = _cwd()
    if cwd is not None and (cwd == target or cwd.startswith(target.rstrip(os.sep) + os.sep)):
        # The save renames the folder aside and a new one into place: the working directory of
        # this process (and of a shell started there) would be left in a deleted folder.
        raise CheckpointError(f"cannot save a checkpoint to {os.fspath(path)}: it is (or holds) the current "
                              "working directory, which the atomic save would replace; save to a subfolder")
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.saving-", dir=parent)
    umask = os.umask(0)          # (the only way to read it)
    os.umask(umask)
    try:
        if os.path.isdir(target):
            shutil.copymode(target, tmp)
        else:
            os.chmod(tmp, 0o777 & ~umask)
        save_file(tensors, os.path.join(tmp, TENSORS))
        # safetensors writes its file 0600; the other files (and the folder) follow the umask
        os.chmod(os.path.join(tmp, TENSORS), 0o666 & ~umask)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(tmp)
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1)
        files = sorted(os.listdir(tmp))
        manifest = {"format": MANIFEST_FORMAT, "version": VERSION,
                    "sha256": {name: sha256_file(os.path.join(tmp, name)) for name in files}}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        for name in files + [MANIFEST]:
            _fsync(os.path.join(tmp, name))
        if os.path.isdir(target):
            _carry_over(target, tmp)
        _fsync(tmp)
        _swap_into_place(tmp, target)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- reading and checking -------------------------------------------------------------------------
def _json_type(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_json(file: str, what: str):
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint: {file} is not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {file}: {e.strerror or e}") from None


def _interrupted_save_hint(path: str) -> str:
    parent, base = os.path.split(os.path.realpath(path))
    try:
        left = sorted(n for n in os.listdir(parent) if n.startswith(f".{base}.saving-") and n.endswith("-old"))
    except OSError:
        return ""
    if left:
        return f" (a save was interrupted: the previous checkpoint is in {os.path.join(parent, left[-1])})"
    return ""


def _check_meta(meta, meta_file: str) -> None:
    """Raise :class:`CheckpointError` naming the first thing wrong with the metadata's structure."""
    def bad(msg):
        raise CheckpointError(f"malformed {meta_file}: {msg}")

    if not isinstance(meta, dict):
        bad(f"expected a JSON object, got {_json_type(meta)}")
    for field, typ in (("model_class", str), ("layers", list), ("aliases", dict)):
        if field not in meta:
            bad(f"'{field}' is missing")
        if not isinstance(meta[field], typ):
            bad(f"'{field}' must be {_json_type(typ())}, got {_json_type(meta[field])}")
    if "model_module" in meta and not isinstance(meta["model_module"], str):
        bad(f"'model_module' must be a string, got {_json_type(meta['model_module'])}")
    if meta["version"] == 1 and not (isinstance(meta.get("sha256"), str) and _HEX64.match(meta["sha256"])):
        bad("'sha256' (the tensor file's SHA-256) is missing or not a hex digest")
    owners: Dict[str, list] = {}
    names = set()
    for i, e in enumerate(meta["layers"]):
        where = f"layers[{i}]"
        if not isinstance(e, dict):
            bad(f"{where} must be an object, got {_json_type(e)}")
        if not isinstance(e.get("name"), str):
            bad(f"{where}: 'name' is missing or not a string")
        where = f"layer {e['name']!r}"
        if e["name"] in names:
            bad(f"{where} is listed twice")
        names.add(e["name"])
        if e.get("kind") not in KINDS:
            bad(f"{where}: unknown kind {e.get('kind')!r} (expected one of {', '.join(KINDS)})")
        shape = e.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(s) and s > 0 for s in shape)):
            bad(f"{where}: 'shape' must be a list of two positive integers, got {shape!r}")
        if e["kind"] == "block":
            block = e.get("block")
            if not (isinstance(block, list) and len(block) == 2 and all(_is_int(s) and s > 0 for s in block)):
                bad(f"{where}: 'block' must be a list of two positive integers, got {block!r}")
            if not (_is_int(e.get("nnz")) and e["nnz"] >= 0):
                bad(f"{where}: 'nnz' must be a non-negative integer, got {e.get('nnz')!r}")
            if not isinstance(e.get("bias"), bool):
                bad(f"{where}: 'bias' must be true or false, got {e.get('bias')!r}")
            if "backend" in e and not isinstance(e["backend"], str):
                bad(f"{where}: 'backend' must be a string, got {_json_type(e['backend'])}")
            if e.get("activation", "none") not in ACTIVATIONS:
                bad(f"{where}: unknown activation {e.get('activation')!r} (expected one of {', '.join(ACTIVATIONS)})")
        else:
            if e["kind"] == "masked_linear" and "bias" in e and not isinstance(e["bias"], bool):
                bad(f"{where}: 'bias' must be true or false, got {e['bias']!r}")
            if "tied_to" in e:
                owner = owners.get(e["tied_to"]) if isinstance(e["tied_to"], str) else None
                if owner is None:
                    bad(f"{where}: 'tied_to' {e['tied_to']!r} does not name an earlier masked layer")
                if owner != shape:
                    bad(f"{where}: tied to {e['tied_to']!r} of shape {owner}, but has shape {shape}")
            else:
                owners[e["name"]] = shape
    for k, v in meta["aliases"].items():
        if not isinstance(v, str):
            bad(f"alias {k!r} must name a tensor (a string), got {_json_type(v)}")


def _read_manifest(path: str) -> Dict[str, str]:
    file = os.path.join(path, MANIFEST)
    man = _read_json(file, "manifest")
    if not isinstance(man, dict) or man.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"corrupt checkpoint: {file} is not a sparsebert manifest")
    hashes = man.get("sha256")
    if not isinstance(hashes, dict):
        raise CheckpointError(f"corrupt checkpoint: {file} has no 'sha256' table of the files")
    for name, digest in hashes.items():
        if name in ("", ".", "..") or os.path.basename(name) != name or "\\" in name:
            raise CheckpointError(f"corrupt checkpoint: {file} lists {name!r}, not a file of the checkpoint folder")
        if not (isinstance(digest, str) and _HEX64.match(digest)):
            raise CheckpointError(f"corrupt checkpoint: {file} records {digest!r} for {name}, not a SHA-256")
    return hashes


def _verify(path: str, name: str, digest: str) -> None:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise CheckpointError(f"corrupt checkpoint: {file} is missing")
    if sha256_file(file) != digest:
        raise CheckpointError(f"corrupt checkpoint: {file} does not match its recorded SHA-256 "
                              "(truncated or modified)")


def _read_meta(path: str, need_config: bool = False) -> dict:
    """The checkpoint's checked metadata, once every file it relies on is verified."""
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise CheckpointError(f"{path} is not a sparsebert checkpoint: it is a file, not a folder")
        raise CheckpointError(f"no sparsebert checkpoint at {path}: the folder is missing"
                              + _interrupted_save_hint(path))
    meta_file = os.path.join(path, META)
    if not os.path.isfile(meta_file):
        raise CheckpointError(f"{path} is not a sparsebert checkpoint: {META} is missing")
    meta = _read_json(meta_file, "metadata")
    if not isinstance(meta, dict):
        raise CheckpointError(f"malformed {meta_file}: expected a JSON object, got {_json_type(meta)}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file} is not a sparsebert checkpoint (format={meta.get('format')!r})")
    version = meta.get("version")
    if not _is_int(version) or version not in VERSIONS:
        raise CheckpointError(f"checkpoint format version {version!r} is not supported "
                              f"(this sparsebert reads {', '.join(map(str, VERSIONS))})")
    config_file = os.path.join(path, CONFIG)
    if version >= 2:
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            raise CheckpointError(f"corrupt checkpoint: {os.path.join(path, MANIFEST)} is missing "
                                  "(an interrupted copy, or files edited by hand)")
        hashes = _read_manifest(path)
        needed = [META, TENSORS] + ([CONFIG] if need_config and os.path.isfile(config_file) else [])
        for name in needed:
            if name not in hashes:
                raise CheckpointError(f"corrupt checkpoint: {name} is not covered by {MANIFEST}")
        for name, digest in hashes.items():
            _verify(path, name, digest)
        _check_meta(meta, meta_file)
    else:
        _check_meta(meta, meta_file)
        _verify(path, TENSORS, meta["sha256"])
        warnings.warn(f"{path}: a format-1 sparsebert checkpoint, whose SHA-256 covers only {TENSORS}; "
                      "save it again to cover every file", stacklevel=3)
    return meta


def _build_model(path: str, meta: dict) -> nn.Module:
    import transformers

    name = meta["model_class"]
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"model class {name!r} is not a transformers model class: "
                              "pass model= to load_sparse")
    if not os.path.isfile(os.path.join(path, CONFIG)):
        raise CheckpointError(f"{path} has no {CONFIG} to build a {name} from: pass model= to load_sparse")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        return cls(config)
    except Exception as e:
        msg = " ".join(str(e).split())
        raise CheckpointError(f"cannot build a {name} from {os.path.join(path, CONFIG)}: {msg}") from None


def build_model(path) -> nn.Module:
    """The fresh (untrained, dense) ``transformers`` model a checkpoint's verified config describes
    — what :func:`load_sparse` fills when no ``model`` is given."""
    path = os.fspath(path)
    return _build_model(path, _read_meta(path, need_config=True))


def tensor_names(path) -> set:
    """The names of the tensors stored in a checkpoint's tensor file (nothing is loaded)."""
    from safetensors import safe_open
    file = os.path.join(os.fspath(path), TENSORS)
    try:
        with safe_open(file, "pt") as f:
            return set(f.keys())
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint: cannot read {file}: {e}") from None


def _check_tensors(meta: dict, tensors: Dict[str, torch.Tensor]) -> None:
    def need(layer, key, ndim, kinds):
        t = tensors.get(key)
        if t is None:
            raise CheckpointError(f"{layer}: tensor {key} is missing from {TENSORS}")
        if t.dim() != ndim or not any(k(t) for k in kinds):
            raise CheckpointError(f"{layer}: tensor {key} has dtype {t.dtype} and {t.dim()} dimensions, "
                                  f"expected {ndim}")

    floating = lambda t: t.is_floating_point()
    byte = lambda t: t.dtype in (torch.uint8, torch.bool)
    for e in meta["layers"]:
        p = f"{e['name']}." if e["name"] else ""
        if e["kind"] == "block":
            need(e["name"], p + "values", 3, [floating])
            need(e["name"], p + "block_mask", 2, [byte])
        elif "tied_to" not in e:
            need(e["name"], p + "kept", 1, [floating])
            need(e["name"], p + "mask_bits", 1, [lambda t: t.dtype == torch.uint8])
    for key, src in meta["aliases"].items():
        if key in tensors:
            raise CheckpointError(f"checkpoint alias {key} -> {src}: {key} is also stored")
        if src not in tensors:
            raise CheckpointError(f"checkpoint alias {key} -> {src} names a missing tensor")


def _match_dtypes(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Give each parameter and buffer of ``model`` the dtype its checkpoint tensor has (in place,
    same objects: weight ties survive)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for key, v in state.items():
        t = params.get(key, buffers.get(key))
        if t is None or t.dtype == v.dtype:
            continue
        if not (t.is_floating_point() and v.is_floating_point()):
            raise CheckpointError(f"{key}: checkpoint has dtype {v.dtype}, model needs {t.dtype}")
        if key in params:
            t.data = t.data.to(v.dtype)
        else:
            mod_name, _, buf = key.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            mod._buffers[buf] = t.to(v.dtype)


def resolve(path) -> tuple:
    """What the folder ``path`` holds: ``(kind, folder to load)``, by the first rule that applies:

    1. ``path/sparsebert.json`` exists: a :func:`save_sparse` checkpoint, ``("sparse", path)``;
    2. ``path/config.json`` has a ``"sparsebert"`` entry: a ``save_pretrained`` folder of a sparse
       model, ``("hf", path)``;
    3. ``path/encoder/`` is a folder: the output of ``sparsebert pretrain --out path`` (``encoder/``,
       ``tokenizer/``, ``pretrain.json``), whose checkpoint is ``("sparse", path/encoder)``.

    Anything else raises :class:`CheckpointError` naming ``path`` and the three kinds. Nothing is
    verified here: the loaders check every file against the manifest."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise CheckpointError(f"{path} is not a sparsebert checkpoint: it is a file, not a folder")
        raise CheckpointError(f"no sparsebert checkpoint at {path}: the folder is missing"
                              + _interrupted_save_hint(path))
    if os.path.isfile(os.path.join(path, META)):
        return "sparse", path
    if _is_hf_folder(path):
        return "hf", path
    encoder = os.path.join(path, PRETRAIN_ENCODER)
    if os.path.isdir(encoder):
        return "sparse", encoder
    raise CheckpointError(f"{path} is not a sparsebert checkpoint: it has no {META} (save_sparse), no "
                          f"{CONFIG} with a \"sparsebert\" entry (save_pretrained of a sparse model) and no "
                          f"{PRETRAIN_ENCODER}/ folder (sparsebert pretrain --out)")


def load_sparse(path, model: Optional[nn.Module] = None) -> nn.Module:
    """Load a checkpoint written by :func:`save_sparse`, in eval mode (like ``from_pretrained``:
    dropout off; call ``.train()`` to fine-tune). ``path`` may also be a ``save_pretrained``
    folder of a sparse model (no ``sparsebert.json``; ``config.json`` with a ``"sparsebert"``
    entry: loaded by :func:`sparsebert.from_pretrained`) or a ``sparsebert pretrain --out``
    folder (its ``encoder/`` checkpoint is loaded: the ``BertModel`` with its pooler); see
    :func:`resolve` for the rule.

    Without ``model`` a fresh ``transformers`` model is built from the saved config; with
    ``model`` (same architecture, any module) a copy of it is converted and filled, and
    ``model`` itself is left untouched. Every parameter and buffer comes back in the dtype it was
    saved in (fp16, bf16, fp32). Every file is checked against the manifest before it is used,
    and the result is returned only when everything loaded; a missing, truncated, corrupt, edited
    or mismatched checkpoint raises :class:`CheckpointError` (a ``ValueError``).
    """
    from safetensors.torch import load_file

    kind, path = resolve(path)
    if kind == "hf":
        from .hf import from_pretrained
        return from_pretrained(path, model=model)
    meta = _read_meta(path, need_config=model is None)
    try:
        tensors = load_file(os.path.join(path, TENSORS))
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint: cannot read {TENSORS}: {e}") from None
    _check_tensors(meta, tensors)
    if model is None:
        target = _build_model(path, meta)
    else:
        # The template's own sparse layers are not the checkpoint's: back to dense first (as
        # from_pretrained does), so a layer the checkpoint holds dense loads dense and a masked
        # layer it does not list (the word embeddings of an unstructured template) is not left
        # expecting a mask the checkpoint has not got.
        from .hf import densify
        target = densify(copy.deepcopy(model))
    staged = _convert(target, meta, tensors)
    state = dict(tensors)
    for key, src in meta["aliases"].items():
        state[key] = state[src]
    for entry in meta["layers"]:
        p = f"{entry['name']}." if entry["name"] else ""
        if entry["kind"] == "block":
            continue           # values + block_mask: what BlockSparseLinear's state-dict loader reads
        if "tied_to" not in entry:
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
    with torch.no_grad():
        expected = set(staged.state_dict())
    for entry in meta["layers"]:     # a block layer's state dict says weight + block_mask; it reads values
        if entry["kind"] == "block":
            p = f"{entry['name']}." if entry["name"] else ""
            expected -= {p + "weight"}
            expected |= {p + "values"}
        else:
            p = f"{entry['name']}." if entry["name"] else ""
            expected -= {p + "mask_bits"}
            expected |= {p + "mask"}
    missing = [k for k in expected if k not in state and not k.endswith("_extra_state")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    shapes = {k: tuple(v.shape) for k, v in staged.named_parameters(remove_duplicate=False)}
    shapes.update({k: tuple(v.shape) for k, v in staged.named_buffers(remove_duplicate=False)})
    for k, v in state.items():
        if k in shapes and tuple(v.shape) != shapes[k]:
            raise CheckpointError(f"{k}: checkpoint has shape {tuple(v.shape)}, model needs {shapes[k]}")
    _match_dtypes(staged, state)
    try:
        staged.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not match the model: {' '.join(str(e).split())}") from None
    from .hf import set_sparsity_config
    from .config import SparsityConfig
    cfg = meta.get("sparsity_config")
    try:
        set_sparsity_config(staged, SparsityConfig.from_dict(cfg) if isinstance(cfg, dict) else None)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"malformed {META}: 'sparsity_config': {e}") from None
    _check_no_other_save(path, staged)
    return staged.eval()


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")   # what save_pretrained writes


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (a NaN equals itself): what one save of the same state writes twice."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    flat = lambda t: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(flat(a), flat(b))


def _check_no_other_save(path: str, loaded: nn.Module) -> None:
    """Refuse a folder that also holds a ``save_pretrained`` checkpoint of other weights.

    Both savers keep files they do not write (save_sparse keeps ``model.safetensors``;
    save_pretrained keeps ``sparsebert.json`` and ``sparse_model.safetensors``), and when the model
    was loaded from a hub folder both write the same ``config.json``, so the manifest still
    matches: after ``save_sparse(m, d)`` then ``m.save_pretrained(d)`` later weights, load_sparse
    and from_pretrained returned the older ones without a word (and plain transformers loads a
    stale ``model.safetensors`` in the other order). Both of one state are fine."""
    present = [n for n in HF_WEIGHTS if os.path.isfile(os.path.join(path, n))]
    if not present:
        return
    from .hf import _read_hf_tensors
    try:
        hf = _read_hf_tensors(path)
    except CheckpointError:
        return           # not a readable save_pretrained folder: nothing to disagree with
    with torch.no_grad():
        state = loaded.state_dict()
    differ = [k for k, v in hf.items() if k not in state or not _same_bits(state[k], v)]
    if not differ:
        return
    hf_time = os.path.getmtime(os.path.join(path, present[0]))
    sparse_time = os.path.getmtime(os.path.join(path, MANIFEST if os.path.isfile(os.path.join(path, MANIFEST)) else META))
    newer = "save_pretrained" if hf_time > sparse_time else "save_sparse"
    raise CheckpointError(
        f"{path} holds two different checkpoints: a save_sparse one ({META}, {TENSORS}) and a "
        f"save_pretrained one ({present[0]}; {differ[0]} differs), the {newer} one written last: "
        "remove the stale files or save each to its own folder")


def _is_hf_folder(path: str) -> bool:
    """A ``save_pretrained`` folder of a sparse model: config.json with a "sparsebert" entry."""
    from .hf import HF_KEY
    f = os.path.join(path, CONFIG)
    if not os.path.isfile(f):
        return False
    try:
        with open(f, encoding="utf-8") as fh:
            return isinstance(json.load(fh).get(HF_KEY), dict)
    except (OSError, ValueError, AttributeError):
        return False


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
            try:
                layout = BlockLayout.from_mask(tensors[p + "block_mask"].bool(), tuple(entry["block"]), shape)
            except ValueError as e:
                raise CheckpointError(f"{name}: {e}") from None
            if layout.nnz != entry["nnz"]:
                raise CheckpointError(f"{name}: layout keeps {layout.nnz} blocks, metadata says {entry['nnz']}")
            ref = old.weight if isinstance(old, nn.Linear) else old.values
            backend = saved_backend(entry.get("backend", "auto"), f"checkpoint layer {name!r}")
            new = BlockSparseLinear(layout, bias=entry["bias"], backend=backend,
                                    device=ref.device, dtype=tensors[p + "values"].dtype)
            keep_template_params(old, new)
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
        if name:
            _set_module(model, name, new)
        else:            # the model is itself the sparse layer (sparsify of a bare nn.Linear)
            model = new
    for entry in meta["layers"]:
        if "tied_to" in entry:
            model.get_submodule(entry["name"]).mask = model.get_submodule(entry["tied_to"]).mask
    fused = [e["name"] for e in meta["layers"] if e.get("activation", "none") != "none"]
    if fused:
        try:
            fuse_activations(model, names=fused)
        except ValueError as e:
            raise CheckpointError(f"the checkpoint's fused GELU does not fit the model: {e}") from None
    return model
