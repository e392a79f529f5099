"""End to end: a BERT masked-LM training step and encoder inference, dense vs block-pruned.

    python benchmarks/bench_bert.py [--device cuda|cpu] [--levels 0 0.5 0.75 0.9] [--block 16 32 64]
                                    [--head full|masked|both] [--compile] [--compile-levels 0.9]
                                    [--steps 5] [--warmup 2] [--batch B] [--seq 128]
                                    [--infer-batches 1 8 64] [--profile] [--out DIR] [--tiny]
                                    [--no-train] [--infer-breakdown] [--full-layout-dense]

Models, built from a config with random weights (timing only): ``--device cuda`` BERT-Base
(12 layers, hidden 768, intermediate 3072) in bf16, batch 128 x 128; ``--device cpu`` a
MiniLM-size model (6 layers, hidden 384, 12 heads, intermediate 1536, vocab 30522) in fp32,
batch 8 x 128. ``--tiny`` is a 2-layer smoke model.

One training step is the user's loop, unchanged: ``loss = model(input_ids=ids, labels=labels).loss;
loss.backward(); opt.step(); opt.zero_grad()`` with ``torch.optim.AdamW`` (defaults), dropout on,
15% of the positions labelled. Rows:

* ``head=full``: the model as Hugging Face runs it (the 30522-way head over every token);
* ``head=masked``: the same model after :func:`sparsebert.optimize` (head at labelled positions,
  SDPA, training-fused GELU, cheaper CPU dropout) — the loss is the same: each row's ``loss`` is
  the model's loss on the batch at the start, without dropout (eval mode), printed as a check
  (``train_loss``, the last timed step's, differs by the dropout draws);
* ``compiled``: the loss computation through ``torch.compile(model)``;
* models: ``dense`` and ``block{b} {s}%`` (``sparsebert.sparsify``, backend ``auto``).

Both wall time and this process's CPU time (``time.process_time``) are recorded: on a shared
machine with ``--threads 1`` the CPU time leaves out the time the process waited for a core.
Timings are interleaved: per block size, one group of models (the dense baseline in every group)
is timed round by round, one step of each model per round, medians reported; every speedup is
against dense eager Hugging Face (``dense``/``full``/eager) of the same group. Each model draws
dropout from its own RNG state, so interleaving does not change its losses.

Also per model: peak memory of a step (CUDA: ``max_memory_allocated``; CPU: the bytes autograd
saved for the backward, deduplicated by storage — the activation memory), the bytes of weights +
gradients + AdamW state of the pruned layers (Q, K, V, attention output, intermediate, output),
and encoder inference latency (``model.bert``, no MLM head; ``--infer-batches``). ``--profile``
writes ``torch.profiler`` tables of one step (dense full, dense optimized, 90% 32x32 optimized);
``--infer-breakdown`` the process CPU time of each part of an inference forward (the profiler
reports wall time, which on a shared machine includes waiting for a core); ``--no-train`` skips
the training rows; ``--full-layout-dense`` (an experiment on ``auto``) makes full layouts take
the dense backend without timing.
Output: a table on stdout; with ``--out`` also ``bench_bert.json`` and ``bench_bert.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
            vocab_size=1000)
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
              vocab_size=30522)


def _config(device, tiny):
    from transformers import BertConfig
    if tiny:
        return BertConfig(**TINY)
    return BertConfig() if device.type == "cuda" else BertConfig(**MINILM)   # BertConfig(): BERT-Base


def _build(cfg, sparsity, block, device, dtype, optimized):
    from transformers import BertForMaskedLM

    import sparsebert

    torch.manual_seed(0)
    model = BertForMaskedLM(copy.deepcopy(cfg))     # own config: attention settings live there
    if sparsity is not None:
        sparsebert.sparsify(model, sparsity=sparsity, block=(block, block))
    model = model.to(device, dtype).train()
    if optimized:
        sparsebert.optimize(model)
    return model


def _pruned_names(cfg):
    from transformers import BertForMaskedLM

    from sparsebert.hf import find_targets
    with torch.device("meta"):
        return [n for n, _ in find_targets(BertForMaskedLM(cfg))]


class Variant:
    """One model with its optimizer, inputs and own RNG state; ``step()`` is one training step."""

    def __init__(self, name, head, compiled, model, ids, labels, device):
        self.name, self.head, self.compiled = name, head, compiled
        self.model, self.ids, self.labels, self.device = model, ids, labels, device
        self.fn = torch.compile(model) if compiled else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        g = torch.Generator().manual_seed(1)
        self.rng = g.get_state()
        self.cuda_rng = None
        self.times, self.cpu_times, self.loss = [], [], float("nan")
        was = model.training
        model.eval()                 # the check value: the loss at the start, without dropout
        with torch.no_grad():
            self.check_loss = float(model(input_ids=ids, labels=labels).loss)
        model.train(was)

    @property
    def key(self):
        return (self.name, self.head, self.compiled)

    def label(self):
        return f"{self.name} {self.head}{' compiled' if self.compiled else ''}"

    def _loss(self):
        return self.fn(input_ids=self.ids, labels=self.labels).loss

    def step(self, zero=True):
        # Each variant draws dropout from its own RNG stream (interleaving leaves it unchanged).
        torch.set_rng_state(self.rng)
        if self.device.type == "cuda" and self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng)
        loss = self._loss()
        loss.backward()
        self.opt.step()
        self.rng = torch.get_rng_state()
        if self.device.type == "cuda":
            self.cuda_rng = torch.cuda.get_rng_state()
        if zero:
            self.opt.zero_grad(set_to_none=True)
        return loss

    def timed_step(self, sync):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = self.step()
        sync()
        self.times.append(time.perf_counter() - t0)
        self.cpu_times.append(time.process_time() - c0)
        self.loss = float(loss.detach())

    def memory(self, pruned):
        """(peak bytes of a step, bytes of the pruned layers' weights + grads + AdamW state)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.step(zero=False)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            seen = {}

            def pack(t):
                try:
                    s = t.untyped_storage()
                    seen[(s.data_ptr(), t.device)] = s.nbytes()
                except Exception:   # noqa: BLE001  (a tensor without storage)
                    pass
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                self.step(zero=False)
            peak = sum(seen.values())
        state = 0
        for name in pruned:
            for p in self.model.get_submodule(name).parameters():
                state += p.nbytes + (p.grad.nbytes if p.grad is not None else 0)
                state += sum(v.nbytes for v in self.opt.state.get(p, {}).values()
                             if torch.is_tensor(v) and v.dim() > 0)
        self.opt.zero_grad(set_to_none=True)
        return peak, state


def _inputs(cfg, batch, seq, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    labels = ids.clone()
    labels[torch.rand(batch, seq, generator=g) > 0.15] = -100
    return ids.to(device), labels.to(device)


def _sync(device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _time_inference(models, cfg, batches, seq, rounds, device, cold=False):
    """{name: {batch: median seconds}} of ``model.bert(ids)`` in inference mode, interleaved.

    Each timed call follows an untimed call of the same model (unless ``cold``): interleaving
    models otherwise starts every timed call with the caches the previous model left, a cost of the
    benchmark's order that a user calling one model repeatedly does not pay, and that weighs most
    on the fastest model (on the 2026-12-02 host: 90% 32x32 at batch 8, 3.5x dense cold, 4.0-4.3x
    warm)."""
    sync = _sync(device)
    out = {name: {} for name in models}
    cpu = {name: {} for name in models}
    for b in batches:
        ids, _ = _inputs(cfg, b, seq, device, seed=2)
        times = {name: [] for name in models}
        ctimes = {name: [] for name in models}
        for m in models.values():
            m.eval()
        with torch.inference_mode():
            for m in models.values():   # warm-up: auto-dispatch timing for this token count
                m.bert(input_ids=ids)
            for _ in range(rounds):
                for name, m in models.items():
                    if not cold:
                        m.bert(input_ids=ids)
                    sync()
                    t0, c0 = time.perf_counter(), time.process_time()
                    m.bert(input_ids=ids)
                    sync()
                    times[name].append(time.perf_counter() - t0)
                    ctimes[name].append(time.process_time() - c0)
        for m in models.values():
            m.train()
        for name in models:
            out[name][b] = statistics.median(times[name])
            cpu[name][b] = statistics.median(ctimes[name])
    return out, cpu


def _breakdown(models, cfg, batches, seq, rounds, device):
    """{name: {batch: {part: mean CPU seconds per forward}}} of ``model.bert(ids)`` at inference:
    the process CPU time (``time.process_time``) spent inside the sparse kernels, the dense
    backend, ``nn.Linear``, SDPA, the fused attention kernel, GELU modules, LayerNorm, the fused
    add + LayerNorm, the embeddings and ``optimize``'s whole-layer op (all of a layer's kernels),
    and the rest (Python, adds, reshapes). ``torch.profiler`` reports wall time, which
    on a shared machine counts the time spent waiting for a core."""
    import collections

    import torch.nn.functional as F
    from transformers.activations import GELUActivation

    from sparsebert.ops import cpu_attention, cpu_bsr, dense
    acc = collections.Counter()
    inside = [0]
    patched = []

    def timing(real, label):
        def timed(*a, **k):
            if inside[0]:
                return real(*a, **k)
            inside[0] += 1
            c = time.process_time()
            try:
                return real(*a, **k)
            finally:
                acc[label] += time.process_time() - c
                inside[0] -= 1
        return timed

    def wrap(obj, attr, label):
        real = getattr(obj, attr)
        patched.append((obj, attr, real))
        setattr(obj, attr, timing(real, label))

    for obj, attr, label in ((cpu_bsr, "forward", "sparse kernels"), (dense, "forward", "dense backend"),
                             (torch.nn.Linear, "forward", "nn.Linear"), (F, "linear", "nn.Linear"),
                             (F, "scaled_dot_product_attention", "sdpa"),
                             (GELUActivation, "forward", "gelu"), (torch.nn.LayerNorm, "forward", "layernorm"),
                             (cpu_bsr, "add_layernorm_", "add+layernorm fused"),
                             (torch.nn.Embedding, "forward", "embedding"),
                             (cpu_attention, "attention", "attention kernel")):
        wrap(obj, attr, label)
    # optimize's whole-layer op (its nine kernel calls are made from C++: one part)
    real_layer_op = cpu_bsr.layer_op
    patched.append((cpu_bsr, "layer_op", real_layer_op))
    timed_op = {}

    def layer_op():
        op = real_layer_op()
        if op is not None and "op" not in timed_op:
            timed_op["op"] = timing(op, "layer op (whole layers)")
        return None if op is None else timed_op["op"]
    cpu_bsr.layer_op = layer_op
    out = {name: {} for name in models}
    try:
        for b in batches:
            ids, _ = _inputs(cfg, b, seq, device, seed=2)
            with torch.inference_mode():
                for name, m in models.items():
                    m.eval()
                    m.bert(input_ids=ids)
                    acc.clear()
                    c = time.process_time()
                    for _ in range(rounds):
                        m.bert(input_ids=ids)
                    total = (time.process_time() - c) / rounds
                    parts = {k: v / rounds for k, v in acc.items()}
                    parts["rest"] = total - sum(parts.values())
                    out[name][b] = dict(parts, total=total)
                    m.train()
    finally:
        for obj, attr, real in reversed(patched):
            setattr(obj, attr, real)
    return out


def _profile(variant, path, row_limit=25):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if variant.device.type == "cuda" else [])
    for _ in range(2):
        variant.step()
    with profile(activities=acts) as p:
        for _ in range(3):
            variant.step()
        _sync(variant.device)()
    sort = "self_cuda_time_total" if variant.device.type == "cuda" else "self_cpu_time_total"
    table = p.key_averages().table(sort_by=sort, row_limit=row_limit)
    text = f"### {variant.label()} — 3 steps\n\n{table}\n"
    if path:
        with open(path, "a") as f:
            f.write(text)
    print(text, flush=True)


def _plot(rows, infer, path, title, cpu_time=False):
    """Speedup bars; ``cpu_time``: from the process CPU times (the CPU mode) instead of wall."""
    tk, ik = ("cpu_speedup", "cpu_speedup") if cpu_time else ("speedup", "speedup")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    labels = [f"{r['model']}\n{r['head']}{' c' if r['compiled'] else ''}" for r in rows]
    ax.bar(range(len(rows)), [r[tk] for r in rows],
           color=["tab:gray" if r["model"] == "dense" else ("tab:orange" if r["compiled"] else "tab:blue")
                  for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel("training step speedup vs dense eager HF" + (" (CPU time)" if cpu_time else ""))
    ax.set_title("training (masked = sparsebert.optimize; c = torch.compile)", fontsize=9)
    ax = axes[1]
    names = list(dict.fromkeys((r["model"], r["block"]) for r in infer if r["model"] != "dense"))
    batches = sorted({r["batch"] for r in infer})
    width = 0.8 / max(1, len(batches))
    sp = {(r["model"], r["block"], r["batch"]): r[ik] for r in infer}
    for i, b in enumerate(batches):
        ax.bar([j + i * width for j in range(len(names))], [sp[(n, blk, b)] for n, blk in names], width,
               label=f"batch {b}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
    ax.set_xticklabels([n for n, _ in names], rotation=45, fontsize=7)
    ax.set_ylabel("encoder inference speedup vs dense" + (" (CPU time)" if cpu_time else ""))
    if batches:                     # no inference rows (--infer-batches with no value): no legend
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny BERT (smoke test)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=None, help="default: 128 (cuda), 8 (cpu)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.9])
    ap.add_argument("--block", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--head", choices=["full", "masked", "both"], default="both",
                    help="full: Hugging Face as is; masked: after sparsebert.optimize; both")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--compile-levels", type=float, nargs="+", default=None,
                    help="sparsity levels compiled with --compile (default: all of --levels)")
    ap.add_argument("--full-levels", type=float, nargs="*", default=None,
                    help="with --head both: sparsity levels that also get the unoptimized (full head) "
                         "sparse row (default: all)")
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (one step per model each)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--infer-batches", type=int, nargs="*", default=[1, 8, 64])
    ap.add_argument("--infer-rounds", type=int, default=5)
    ap.add_argument("--infer-cold", action="store_true",
                    help="time each inference call right after the previous model's (no untimed call "
                         "of the same model first): the method of the runs before 2026-12-02")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables of one step")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--no-train", action="store_true", help="inference only: no training rows")
    ap.add_argument("--infer-breakdown", action="store_true",
                    help="also the CPU time of each part of an inference forward (kernels, SDPA, ...)")
    ap.add_argument("--full-layout-dense", action="store_true",
                    help="experiment: backend auto takes the dense backend for full layouts (every block "
                         "kept) instead of timing the candidates")
    args = ap.parse_args(argv)
    if args.full_layout_dense:
        from sparsebert.ops import backends
        real_choose = backends.choose

        def choose(x, values, layout, train=False):
            if backends._layout_key(layout)[2] == 1.0 and x.device.type == "cpu":
                return "dense"
            return real_choose(x, values, layout, train)
        backends.choose = choose
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --device cpu)")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = args.batch or (128 if device.type == "cuda" else 8)
    cfg = _config(device, args.tiny)
    ids, labels = _inputs(cfg, batch, args.seq, device)
    heads = ["full", "masked"] if args.head == "both" else [args.head]
    compile_levels = args.levels if args.compile_levels is None else args.compile_levels
    full_levels = args.full_levels
    pruned = _pruned_names(cfg)
    sync = _sync(device)
    what = ("tiny BERT" if args.tiny else "BERT-Base" if device.type == "cuda" else "MiniLM-size BERT")
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} CPUs)"
    print(f"{what} MLM, {dev_name}, torch {torch.__version__}, {dtype}, batch {batch} x seq {args.seq}, "
          f"{args.steps} interleaved rounds, {torch.get_num_threads()} threads", flush=True)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
    rows, infer, groups, breakdowns = [], [], [], []
    for block in args.block:
        spec = []                       # (name, sparsity, head, compiled)
        for head in heads:
            spec.append(("dense", None, head, False))
        if args.compile and block == args.block[0]:      # dense compiled once, in the first group
            spec += [("dense", None, h, True) for h in heads]
        for s in args.levels:
            for head in heads:
                if head == "full" and len(heads) > 1 and full_levels is not None and s not in full_levels:
                    continue
                spec.append((f"block{block} {round(100 * s)}%", s, head, False))
            if args.compile and s in compile_levels:
                spec.append((f"block{block} {round(100 * s)}%", s, heads[-1], True))
        if ("dense", "full", False) not in [(n, h, c) for n, _, h, c in spec]:
            spec.insert(0, ("dense", None, "full", False))     # the baseline is always there
        variants = []
        for name, s, head, compiled in spec:
            m = _build(cfg, s, block, device, dtype, optimized=head == "masked")
            variants.append(Variant(name, head, compiled, m, ids, labels, device))
        base = next(v for v in variants if v.key == ("dense", "full", False))
        t0 = time.perf_counter()
        for v in (variants if not args.no_train else ()):
            for _ in range(args.warmup):            # auto-dispatch timing, autotuning, compilation
                v.step()
        warm_s = time.perf_counter() - t0
        for _ in range(args.steps if not args.no_train else 0):
            for v in variants:
                v.timed_step(sync)
        trained = variants if not args.no_train else []
        if trained:
            base_t = statistics.median(base.times)
            base_c = statistics.median(base.cpu_times)
        for v in trained:
            t, c = statistics.median(v.times), statistics.median(v.cpu_times)
            spread = (max(v.times) - min(v.times)) / t if len(v.times) > 1 else 0.0
            row = dict(model=v.name, head=v.head, compiled=v.compiled, block=block,
                       tokens_per_s=batch * args.seq / t, ms_per_step=1e3 * t, spread=spread,
                       speedup=base_t / t, cpu_ms_per_step=1e3 * c, cpu_speedup=base_c / c,
                       loss=v.check_loss, train_loss=v.loss, times=v.times, cpu_times=v.cpu_times)
            if not args.no_memory:
                row["peak_bytes"], row["pruned_state_bytes"] = v.memory(pruned)
            rows.append(row)
            print(f"  [{row['model']} {row['head']}{' compiled' if row['compiled'] else ''}] "
                  f"{row['ms_per_step']:.0f} ms/step, {row['speedup']:.2f}x dense, spread {spread:.0%}; "
                  f"CPU time {row['cpu_ms_per_step']:.0f} ms, {row['cpu_speedup']:.2f}x; "
                  f"loss {row['loss']:.4f}", flush=True)
        groups.append(dict(block=block, warmup_s=warm_s))
        if args.profile and block == (32 if 32 in args.block else args.block[0]):
            path = os.path.join(args.out, "bench_bert_profile.txt") if args.out else None
            if path and os.path.exists(path):
                os.remove(path)
            for key in [("dense", "full", False), ("dense", "masked", False),
                        (f"block{block} 90%", "masked", False)]:
                v = next((v for v in variants if v.key == key), None)
                if v is not None:
                    _profile(v, path)
        if args.infer_batches:
            models = {"dense": base.model}            # dense as is; sparse after optimize if timed
            dense_opt = next((v for v in variants if v.key == ("dense", "masked", False)), None)
            if dense_opt is not None:
                models["dense + optimize"] = dense_opt.model     # the gain without sparsity
            for v in sorted(variants, key=lambda v: v.head != "masked"):
                if not v.compiled and v.name != "dense":
                    models.setdefault(v.name, v.model)
            lat, clat = _time_inference(models, cfg, args.infer_batches, args.seq, args.infer_rounds, device,
                                         cold=args.infer_cold)
            if args.infer_breakdown:
                bd = _breakdown(models, cfg, args.infer_batches, args.seq, args.infer_rounds, device)
                for name, d in bd.items():
                    for b, parts in d.items():
                        tot = parts["total"]
                        print(f"  [breakdown {name} batch {b}] {1e3 * tot:.1f} ms CPU: " + ", ".join(
                            f"{k} {1e3 * v:.1f} ({v / tot:.0%})" for k, v in
                            sorted(parts.items(), key=lambda kv: -kv[1]) if k != "total"), flush=True)
                        breakdowns.append(dict(model=name, block=block, batch=b, **{k: 1e3 * v for k, v in parts.items()}))
            for name, d in lat.items():
                print(f"  [inference {name}] " + ", ".join(
                    f"batch {b}: {1e3 * t:.1f} ms ({lat['dense'][b] / t:.2f}x; CPU time "
                    f"{1e3 * clat[name][b]:.1f} ms, {clat['dense'][b] / clat[name][b]:.2f}x)"
                    for b, t in d.items()), flush=True)
                for b, t in d.items():
                    infer.append(dict(model=name, block=block, batch=b, ms=1e3 * t, speedup=lat["dense"][b] / t,
                                      cpu_ms=1e3 * clat[name][b], cpu_speedup=clat["dense"][b] / clat[name][b]))
        del variants
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{'model':<16} {'head':<7} {'mode':<8} {'ms/step':>9} {'k tok/s':>8} {'× dense':>8} "
          f"{'spread':>7} {'CPU ms':>8} {'× (CPU)':>8} {'loss':>8} {'peak MB':>8} {'pruned-layer state MB':>22}")
    for r in rows:
        mem = (f"{r['peak_bytes'] / 2**20:>8.0f} {r['pruned_state_bytes'] / 2**20:>22.1f}"
               if "peak_bytes" in r else "")
        print(f"{r['model']:<16} {r['head']:<7} {'compile' if r['compiled'] else 'eager':<8} "
              f"{r['ms_per_step']:>9.1f} {r['tokens_per_s'] / 1e3:>8.2f} {r['speedup']:>7.2f}x "
              f"{r['spread']:>6.0%} {r['cpu_ms_per_step']:>8.1f} {r['cpu_speedup']:>7.2f}x {r['loss']:>8.4f} {mem}")
    if infer:
        bs = sorted({r["batch"] for r in infer})
        print("\nencoder inference (model.bert, no head), ms (x dense of the same group)")
        print(f"{'model':<16} " + " ".join(f"{'batch ' + str(b):>18}" for b in bs))
        for block in args.block:
            for name in dict.fromkeys(r["model"] for r in infer if r["block"] == block):
                d = {r["batch"]: r for r in infer if r["block"] == block and r["model"] == name}
                print(f"{name:<16} " + " ".join(f"{d[b]['ms']:>10.1f} ({d[b]['speedup']:4.2f}x)" for b in bs))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = dict(device=dev_name, torch=torch.__version__, threads=torch.get_num_threads(), dtype=str(dtype), batch=batch, seq=args.seq,
                    tiny=args.tiny, config=what, steps=args.steps, warmup=args.warmup, groups=groups)
        with open(os.path.join(args.out, "bench_bert.json"), "w") as f:
            json.dump(dict(meta, rows=rows, inference=infer, inference_breakdown_ms=breakdowns,
                           full_layout_dense=args.full_layout_dense, infer_cold=args.infer_cold,
                           infer_rounds=args.infer_rounds), f, indent=1)
        try:
            _plot(rows, infer, os.path.join(args.out, "bench_bert.png"),
                  f"{what} MLM, {dev_name}, {dtype}, batch {batch} x {args.seq}", cpu_time=device.type == "cpu")
        except Exception as e:  # noqa: BLE001  (no matplotlib: the JSON is the result)
            print(f"(no plot: {type(e).__name__}: {e})")
    return rows


if __name__ == "__main__":
    main()
