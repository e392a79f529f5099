"""A deterministic linear probe: how much of a task a frozen encoder's features already hold.

Features are the encoder's last hidden states mean-pooled over the real tokens (attention mask),
in eval mode (no dropout), for the task's fixed train and dev splits; they are standardised with
the train split's mean and sd. Classification: multinomial logistic regression with an L2
penalty, fit by full-batch L-BFGS in float64 from zero weights (no randomness: the same encoder
gives the same score). Regression: ridge regression in closed form. The score is the same
metric fine-tuning reports (:func:`sparsebert.study.finetune.metrics`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .data import TaskData
from .finetune import collate, encode, mean_pool, metrics
from .training import autocast, pick_device


@dataclass
class ProbeConfig:
    max_len: int = 128
    l2: float = 1e-2          # L2 penalty on the weights, per example (features standardised)
    max_iter: int = 200       # L-BFGS iterations
    batch_tokens: int = 4096  # feature extraction: sequences per batch × their padded length


@torch.no_grad()
def pooled_features(encoder: nn.Module, seqs: Sequence[Sequence[int]], pad_id: int, device,
                    amp: bool = False, batch_tokens: int = 4096) -> torch.Tensor:
    """Mean-pooled last hidden states [N, H] (float64, CPU), length-sorted token-budget batches."""
    was = encoder.training
    encoder.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [None] * len(seqs)
    i = 0
    while i < len(order):
        L = len(seqs[order[min(len(order) - 1, i)]])
        n = max(1, batch_tokens // max(1, L))
        # sorted ascending: the batch's longest is its last; shrink until it fits the budget
        while n > 1 and len(seqs[order[min(len(order), i + n) - 1]]) * n > batch_tokens:
            n -= 1
        idx = order[i:i + n]
        ids, att = collate([seqs[j] for j in idx], pad_id)
        ids, att = ids.to(device), att.to(device)
        with autocast(device, amp):
            h = encoder(input_ids=ids, attention_mask=att).last_hidden_state
        pooled = mean_pool(h, att).double().cpu()
        for k, j in enumerate(idx):
            out[j] = pooled[k]
        i += n
    encoder.train(was)
    return torch.stack(out)


def fit_logistic(X: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int) -> torch.Tensor:
    """Weights [H+1, C] (last row the bias) of an L2-penalised softmax regression, L-BFGS, float64."""
    Xb = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    W = torch.zeros(Xb.shape[1], num_classes, dtype=X.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(Xb @ W, y) + 0.5 * l2 * (W[:-1] ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return W.detach()


def fit_ridge(X: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    Xb = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    reg = torch.eye(Xb.shape[1], dtype=X.dtype) * l2 * len(X)
    reg[-1, -1] = 0
    return torch.linalg.solve(Xb.T @ Xb + reg, Xb.T @ y.double().view(-1, 1))


def probe(encoder: nn.Module, cfg: ProbeConfig, data: TaskData, tokenizer, device: Optional[torch.device] = None,
          amp: bool = False) -> dict:
    """Linear probe of ``encoder`` (a ``BertModel``, possibly sparse) on ``data``; deterministic.

    Returns ``dev_score`` and ``dev_metrics`` (as fine-tuning's), ``train_score`` and the
    seconds spent."""
    device = device or pick_device()
    t0 = time.perf_counter()
    spec = data.spec
    pad = tokenizer.pad_token_id
    tr = encode(tokenizer, [t for t, _ in data.train], cfg.max_len)
    dv = encode(tokenizer, [t for t, _ in data.dev], cfg.max_len)
    was_device = next(encoder.parameters()).device
    encoder.to(device)
    Xtr = pooled_features(encoder, tr, pad, device, amp, cfg.batch_tokens)
    Xdv = pooled_features(encoder, dv, pad, device, amp, cfg.batch_tokens)
    encoder.to(was_device)
    mu, sd = Xtr.mean(0), Xtr.std(0).clamp_min(1e-6)
    Xtr, Xdv = (Xtr - mu) / sd, (Xdv - mu) / sd
    t_feat = time.perf_counter() - t0
    if spec.kind == "classification":
        ytr = torch.tensor([y for _, y in data.train], dtype=torch.long)
        ydv = torch.tensor([y for _, y in data.dev], dtype=torch.long)
        with torch.enable_grad():
            W = fit_logistic(Xtr, ytr, spec.num_labels, cfg.l2, cfg.max_iter)
        pred = lambda X: torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1) @ W  # noqa: E731
    else:
        ytr = torch.tensor([y for _, y in data.train], dtype=torch.float64)
        ydv = torch.tensor([y for _, y in data.dev], dtype=torch.float64)
        W = fit_ridge(Xtr, ytr, cfg.l2)
        pred = lambda X: torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1) @ W  # noqa: E731
    dev = metrics(spec.kind, pred(Xdv), ydv)
    train = metrics(spec.kind, pred(Xtr), ytr)
    return {"dev_score": dev["score"], "dev_metrics": dev, "train_score": train["score"],
            "seconds_features": t_feat, "seconds": time.perf_counter() - t0}
