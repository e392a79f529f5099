"""Importance scores and exact top-k masks.

Unstructured: ``|w|`` (the paper). Block: the L2 norm of each block. Random: the paper's control.
The kept count is exact whatever the ties (``topk``, not a threshold).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

SCORES = ("magnitude", "random")


def element_scores(weight: torch.Tensor, score: str = "magnitude",
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One score per weight (float32, CPU)."""
    if score == "magnitude":
        return weight.detach().abs().float().cpu()
    if score == "random":
        return torch.rand(weight.shape, generator=generator)
    raise ValueError(f"unknown score {score!r}; choose one of {SCORES}")


def block_scores(weight: torch.Tensor, block: Tuple[int, int], score: str = "magnitude",
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One score per ``[bn, bk]`` block (``[N // bn, K // bk]``): block L2 norm, or random."""
    bn, bk = block
    N, K = weight.shape
    if N % bn or K % bk:
        raise ValueError(f"block ({bn}, {bk}) does not divide the weight shape ({N}, {K})")
    if score == "magnitude":
        w = weight.detach().float().cpu().reshape(N // bn, bn, K // bk, bk)
        return w.pow(2).sum(dim=(1, 3)).sqrt()
    if score == "random":
        return torch.rand(N // bn, K // bk, generator=generator)
    raise ValueError(f"unknown score {score!r}; choose one of {SCORES}")


def check_sparsity(sparsity) -> float:
    """``sparsity`` as a float in ``[0, 1]``, or a one-line error. A bool or a string is not a
    sparsity (``True`` would read as 1.0 and prune everything; ``"0.5"`` failed deep inside)."""
    if sparsity is None or isinstance(sparsity, (bool, str, bytes)):
        raise TypeError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    try:
        value = float(sparsity)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"sparsity must be a number in [0, 1], got {sparsity!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return value


def keep_count(n: int, sparsity: float) -> int:
    """Units kept out of ``n`` at ``sparsity``: the target rounded to whole units."""
    return int(round(n * (1.0 - check_sparsity(sparsity))))


def topk_mask(scores: torch.Tensor, k: int, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask keeping the ``k`` highest scores; only entries in ``allowed`` may be kept."""
    flat = scores.flatten().float()
    if allowed is not None:
        allowed = allowed.flatten().bool()
        k = min(k, int(allowed.sum()))
        flat = torch.where(allowed, flat, torch.full_like(flat, float("-inf")))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        # topk is a partial selection: ~5x faster than a full sort on an 11.7M-entry embedding
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view(scores.shape)


def global_masks(score_list: Sequence[torch.Tensor], sparsity: float,
                 allowed: Optional[Sequence[torch.Tensor]] = None,
                 weights: Optional[Sequence[int]] = None):
    """One threshold across layers: keep the best ``(1 - sparsity)`` of all units together.

    ``weights`` gives each layer's unit size (elements per unit, e.g. ``bn * bk`` for blocks) so
    that the kept fraction is of weights, not of units; the total is exact to within one unit.
    """
    weights = list(weights) if weights is not None else [1] * len(score_list)
    sizes = [s.numel() for s in score_list]
    total = sum(n * w for n, w in zip(sizes, weights))
    budget = total * (1.0 - sparsity)
    # Scores are compared per weight, so normalise block norms by sqrt(elements per block).
    flat = torch.cat([s.flatten().double() / (w ** 0.5) for s, w in zip(score_list, weights)])
    unit_w = torch.cat([torch.full((n,), w, dtype=torch.float64) for n, w in zip(sizes, weights)])
    if allowed is not None:
        ok = torch.cat([a.flatten().bool() for a in allowed])
        flat = torch.where(ok, flat, torch.full_like(flat, float("-inf")))
    order = torch.sort(flat, descending=True, stable=True).indices
    cum = torch.cumsum(unit_w[order], 0)
    n_keep = int(torch.searchsorted(cum, torch.tensor([budget + 1e-9], dtype=torch.float64)).item())
    # round to the nearer unit boundary
    if n_keep < len(order) and abs(cum[n_keep].item() - budget) < abs((cum[n_keep - 1].item() if n_keep else 0) - budget):
        n_keep += 1
    if allowed is not None:
        n_keep = min(n_keep, int(ok.sum()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:n_keep]] = True
    return [m.view(s.shape) for m, s in zip(torch.split(keep, sizes), score_list)]
