"""Pruning schedules: how sparse the model should be at each optimizer step."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

from .scores import check_sparsity


@dataclass(frozen=True)
class CubicSchedule:
    """Zhu & Gupta (2017) gradual pruning, as used by the paper.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3`` for ``t0 <= t <= t1``,
    ``s_i`` before ``t0``, ``s_f`` after ``t1``; masks are recomputed every ``frequency`` steps
    (and at ``t1``, so the final sparsity is always reached). ``s_f >= s_i``: masks only tighten,
    so a decreasing schedule is refused.
    """

    initial_sparsity: float = 0.0
    final_sparsity: float = 0.5
    start_step: int = 0
    end_step: int = 1000
    frequency: int = 10

    def __post_init__(self):
        for name in ("initial_sparsity", "final_sparsity"):
            try:
                v = check_sparsity(getattr(self, name))
            except (TypeError, ValueError) as e:
                raise type(e)(f"{name}: {e}") from None
            object.__setattr__(self, name, v)      # (frozen) a bool or a string is refused there
        for name in ("start_step", "end_step", "frequency"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be a whole number of steps, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.final_sparsity < self.initial_sparsity:
            raise ValueError(f"final_sparsity ({self.final_sparsity}) is below initial_sparsity "
                             f"({self.initial_sparsity}): pruning only removes weights, so the schedule "
                             "must not decrease")
        if self.end_step < self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must not precede start_step ({self.start_step})")
        if self.frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {self.frequency}")

    def sparsity_at(self, step: int) -> float:
        if step < self.start_step:
            return self.initial_sparsity
        if step >= self.end_step:
            return self.final_sparsity
        frac = (step - self.start_step) / (self.end_step - self.start_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - frac) ** 3

    def is_update_step(self, step: int) -> bool:
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.frequency == 0 or step == self.end_step


@dataclass(frozen=True)
class OneShotSchedule:
    """Prune once, to ``sparsity``, at ``step``."""

    sparsity: float
    step: int = 0

    def __post_init__(self):
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        if isinstance(self.step, bool) or not isinstance(self.step, numbers.Integral):
            raise TypeError(f"step must be a whole number, got {self.step!r}")
        object.__setattr__(self, "step", int(self.step))

    def sparsity_at(self, step: int) -> float:
        return self.sparsity if step >= self.step else 0.0

    def is_update_step(self, step: int) -> bool:
        return step == self.step
