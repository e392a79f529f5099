"""Seed aggregation: per-seed run records → one row per (mode, block, sparsity, control, task).

A *record* is one fine-tuning (or probe-only) result of one seed::

    {"mode", "block", "sparsity", "control", "task", "seed", "lr",
     "dev_score", "train_loss", "finetune_s_per_step",        # None when not fine-tuned
     "probe", "pretrain_dev_loss", "pretrain_s_per_step", "achieved_sparsity"}

For each row the learning rate is the one with the best *mean* dev score over seeds (the paper
takes the best of a few learning rates per task); ``mean``/``sd``/``n_seeds`` are over the seeds
at that rate (``sd``: sample standard deviation, None for one seed). With more than one task an
``average`` row per (mode, block, sparsity, control) averages the tasks per seed first.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

ROW_KEYS = ("mode", "block", "sparsity", "control")
MODE_ORDER = {"dense": 0, "unstructured": 1, "block": 2}
CONTROL_ORDER = {"none": 0, "scratch": 1, "random": 2, "deletion": 3, "finetune-prune": 4}


def mean_sd(xs: Iterable[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    """(mean, sample sd or None when fewer than 2, n) of the values that are not None."""
    v = [float(x) for x in xs if x is not None]
    if not v:
        return None, None, 0
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, None, len(v)
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)), len(v)


def sort_key(r: dict):
    return (CONTROL_ORDER.get(r["control"], 9), MODE_ORDER.get(r["mode"], 9), r["block"], r["sparsity"],
            r["task"] == "average", r["task"])


def aggregate(records: Sequence[dict], tasks: Sequence[str], metrics: Optional[Dict[str, str]] = None) -> List[dict]:
    metrics = metrics or {}
    groups: Dict[tuple, List[dict]] = {}
    for rec in records:
        groups.setdefault(tuple(rec[k] for k in ROW_KEYS) + (rec["task"],), []).append(rec)
    rows: List[dict] = []
    per_seed_best: Dict[tuple, Dict[int, float]] = {}      # (row key) -> {seed: {task: dev}}
    for gk, recs in groups.items():
        by_lr: Dict[object, List[dict]] = {}
        for r in recs:
            by_lr.setdefault(r.get("lr"), []).append(r)

        def lr_mean(lr):
            m = mean_sd(r.get("dev_score") for r in by_lr[lr])[0]
            return -math.inf if m is None else m
        best_lr = max(by_lr, key=lambda lr: (lr_mean(lr), -(lr or 0)))
        chosen = by_lr[best_lr]
        mean, sd, n = mean_sd(r.get("dev_score") for r in chosen)
        # the probe and the pre-training numbers do not depend on the fine-tuning LR: one per seed
        seeds: Dict[int, dict] = {}
        for r in recs:
            seeds.setdefault(r["seed"], r)
        pm, psd, pn = mean_sd(r.get("probe") for r in seeds.values())
        tl, tlsd, _ = mean_sd(r.get("train_loss") for r in chosen)
        pl, plsd, _ = mean_sd(r.get("pretrain_dev_loss") for r in seeds.values())
        ps, _, _ = mean_sd(r.get("pretrain_s_per_step") for r in seeds.values())
        fs, _, _ = mean_sd(r.get("finetune_s_per_step") for r in chosen)
        ach, _, _ = mean_sd(r.get("achieved_sparsity") for r in seeds.values())
        row = dict(zip(ROW_KEYS + ("task",), gk))
        row.update({"metric": metrics.get(gk[-1], "score"), "mean": mean, "sd": sd, "n_seeds": n,
                    "probe_mean": pm, "probe_sd": psd, "probe_n": pn, "train_loss": tl, "train_loss_sd": tlsd,
                    "pretrain_dev_loss": pl, "pretrain_dev_loss_sd": plsd, "s_per_step_pretrain": ps,
                    "s_per_step_finetune": fs, "lr": best_lr, "achieved_sparsity": ach,
                    "seeds": sorted(r["seed"] for r in chosen),
                    "scores": [r.get("dev_score") for r in sorted(chosen, key=lambda r: r["seed"])],
                    "probes": [r.get("probe") for _, r in sorted(seeds.items())]})
        rows.append(row)
        ps_map = per_seed_best.setdefault(gk[:-1], {})
        for r in chosen:
            ps_map.setdefault(r["seed"], {})[gk[-1]] = (r.get("dev_score"), seeds[r["seed"]].get("probe"),
                                                         r.get("train_loss"))
    if len(tasks) > 1:
        by_key = {tuple(r[k] for k in ROW_KEYS): [] for r in rows}
        for r in rows:
            by_key[tuple(r[k] for k in ROW_KEYS)].append(r)
        for rk, task_rows in by_key.items():
            seeds = per_seed_best.get(rk, {})

            def avg(seed_tasks, i):
                vals = [seed_tasks[t][i] for t in tasks if t in seed_tasks and seed_tasks[t][i] is not None]
                return sum(vals) / len(vals) if len(vals) == len(tasks) else None
            dev = [avg(st, 0) for st in seeds.values()]
            prb = [avg(st, 1) for st in seeds.values()]
            trl = [avg(st, 2) for st in seeds.values()]
            mean, sd, n = mean_sd(dev)
            pm, psd, pn = mean_sd(prb)
            tl, tlsd, _ = mean_sd(trl)
            first = task_rows[0]
            row = dict(zip(ROW_KEYS, rk))
            row.update({"task": "average", "metric": "average", "mean": mean, "sd": sd, "n_seeds": n,
                        "probe_mean": pm, "probe_sd": psd, "probe_n": pn, "train_loss": tl, "train_loss_sd": tlsd,
                        "pretrain_dev_loss": first["pretrain_dev_loss"],
                        "pretrain_dev_loss_sd": first["pretrain_dev_loss_sd"],
                        "s_per_step_pretrain": first["s_per_step_pretrain"],
                        "s_per_step_finetune": mean_sd(r["s_per_step_finetune"] for r in task_rows)[0],
                        "lr": None, "achieved_sparsity": first["achieved_sparsity"],
                        "seeds": sorted(seeds), "scores": dev, "probes": prb})
            rows.append(row)
    rows.sort(key=sort_key)
    return rows
