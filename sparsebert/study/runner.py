"""The study: presets, orchestration, per-run caching (resume) and the summary.

Every run (the MLM head fit, each pre-training run, each probe, each fine-tuning run) is cached as
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
from .aggregate import aggregate
from .finetune import FinetuneConfig, finetune, load_encoder
from .head import HeadConfig, fit_head
from .pretrain import PretrainConfig, load_tokenizer, mlm_dev_loss, pick_device, pretrain, special_ids
from .probe import ProbeConfig, probe
from .training import keep_freed_memory
from .report import write_report

CONTROLS = ("scratch", "random", "deletion", "finetune-prune")


@dataclass
class Preset:
    name: str
    description: str
    levels: Tuple[float, ...]
    modes: Tuple[str, ...]
    tasks: Tuple[str, ...]
    controls: Tuple[str, ...] = ()
    control_modes: Tuple[str, ...] = ("unstructured",)   # modes that get the random / deletion controls
    control_levels: dict = field(default_factory=dict)   # control -> its levels (a control not named: every level)
    blocks: Tuple[int, ...] = (32,)             # block sizes (square) of mode "block": a study axis
    seeds: Tuple[int, ...] = (0,)               # each seed: its own pre-training and fine-tuning runs
    model: str = "minilm"                       # minilm | scratch
    layers: Optional[int] = None                # keep only the first n encoder layers
    scratch: dict = field(default_factory=lambda: dict(hidden=128, layers=2, heads=2, intermediate=512))
    seq_len: int = 128
    mlm_train_blocks: Optional[int] = None      # None: all the text
    mlm_dev_blocks: int = 256
    extra_text: bool = False                    # add the Debian documentation to the MLM text
    head: dict = field(default_factory=dict)    # HeadConfig fields (the MLM head fit, done once)
    pretrain: dict = field(default_factory=dict)   # PretrainConfig fields
    finetune: dict = field(default_factory=dict)   # FinetuneConfig fields
    probe: Optional[dict] = field(default_factory=dict)   # ProbeConfig fields; None: no probe
    lrs: Tuple[float, ...] = (5e-5,)
    max_train: Optional[int] = None
    max_dev: Optional[int] = None
    amp: bool = True                            # bf16 autocast on CUDA (ignored on CPU)
    workers: int = 1                            # >1: encoders run in that many processes (one GPU shared)
    time_steps: int = 0                         # >0: time per step measured alone afterwards (see _time_steps)
    demo: bool = False


PRESETS: Dict[str, Preset] = {
    "cpu-demo": Preset(
        name="cpu-demo",
        description="small-scale study on a CPU (minutes): unstructured 0/30/60/90%, 16x16 blocks "
                    "30/60/90%, polarity, 2 seeds, linear probe + fine-tuning, controls: from-scratch, "
                    "random pruning at 60%, information deletion at 90%; 2 worker processes",
        levels=(0.0, 0.3, 0.6, 0.9), modes=("unstructured", "block"), blocks=(16,), seeds=(0, 1),
        tasks=("polarity",), controls=("scratch", "random", "deletion"),
        control_levels={"random": (0.6,), "deletion": (0.9,)}, workers=2,
        seq_len=64, mlm_train_blocks=1200, mlm_dev_blocks=48,
        head=dict(blocks=640, max_steps=60, batch_size=512, lr=1e-2, eval_every=10, tol=0.02),
        pretrain=dict(steps=20, batch_size=8, lr=1e-4, ramp_fraction=0.5, prune_every=5),
        finetune=dict(epochs=2.0, max_steps=64, batch_size=16, token_budget=512, max_len=64,
                      warmup_fraction=0.1, pooling="mean"),
        probe=dict(max_len=64), lrs=(2e-4,), max_train=640, max_dev=400, demo=True),
    "gpu": Preset(
        name="gpu",
        description="the scaled-down study on one GPU: levels 0-90%, unstructured and 16/32 blocks, "
                    "all tasks, from-scratch / random-pruning / information-deletion controls, 3 seeds",
        levels=tuple(i / 10 for i in range(10)), modes=("unstructured", "block"), blocks=(16, 32),
        seeds=(0, 1, 2), tasks=("polarity", "uncertainty", "bbc-topic", "movie-score"),
        controls=("scratch", "random", "deletion"), seq_len=128, mlm_train_blocks=None,
        mlm_dev_blocks=512, extra_text=False,
        head=dict(blocks=4096, max_steps=400, batch_size=4096, lr=1e-2, eval_every=20, tol=0.005),
        pretrain=dict(steps=150, batch_size=64, lr=1e-4, ramp_fraction=0.5, prune_every=5, warmup_fraction=0.02),
        finetune=dict(epochs=3.0, max_steps=200, batch_size=32, token_budget=2048, max_len=128,
                      warmup_fraction=0.1, pooling="mean"),
        probe=dict(max_len=128, batch_tokens=16384), lrs=(1e-4,), max_train=2000, max_dev=1000,
        workers=8, time_steps=20),
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


@dataclass(frozen=True)
class EncoderSpec:
    """One pre-trained encoder of the study: ``control`` is ``none``, ``random`` (random masks)
    or ``scratch`` (random init, no pre-training: ``cfg`` is None)."""
    control: str
    seed: int
    cfg: Optional[PretrainConfig]

    @property
    def mode(self):
        return "dense" if self.cfg is None else self.cfg.mode

    @property
    def block(self):
        return self.cfg.block if self.cfg is not None and self.cfg.mode == "block" else 0

    @property
    def sparsity(self):
        return 0.0 if self.cfg is None else self.cfg.sparsity

    def label(self):
        lab = self.mode + (f" {self.block}x{self.block}" if self.block else "") + f" {100 * self.sparsity:.0f}%"
        return lab + (f" [{self.control}]" if self.control != "none" else "") + f" seed {self.seed}"


def _worker(job) -> dict:
    preset, out, cache_dir, device, indices, threads, number, deadline = job
    torch.set_num_threads(threads)
    keep_freed_memory()

    def log(msg):
        print(f"[worker {number}] {msg}", flush=True)
    st = Study(preset, out, cache_dir, device=device, progress=False, log=log, deadline=deadline)
    st.run_jobs(indices)
    return {"counts": {k: v for k, v in st.counts.items() if k.endswith("_trained")}, "phases": st.phases}


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def step_time(base_mlm, encoder, blocks, ids, device, amp, batch_size: int, steps: int) -> float:
    """Seconds per MLM training step (forward, backward, AdamW) of ``encoder`` under ``base_mlm``'s
    head, at its current mask: median of ``steps`` timed steps after 3 warm-up steps."""
    import statistics

    from .data import mask_tokens
    from .training import make_adamw
    mlm = copy.deepcopy(base_mlm)
    mlm.bert = copy.deepcopy(encoder)
    mlm.to(device).train()
    opt = make_adamw([q for q in mlm.parameters() if q.requires_grad], 1e-5)
    g = torch.Generator().manual_seed(0)
    ts = []
    for i in range(steps + 3):
        x = blocks[torch.randint(len(blocks), (batch_size,), generator=g)]
        inputs, labels = mask_tokens(x, ids["special"], ids["mask"], ids["vocab"], g)
        inputs, labels = inputs.to(device), labels.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with _pt.autocast(device, amp):
            loss = _pt.mlm_loss(mlm, inputs, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


class Study:
    def __init__(self, preset: Preset, out_dir, cache_dir=None, device: str = "auto", progress: bool = True,
                 data: Optional[StudyData] = None, log: Callable[[str], None] = print,
                 deadline: Optional[float] = None):
        """``deadline``: a ``time.time()`` after which no encoder is started (those running finish);
        the report then covers the encoders whose runs all completed (see :meth:`run`)."""
        self.p = preset
        self.deadline = deadline
        self.out = Path(out_dir)
        self.store = RunStore(self.out / "runs")
        self.device = pick_device(device)
        self.progress = progress
        self.log = log
        self.data = data or StudyData(DataCache(cache_dir, log=log), preset)
        self.amp = preset.amp and self.device.type == "cuda"
        self.counts = {k: 0 for k in ("pretrain_trained", "pretrain_cached", "finetune_trained", "finetune_cached",
                                      "probe_trained", "probe_cached")}
        # per phase (head, pretrain, probe, finetune; runs done, not cached): [runs, wall s, CPU s]
        self.phases: Dict[str, List[float]] = {}
        self._tasks: Dict[str, TaskData] = {}
        self._bar = None
        self._base = None

    # ---- planning ----------------------------------------------------------------------------
    def data_key(self) -> dict:
        p = self.p
        return {"model": p.model, "layers": p.layers, "scratch": p.scratch if p.model == "scratch" else None,
                "seq_len": p.seq_len, "mlm_train_blocks": p.mlm_train_blocks, "mlm_dev_blocks": p.mlm_dev_blocks,
                "extra_text": p.extra_text, "seed": 0}

    def encoder_plan(self) -> List[EncoderSpec]:
        """Every encoder the study needs: dense (level 0) first, then each mode, block size and
        level, then the random-pruning control, then the from-scratch baseline; each for every seed."""
        p = self.p
        base = dict(p.pretrain)
        levels = [l for l in p.levels if l > 0]
        plan: List[EncoderSpec] = []
        variants = [(m, b) for m in p.modes for b in (p.blocks if m == "block" else (None,))]
        # seeds innermost: a study stopped part-way has every seed of the levels it finished
        for seed in p.seeds:
            plan.append(EncoderSpec("none", seed, PretrainConfig(mode="dense", sparsity=0.0, seed=seed, **base)))
        for control in ("none", "random"):
            if control == "random" and "random" not in p.controls:
                continue
            for mode, blk in variants:
                if control == "random" and mode not in p.control_modes:
                    continue
                kw = dict(base, block=blk) if blk else dict(base)
                if control == "random":
                    kw["score"] = "random"
                for l in (levels if control == "none" else self.control_levels(control)):
                    for seed in p.seeds:
                        plan.append(EncoderSpec(control, seed, PretrainConfig(mode=mode, sparsity=l, seed=seed, **kw)))
        if "scratch" in p.controls:
            for seed in p.seeds:
                plan.append(EncoderSpec("scratch", seed, None))
        return plan

    def control_levels(self, control: str) -> List[float]:
        """The levels (above 0) that ``control`` (random or deletion) runs at: the preset's
        ``control_levels[control]`` among its levels, or every level when it names none."""
        levels = [l for l in self.p.levels if l > 0]
        if control not in self.p.control_levels:
            return levels
        return [l for l in levels if any(abs(l - c) < 1e-9 for c in self.p.control_levels[control])]

    def finetune_plan(self, spec: EncoderSpec) -> List[Tuple[tuple, FinetuneConfig]]:
        """``(row key, config)`` of each fine-tuning run of one encoder; a row key is
        ``(mode, block, sparsity, control)``."""
        p = self.p
        out = []
        base = dict(p.finetune, seed=spec.seed)
        own = (spec.mode, spec.block, spec.sparsity, spec.control)
        for task in p.tasks:
            for lr in p.lrs:
                out.append((own, FinetuneConfig(task=task, lr=lr, **base)))
                if (spec.control == "none" and spec.mode != "dense" and "deletion" in p.controls
                        and spec.mode in p.control_modes and spec.sparsity in self.control_levels("deletion")):
                    out.append(((spec.mode, spec.block, spec.sparsity, "deletion"),
                                FinetuneConfig(task=task, lr=lr, control="deletion", **base)))
                if spec.control == "none" and spec.mode == "dense" and "finetune-prune" in p.controls:
                    for mode in p.modes:
                        for blk in (p.blocks if mode == "block" else (None,)):
                            for l in p.levels:
                                if l <= 0:
                                    continue
                                kw = dict(base)
                                kw.setdefault("ramp_fraction", p.pretrain.get("ramp_fraction", 0.1))
                                kw.setdefault("prune_every", p.pretrain.get("prune_every", 10))
                                if blk:
                                    kw["block"] = blk
                                out.append(((mode, blk or 0, l, "finetune-prune"), FinetuneConfig(
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

    def prepare(self) -> None:
        """What must happen once, before encoder jobs run side by side (workers, torchrun ranks):
        every download (start model, MLM text, each task's archive), the MLM head fit and the
        block-size check. Jobs started after it only read the cache; two processes never fetch
        or unpack the same archive."""
        self.base_model()
        self.check_blocks()
        for t in self.p.tasks:
            self.task_data(t)

    def check_blocks(self) -> None:
        """Every block size of mode block divides the model's pruned matrices (hidden and
        intermediate sizes); else a one-line ValueError before any pre-training starts."""
        if "block" not in self.p.modes:
            return
        cfg = self.base_model().config
        dims = (cfg.hidden_size, cfg.intermediate_size)
        bad = [b for b in self.p.blocks if any(d % b for d in dims)]
        if bad:
            ok = [b for b in range(16, 257, 16) if all(d % b == 0 for d in dims)]
            raise ValueError(f"block size {', '.join(map(str, bad))} does not divide the model's hidden size {dims[0]} "
                             f"and intermediate size {dims[1]}: use one of {', '.join(map(str, ok))}")

    def head_config(self) -> HeadConfig:
        return HeadConfig(**self.p.head)

    def head_key(self) -> str:
        return config_hash({"data": self.data_key(), "head": asdict(self.head_config())})

    def base_model(self):
        """The start model with its MLM head fit on frozen-encoder features (cached): the parent
        of every pre-training run."""
        if self._base is not None:
            return self._base
        key = self.head_key()
        rec = self.store.get("head", key)
        model = self.store.load_model("head", key) if rec else None
        if model is None:
            train, dev = self._blocks()
            model = self.data.start_model()
            res = self._timed("head", lambda: fit_head(model, self.head_config(), train, self._ids, self.device,
                                                       self.amp, self.progress))
            res["dev_mlm_loss"] = mlm_dev_loss(model, dev, self._ids, self.device, amp=self.amp)
            self.store.save_model("head", key, model)
            self.store.put("head", key, {"data": self.data_key(), "head": asdict(self.head_config())}, res)
            self._say(f"MLM head fit ({res['positions']} positions, {res['steps']} steps, "
                      f"{'converged' if res['converged'] else 'NOT converged'}): held-out loss "
                      f"{res['heldout_loss_start']:.3f} -> {res['heldout_loss']:.3f} (unigram {res['unigram_loss']:.3f}); "
                      f"dev MLM loss {res['dev_mlm_loss']:.3f}")
            rec = {"result": res}
        self.head_result = rec["result"]
        self._base = model.cpu()
        return self._base

    def pretrain_key(self, spec: EncoderSpec) -> str:
        if spec.cfg is None:
            return config_hash({"scratch_of": self.data_key(), "seed": spec.seed})
        return config_hash({"parent": self.head_key(), "data": self.data_key(), "pretrain": asdict(spec.cfg)})

    def scratch_encoder(self, seed: int):
        """A randomly initialised encoder of the start model's architecture (the baseline)."""
        from transformers import BertModel
        cfg = copy.deepcopy(self.base_model().config)
        torch.manual_seed(1000 + seed)
        return BertModel(cfg, add_pooling_layer=True)

    def run_pretrain(self, spec: EncoderSpec, need_model: bool):
        """(result, encoder or None, key) — trained now, or from the cache."""
        key = self.pretrain_key(spec)
        if spec.cfg is None:
            self.counts["pretrain_cached"] += 0
            return {"dev_mlm_loss": None, "seconds_per_step": None, "sparsity": 0.0}, \
                (self.scratch_encoder(spec.seed) if need_model else None), key
        rec = self.store.get("pretrain", key)
        enc = None
        if rec is not None and need_model:
            enc = self.store.load_model("pretrain", key)
        if rec is not None and (enc is not None or not need_model):
            self.counts["pretrain_cached"] += 1
            return rec["result"], enc, key
        train, dev = self._blocks()
        model = copy.deepcopy(self.base_model())
        desc = "pretrain " + spec.label()
        res = self._timed("pretrain", lambda: pretrain(model, spec.cfg, train, dev, self._ids, self.device,
                                                       self.amp, self.progress, desc=desc))
        res.pop("kept_fractions", None)
        self.counts["pretrain_trained"] += 1
        enc = model.bert.cpu()
        self.store.save_model("pretrain", key, enc)
        self.store.put("pretrain", key, {"control": spec.control, "pretrain": asdict(spec.cfg),
                                         "data": self.data_key()}, res)
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

    def probe_config(self) -> Optional[ProbeConfig]:
        return None if self.p.probe is None else ProbeConfig(**self.p.probe)

    def probe_key(self, parent, task: str) -> str:
        return config_hash({"parent": parent, "max_train": self.p.max_train, "max_dev": self.p.max_dev,
                            "task": task, "probe": asdict(self.probe_config())})

    def run_probe(self, parent_key, encoder_fn, task: str, label: str):
        key = self.probe_key(parent_key, task)
        rec = self.store.get("probe", key)
        if rec is not None:
            self.counts["probe_cached"] += 1
            return rec["result"]
        enc = encoder_fn()
        res = self._timed("probe", lambda: probe(enc, self.probe_config(), self.task_data(task),
                                                 self.data.tokenizer(), self.device, self.amp))
        self.counts["probe_trained"] += 1
        self.store.put("probe", key, {"parent": parent_key, "task": task, "probe": asdict(self.probe_config())}, res)
        self._say(f"probe {label} {task}: dev {res['dev_score']:.1f} (train {res['train_score']:.1f})")
        return res

    def run_finetune(self, parent_key, encoder_fn, cfg: FinetuneConfig, label: str):
        key = self.finetune_key(parent_key, cfg)
        rec = self.store.get("finetune", key)
        if rec is not None:
            self.counts["finetune_cached"] += 1
            return rec["result"]
        enc = encoder_fn()
        res = self._timed("finetune", lambda: finetune(enc, cfg, self.task_data(cfg.task), self.data.tokenizer(),
                                                       self.device, self.amp, self.progress,
                                                       desc=f"finetune {label} {cfg.task} lr={cfg.lr:g}"))
        res.pop("model", None)
        self.counts["finetune_trained"] += 1
        self.store.put("finetune", key, {"parent": parent_key, "finetune": asdict(cfg)}, res)
        self._say(f"finetune {label} {cfg.task} lr={cfg.lr:g}: dev {res['dev_score']:.1f}, "
                  f"train loss {res['train_loss']:.3f}")
        return res

    def _add_phase(self, kind: str, runs: float, wall: float, cpu: float) -> None:
        ph = self.phases.setdefault(kind, [0, 0.0, 0.0])
        ph[0] += runs
        ph[1] += wall
        ph[2] += cpu

    def _timed(self, kind: str, fn):
        """``fn()``, its wall and CPU seconds (this process, all threads) added to ``phases[kind]``."""
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        self._add_phase(kind, 1, time.perf_counter() - w, time.process_time() - c)
        return out

    def _tick(self):
        if self._bar is not None:
            self._bar.update(1)

    def _say(self, msg):
        if self._bar is not None:
            self._bar.write(msg)
        else:
            self.log(msg)

    def chance(self) -> Dict[str, float]:
        """Dev score of a constant predictor per task: the majority class's share (classification)
        or 0 (regression: a constant has no correlation)."""
        out = {}
        for t in self.p.tasks:
            d = self.task_data(t)
            if d.spec.kind == "classification":
                ys = [y for _, y in d.dev]
                out[t] = 100.0 * max(ys.count(c) for c in set(ys)) / len(ys)
            else:
                out[t] = 0.0
        if len(self.p.tasks) > 1:
            out["average"] = sum(out[t] for t in self.p.tasks) / len(self.p.tasks)
        return out

    def run_encoder(self, spec: EncoderSpec, fl, probing: bool) -> List[dict]:
        """Pre-train (or load) one encoder, probe it and fine-tune it; its per-seed records."""
        p = self.p
        records: List[dict] = []
        key0 = self.pretrain_key(spec)
        need = self._runs_missing(key0, fl, probing)
        pres, enc, pkey = self.run_pretrain(spec, need_model=need)
        self._tick()
        cache_enc = {"enc": enc}

        def encoder_fn(spec=spec, cache_enc=cache_enc):
            if cache_enc["enc"] is None:
                cache_enc["enc"] = self.run_pretrain(spec, need_model=True)[1]
            return cache_enc["enc"]

        probes = {}
        if probing:
            for t in p.tasks:
                probes[t] = self.run_probe(pkey, encoder_fn, t, spec.label())["dev_score"]
                self._tick()
        for rk, fcfg in fl:
            label = f"{rk[0]}{' %dx%d' % (rk[1], rk[1]) if rk[1] else ''} {100 * rk[2]:.0f}%" + \
                    (f" [{rk[3]}]" if rk[3] != "none" else "") + f" seed {spec.seed}"
            fres = self.run_finetune(pkey, encoder_fn, fcfg, label)
            self._tick()
            own_encoder = rk[3] in ("none", "random", "scratch", "deletion")
            records.append({
                "mode": rk[0], "block": rk[1], "sparsity": rk[2], "control": rk[3], "task": fcfg.task,
                "seed": spec.seed, "lr": fcfg.lr, "dev_score": fres["dev_score"], "train_loss": fres["train_loss"],
                "finetune_s_per_step": fres["seconds_per_step"],
                # the probe reads the pre-trained encoder (a deletion run's is its pruned parent's)
                "probe": probes.get(fcfg.task) if own_encoder else None,
                "pretrain_dev_loss": pres.get("dev_mlm_loss") if own_encoder else None,
                "pretrain_s_per_step": pres.get("seconds_per_step") if own_encoder else None,
                "achieved_sparsity": (fres.get("linear_zero_fraction") if rk[3] == "finetune-prune"
                                      else pres.get("sparsity"))})
        del enc, cache_enc
        return records

    def run_jobs(self, indices) -> None:
        """Run (or find cached) the encoders ``plan[i]`` for ``i`` in ``indices``, each with its probes
        and fine-tuning runs (what a worker process or a torchrun rank does)."""
        plan = self.encoder_plan()
        probing = self.probe_config() is not None
        for i in indices:
            if self._past_deadline():
                self._say(f"time limit reached: {plan[i].label()} and the encoders after it not started")
                return
            self.run_encoder(plan[i], self.finetune_plan(plan[i]), probing)

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    def _runs_missing(self, key0: str, fl, probing: bool) -> bool:
        """Whether a probe or fine-tuning run of the encoder ``key0`` is not in the cache."""
        return any(self.store.get("finetune", self.finetune_key(key0, f)) is None for _, f in fl) or (
            probing and any(self.store.get("probe", self.probe_key(key0, t)) is None for t in self.p.tasks))

    def _all_cached(self, spec: EncoderSpec, fl, probing: bool) -> bool:
        """Whether every run of one encoder (pre-training, probes, fine-tuning) is in the cache."""
        key0 = self.pretrain_key(spec)
        if spec.cfg is not None and self.store.get("pretrain", key0) is None:
            return False
        return not self._runs_missing(key0, fl, probing)

    def run_ranks(self, rank: int, world: int, sync: Callable[[bool], bool],
                  failed: Optional[dict] = None) -> Optional[List[dict]]:
        """The study on ``world`` processes (torchrun ranks): rank 0 fetches the data and fits the MLM
        head (cached) while the others wait; then rank ``r`` runs every ``world``-th encoder job
        (``r``, ``r + world``, ...), each alone on its process; after the second meeting rank 0 finds
        every run cached, aggregates and reports (its rows are returned; other ranks return None).
        No two ranks write the same run. ``sync(ok)`` is a collective returning whether every rank
        was ok; when another rank failed this one stops (``failed["other"]`` says where); its own
        error propagates after it has told the others."""
        failed = {} if failed is None else failed

        def meet(where, fn):
            try:
                out = fn()
            except BaseException:
                sync(False)
                raise
            if not sync(True):
                failed["other"] = where
                return False, None
            return True, out

        ok, _ = meet("fetching the data / fitting the MLM head", lambda: self.prepare() if rank == 0 else None)
        if not ok:
            return None
        plan = self.encoder_plan()

        def jobs():
            self.base_model()
            mine = range(rank, len(plan), world)
            self._say(f"rank {rank} of {world}: {len(mine)} of the {len(plan)} encoders")
            self.run_jobs(mine)
        ok, _ = meet("in its encoder jobs", jobs)
        if not ok:
            return None
        return self.run(parallel=False) if rank == 0 else None

    def _parallel(self, plan: List[EncoderSpec]) -> None:
        """Fill the run cache with ``workers`` processes (spawned; on CUDA they share the GPU): each
        takes every ``workers``-th encoder. The main process then finds every run cached."""
        import multiprocessing as mp
        n = min(self.p.workers, len(plan))
        threads = max(1, (os.cpu_count() or 1) // n)
        jobs = [(self.p, str(self.out), str(self.data.cache.root), str(self.device), list(range(i, len(plan), n)), threads,
                 i, self.deadline) for i in range(n)]
        self._say(f"{len(plan)} encoders on {n} worker processes ({threads} CPU threads each)")
        with mp.get_context("spawn").Pool(n) as pool:
            for done in pool.imap_unordered(_worker, jobs):
                counts = done["counts"]
                for k, v in counts.items():
                    self.counts["workers_" + k] = self.counts.get("workers_" + k, 0) + v
                for k, v in done["phases"].items():
                    self._add_phase(k, *v)
                self._say(f"worker done: {counts}")

    def _time_steps(self, plan: List[EncoderSpec], records: List[dict]) -> None:
        """Time per MLM training step of each (mode, block, level) at its final mask, measured alone
        (after the workers: no sharing of the device), seed-0 encoders; replaces the records'
        ``pretrain_s_per_step`` (which the workers measured while sharing the device)."""
        train, _ = self._blocks()
        times: Dict[tuple, float] = {}
        for spec in plan:
            k = (spec.mode, spec.block, spec.sparsity, spec.control)
            if spec.cfg is None or k in times:
                continue
            if self._past_deadline():
                self._say("time limit reached: the remaining step times are the workers' (measured sharing the device)")
                break
            enc = self.run_pretrain(spec, need_model=True)[1]
            times[k] = step_time(self.base_model(), enc, train, self._ids, self.device, self.amp,
                                 self.p.pretrain.get("batch_size", 16), self.p.time_steps)
            self._say(f"step time {spec.label()}: {times[k]:.4f} s")
        for r in records:
            k = (r["mode"], r["block"], r["sparsity"], "none" if r["control"] == "deletion" else r["control"])
            if k in times and r.get("pretrain_s_per_step") is not None:
                r["pretrain_s_per_step"] = times[k]

    # ---- the whole study -----------------------------------------------------------------------
    def run(self, parallel: bool = True) -> List[dict]:
        """The whole study: every run (cached ones skipped), then aggregation and the report.
        ``parallel=False``: no worker processes even when the preset has ``workers > 1``."""
        from tqdm.auto import tqdm

        p = self.p
        t_start = time.time()
        c_start = time.process_time()
        if p.demo:
            self.log("=" * 78)
            self.log(f"sparsebert study, preset {p.name}: a SMALL-SCALE study, not the paper's experiment.")
            self.log("Runs are short and data subsets small: read every difference against its error bar.")
            self.log("=" * 78)
        self.log(f"preset {p.name}: levels {[int(100 * l) for l in p.levels]}%, modes {list(p.modes)}, "
                 f"blocks {list(p.blocks)}, tasks {list(p.tasks)}, controls {list(p.controls) or 'none'}, "
                 f"seeds {list(p.seeds)}, device {self.device}")
        for c in ("random", "deletion"):
            if c in p.controls and not self.control_levels(c):
                self.log(f"control {c}: none of its levels ({', '.join(f'{100 * l:.0f}%' for l in p.control_levels[c])}) "
                         "is among the study's levels: not run")
        plan = self.encoder_plan()
        fplans = [self.finetune_plan(s) for s in plan]
        probing = self.probe_config() is not None
        total = len(plan) + sum(len(v) for v in fplans) + (len(plan) * len(p.tasks) if probing else 0)
        self._bar = tqdm(total=total, desc="study runs", disable=not self.progress, dynamic_ncols=True)
        self.prepare()
        if parallel and p.workers > 1 and len(plan) > 1:
            self._parallel(plan)
        records: List[dict] = []
        left_out: List[str] = []
        for spec, fl in zip(plan, fplans):
            if self._past_deadline() and not self._all_cached(spec, fl, probing):
                left_out.append(spec.label())
                continue
            records += self.run_encoder(spec, fl, probing)
        if left_out:
            self.log(f"time limit reached: {len(left_out)} of {len(plan)} encoders not run ({', '.join(left_out)}); "
                     "the report covers the rest; the same command again resumes from the cache")
        if p.time_steps and records:
            self._time_steps(plan, records)
        self._bar.close()
        self._bar = None
        metrics = {t: ("accuracy" if self.task_data(t).spec.kind == "classification" else "pearson+spearman")
                   for t in p.tasks}
        rows = aggregate(records, p.tasks, metrics)
        elapsed = time.time() - t_start
        meta = {"preset": p.name, "title": f"sparsebert study — preset {p.name}",
                "note": ("Small-scale study: short runs on small subsets; mean ± sd over seeds, read every "
                         "difference against its error bar." if p.demo else p.description),
                "device": str(self.device), "elapsed_s": round(elapsed, 1), "counts": self.counts,
                "cpu_s": round(time.process_time() - c_start, 1),
                "phases": {k: {"runs": int(v[0]), "wall_s": round(v[1], 1), "cpu_s": round(v[2], 1)}
                           for k, v in self.phases.items()},
                "loadavg_1min": _loadavg(),
                "preset_config": asdict(p), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "chance": self.chance(), "n_dev": {t: len(self.task_data(t).dev) for t in p.tasks},
                "left_out": left_out,
                "head": getattr(self, "head_result", None), "tasks": list(p.tasks)}
        paths = write_report(rows, p.tasks, self.out, meta, records=records)
        self.summary(rows, paths, elapsed)
        return rows

    def summary(self, rows, paths, elapsed):
        from .report import markdown_table
        self.log("")
        self.log(markdown_table(rows))
        c = self.counts
        self.log(f"runs: pre-training {c['pretrain_trained']} trained + {c['pretrain_cached']} cached, "
                 f"probes {c['probe_trained']} + {c['probe_cached']} cached, "
                 f"fine-tuning {c['finetune_trained']} trained + {c['finetune_cached']} cached; "
                 f"{elapsed:.0f} s in all")
        for k, (n, wall, cpu) in self.phases.items():
            self.log(f"  {k}: {int(n)} runs, {wall:.0f} s wall, {cpu:.0f} s CPU")
        self.log("wrote " + ", ".join(str(v) for v in paths.values()))
        if self.p.demo:
            self.log("(see docs/STUDY.md for what this small-scale study does and does not show; the 'gpu' "
                     "preset runs the full scaled-down study.)")
