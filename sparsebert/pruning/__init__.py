"""Magnitude pruning: scores, schedules and the :class:`Pruner` that owns a model's masks."""
from .pruner import Pruner, prunable_layers
from .schedules import CubicSchedule, OneShotSchedule
from .scores import block_scores, element_scores, global_masks, keep_count, topk_mask

__all__ = ["Pruner", "prunable_layers", "CubicSchedule", "OneShotSchedule", "block_scores",
           "element_scores", "global_masks", "keep_count", "topk_mask"]
