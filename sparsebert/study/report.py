"""Study report: results.json, results.csv, results.md (Markdown table) and PNG plots."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

CONTROL_LABELS = {"none": "", "random": "random pruning", "deletion": "information deletion",
                  "finetune-prune": "pruned during fine-tuning"}


def row_label(row: dict) -> str:
    lab = row["mode"]
    if row.get("control", "none") != "none":
        lab += f" ({CONTROL_LABELS.get(row['control'], row['control'])})"
    return lab


def _fmt(x, nd=2):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}"


def flat_rows(rows: Sequence[dict], tasks: Sequence[str]) -> List[dict]:
    out = []
    for r in rows:
        d = {"mode": r["mode"], "control": r.get("control", "none"), "sparsity": r["sparsity"],
             "achieved_sparsity": r.get("achieved_sparsity"), "pretrain_dev_loss": r.get("pretrain_dev_loss"),
             "pretrain_s_per_step": r.get("pretrain_s_per_step")}
        for t in tasks:
            tr = r.get("tasks", {}).get(t, {})
            d[f"{t}_dev"] = tr.get("dev_score")
            d[f"{t}_train_loss"] = tr.get("train_loss")
            d[f"{t}_lr"] = tr.get("lr")
        d["average_dev"] = r.get("average")
        out.append(d)
    return out


def markdown_table(rows: Sequence[dict], tasks: Sequence[str]) -> str:
    head = ["mode", "sparsity", "pre-train dev loss", "s/step (pre-train)"]
    for t in tasks:
        head += [f"{t} dev", f"{t} train loss"]
    head += ["average dev"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [row_label(r), f"{100 * r['sparsity']:.0f}%", _fmt(r.get("pretrain_dev_loss"), 3),
                 _fmt(r.get("pretrain_s_per_step"), 3)]
        for t in tasks:
            tr = r.get("tasks", {}).get(t, {})
            cells += [_fmt(tr.get("dev_score"), 1), _fmt(tr.get("train_loss"), 3)]
        cells.append(_fmt(r.get("average"), 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _series(rows, key_fn):
    """{label: sorted [(sparsity%, value)]}; the dense (level 0) row starts every series."""
    dense = [r for r in rows if r["mode"] == "dense"]
    groups: Dict[str, list] = {}
    for r in rows:
        if r["mode"] == "dense":
            continue
        v = key_fn(r)
        if v is not None:
            groups.setdefault(row_label(r), []).append((100 * r["sparsity"], v))
    for lab, pts in groups.items():
        if dense and key_fn(dense[0]) is not None:
            pts.append((0.0, key_fn(dense[0])))
        pts.sort()
    return groups, (key_fn(dense[0]) if dense else None)


def plot(rows, key_fn, ylabel, title, path: Path, dense_label="dense (0%)"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, dense = _series(rows, key_fn)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    styles = {"unstructured": ("o", "-"), "block": ("s", "-")}
    for lab, pts in groups.items():
        marker, ls = styles.get(lab, ("^", "--"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=ls, label=lab)
    if dense is not None:
        ax.axhline(dense, color="gray", linestyle=":", label=dense_label)
    ax.set_xlabel("sparsity of pruned matrices (%)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(rows: Sequence[dict], tasks: Sequence[str], out_dir, meta: Optional[dict] = None) -> Dict[str, Path]:
    """Write results.json / results.csv / results.md and the three plots; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md",
             "plot_dev": out / "dev_score_vs_sparsity.png",
             "plot_pretrain": out / "pretrain_loss_vs_sparsity.png",
             "plot_train": out / "train_loss_vs_sparsity.png"}
    paths["json"].write_text(json.dumps({"meta": meta or {}, "tasks": list(tasks), "rows": list(rows)},
                                        indent=1, default=str))
    flat = flat_rows(rows, tasks)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0].keys()) if flat else ["mode"])
        w.writeheader()
        w.writerows(flat)
    md = markdown_table(rows, tasks)
    title = (meta or {}).get("title", "sparsebert study")
    note = (meta or {}).get("note", "")
    paths["md"].write_text(f"# {title}\n\n{note}\n\n{md}" if note else f"# {title}\n\n{md}")
    tag = (meta or {}).get("preset", "")
    plot(rows, lambda r: r.get("average"), "average dev score (tasks)",
         f"Transfer after pruning in pre-training {tag}".strip(), paths["plot_dev"])
    plot(rows, lambda r: r.get("pretrain_dev_loss"), "pre-training dev MLM loss",
         f"Pre-training loss vs sparsity {tag}".strip(), paths["plot_pretrain"])

    def avg_train(r):
        v = [t["train_loss"] for t in r.get("tasks", {}).values() if t.get("train_loss") is not None]
        return sum(v) / len(v) if v else None
    plot(rows, avg_train, "fine-tuning train loss (mean over tasks)",
         f"Fine-tuning train loss vs sparsity {tag}".strip(), paths["plot_train"])
    return paths
