"""Continued masked-LM pre-training with gradual magnitude pruning (the paper's setup, scaled down).

The model starts from a pre-trained BERT (MiniLM-L6 by default), is converted with
:func:`sparsebert.sparsify` at sparsity 0, and a :class:`sparsebert.pruning.Pruner` tightens the
masks with the Zhu & Gupta cubic schedule from 0 to the target over the first ``ramp_fraction``
of the steps, recomputing them every ``prune_every`` steps (per-layer thresholds). Mode
``unstructured`` is the paper's (MaskedLinear + masked word embeddings, tied decoder shares the
mask); mode ``block`` drops whole 32×32 blocks (BlockSparseLinear); mode ``dense`` is level 0.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .data import build_vocab_tokenizer, mask_tokens
from .training import (autocast, configure_threads, linear_schedule, make_adamw,  # noqa: F401 (re-exported)
                       optimizer_step, pick_device, progress_bar)

MODES = ("dense", "unstructured", "block")


@dataclass
class PretrainConfig:
    mode: str = "dense"               # dense | unstructured | block
    sparsity: float = 0.0
    score: str = "magnitude"          # magnitude | random (the paper's control)
    scope: str = "layer"
    block: int = 32
    steps: int = 200
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.0
    ramp_fraction: float = 0.1        # prune from 0 to the target over this fraction of the steps
    prune_every: int = 10             # masks recomputed every this many steps
    mask_prob: float = 0.15
    head_only: bool = False           # train only the MLM head (encoder frozen): the head warm-up
    seed: int = 0
    backend: str = "auto"
    optimize: bool = True             # sparsebert.optimize during training (SDPA, fused GELU, fast CPU dropout)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "dense" and self.sparsity:
            raise ValueError("mode 'dense' needs sparsity 0")
        if self.mode != "dense" and not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1) for mode {self.mode!r}, got {self.sparsity}")

    def ramp_end(self) -> int:
        return max(1, int(round(self.ramp_fraction * self.steps)))


# ---------------------------------------------------------------------------------------------
# Models and tokenizers
# ---------------------------------------------------------------------------------------------
def _quiet_transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass


def load_tokenizer(model_dir: Optional[Path] = None, texts=None, vocab_dir: Optional[Path] = None,
                   vocab_size: int = 8000):
    """The model folder's tokenizer, else a word-level vocabulary built from ``texts``."""
    _quiet_transformers()
    if model_dir is not None and any((Path(model_dir) / f).exists()
                                     for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(model_dir))
    if texts is None or vocab_dir is None:
        raise ValueError("no model folder with a tokenizer: give texts and vocab_dir to build one")
    return build_vocab_tokenizer(texts, vocab_dir, vocab_size)


def attach_pooler(mlm: nn.Module, pooler_state: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
    """BertForMaskedLM has no pooler; the paper prunes it, and fine-tuning uses it: add one."""
    from transformers.models.bert.modeling_bert import BertPooler
    if getattr(mlm.bert, "pooler", None) is None:
        pooler = BertPooler(mlm.config)
        if pooler_state:
            pooler.load_state_dict(pooler_state)
        mlm.bert.pooler = pooler
    return mlm


def load_minilm_mlm(model_dir: Path) -> nn.Module:
    """MiniLM-L6 as ``BertForMaskedLM`` (fresh MLM head, decoder tied to the word embeddings)
    with its pre-trained pooler attached."""
    _quiet_transformers()
    from safetensors.torch import load_file
    from transformers import BertForMaskedLM
    # the weights MiniLM lacks (the MLM head's transform) are initialised from a fixed seed, not
    # from whatever state the global RNG is in (it differed between a fresh and a cached data
    # fetch, and so did every result downstream); the caller's RNG is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForMaskedLM.from_pretrained(str(model_dir))
    sd = load_file(str(Path(model_dir) / "model.safetensors"))
    pooler = {k.split("pooler.", 1)[1]: v for k, v in sd.items() if "pooler." in k}
    return attach_pooler(model, pooler)


def scratch_mlm(vocab_size: int, hidden: int = 128, layers: int = 2, heads: int = 2,
                intermediate: int = 512, max_position: int = 512, seed: int = 0) -> nn.Module:
    """A small randomly initialised ``BertForMaskedLM`` (``--from-scratch``, tests)."""
    _quiet_transformers()
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=intermediate,
                     max_position_embeddings=max_position)
    return attach_pooler(BertForMaskedLM(cfg))


def save_encoder(module: nn.Module, path) -> None:
    """Write a (possibly sparse) transformers model to the folder ``path`` as a sparse checkpoint
    (safetensors + config, :func:`sparsebert.save_sparse`, atomic); read it back with
    :func:`sparsebert.study.finetune.load_encoder`. Never a pickle: loading one can run code."""
    from sparsebert.checkpoint import save_sparse
    save_sparse(module, path)


def special_ids(tokenizer) -> dict:
    return {"special": sorted({i for i in (tokenizer.cls_token_id, tokenizer.sep_token_id,
                                          tokenizer.pad_token_id) if i is not None}),
            "mask": tokenizer.mask_token_id, "vocab": len(tokenizer)}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def mlm_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the masked positions only (the decoder runs on those rows alone)."""
    hidden = model.bert(input_ids=inputs).last_hidden_state
    sel = labels != -100
    logits = model.cls(hidden[sel])
    return F.cross_entropy(logits.float(), labels[sel])


@torch.no_grad()
def mlm_dev_loss(model: nn.Module, dev_blocks: torch.Tensor, ids: dict, device: torch.device,
                 batch_size: int = 32, amp: bool = False, seed: int = 1234) -> float:
    """Mean masked-LM loss over ``dev_blocks`` with a fixed (seeded) masking."""
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for i in range(0, len(dev_blocks), batch_size):
        x = dev_blocks[i:i + batch_size]
        inputs, labels = mask_tokens(x, ids["special"], ids["mask"], ids["vocab"], g)
        n = int((labels != -100).sum())
        if n == 0:
            continue
        with autocast(device, amp):
            loss = mlm_loss(model, inputs.to(device), labels.to(device))
        total += float(loss) * n
        count += n
    model.train(was)
    return total / max(1, count)


class _MLMObjective(nn.Module):
    """The training loss as a module (what DDP wraps): masked-LM cross-entropy summed over this
    rank's masked positions and divided by ``count``, the global batch's masked positions (so the
    gradient averaged over ranks is the one-process gradient of the global batch's mean loss)."""

    def __init__(self, model: nn.Module, head_only: bool = False):
        super().__init__()
        self.model, self.head_only = model, head_only

    def forward(self, inputs, labels, count):
        sel = labels != -100
        if self.head_only:
            with torch.no_grad():
                hidden = self.model.bert(input_ids=inputs).last_hidden_state
        else:
            hidden = self.model.bert(input_ids=inputs).last_hidden_state
        logits = self.model.cls(hidden[sel])
        return F.cross_entropy(logits.float(), labels[sel], reduction="sum") / count


RESUME_DIR = "resume"


def pretrain(model: nn.Module, cfg: PretrainConfig, train_blocks: torch.Tensor, dev_blocks: torch.Tensor,
             ids: dict, device: Optional[torch.device] = None, amp: bool = False, progress: bool = True,
             desc: str = "pretrain", save_dir=None, save_every: int = 0, resume: bool = False,
             run_info: Optional[dict] = None, deadline: Optional[float] = None) -> dict:
    """Train ``model`` (a ``BertForMaskedLM`` with a pooler) in place; returns the run's numbers.

    For modes other than ``dense`` the model is sparsified (at 0) and pruned gradually; the
    returned dict has ``dev_mlm_loss``, ``train_loss`` (mean of the last 10% of steps),
    ``seconds_per_step``, ``sparsity`` (achieved, over the pruned layers), ``mask_updates``
    (``[step, sparsity]`` at each mask recomputation) and a loss curve.

    Under ``torchrun`` (:mod:`sparsebert.distributed` set up) each step's global batch is
    ``cfg.batch_size`` × world size, drawn identically on every rank and split between them; the
    objective runs in DDP (rebuilt after each layout change), pruning decisions come from rank 0
    and every rank's model and optimizer state are compared after each pruning event
    (``rank_checks`` in the result). With ``save_dir`` and ``save_every`` the full training state
    (model, optimizer, schedule, data order, RNGs) is written by rank 0 every ``save_every`` steps
    and at the end to ``save_dir/resume`` (:func:`save_train_state`); ``resume=True`` continues
    from it, on any number of ranks. ``run_info`` (the settings that make the run what it is) is
    stored with that state, so a resume can check it continues the same run (:func:`train_state_run`).
    With ``deadline`` (a ``time.time()``) no step starts after it: the state is saved (with
    ``save_dir``) and the result is only ``{"stopped_at": last step done, "steps": cfg.steps}``.
    """
    import sparsebert
    from sparsebert import distributed as D
    from sparsebert.optimize import unoptimize
    from sparsebert.pruning import CubicSchedule, Pruner

    ctx = D.context()
    world = ctx.world
    device = device or pick_device()
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    pruner = None
    if cfg.mode != "dense":
        sparsebert.sparsify(model, 0.0, block=(cfg.block, cfg.block), mode=cfg.mode, scope=cfg.scope,
                            score=cfg.score, seed=cfg.seed, backend=cfg.backend)
        model.to(device)
    if cfg.optimize:
        # SDPA, BERT's GELU fused into block-sparse layers in training, cheaper CPU dropout; the
        # MLM head already runs on labelled rows only (_MLMObjective). Undone before returning, so
        # the saved model and its config are plain Hugging Face.
        sparsebert.optimize(model)
    state = None
    if resume and save_dir is not None:
        state = load_train_state(save_dir, model)
        model.to(device).train()
    if cfg.head_only:
        emb = model.get_input_embeddings().weight
        for p in model.parameters():
            p.requires_grad_(False)
        params = [p for p in model.cls.parameters() if p is not emb]
        for p in params:
            p.requires_grad_(True)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = make_adamw([{"params": decay, "weight_decay": cfg.weight_decay},
                      {"params": no_decay, "weight_decay": 0.0}], cfg.lr)
    sched = linear_schedule(opt, cfg.steps, cfg.warmup_fraction)
    if cfg.mode != "dense":
        schedule = CubicSchedule(0.0, cfg.sparsity, 0, cfg.ramp_end(), cfg.prune_every)
        pruner = Pruner(model, schedule, scope=cfg.scope, score=cfg.score, optimizer=opt, seed=cfg.seed)
        D.install(pruner)

    g = torch.Generator().manual_seed(cfg.seed)
    n = len(train_blocks)
    gbatch = cfg.batch_size * world
    if gbatch > n:
        raise ValueError(f"global batch {gbatch} (batch size {cfg.batch_size} x {world} ranks) exceeds the "
                         f"{n} training blocks")
    perm = torch.randperm(n, generator=g)
    pos, first = 0, 1
    losses: List[float] = []
    updates: List[List[float]] = []
    checks: List[int] = []
    train_time = 0.0
    if state is not None:
        first = _restore(state, opt, sched, pruner, g, device)
        perm, pos = state["perm"], state["pos"]
        losses, updates = state["losses"], state["updates"]
        train_time = state["train_time"]
    objective = _MLMObjective(model, cfg.head_only)
    step_fn = D.wrap(objective, model, opt, where="at the start")
    if ctx.enabled:
        checks.append(first - 1)
        if ctx.rank:
            torch.manual_seed(cfg.seed + 7919 * ctx.rank + first)     # each rank its own dropout draws
    bar = progress_bar(cfg.steps, desc, progress and ctx.main)
    bar.update(first - 1)
    cpu_time = time.process_time()
    stopped = None
    for step in range(first, cfg.steps + 1):
        if deadline is not None:
            late = float(time.time() >= deadline)
            if (D.all_mean(late) if world > 1 else late) > 0:     # every rank stops at the same step
                stopped = step - 1
                break
        if pos + gbatch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + gbatch]
        pos += gbatch
        inputs, labels = mask_tokens(train_blocks[idx], ids["special"], ids["mask"], ids["vocab"], g, cfg.mask_prob)
        count = max(1, int((labels != -100).sum()))
        inputs, labels = D.shard(inputs, labels)
        t0 = time.perf_counter()
        with autocast(device, amp):
            loss = step_fn(inputs.to(device), labels.to(device), count)
        # DDP averages gradients over ranks: scale by the world size to get the global batch's
        loss_value = optimizer_step(loss * world if world > 1 else loss, opt, sched)
        losses.append(D.all_mean(loss_value) if world > 1 else loss_value)
        del loss
        if pruner is not None and pruner.step(step):   # also clears pruned weights' AdamW state
            updates.append([step, round(pruner.sparsity(), 6)])
            if ctx.enabled:
                step_fn = D.rewrap(step_fn, model, opt, where=f"after pruning at step {step}")
                checks.append(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time += time.perf_counter() - t0
        if save_dir is not None and save_every and (step % save_every == 0 or step == cfg.steps):
            save_train_state(save_dir, model, opt, sched, pruner, g, perm, pos, step, losses, updates, train_time,
                             run_info)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", sparsity=f"{pruner.sparsity():.2f}" if pruner else "0")
    bar.close()
    if stopped is not None:
        if save_dir is not None:
            save_train_state(save_dir, model, opt, sched, pruner, g, perm, pos, stopped, losses, updates, train_time,
                             run_info)
        if cfg.optimize:
            unoptimize(model)
        return {"stopped_at": stopped, "steps": cfg.steps}
    cpu_time = time.process_time() - cpu_time      # this process's CPU seconds (all threads) in the loop
    if ctx.enabled:
        D.verify_identical(model, opt, where="at the end")
        checks.append(cfg.steps)
    del step_fn
    tail = losses[-max(1, len(losses) // 10):]
    t_dev = time.process_time()
    dev = mlm_dev_loss(model, dev_blocks, ids, device, amp=amp)
    t_dev = time.process_time() - t_dev
    if cfg.optimize:
        unoptimize(model)
    every = max(1, len(losses) // 50)
    return {
        "dev_mlm_loss": dev,
        "train_loss": sum(tail) / len(tail),
        "seconds_per_step": train_time / max(1, cfg.steps),
        "cpu_seconds_train": cpu_time,
        "cpu_seconds_dev": t_dev,
        "sparsity": pruner.sparsity() if pruner else 0.0,
        "kept_fractions": pruner.kept_fractions() if pruner else {},
        "mask_updates": updates,
        "loss_curve": [[i + 1, round(l, 4)] for i, l in enumerate(losses) if i % every == 0 or i == len(losses) - 1],
        "steps": cfg.steps,
        "world_size": world,
        "global_batch_size": gbatch,
        "rank_checks": checks,
        "resumed_at": first - 1 if state is not None else None,
    }


# ---------------------------------------------------------------------------------------------
# Training state (resume): safetensors + JSON, never a pickle; written by rank 0, atomically
# ---------------------------------------------------------------------------------------------
def _gen_state(g: torch.Generator) -> List[int]:
    return g.get_state().tolist()


def save_train_state(save_dir, model, opt, sched, pruner, g, perm, pos, step, losses, updates,
                     train_time, run_info: Optional[dict] = None) -> Optional[Path]:
    """Write ``save_dir/resume/step-NNNNNN/`` (model as a sparse checkpoint, optimizer state as
    safetensors, the rest as JSON) and then point ``save_dir/resume/LATEST`` at it (an atomic
    rename), removing older states. Rank 0 writes; every rank waits for it."""
    import json
    import os
    import shutil

    from safetensors.torch import save_file

    from sparsebert import distributed as D
    from sparsebert.checkpoint import save_sparse
    root = Path(save_dir) / RESUME_DIR
    name = f"step-{step:06d}"
    if D.is_main():
        root.mkdir(parents=True, exist_ok=True)
        d = root / name
        save_sparse(model, d / "model")
        sd = opt.state_dict()
        tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items()
                   for k, v in st.items() if torch.is_tensor(v)}
        tensors["perm"] = perm.clone()
        tmp = d / "optimizer.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, d / "optimizer.safetensors")
        meta = {"step": step, "pos": pos, "param_groups": sd["param_groups"],
                "scalars": {str(i): {k: v for k, v in st.items() if not torch.is_tensor(v)}
                            for i, st in sd["state"].items()},
                "scheduler": {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"},
                "data_generator": _gen_state(g), "torch_rng": _gen_state(torch.default_generator),
                "pruner": None if pruner is None else {"current_sparsity": pruner.current_sparsity,
                                                       "generator": _gen_state(pruner.generator)},
                "losses": losses, "updates": updates, "train_time": train_time, "run": run_info}
        tmp = d / "state.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, d / "state.json")
        tmp = root / "LATEST.tmp"
        tmp.write_text(name)
        os.replace(tmp, root / "LATEST")
        for old in root.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return root / name


def has_train_state(save_dir) -> bool:
    return (Path(save_dir) / RESUME_DIR / "LATEST").is_file()


def train_state_run(save_dir) -> Optional[dict]:
    """The ``run_info`` stored with the latest training state (None: written without one, e.g.
    by an older sparsebert)."""
    import json
    root = Path(save_dir) / RESUME_DIR
    d = root / (root / "LATEST").read_text().strip()
    return json.loads((d / "state.json").read_text()).get("run")


def clear_train_state(save_dir) -> None:
    """Remove ``save_dir/resume`` (a run replaced with ``--force`` must not be resumable)."""
    import shutil
    root = Path(save_dir) / RESUME_DIR
    if root.exists():
        shutil.rmtree(root)


def load_train_state(save_dir, model: nn.Module) -> dict:
    """Read the state :func:`save_train_state` wrote, loading its model (layouts included) into
    ``model``; returns the rest for :func:`pretrain` to restore."""
    import json

    from safetensors.torch import load_file

    from sparsebert.checkpoint import load_sparse
    root = Path(save_dir) / RESUME_DIR
    d = root / (root / "LATEST").read_text().strip()
    saved = load_sparse(d / "model", model=model)      # a filled copy of ``model`` (verified files)
    model.load_state_dict(saved.state_dict())           # layouts too (BlockSparseLinear adopts them)
    del saved
    meta = json.loads((d / "state.json").read_text())
    tensors = load_file(str(d / "optimizer.safetensors"))
    meta["perm"] = tensors.pop("perm")
    meta["optimizer_tensors"] = tensors
    return meta


def _restore(state: dict, opt, sched, pruner, g, device) -> int:
    """Restore optimizer, schedule, pruner and RNG state; returns the first step to run."""
    st: Dict[int, dict] = {}
    for key, v in state["optimizer_tensors"].items():
        i, k = key.split(".", 1)
        st.setdefault(int(i), {})[k] = v
    for i, sc in state["scalars"].items():
        st.setdefault(int(i), {}).update(sc)
    opt.load_state_dict({"state": st, "param_groups": state["param_groups"]})
    sched.load_state_dict(dict(state["scheduler"], lr_lambdas=[None] * len(opt.param_groups)))
    if pruner is not None and state["pruner"] is not None:
        pruner.current_sparsity = state["pruner"]["current_sparsity"]
        pruner.generator.set_state(torch.tensor(state["pruner"]["generator"], dtype=torch.uint8))
    g.set_state(torch.tensor(state["data_generator"], dtype=torch.uint8))
    torch.default_generator.set_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return int(state["step"]) + 1
