"""Study report: results.json, results.csv, results.md (tables) and PNG plots.

Rows come from :func:`sparsebert.study.aggregate.aggregate`: one per (mode, block, sparsity,
control, task), with the mean ± sd over seeds of the fine-tuned dev score and of the linear
probe, the fine-tuning train loss, the pre-training dev MLM loss and the measured time per
pre-training step. ``results.md`` also holds the paper's numbers (Gordon et al. 2020, appendix
table 1, BERT-Base, GLUE dev) beside ours as change relative to dense per level, and the
smallest difference the setup resolves.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

CONTROL_LABELS = {"none": "", "random": "random pruning", "deletion": "information deletion",
                  "finetune-prune": "pruned during fine-tuning", "scratch": "from scratch"}

CSV_COLUMNS = ["mode", "block", "sparsity", "control", "task", "metric", "mean", "sd", "n_seeds",
               "probe_mean", "probe_sd", "train_loss", "train_loss_sd", "pretrain_dev_loss",
               "pretrain_dev_loss_sd", "s_per_step_pretrain", "s_per_step_finetune", "lr", "achieved_sparsity"]

# Gordon, Duh & Andrews (2020), appendix table 1 (BERT-Base, GLUE dev), pruned 0..90%.
PAPER_LEVELS = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
PAPER = {
    "pretrain_loss": [1.82, 1.82, 1.83, 1.86, 1.93, 2.03, 2.25, 2.62, 3.44, 5.83],
    "glue_dev": [87.2, 87.2, 87.1, 87.1, 86.7, 86.2, 85.6, 83.9, 81.1, 73.4],
    "finetune_train_loss_x100": [15.7, 16.0, 16.0, 16.9, 15.6, 18.0, 23.0, 27.1, 34.8, 49.8],
    "deletion_glue_dev": [87.3, 87.4, 87.2, 86.9, 86.7, 86.4, 85.7, 84.9, 82.5, 77.9],
    "random_glue_dev": [87.1, 86.3, 84.7, 83.3, 81.2, 78.8, 75.6, 71.6, 69.3, 65.7],
}


def series_label(row: dict) -> str:
    lab = row["mode"]
    if row.get("block"):
        lab += f" {row['block']}x{row['block']}"
    if row.get("control", "none") != "none":
        lab += f" ({CONTROL_LABELS.get(row['control'], row['control'])})"
    return lab


row_label = series_label


def _fmt(x, nd=2):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}"


def _pm(m, sd, nd=1):
    if m is None:
        return "–"
    return f"{m:.{nd}f} ± {sd:.{nd}f}" if sd is not None else f"{m:.{nd}f}"


def main_task(rows: Sequence[dict]) -> Optional[str]:
    tasks = [r["task"] for r in rows]
    return "average" if "average" in tasks else (tasks[0] if tasks else None)


def markdown_table(rows: Sequence[dict]) -> str:
    head = ["mode", "block", "sparsity", "control", "task", "dev (mean ± sd)", "probe (mean ± sd)", "n",
            "fine-tune train loss", "pre-train dev loss", "s/step (pre-train)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["mode"], f"{r['block']}x{r['block']}" if r.get("block") else "–", f"{100 * r['sparsity']:.0f}%",
                 r.get("control", "none"), r["task"], _pm(r.get("mean"), r.get("sd")),
                 _pm(r.get("probe_mean"), r.get("probe_sd")), str(r.get("n_seeds", "")),
                 _pm(r.get("train_loss"), r.get("train_loss_sd"), 3),
                 _pm(r.get("pretrain_dev_loss"), r.get("pretrain_dev_loss_sd"), 3),
                 _fmt(r.get("s_per_step_pretrain"), 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _dense(rows, task):
    for r in rows:
        if r["mode"] == "dense" and r["control"] == "none" and r["task"] == task:
            return r
    return None


def _rel(x, ref):
    if x is None or ref is None or ref == 0:
        return None
    return 100.0 * (x - ref) / abs(ref)


def comparison_table(rows: Sequence[dict], task: Optional[str] = None) -> str:
    """Per level: the paper's change from dense beside ours (relative %, losses as differences)."""
    task = task or main_task(rows)
    d = _dense(rows, task)
    if d is None:
        return ""
    series = sorted({(r["mode"], r["block"]) for r in rows if r["control"] == "none" and r["mode"] != "dense"
                     and r["task"] == task}, key=lambda mb: (mb[0] != "unstructured", mb[1]))
    head = ["level", "paper: Δ pre-train loss", "paper: GLUE Δ%", "paper: train loss ×100",
            "paper: deletion Δ%", "paper: random Δ%"]
    for mode, blk in series:
        lab = "unstr." if mode == "unstructured" else f"block {blk}"
        head += [f"{lab}: Δ MLM loss", f"{lab}: dev Δ%", f"{lab}: probe Δ%", f"{lab}: train loss"]
    # our controls beside the paper's: dev Δ% (and train loss) of each (mode, control) that has rows
    ctrl = sorted({(r["mode"], r["block"], r["control"]) for r in rows if r["task"] == task
                   and r["control"] in ("deletion", "random")}, key=lambda k: (k[2], k[0] != "unstructured", k[1]))
    for mode, blk, c in ctrl:
        lab = ("unstr." if mode == "unstructured" else f"block {blk}") + f" {c}"
        head += [f"{lab}: dev Δ%", f"{lab}: train loss"]
    by = {(r["mode"], r["block"], r["control"], round(100 * r["sparsity"])): r for r in rows if r["task"] == task}
    levels = sorted({round(100 * r["sparsity"]) for r in rows if r["task"] == task})
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lv in levels:
        if lv in PAPER_LEVELS:
            i = PAPER_LEVELS.index(lv)
            g0 = PAPER["glue_dev"][0]
            cells = [f"{lv}%", f"{PAPER['pretrain_loss'][i] - PAPER['pretrain_loss'][0]:+.2f}",
                     f"{_rel(PAPER['glue_dev'][i], g0):+.1f}", f"{PAPER['finetune_train_loss_x100'][i]:.1f}",
                     f"{_rel(PAPER['deletion_glue_dev'][i], g0):+.1f}", f"{_rel(PAPER['random_glue_dev'][i], g0):+.1f}"]
        else:
            cells = [f"{lv}%"] + ["–"] * 5
        for mode, blk in series:
            r = d if lv == 0 else by.get((mode, blk, "none", lv))
            if r is None:
                cells += ["–"] * 4
                continue
            dl = (None if r.get("pretrain_dev_loss") is None or d.get("pretrain_dev_loss") is None
                  else r["pretrain_dev_loss"] - d["pretrain_dev_loss"])
            rd, rp = _rel(r.get("mean"), d.get("mean")), _rel(r.get("probe_mean"), d.get("probe_mean"))
            cells += [f"{dl:+.3f}" if dl is not None else "–", f"{rd:+.1f}" if rd is not None else "–",
                      f"{rp:+.1f}" if rp is not None else "–", _fmt(r.get("train_loss"), 3)]
        for mode, blk, c in ctrl:
            r = by.get((mode, blk, c, lv))
            rd = None if r is None else _rel(r.get("mean"), d.get("mean"))
            cells += [f"{rd:+.1f}" if rd is not None else "–", _fmt(None if r is None else r.get("train_loss"), 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def resolution(rows: Sequence[dict], meta: dict) -> str:
    """The smallest difference the setup resolves, per task, from the dense row's seed spread and
    from the dev set's size (binomial sampling sd of an accuracy)."""
    out = []
    n_dev = meta.get("n_dev", {})
    for task in sorted({r["task"] for r in rows}):
        d = _dense(rows, task)
        if d is None:
            continue
        parts = []
        for what, m, sd, n in (("fine-tuned dev", d.get("mean"), d.get("sd"), d.get("n_seeds")),
                               ("probe", d.get("probe_mean"), d.get("probe_sd"), d.get("probe_n", d.get("n_seeds")))):
            if m is None:
                continue
            if sd is not None and n:
                # two means of n seeds each with this sd: a difference of 2·sd·√(2/n) is ~2 standard errors
                parts.append(f"{what}: seed sd {sd:.2f} (n={n}) → resolves ≈ {2 * sd * math.sqrt(2 / n):.2f}")
            else:
                parts.append(f"{what}: one seed, no spread measured")
        nd = n_dev.get(task)
        if nd and d.get("mean") is not None and d.get("metric") == "accuracy":
            p = d["mean"] / 100.0
            parts.append(f"dev-set sampling sd of an accuracy near {100 * p:.0f}% on {nd} examples: "
                         f"{100 * math.sqrt(p * (1 - p) / nd):.2f} points")
        out.append(f"- **{task}**: " + "; ".join(parts))
    return "\n".join(out) + "\n" if out else ""


def _plot_series(rows, task, value, sd_key=None, controls=("none", "random", "deletion", "finetune-prune")):
    """{label: [(sparsity%, value, sd)]}; the dense row starts every series of control 'none'."""
    d = _dense(rows, task)
    groups: Dict[str, list] = {}
    for r in rows:
        if r["task"] != task or r["mode"] == "dense" or r["control"] not in controls or r.get(value) is None:
            continue
        groups.setdefault(series_label(r), []).append((100 * r["sparsity"], r[value], r.get(sd_key) if sd_key else None))
    for lab, pts in groups.items():
        if d is not None and d.get(value) is not None and "(" not in lab:
            pts.append((0.0, d[value], d.get(sd_key) if sd_key else None))
        pts.sort()
    return groups, d


def _axis(ax, rows, task, value, sd_key, ylabel, chance=None, title=None):
    groups, d = _plot_series(rows, task, value, sd_key)
    for lab, pts in groups.items():
        ls = "--" if "(" in lab else "-"
        marker = "o" if lab.startswith("unstructured") else ("s" if lab.startswith("block") else "^")
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                    yerr=[p[2] or 0.0 for p in pts], marker=marker, linestyle=ls, capsize=3, label=lab)
    if d is not None and d.get(value) is not None:
        lo, hi = d[value] - (d.get(sd_key) or 0.0), d[value] + (d.get(sd_key) or 0.0)
        ax.axhspan(lo, hi, color="gray", alpha=0.2, label="dense ± sd")
        ax.axhline(d[value], color="gray", linestyle=":", linewidth=1)
    scratch = [r for r in rows if r["task"] == task and r["control"] == "scratch" and r.get(value) is not None]
    if scratch:
        ax.axhline(scratch[0][value], color="brown", linestyle="-.", linewidth=1, label="from scratch")
    if chance is not None:
        ax.axhline(chance, color="red", linestyle="--", linewidth=1, label=f"chance ({chance:.1f})")
    ax.set_xlabel("sparsity of pruned matrices (%)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_plots(rows, meta, paths):
    plt = _plt()
    task = main_task(rows)
    chance = (meta.get("chance") or {}).get(task)
    tag = meta.get("preset", "")
    # dev score and probe
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    _axis(axes[0], rows, task, "mean", "sd", f"fine-tuned dev score ({task})", chance, f"Fine-tuning {tag}")
    _axis(axes[1], rows, task, "probe_mean", "probe_sd", f"linear-probe dev score ({task})", chance,
          f"Linear probe (frozen encoder) {tag}")
    fig.tight_layout()
    fig.savefig(paths["plot_dev"])
    plt.close(fig)
    for key, value, sd_key, ylabel in (("plot_pretrain", "pretrain_dev_loss", "pretrain_dev_loss_sd",
                                        "pre-training dev MLM loss"),
                                       ("plot_train", "train_loss", "train_loss_sd",
                                        f"fine-tuning train loss ({task})")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        _axis(ax, rows, task, value, sd_key, ylabel, None, f"{ylabel} vs sparsity {tag}")
        fig.tight_layout()
        fig.savefig(paths[key])
        plt.close(fig)
    # score against measured time per pre-training step
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    groups: Dict[str, list] = {}
    for r in rows:
        if r["task"] == task and r["control"] == "none" and r.get("s_per_step_pretrain") and r.get("mean") is not None:
            groups.setdefault(series_label(r), []).append(r)
    dense = groups.pop("dense", [])
    for lab, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["sparsity"])
        ax.errorbar([r["s_per_step_pretrain"] for r in rs], [r["mean"] for r in rs], yerr=[r.get("sd") or 0 for r in rs],
                    marker="o" if lab.startswith("unstructured") else "s", capsize=3, label=lab)
        for r in rs:
            ax.annotate(f"{100 * r['sparsity']:.0f}%", (r["s_per_step_pretrain"], r["mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    for r in dense:
        ax.errorbar([r["s_per_step_pretrain"]], [r["mean"]], yerr=[r.get("sd") or 0], marker="*", markersize=10,
                    color="black", linestyle="none", label="dense")
    if chance is not None:
        ax.axhline(chance, color="red", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel(f"measured time per pre-training step (s, {meta.get('device', '')})")
    ax.set_ylabel(f"fine-tuned dev score ({task})")
    ax.set_title(f"Score vs measured step time {tag}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["plot_time"])
    plt.close(fig)


def write_report(rows: Sequence[dict], tasks: Sequence[str], out_dir, meta: Optional[dict] = None,
                 records: Optional[Sequence[dict]] = None) -> Dict[str, Path]:
    """Write results.json / results.csv / results.md and the four plots; returns their paths."""
    meta = dict(meta or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md",
             "plot_dev": out / "dev_score_vs_sparsity.png",
             "plot_pretrain": out / "pretrain_loss_vs_sparsity.png",
             "plot_train": out / "train_loss_vs_sparsity.png",
             "plot_time": out / "score_vs_step_time.png"}
    paths["json"].write_text(json.dumps({"meta": meta, "tasks": list(tasks), "rows": list(rows),
                                         "records": list(records or []), "paper": PAPER}, indent=1, default=str))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in CSV_COLUMNS})
    title = meta.get("title", "sparsebert study")
    note = meta.get("note", "")
    md = [f"# {title}", ""]
    if note:
        md += [note, ""]
    if meta.get("left_out"):
        md += [f"**Partial study** (time limit): {len(meta['left_out'])} encoders not run, so their rows are "
               f"missing: {', '.join(meta['left_out'])}. The same command again resumes from the run cache.", ""]
    head = meta.get("head")
    if head:
        md += [f"MLM head fit on frozen-encoder features: {head.get('positions')} masked positions, "
               f"{head.get('steps')} steps, {'converged' if head.get('converged') else 'not converged'}; "
               f"held-out loss {_fmt(head.get('heldout_loss_start'), 3)} → {_fmt(head.get('heldout_loss'), 3)} "
               f"(unigram {_fmt(head.get('unigram_loss'), 3)}); dev MLM loss of the start model "
               f"{_fmt(head.get('dev_mlm_loss'), 3)}.", ""]
    if meta.get("chance"):
        md += ["Chance (constant predictor) dev score: " +
               ", ".join(f"{t} {v:.1f}" for t, v in meta["chance"].items()) + ".", ""]
    md += ["## Results (mean ± sd over seeds)", "", markdown_table(rows)]
    comp = comparison_table(rows)
    if comp:
        md += [f"## Beside the paper (change from dense; ours: task `{main_task(rows)}`)", "",
               "Paper: Gordon et al. 2020, appendix table 1 (BERT-Base, GLUE dev average; 100k steps). "
               "Δ% = relative change of the score from the dense model; losses as differences.", "", comp]
    res = resolution(rows, meta)
    if res:
        md += ["## Smallest resolvable difference", "", res]
    if meta.get("elapsed_s") is not None:
        load = meta.get("loadavg_1min")
        md += [f"Wall time of the study: {meta['elapsed_s']:.0f} s on {meta.get('device')} "
               f"({meta.get('threads', '?')} torch threads" + (f", 1-minute load average {load:.1f} at the end"
                                                             if load is not None else "") + ")."]
    phases = meta.get("phases") or {}
    if phases:
        md += ["", "Runs done (cached ones not counted), wall and CPU seconds per phase: " + "; ".join(
            f"{k} {v['runs']} runs, {v['wall_s']:.0f} s wall, {v['cpu_s']:.0f} s CPU" for k, v in phases.items()) + "."]
    paths["md"].write_text("\n".join(md) + "\n")
    if rows:
        write_plots(rows, meta, paths)
    return paths
