""":class:`SparsityConfig`: a pruning setup as one JSON-serialisable object.

``sparsify(model, config)`` applies it (one shot, at ``config.sparsity``);
:class:`sparsebert.hf.PruningCallback` runs it gradually inside ``transformers.Trainer`` (with
``config.schedule``). Every checkpoint folder records the config a model was sparsified with
(``config.json`` under ``"sparsebert"`` for ``save_pretrained``; ``sparsebert.json`` and
``config.json`` for ``save_sparse``), so a setup can be shared and re-applied::

    cfg = SparsityConfig(mode="block", sparsity=0.8, block=32)
    cfg.save("sparsity.json")
    sparsebert.sparsify(model, SparsityConfig.load("sparsity.json"))
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from .layout import _as_block

FORMAT = "sparsebert-sparsity-config"
MODES = ("block", "unstructured")
SCOPES = ("layer", "global")
SCORES = ("magnitude", "random")
SCHEDULE_KEYS = ("initial_sparsity", "start_step", "end_step", "frequency")


def _schedule_dict(schedule) -> Optional[Dict[str, Any]]:
    if schedule is None:
        return None
    from .pruning.schedules import CubicSchedule
    if isinstance(schedule, CubicSchedule):
        return {"initial_sparsity": schedule.initial_sparsity, "start_step": schedule.start_step,
                "end_step": schedule.end_step, "frequency": schedule.frequency}
    if not isinstance(schedule, dict):
        raise ValueError(f"schedule must be a dict of {', '.join(SCHEDULE_KEYS)} or a CubicSchedule, "
                         f"got {type(schedule).__name__}")
    unknown = sorted(set(schedule) - set(SCHEDULE_KEYS) - {"final_sparsity"})
    if unknown:
        raise ValueError(f"schedule has unknown keys {unknown} (known: {', '.join(SCHEDULE_KEYS)}; "
                         "the final sparsity is the config's sparsity)")
    out = {"initial_sparsity": 0.0, "start_step": 0, "end_step": None, "frequency": None}
    out.update({k: v for k, v in schedule.items() if k != "final_sparsity"})
    return out


@dataclass
class SparsityConfig:
    """What to prune, how much and how: the arguments of :func:`sparsebert.sparsify` plus a
    gradual-pruning schedule, as a JSON-serialisable dataclass.

    Args:
        mode: ``"block"`` (:class:`~sparsebert.BlockSparseLinear`) or ``"unstructured"``
            (:class:`~sparsebert.MaskedLinear`).
        sparsity: the fraction of weights removed (the final one, for a schedule), in ``[0, 1]``.
        block: ``(bn, bk)`` or an int (block mode).
        scope: ``"layer"`` or ``"global"``.
        targets: ``None`` (BERT's Q, K, V, attention output, intermediate, output, pooler), a regex
            or a list of regexes (a predicate cannot be saved: pass it to ``sparsify`` directly).
        schedule: for gradual pruning (:class:`~sparsebert.hf.PruningCallback`): a dict with
            ``initial_sparsity`` (0), ``start_step`` (0), ``end_step`` (``None``: Trainer's
            ``max_steps``) and ``frequency`` (``None``: a tenth of the ramp), or a
            :class:`~sparsebert.pruning.CubicSchedule` (its ``final_sparsity`` must equal ``sparsity``).
        score, embeddings, fuse_activation, seed, backend: as in :func:`sparsebert.sparsify`.
    """

    mode: str = "block"
    sparsity: float = 0.5
    block: Union[int, Tuple[int, int], List[int]] = (32, 32)
    scope: str = "layer"
    targets: Union[None, str, List[str]] = None
    schedule: Optional[Dict[str, Any]] = None
    score: str = "magnitude"
    embeddings: Optional[bool] = None
    fuse_activation: bool = True
    seed: int = 0
    backend: str = "auto"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'block' or 'unstructured', got {self.mode!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be 'magnitude' or 'random', got {self.score!r}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0.0 <= float(self.sparsity) <= 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1], got {self.sparsity!r}")
        self.sparsity = float(self.sparsity)
        self.block = _as_block(self.block)
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if callable(self.targets):
            raise ValueError("a SparsityConfig holds regex targets only (a predicate cannot be saved): "
                             "pass the predicate to sparsify(targets=...) directly")
        if not (self.targets is None or isinstance(self.targets, str)
                or (isinstance(self.targets, list) and all(isinstance(t, str) for t in self.targets))):
            raise ValueError(f"targets must be None, a regex or a list of regexes, got {self.targets!r}")
        if self.embeddings is not None and not isinstance(self.embeddings, bool):
            raise ValueError(f"embeddings must be None, true or false, got {self.embeddings!r}")
        from .pruning.schedules import CubicSchedule
        if isinstance(self.schedule, CubicSchedule) and abs(self.schedule.final_sparsity - self.sparsity) > 1e-12:
            raise ValueError(f"schedule's final_sparsity ({self.schedule.final_sparsity}) differs from the "
                             f"config's sparsity ({self.sparsity})")
        self.schedule = _schedule_dict(self.schedule)
        if self.schedule is not None:
            self.cubic_schedule(max_steps=max(1, self.schedule["start_step"] or 0) + 1)   # validates

    # ---- schedule ------------------------------------------------------------------------------
    def cubic_schedule(self, max_steps: Optional[int] = None):
        """The :class:`~sparsebert.pruning.CubicSchedule` ramping to ``sparsity``; ``end_step``
        ``None`` becomes ``max_steps``, ``frequency`` ``None`` a tenth of the ramp (at least 1)."""
        from .pruning.schedules import CubicSchedule
        s = self.schedule or {"initial_sparsity": 0.0, "start_step": 0, "end_step": None, "frequency": None}
        end = s["end_step"]
        if end is None:
            if max_steps is None:
                raise ValueError("the schedule's end_step is None (Trainer's max_steps): give max_steps")
            end = int(max_steps)
        freq = s["frequency"]
        if freq is None:
            freq = max(1, (end - s["start_step"]) // 10)
        return CubicSchedule(initial_sparsity=float(s["initial_sparsity"]), final_sparsity=self.sparsity,
                             start_step=int(s["start_step"]), end_step=int(end), frequency=int(freq))

    @property
    def initial_sparsity(self) -> float:
        return float(self.schedule["initial_sparsity"]) if self.schedule else self.sparsity

    # ---- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block"] = list(self.block)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SparsityConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a SparsityConfig is read from a JSON object, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if k != "format"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown SparsityConfig fields {unknown} (known: {', '.join(sorted(names))})")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **self.to_dict()}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "SparsityConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path) -> None:
        with open(os.fspath(path), "w") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> "SparsityConfig":
        """From a JSON file written by :meth:`save`, or from a checkpoint folder (either format)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            from .hf import read_sparsity_config
            cfg = read_sparsity_config(path)
            if cfg is None:
                raise ValueError(f"{path} records no SparsityConfig")
            return cfg
        with open(path) as f:
            return cls.from_json(f.read())

    def sparsify_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of :func:`sparsebert.sparsify` this config stands for."""
        return {"sparsity": self.sparsity, "block": self.block, "mode": self.mode, "scope": self.scope,
                "targets": self.targets, "score": self.score, "seed": self.seed, "backend": self.backend,
                "embeddings": self.embeddings, "fuse_activation": self.fuse_activation}
