"""The :class:`Pruner`: owns a model's masks and tightens them on a schedule."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..layout import BlockLayout
from ..nn import sync_optimizer_state
from .scores import block_scores, element_scores, global_masks, keep_count, topk_mask


def prunable_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every masked or block-sparse layer, each parameter once.

    A tied MLM decoder that shares its weight (and mask) with the word embeddings is listed once.
    """
    from ..nn import BlockSparseLinear, MaskedEmbedding, MaskedLinear

    out, seen = [], set()
    for name, mod in model.named_modules():
        if isinstance(mod, (MaskedLinear, MaskedEmbedding)):
            key = id(mod.weight)
        elif isinstance(mod, BlockSparseLinear):
            key = id(mod.values)
        else:
            continue
        if key not in seen:
            seen.add(key)
            out.append((name, mod))
    return out


class Pruner:
    """Magnitude (or random) pruning of a sparsified model, stepped with the optimizer.

    Call :meth:`step` once per optimizer step, after ``optimizer.step()``. On the schedule's update
    steps the masks are recomputed at ``schedule.sparsity_at(step)`` from the current weights,
    among weights that are still kept (pruning only ever removes). Thresholds are per layer (the
    paper) or global. Block-sparse layers lose their dropped blocks for real: their ``values``
    shrink in place (:meth:`~sparsebert.BlockSparseLinear.set_layout`).

    Parameters are never replaced, so the rule for optimizers is simple: build them whenever you
    like, before or after the Pruner, with or without ``optimizer=``. Every optimizer holding a
    pruned parameter keeps training it, and its per-parameter state follows the pruning (gathered
    to the kept blocks; zeroed at pruned weights of masked layers, so a stale AdamW moment cannot
    regrow them): at once for ``optimizer``, and for any other optimizer at the start of its next
    ``step()`` (:func:`sparsebert.nn.sync_optimizer_state`). Parameter lists taken before pruning
    (``clip_grad_norm_``, EMA, logging) still hold the live parameters.

    Args:
        model: a model already converted by :func:`sparsebert.sparsify` (``sparsity=0`` to start).
        schedule: :class:`CubicSchedule`, :class:`OneShotSchedule` or anything with
            ``sparsity_at(step)`` and ``is_update_step(step)``.
        scope: ``"layer"`` or ``"global"``.
        score: ``"magnitude"`` or ``"random"`` (the paper's control).
        optimizer: optional; its state is brought in line right after each pruning step rather
            than at its next ``step()`` (useful when you read or save the state in between).
    """

    def __init__(self, model: nn.Module, schedule, scope: str = "layer", score: str = "magnitude",
                 optimizer: Optional[torch.optim.Optimizer] = None, seed: int = 0):
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        if score not in ("magnitude", "random"):
            raise ValueError(f"score must be 'magnitude' or 'random', got {score!r}")
        if not (callable(getattr(schedule, "sparsity_at", None)) and callable(getattr(schedule, "is_update_step", None))):
            raise TypeError(f"schedule must have sparsity_at(step) and is_update_step(step) (e.g. a "
                            f"CubicSchedule), got {type(schedule).__name__}")
        self.layers = prunable_layers(model)
        if not self.layers:
            raise ValueError("model has no MaskedLinear/MaskedEmbedding/BlockSparseLinear layers: "
                             "convert it first with sparsebert.sparsify(model, sparsity=0.0, ...)")
        self.schedule, self.scope, self.score = schedule, scope, score
        self.optimizer = optimizer
        self.generator = torch.Generator().manual_seed(seed)
        self.current_sparsity = 0.0
        # called with the new keep masks (one per layer, in ``self.layers`` order) before they are
        # applied; returns the masks to apply. ``sparsebert.distributed.install`` sets it to
        # broadcast rank 0's decision, so every rank applies the same masks.
        self.decision_hook = None

    # ---- one layer's scores, kept set and size -------------------------------------------------
    def _unit_scores(self, mod):
        from ..nn import BlockSparseLinear
        if isinstance(mod, BlockSparseLinear):
            return block_scores(mod.dense_weight(), mod.layout.block, self.score, self.generator)
        return element_scores(mod.weight, self.score, self.generator)

    @staticmethod
    def _allowed(mod):
        from ..nn import BlockSparseLinear
        if isinstance(mod, BlockSparseLinear):
            return mod.layout.block_mask
        return mod.mask.detach().cpu()

    @staticmethod
    def _unit_size(mod):
        from ..nn import BlockSparseLinear
        if isinstance(mod, BlockSparseLinear):
            bn, bk = mod.layout.block
            return bn * bk
        return 1

    def _apply(self, mod, keep: torch.Tensor) -> None:
        from ..nn import BlockSparseLinear
        if isinstance(mod, BlockSparseLinear):
            new = BlockLayout.from_mask(keep, mod.layout.block, mod.layout.shape)
            if new != mod.layout:
                mod.set_layout(new)
        else:
            mod.set_mask(keep)

    # ---- public ---------------------------------------------------------------------------
    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Recompute masks at ``sparsity`` now (only removing)."""
        allowed = [self._allowed(m) for _, m in self.layers]
        scores = [self._unit_scores(m) for _, m in self.layers]
        if self.scope == "layer":
            keeps = [topk_mask(s, min(keep_count(s.numel(), sparsity), int(a.sum())), a)
                     for s, a in zip(scores, allowed)]
        else:
            keeps = global_masks(scores, sparsity, allowed, [self._unit_size(m) for _, m in self.layers])
        if self.decision_hook is not None:
            keeps = self.decision_hook(keeps)
        for (_, mod), keep in zip(self.layers, keeps):
            self._apply(mod, keep)
        if self.optimizer is not None:
            sync_optimizer_state(self.optimizer)
        self.current_sparsity = sparsity

    def step(self, step: int) -> bool:
        """Call after each optimizer step; returns True when masks were recomputed."""
        if not self.schedule.is_update_step(step):
            return False
        target = self.schedule.sparsity_at(step)
        if target <= self.current_sparsity:      # masks only tighten
            return False
        self.prune_to(target)
        return True

    def kept_fractions(self) -> Dict[str, float]:
        """Per layer, the fraction of weights kept."""
        return {name: float(m.density) for name, m in self.layers}

    def sparsity(self) -> float:
        """Overall fraction of pruned weights across the managed layers."""
        kept = total = 0
        for _, m in self.layers:
            n = m.out_features * m.in_features if hasattr(m, "out_features") else m.weight.numel()
            kept += m.density * n
            total += n
        return 1.0 - kept / max(1, total)
