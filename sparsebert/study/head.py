"""Fitting the MLM head of a start model that ships none (MiniLM), once, before any pruning.

The head (``cls.predictions``: dense → GELU → LayerNorm → decoder + bias) is fit on features
of the *frozen* encoder: the masked positions of ``blocks`` MLM blocks are run through the
encoder once (the BERT masking recipe, seeded) and their last hidden states cached; the head is
then trained on those cached rows only — no encoder forward or backward per step. The decoder
weight is the (tied) word-embedding matrix and stays frozen, so the embeddings are exactly the
start model's; the transform and the output bias are trained.

Initialisation makes convergence cheap: the bias starts at the log unigram frequency of the
masked tokens (the best input-independent predictor); optionally (``init="lstsq"``) the
transform's dense layer starts at the ridge least-squares map from hidden state to the target
token's embedding (measured on MiniLM: no better than ``unigram`` once trained). Training (AdamW, cosine
decay) stops when the held-out positions' loss improves by less than ``tol`` between two checks
(``converged``) or at ``max_steps``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .data import mask_tokens
from .training import autocast, pick_device, progress_bar


@dataclass
class HeadConfig:
    blocks: int = 512              # MLM training blocks whose masked positions are the features
    heldout_fraction: float = 0.1  # of those positions, held out for the convergence check
    max_steps: int = 200
    batch_size: int = 1024         # positions per step
    lr: float = 1e-2
    eval_every: int = 10
    tol: float = 0.01              # stop when the held-out loss improves by less than this (nats)
    init: str = "unigram"          # unigram (bias only) | lstsq (also a ridge map for the dense layer)
    ridge: float = 1e-2
    seed: int = 0


@torch.no_grad()
def encoder_features(model: nn.Module, blocks: torch.Tensor, ids: dict, device: torch.device,
                     seed: int = 0, batch_size: int = 32, amp: bool = False,
                     progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hidden states [N, H] float32 on the CPU, labels [N]) of the masked positions of ``blocks``
    under the seeded BERT masking, from the frozen encoder ``model.bert`` in eval mode."""
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    hs: List[torch.Tensor] = []
    ys: List[torch.Tensor] = []
    bar = progress_bar(len(blocks), "MLM head: encoder features", progress)
    for i in range(0, len(blocks), batch_size):
        x = blocks[i:i + batch_size]
        inputs, labels = mask_tokens(x, ids["special"], ids["mask"], ids["vocab"], g)
        sel = labels != -100
        with autocast(device, amp):
            h = model.bert(input_ids=inputs.to(device)).last_hidden_state
        hs.append(h[sel.to(device)].float().cpu())
        ys.append(labels[sel])
        bar.update(len(x))
    bar.close()
    model.train(was)
    return torch.cat(hs), torch.cat(ys)


def _head_parts(model: nn.Module):
    pred = model.cls.predictions
    return pred, pred.transform, pred.decoder, pred.bias


def head_logits(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    pred, transform, decoder, bias = _head_parts(model)
    return F.linear(transform(h), decoder.weight, bias)


@torch.no_grad()
def head_loss(model: nn.Module, h: torch.Tensor, y: torch.Tensor, device, amp=False, batch_size=4096) -> float:
    total = 0.0
    for i in range(0, len(h), batch_size):
        hb, yb = h[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with autocast(device, amp):
            lo = head_logits(model, hb)
        total += float(F.cross_entropy(lo.float(), yb, reduction="sum"))
    return total / max(1, len(h))


@torch.no_grad()
def init_head(model: nn.Module, h: torch.Tensor, y: torch.Tensor, init: str = "unigram", ridge: float = 1e-2,
              h_check: Optional[torch.Tensor] = None, y_check: Optional[torch.Tensor] = None) -> None:
    """Bias = log unigram frequency of ``y`` (the transform keeps its random init); with ``lstsq``
    also the dense layer = the ridge map from ``h`` to the target tokens' embeddings, and the
    LayerNorm gain (a temperature) picked on ``h_check``/``y_check`` (default: ``h``, ``y``)."""
    pred, transform, decoder, bias = _head_parts(model)
    V = decoder.weight.shape[0]
    counts = torch.bincount(y, minlength=V).double() + 0.5
    bias.copy_((counts / counts.sum()).log().to(bias.dtype))
    if init == "lstsq":
        X = h.double()
        T = decoder.weight.detach().double().cpu()[y]
        mu = X.mean(0)
        Xc = X - mu
        A = Xc.T @ Xc / len(X)
        A += ridge * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype)
        W = torch.linalg.solve(A, Xc.T @ (T - T.mean(0)) / len(X)).T      # [H_out, H_in]
        # scale so the pre-activations are O(1); LayerNorm removes the overall scale anyway
        W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(1.0 / X.var(0).mean().item())
        transform.dense.weight.copy_(W.to(transform.dense.weight.dtype))
        transform.dense.bias.copy_((-(W @ mu)).to(transform.dense.bias.dtype))
        transform.LayerNorm.weight.fill_(1.0)
        transform.LayerNorm.bias.zero_()
        # a temperature: the LayerNorm gain that gives the lowest loss on (a sample of) the rows
        hc, yc = (h, y) if h_check is None else (h_check, y_check)
        sub = torch.randperm(len(hc), generator=torch.Generator().manual_seed(0))[:2048]
        hs, ys = hc[sub].to(decoder.weight.device), yc[sub].to(decoder.weight.device)
        best = None
        for gain in (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0):
            transform.LayerNorm.weight.fill_(gain)
            loss = float(F.cross_entropy(head_logits(model, hs).float(), ys))
            if best is None or loss < best[0]:
                best = (loss, gain)
        transform.LayerNorm.weight.fill_(best[1])
    elif init != "unigram":
        raise ValueError(f"init must be 'unigram' or 'lstsq', got {init!r}")


def fit_head(model: nn.Module, cfg: HeadConfig, train_blocks: torch.Tensor, ids: dict,
             device: Optional[torch.device] = None, amp: bool = False, progress: bool = True) -> Dict:
    """Fit ``model.cls`` (a ``BertForMaskedLM``) on frozen-encoder features, in place.

    Returns ``positions``, ``heldout_loss_start`` (after the closed-form initialisation),
    ``heldout_loss`` (at the end), ``unigram_loss`` (bias only), ``steps``, ``converged``, the
    held-out ``curve`` ``[[step, loss], ...]`` and the seconds spent on features and on fitting.
    Every parameter's ``requires_grad`` is restored to True at the end.
    """
    device = device or pick_device()
    torch.manual_seed(cfg.seed)
    model.to(device)
    t0 = time.perf_counter()
    n_blocks = min(cfg.blocks, len(train_blocks))
    h, y = encoder_features(model, train_blocks[:n_blocks], ids, device, seed=cfg.seed, amp=amp, progress=progress)
    t_feat = time.perf_counter() - t0
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(h), generator=g)
    n_ho = max(1, int(round(cfg.heldout_fraction * len(h))))
    ho, tr = perm[:n_ho], perm[n_ho:]
    h_ho, y_ho, h_tr, y_tr = h[ho], y[ho], h[tr], y[tr]

    pred, transform, decoder, bias = _head_parts(model)
    for p in model.parameters():
        p.requires_grad_(False)
    init_head(model, h_tr, y_tr, cfg.init, cfg.ridge, h_ho, y_ho)
    # the unigram loss: cross-entropy of the held-out labels under the bias alone
    unigram = float(-torch.log_softmax(bias.detach().float().cpu(), 0)[y_ho].mean())
    params = list(transform.parameters()) + [bias]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [transform.dense.weight], "weight_decay": 0.01},
                             {"params": [p for p in params if p is not transform.dense.weight], "weight_decay": 0.0}],
                            lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.max_steps) / max(1, cfg.max_steps))))
    h_tr, y_tr = h_tr.to(device), y_tr.to(device)
    start = head_loss(model, h_ho, y_ho, device, amp)
    curve = [[0, round(start, 4)]]
    best = start
    converged = False
    step = 0
    t1 = time.perf_counter()
    bar = progress_bar(cfg.max_steps, "MLM head fit", progress)
    while step < cfg.max_steps:
        idx = torch.randint(len(h_tr), (min(cfg.batch_size, len(h_tr)),), generator=g).to(device)
        with autocast(device, amp):
            lo = head_logits(model, h_tr[idx])
        loss = F.cross_entropy(lo.float(), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            cur = head_loss(model, h_ho, y_ho, device, amp)
            curve.append([step, round(cur, 4)])
            bar.set_postfix(heldout=f"{cur:.3f}")
            if best - cur < cfg.tol:
                converged = True
                best = min(best, cur)
                break
            best = cur
    bar.close()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"positions": len(h), "heldout_positions": n_ho, "unigram_loss": unigram,
            "heldout_loss_start": start, "heldout_loss": curve[-1][1], "steps": step, "converged": converged,
            "curve": curve, "seconds_features": t_feat, "seconds_fit": time.perf_counter() - t1}
