"""Fine-tuning a (pruned) pre-trained encoder on one task, the mask held fixed.

The encoder keeps its sparse layers, so pruned weights stay exactly zero (MaskedLinear multiplies
by its mask; BlockSparseLinear has no storage for dropped blocks). Controls (``control``):

* ``"none"`` — the paper's main setting.
* ``"deletion"`` — information deletion: :func:`sparsebert.densify` first; the pruned weights
  start at zero but are free to regrow.
* ``"prune"`` — pruning during fine-tuning instead of pre-training: start from the dense
  encoder, sparsify at 0 and prune gradually (same cubic schedule) while fine-tuning.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .data import TaskData
from .pretrain import attach_pooler
from .training import autocast, linear_schedule, make_adamw, optimizer_step, pick_device, progress_bar

CONTROLS = ("none", "deletion", "prune")
POOLINGS = ("cls", "mean")


@dataclass
class FinetuneConfig:
    task: str = "polarity"
    lr: float = 5e-5
    epochs: float = 3.0
    max_steps: Optional[int] = None   # caps the steps implied by ``epochs``
    batch_size: int = 32              # sequences per batch (the cap, with ``token_budget``)
    token_budget: Optional[int] = None  # batches of length-bucketed sequences, n × padded length ≤ this
    max_len: int = 128
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    dropout: float = 0.1
    seed: int = 0
    control: str = "none"
    # what the classifier reads: "cls" (BERT's pooler over [CLS], as BertForSequenceClassification)
    # or "mean" (the last hidden states averaged over real tokens: how a sentence encoder such as
    # MiniLM-L6 was trained, and what the probe reads)
    pooling: str = "cls"
    # for control "prune": what to prune to while fine-tuning
    prune_mode: str = "unstructured"
    prune_sparsity: float = 0.0
    prune_score: str = "magnitude"
    block: int = 32
    ramp_fraction: float = 0.1
    prune_every: int = 10
    backend: str = "auto"
    optimize: bool = True             # sparsebert.optimize on the encoder (SDPA, fused GELU, fast CPU dropout)

    def __post_init__(self):
        if self.control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}, got {self.control!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.control == "prune" and not 0.0 < self.prune_sparsity < 1.0:
            raise ValueError("control 'prune' needs 0 < prune_sparsity < 1")


class SequenceModel(nn.Module):
    """BERT encoder + pooling + dropout + linear head. ``pooling="cls"``: BERT's pooler over [CLS]
    (what BertForSequenceClassification does); ``"mean"``: the last hidden states averaged over the
    real tokens (the pooler is not used)."""

    def __init__(self, bert: nn.Module, num_labels: int, dropout: float = 0.1, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.bert = bert
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(bert.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids, attention_mask=None):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        h = out.last_hidden_state
        if self.pooling == "mean":
            pooled = mean_pool(h, torch.ones(h.shape[:2], device=h.device) if attention_mask is None
                               else attention_mask)
        else:
            pooled = out.pooler_output if out.pooler_output is not None else h[:, 0]
        return self.classifier(self.dropout(pooled))


def load_encoder(path) -> nn.Module:
    """An encoder written by :func:`sparsebert.study.pretrain.save_encoder` (a sparse checkpoint:
    safetensors, verified, never unpickled), in eval mode. A BERT pooler is there exactly when
    the saved model had one (a ``BertForMaskedLM`` given one by :func:`attach_pooler`, a
    ``BertModel`` without). Raises :class:`sparsebert.CheckpointError`."""
    from sparsebert.checkpoint import build_model, load_sparse, tensor_names
    from transformers.models.bert.modeling_bert import BertPooler

    model = build_model(path)
    bert, prefix = (model, "") if hasattr(model, "pooler") else (getattr(model, "bert", None), "bert.")
    if bert is not None and hasattr(bert, "pooler"):
        saved = any(n.startswith(prefix + "pooler.") for n in tensor_names(path))
        if saved and bert.pooler is None:
            bert.pooler = BertPooler(model.config)
        elif not saved and bert.pooler is not None:
            bert.pooler = None
    return load_sparse(path, model=model)


def mean_pool(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L, H]`` hidden states averaged over each sequence's real tokens (mask 1): ``[B, H]``."""
    m = attention_mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


def encode(tokenizer, texts: Sequence[str], max_len: int) -> List[List[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]


def collate(seqs: Sequence[List[int]], pad_id: int):
    """Pad to the batch's longest sequence (dynamic padding)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
    return ids, att


def batches(seqs: Sequence[Sequence[int]], batch_size: int, token_budget: Optional[int], generator) -> List[List[int]]:
    """One epoch of batches (lists of indices), in a seeded random order.

    Without ``token_budget``: consecutive ``batch_size`` slices of a random permutation. With it:
    the permutation is cut into chunks of 16 batches, each chunk sorted by length and packed
    greedily so that (sequences × the batch's longest) ≤ ``token_budget`` and sequences ≤
    ``batch_size`` (dynamic padding then pads little); the batches are shuffled again."""
    perm = torch.randperm(len(seqs), generator=generator).tolist()
    if not token_budget:
        return [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    out: List[List[int]] = []
    chunk = 16 * batch_size
    for c in range(0, len(perm), chunk):
        part = sorted(perm[c:c + chunk], key=lambda i: len(seqs[i]))
        cur: List[int] = []
        for i in part:
            longest = max(len(seqs[i]), max((len(seqs[j]) for j in cur), default=0))
            if cur and (len(cur) + 1 > batch_size or (len(cur) + 1) * longest > token_budget):
                out.append(cur)
                cur = []
            cur.append(i)
        if cur:
            out.append(cur)
    order = torch.randperm(len(out), generator=generator).tolist()
    return [out[i] for i in order]


def _rank(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), for Spearman's rho."""
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    xs = x[order]
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        if j > i:
            ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else 0.0


def metrics(kind: str, preds: torch.Tensor, labels: torch.Tensor) -> dict:
    """Classification: accuracy (%). Regression: Pearson and Spearman (×100); ``score`` is the
    task's single number (accuracy, or the mean of Pearson and Spearman as GLUE does for STS-B)."""
    if kind == "classification":
        acc = 100.0 * float((preds.argmax(-1) == labels).double().mean())
        return {"accuracy": acc, "score": acc}
    p = preds.view(-1).double()
    y = labels.view(-1).double()
    pr, sr = 100.0 * pearson(p, y), 100.0 * pearson(_rank(p), _rank(y))
    return {"pearson": pr, "spearman": sr, "score": (pr + sr) / 2}


@torch.no_grad()
def evaluate(model: nn.Module, seqs, labels, kind: str, pad_id: int, device, amp=False, batch_size=64) -> dict:
    was = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))   # length-sorted: less padding
    preds = [None] * len(seqs)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        ids, att = collate([seqs[j] for j in idx], pad_id)
        with autocast(device, amp):
            out = model(ids.to(device), att.to(device)).float().cpu()
        for k, j in enumerate(idx):
            preds[j] = out[k]
    model.train(was)
    y = torch.tensor(labels, dtype=torch.long if kind == "classification" else torch.float)
    return metrics(kind, torch.stack(preds), y)


def finetune(encoder: nn.Module, cfg: FinetuneConfig, data: TaskData, tokenizer,
             device: Optional[torch.device] = None, amp: bool = False, progress: bool = True,
             desc: str = "finetune", return_model: bool = False) -> dict:
    """Fine-tune a copy of ``encoder`` (a ``BertModel`` with pooler, possibly sparse) on ``data``.

    Returns ``dev_score`` (see :func:`metrics`), ``dev_metrics``, ``train_loss`` (mean batch loss
    over the last quarter of the steps), ``seconds_per_step``, ``steps`` and ``sparsity``
    (fraction of zero weights in the pruned matrices at the end); with ``return_model`` also the
    trained model under ``"model"``.

    Under ``torchrun`` (:mod:`sparsebert.distributed` set up) the model runs in DDP; each step's
    global batch (``batch_size`` × world size sequences, or the token budget × world size) is
    drawn identically on every rank and split between them, the loss is the global batch's mean,
    and with control ``"prune"`` the pruning decisions come from rank 0 (DDP rebuilt, ranks
    verified identical after each pruning event).
    """
    import sparsebert
    from sparsebert import distributed as D
    from sparsebert.optimize import unoptimize
    from sparsebert.hf import sparse_layers
    from sparsebert.pruning import CubicSchedule, Pruner

    ctx = D.context()
    world = ctx.world
    device = device or pick_device()
    torch.manual_seed(cfg.seed)
    spec = data.spec
    model = SequenceModel(copy.deepcopy(encoder), spec.num_labels, cfg.dropout, cfg.pooling)
    if cfg.control == "deletion":
        sparsebert.densify(model)
    elif cfg.control == "prune":
        sparsebert.sparsify(model, 0.0, block=(cfg.block, cfg.block), mode=cfg.prune_mode,
                            score=cfg.prune_score, seed=cfg.seed, backend=cfg.backend)
    if cfg.optimize:
        sparsebert.optimize(model.bert)     # undone at the end: the returned model is plain
    model.to(device).train()

    train_seqs = encode(tokenizer, [t for t, _ in data.train], cfg.max_len)
    train_y = [y for _, y in data.train]
    dev_seqs = encode(tokenizer, [t for t, _ in data.dev], cfg.max_len)
    dev_y = [y for _, y in data.dev]
    g = torch.Generator().manual_seed(cfg.seed)
    budget = cfg.token_budget * world if cfg.token_budget else None
    epoch_batches = lambda: batches(train_seqs, cfg.batch_size * world, budget, g)  # noqa: E731
    first = epoch_batches()
    steps_per_epoch = len(first)
    steps = max(1, int(round(cfg.epochs * steps_per_epoch)))
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_adamw([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], cfg.lr)
    sched = linear_schedule(opt, steps, cfg.warmup_fraction)
    pruner = None
    if cfg.control == "prune":
        end = max(1, int(round(cfg.ramp_fraction * steps)))
        pruner = Pruner(model, CubicSchedule(0.0, cfg.prune_sparsity, 0, end, cfg.prune_every),
                        score=cfg.prune_score, optimizer=opt, seed=cfg.seed)
        D.install(pruner)
    net = D.wrap(model, model, opt, where="at the start")
    if ctx.enabled and ctx.rank:
        torch.manual_seed(cfg.seed + 7919 * ctx.rank)      # each rank its own dropout draws

    pad = tokenizer.pad_token_id
    ydtype = torch.long if spec.kind == "classification" else torch.float
    losses: List[float] = []
    train_time = 0.0
    queue = list(first)
    bar = progress_bar(steps, desc, progress and ctx.main)
    cpu_time = time.process_time()
    for step in range(1, steps + 1):
        if not queue:
            queue = epoch_batches()
        idx = queue.pop(0)
        count, weight = len(idx), 1.0
        if world > 1:               # this rank's contiguous part (sizes differ by at most one)
            part = [c.tolist() for c in torch.tensor_split(torch.arange(count), world)][ctx.rank]
            idx, weight = ([idx[i] for i in part], 1.0) if part else (idx[:1], 0.0)  # an empty part: weight 0
        ids, att = collate([train_seqs[i] for i in idx], pad)
        y = torch.tensor([train_y[i] for i in idx], dtype=ydtype, device=device)
        t0 = time.perf_counter()
        with autocast(device, amp):
            out = net(ids.to(device), att.to(device)).float()
        if world > 1:   # the global batch's mean loss; DDP averages over ranks, hence × world
            loss = (F.cross_entropy(out, y, reduction="sum") if spec.kind == "classification"
                    else F.mse_loss(out.view(-1), y, reduction="sum")) * (weight * world / count)
            losses.append(D.all_mean(optimizer_step(loss, opt, sched)))
        else:
            loss = F.cross_entropy(out, y) if spec.kind == "classification" else F.mse_loss(out.view(-1), y)
            losses.append(optimizer_step(loss, opt, sched))
        del loss, out
        if pruner is not None and pruner.step(step) and ctx.enabled:   # also clears pruned weights' AdamW state
            net = D.rewrap(net, model, opt, where=f"after pruning at step {step}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    cpu_time = time.process_time() - cpu_time
    if ctx.enabled:
        D.verify_identical(model, opt, where="at the end of fine-tuning")
    del net
    t_dev = time.process_time()
    dev = evaluate(model, dev_seqs, dev_y, spec.kind, pad, device, amp)
    t_dev = time.process_time() - t_dev
    if cfg.optimize:
        unoptimize(model.bert)
    tail = losses[-max(1, len(losses) // 4):]
    layers = sparse_layers(model)
    result = {
        "dev_score": dev["score"],
        "dev_metrics": dev,
        "train_loss": sum(tail) / len(tail),
        "seconds_per_step": train_time / steps,
        "cpu_seconds_train": cpu_time,
        "cpu_seconds_dev": t_dev,
        "steps": steps,
        "loss_curve": [[i + 1, round(l, 4)] for i, l in enumerate(losses)
                       if i % max(1, len(losses) // 20) == 0 or i == len(losses) - 1],
        "linear_zero_fraction": zero_fraction(model),
        "sparse_layers": len(layers),
        "world_size": world,
    }
    if return_model:
        result["model"] = model
    return result


@torch.no_grad()
def zero_fraction(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over the encoder's pruned linears (Q, K, V, attention
    output, intermediate, output, pooler), whether they are dense or sparse layers now."""
    from sparsebert.hf import BERT_LINEAR_TARGETS
    import re
    from sparsebert.nn import BlockSparseLinear

    pats = [re.compile(p) for p in BERT_LINEAR_TARGETS]
    zeros = total = 0
    for name, m in model.named_modules():
        if not any(p.search(name) for p in pats):
            continue
        if isinstance(m, BlockSparseLinear):
            n = m.out_features * m.in_features
            zeros += n - int((m.values != 0).sum())
            total += n
        elif hasattr(m, "weight") and isinstance(getattr(m, "weight"), torch.Tensor):
            w = m.weight * m.mask if hasattr(m, "mask") else m.weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / max(1, total)
