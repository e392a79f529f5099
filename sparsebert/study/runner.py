"""The study: presets, orchestration, per-run caching (resume) and the summary.

Every run (the MLM-head warm-up, each pre-training run, each fine-tuning run) is cached as
``<out>/runs/<kind>-<hash>.json`` keyed by the hash of everything that determines it (its config,
the data settings and its parent run's hash); pre-training runs also keep the encoder, as a
sparse checkpoint folder ``<kind>-<hash>.ckpt`` (safetensors, :func:`sparsebert.save_sparse`), for
their fine-tuning runs. Re-running a study skips every cached run, so an interrupted study resumes
where it stopped. Nothing in the cache is ever unpickled: an encoder an older sparsebert cached as
``<kind>-<hash>.pt`` (a pickle) is left on disk, not loaded, and its run is done again.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import pretrain as _pt
from .data import DataCache, TaskData, load_mlm_text, load_task, mlm_blocks
from .finetune import FinetuneConfig, finetune, load_encoder
from .pretrain import PretrainConfig, load_tokenizer, pick_device, pretrain, special_ids
from .report import write_report

CONTROLS = ("random", "deletion", "finetune-prune")


@dataclass
class Preset:
    name: str
    description: str
    levels: Tuple[float, ...]
    modes: Tuple[str, ...]
    tasks: Tuple[str, ...]
    controls: Tuple[str, ...] = ()
    model: str = "minilm"                       # minilm | scratch
    layers: Optional[int] = None                # keep only the first n encoder layers
    scratch: dict = field(default_factory=lambda: dict(hidden=128, layers=2, heads=2, intermediate=512))
    seq_len: int = 128
    mlm_train_blocks: Optional[int] = None      # None: all the text
    mlm_dev_blocks: int = 256
    extra_text: bool = False                    # add the Debian documentation to the MLM text
    warmup: dict = field(default_factory=lambda: dict(steps=200, lr=1e-3, batch_size=32))
    pretrain: dict = field(default_factory=dict)   # PretrainConfig fields
    finetune: dict = field(default_factory=dict)   # FinetuneConfig fields
    lrs: Tuple[float, ...] = (5e-5,)
    max_train: Optional[int] = None
    max_dev: Optional[int] = None
    amp: bool = True                            # bf16 autocast on CUDA (ignored on CPU)
    demo: bool = False


PRESETS: Dict[str, Preset] = {
    "cpu-demo": Preset(
        name="cpu-demo",
        description="small-scale demonstration on a CPU (minutes): 4 levels, both modes, one task",
        levels=(0.0, 0.4, 0.7, 0.9), modes=("unstructured", "block"), tasks=("polarity",),
        layers=None, seq_len=64, mlm_train_blocks=1200, mlm_dev_blocks=48,
        warmup=dict(steps=60, lr=3e-3, batch_size=16),
        pretrain=dict(steps=30, batch_size=8, lr=1e-4, ramp_fraction=0.2, prune_every=3),
        finetune=dict(epochs=1.0, max_steps=30, batch_size=16, max_len=64, warmup_fraction=0.1),
        lrs=(1e-4,), max_train=480, max_dev=300, demo=True),
    "gpu": Preset(
        name="gpu",
        description="the full scaled-down study: levels 0-90%, both modes, all tasks, controls",
        levels=tuple(i / 10 for i in range(10)), modes=("unstructured", "block"),
        tasks=("polarity", "uncertainty", "bbc-topic", "movie-score"),
        controls=CONTROLS, seq_len=128, mlm_train_blocks=None, mlm_dev_blocks=512, extra_text=True,
        warmup=dict(steps=1000, lr=1e-3, batch_size=64),
        pretrain=dict(steps=5000, batch_size=64, lr=1e-4, ramp_fraction=0.1, prune_every=10, warmup_fraction=0.01),
        finetune=dict(epochs=3.0, batch_size=32, max_len=128, warmup_fraction=0.1),
        lrs=(3e-5, 5e-5, 1e-4)),
}


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunStore:
    """One JSON per run (and optionally one checkpoint), keyed by config hash."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def json_path(self, kind, key):
        return self.root / f"{kind}-{key}.json"

    def ckpt_path(self, kind, key):
        return self.root / f"{kind}-{key}.ckpt"

    def legacy_ckpt_path(self, kind, key):
        """Where an older sparsebert pickled the encoder (never loaded)."""
        return self.root / f"{kind}-{key}.pt"

    def get(self, kind, key) -> Optional[dict]:
        p = self.json_path(kind, key)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None           # a torn write: run again

    def put(self, kind, key, config, result):
        p = self.json_path(kind, key)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({"kind": kind, "key": key, "config": config, "result": result}, indent=1))
        os.replace(tmp, p)

    def save_model(self, kind, key, module):
        """Keep ``module`` (a transformers model, sparse layers and all) as a sparse checkpoint
        (written atomically: an interrupted save leaves no half checkpoint)."""
        _pt.save_encoder(module, self.ckpt_path(kind, key))

    def load_model(self, kind, key):
        """The cached module, or None when there is none to use (then the run is done again):
        missing, corrupt (a warning says so), or only an old pickle (never unpickled)."""
        from sparsebert.checkpoint import CheckpointError

        p = self.ckpt_path(kind, key)
        if not p.exists():
            legacy = self.legacy_ckpt_path(kind, key)
            if legacy.exists():
                warnings.warn(f"{legacy} is a pickle cached by an older sparsebert: not loaded (unpickling "
                              "can run code); the run is done again", stacklevel=2)
            return None
        try:
            return load_encoder(p)
        except CheckpointError as e:
            warnings.warn(f"cached encoder {p} is corrupt ({e}); the run is done again", stacklevel=2)
            return None


class StudyData:
    """What a study reads: MLM text, tasks, tokenizer and start model (from a :class:`DataCache`)."""

    def __init__(self, cache: DataCache, preset: Preset, seed: int = 0):
        self.cache, self.preset, self.seed = cache, preset, seed
        self._tok = None
        self._mlm = None

    def mlm_text(self):
        if self._mlm is None:
            self._mlm = load_mlm_text(self.cache, self.seed, extra_text=self.preset.extra_text)
        return self._mlm

    def tokenizer(self):
        if self._tok is None:
            if self.preset.model == "minilm":
                self._tok = load_tokenizer(self.cache.minilm_dir())
            else:
                # MiniLM's tokenizer when its archive is already here; else a word-level vocabulary
                mdir = self.cache.minilm_dir() if self.cache.has("minilm") else None
                self._tok = load_tokenizer(mdir, texts=self.mlm_text()[0], vocab_dir=self.cache.root / "scratch-vocab")
        return self._tok

    def start_model(self):
        p = self.preset
        if p.model == "minilm":
            model = _pt.load_minilm_mlm(self.cache.minilm_dir())
        else:
            model = _pt.scratch_mlm(len(self.tokenizer()), seed=self.seed, **p.scratch)
        if p.layers is not None:
            model.bert.encoder.layer = model.bert.encoder.layer[: p.layers]
            model.config.num_hidden_layers = p.layers
        return model

    def task(self, name) -> TaskData:
        return load_task(name, self.cache, self.seed).subset(self.preset.max_train, self.preset.max_dev)


def _avg(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


class Study:
    def __init__(self, preset: Preset, out_dir, cache_dir=None, device: str = "auto", progress: bool = True,
                 data: Optional[StudyData] = None, log: Callable[[str], None] = print):
        self.p = preset
        self.out = Path(out_dir)
        self.store = RunStore(self.out / "runs")
        self.device = pick_device(device)
        self.progress = progress
        self.log = log
        self.data = data or StudyData(DataCache(cache_dir, log=log), preset)
        self.amp = preset.amp and self.device.type == "cuda"
        self.counts = {"pretrain_trained": 0, "pretrain_cached": 0, "finetune_trained": 0, "finetune_cached": 0}
        self._tasks: Dict[str, TaskData] = {}

    # ---- planning ----------------------------------------------------------------------------
    def data_key(self) -> dict:
        p = self.p
        return {"model": p.model, "layers": p.layers, "scratch": p.scratch if p.model == "scratch" else None,
                "seq_len": p.seq_len, "mlm_train_blocks": p.mlm_train_blocks, "mlm_dev_blocks": p.mlm_dev_blocks,
                "extra_text": p.extra_text, "seed": 0}

    def pretrain_plan(self) -> List[Tuple[str, PretrainConfig]]:
        """``(control, config)`` of each pre-training run; the dense level-0 run first."""
        base = dict(self.p.pretrain)
        plan = [("none", PretrainConfig(mode="dense", sparsity=0.0, **base))]
        levels = [l for l in self.p.levels if l > 0]
        for mode in self.p.modes:
            for l in levels:
                plan.append(("none", PretrainConfig(mode=mode, sparsity=l, **base)))
        if "random" in self.p.controls:
            for mode in self.p.modes:
                for l in levels:
                    plan.append(("random", PretrainConfig(mode=mode, sparsity=l, score="random", **base)))
        return plan

    def finetune_plan(self, control: str, pcfg: PretrainConfig) -> List[Tuple[str, FinetuneConfig]]:
        out = []
        base = dict(self.p.finetune)
        for task in self.p.tasks:
            for lr in self.p.lrs:
                out.append((control, FinetuneConfig(task=task, lr=lr, **base)))
                if control == "none" and pcfg.mode != "dense" and "deletion" in self.p.controls:
                    out.append(("deletion", FinetuneConfig(task=task, lr=lr, control="deletion", **base)))
                if pcfg.mode == "dense" and "finetune-prune" in self.p.controls:
                    for mode in self.p.modes:
                        for l in self.p.levels:
                            if l > 0:
                                kw = dict(base)
                                kw.setdefault("ramp_fraction", self.p.pretrain.get("ramp_fraction", 0.1))
                                kw.setdefault("prune_every", self.p.pretrain.get("prune_every", 10))
                                out.append(("finetune-prune", FinetuneConfig(
                                    task=task, lr=lr, control="prune", prune_mode=mode, prune_sparsity=l, **kw)))
        return out

    # ---- steps ---------------------------------------------------------------------------------
    def _blocks(self):
        if not hasattr(self, "_blk"):
            tok = self.data.tokenizer()
            train_docs, dev_docs = self.data.mlm_text()
            self._blk = (mlm_blocks(train_docs, tok, self.p.seq_len, self.p.mlm_train_blocks, seed=0),
                         mlm_blocks(dev_docs, tok, self.p.seq_len, self.p.mlm_dev_blocks, seed=0))
            self._ids = special_ids(tok)
        return self._blk

    def warmup_key(self) -> str:
        return config_hash({"data": self.data_key(), "warmup": self.p.warmup})

    def base_model(self):
        """The start model with its fresh MLM head trained (encoder frozen): cached."""
        if getattr(self, "_base", None) is not None:
            return self._base
        key = self.warmup_key()
        model = self.store.load_model("warmup", key) if self.store.get("warmup", key) else None
        if model is None:
            train, dev = self._blocks()
            model = self.data.start_model()
            w = self.p.warmup
            cfg = PretrainConfig(mode="dense", head_only=True, steps=w["steps"], lr=w["lr"], batch_size=w["batch_size"])
            res = pretrain(model, cfg, train, dev, self._ids, self.device, self.amp, self.progress, desc="MLM head warm-up")
            for prm in model.parameters():
                prm.requires_grad_(True)
            self.store.save_model("warmup", key, model)
            self.store.put("warmup", key, {"data": self.data_key(), "warmup": self.p.warmup}, res)
            self._say(f"MLM head warm-up: dev MLM loss {res['dev_mlm_loss']:.3f}")
        self._base = model.cpu()
        return self._base

    def pretrain_key(self, control, cfg: PretrainConfig) -> str:
        return config_hash({"parent": self.warmup_key(), "data": self.data_key(), "pretrain": asdict(cfg)})

    def run_pretrain(self, control, cfg: PretrainConfig, need_model: bool):
        """(result, encoder or None) — trained now, or from the cache."""
        key = self.pretrain_key(control, cfg)
        rec = self.store.get("pretrain", key)
        enc = None
        if rec is not None and need_model:
            enc = self.store.load_model("pretrain", key)
        if rec is not None and (enc is not None or not need_model):
            self.counts["pretrain_cached"] += 1
            return rec["result"], enc, key
        train, dev = self._blocks()
        model = copy.deepcopy(self.base_model())
        desc = f"pretrain {cfg.mode} {100 * cfg.sparsity:.0f}%" + (" random" if cfg.score == "random" else "")
        res = pretrain(model, cfg, train, dev, self._ids, self.device, self.amp, self.progress, desc=desc)
        self.counts["pretrain_trained"] += 1
        enc = model.bert.cpu()
        self.store.save_model("pretrain", key, enc)
        self.store.put("pretrain", key, {"control": control, "pretrain": asdict(cfg), "data": self.data_key()}, res)
        self._say(f"{desc}: dev MLM loss {res['dev_mlm_loss']:.3f}, {res['seconds_per_step']:.3f} s/step, "
                  f"sparsity {res['sparsity']:.3f}")
        return res, enc, key

    def task_data(self, name) -> TaskData:
        if name not in self._tasks:
            self._tasks[name] = self.data.task(name)
        return self._tasks[name]

    def finetune_key(self, parent, cfg: FinetuneConfig) -> str:
        return config_hash({"parent": parent, "max_train": self.p.max_train, "max_dev": self.p.max_dev,
                            "finetune": asdict(cfg)})

    def run_finetune(self, parent_key, encoder_fn, cfg: FinetuneConfig, label: str):
        key = self.finetune_key(parent_key, cfg)
        rec = self.store.get("finetune", key)
        if rec is not None:
            self.counts["finetune_cached"] += 1
            return rec["result"]
        res = finetune(encoder_fn(), cfg, self.task_data(cfg.task), self.data.tokenizer(), self.device, self.amp,
                       self.progress, desc=f"finetune {label} {cfg.task} lr={cfg.lr:g}")
        res.pop("model", None)
        self.counts["finetune_trained"] += 1
        self.store.put("finetune", key, {"parent": parent_key, "finetune": asdict(cfg)}, res)
        self._say(f"finetune {label} {cfg.task} lr={cfg.lr:g}: dev {res['dev_score']:.1f}, "
                  f"train loss {res['train_loss']:.3f}")
        return res

    def _say(self, msg):
        if self._bar is not None:
            self._bar.write(msg)
        else:
            self.log(msg)

    # ---- the whole study -----------------------------------------------------------------------
    def run(self) -> List[dict]:
        from tqdm.auto import tqdm

        p = self.p
        t_start = time.time()
        if p.demo:
            self.log("=" * 78)
            self.log(f"sparsebert study, preset {p.name}: a SMALL-SCALE DEMONSTRATION, not the paper's experiment.")
            self.log("Runs are short and data subsets small, so differences of a few points are noise.")
            self.log("=" * 78)
        self.log(f"preset {p.name}: levels {[int(100 * l) for l in p.levels]}%, modes {list(p.modes)}, "
                 f"tasks {list(p.tasks)}, controls {list(p.controls) or 'none'}, device {self.device}")
        self._bar = None
        plan = self.pretrain_plan()
        fplans = {i: self.finetune_plan(c, cfg) for i, (c, cfg) in enumerate(plan)}
        total = len(plan) + sum(len(v) for v in fplans.values())
        self._bar = tqdm(total=total, desc="study runs", disable=not self.progress, dynamic_ncols=True)
        # rows keyed by (mode, control, level)
        rows: Dict[Tuple[str, str, float], dict] = {}
        for i, (control, pcfg) in enumerate(plan):
            fl = fplans[i]
            need = any(self.store.get("finetune", self.finetune_key(self.pretrain_key(control, pcfg), f)) is None
                       for _, f in fl)
            pres, enc, pkey = self.run_pretrain(control, pcfg, need_model=need)
            self._bar.update(1)
            cache_enc = {"enc": enc}

            def encoder_fn(pkey=pkey, pcfg=pcfg, control=control, cache_enc=cache_enc):
                if cache_enc["enc"] is None:
                    cache_enc["enc"] = self.run_pretrain(control, pcfg, need_model=True)[1]
                return cache_enc["enc"]

            for fcontrol, fcfg in fl:
                label = f"{pcfg.mode} {100 * (fcfg.prune_sparsity if fcfg.control == 'prune' else pcfg.sparsity):.0f}%"
                if fcontrol != "none":
                    label += f" [{fcontrol}]"
                fres = self.run_finetune(pkey, encoder_fn, fcfg, label)
                self._bar.update(1)
                if fcfg.control == "prune":
                    rk = (fcfg.prune_mode, "finetune-prune", fcfg.prune_sparsity)
                    pre = pres
                else:
                    rk = (pcfg.mode, fcontrol, pcfg.sparsity)
                    pre = pres
                row = rows.setdefault(rk, {"mode": rk[0], "control": rk[1], "sparsity": rk[2],
                                           "achieved_sparsity": pre.get("sparsity"),
                                           "pretrain_dev_loss": pre.get("dev_mlm_loss"),
                                           "pretrain_s_per_step": pre.get("seconds_per_step"), "tasks": {}})
                if fcfg.control == "prune":
                    row["achieved_sparsity"] = fres.get("linear_zero_fraction")
                best = row["tasks"].get(fcfg.task)
                if best is None or fres["dev_score"] > best["dev_score"]:
                    row["tasks"][fcfg.task] = {"dev_score": fres["dev_score"], "train_loss": fres["train_loss"],
                                               "lr": fcfg.lr, "dev_metrics": fres["dev_metrics"],
                                               "finetune_s_per_step": fres["seconds_per_step"]}
            del enc, cache_enc
        self._bar.close()
        self._bar = None
        order = {"dense": 0, "unstructured": 1, "block": 2}
        corder = {"none": 0, "random": 1, "deletion": 2, "finetune-prune": 3}
        out = sorted(rows.values(), key=lambda r: (corder.get(r["control"], 9), order.get(r["mode"], 9), r["sparsity"]))
        for r in out:
            r["average"] = _avg([r["tasks"].get(t, {}).get("dev_score") for t in p.tasks])
        elapsed = time.time() - t_start
        meta = {"preset": p.name, "title": f"sparsebert study — preset {p.name}",
                "note": ("Small-scale demonstration: short runs on small subsets; differences of a few "
                         "points are within noise." if p.demo else p.description),
                "device": str(self.device), "elapsed_s": round(elapsed, 1), "counts": self.counts,
                "preset_config": asdict(p), "torch": torch.__version__}
        paths = write_report(out, p.tasks, self.out, meta)
        self.summary(out, paths, elapsed)
        return out

    def summary(self, rows, paths, elapsed):
        from .report import markdown_table
        self.log("")
        self.log(markdown_table(rows, self.p.tasks))
        c = self.counts
        self.log(f"runs: pre-training {c['pretrain_trained']} trained + {c['pretrain_cached']} cached, "
                 f"fine-tuning {c['finetune_trained']} trained + {c['finetune_cached']} cached; "
                 f"{elapsed:.0f} s in all")
        self.log("wrote " + ", ".join(str(v) for v in paths.values()))
        if self.p.demo:
            self.log("(cpu-demo is a small-scale demonstration: see docs/STUDY.md for what it does and "
                     "does not show; the 'gpu' preset runs the full scaled-down study.)")
