"""``sparsebert study | pretrain | finetune``: registered on the main CLI by :func:`add_subcommands`.

Also runnable alone: ``python -m sparsebert.study.cli study --preset cpu-demo``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path


def _levels(s: str):
    v = float(s)
    return v / 100.0 if v > 1.0 else v


def _common(s):
    s.add_argument("--cache-dir", default=None, help="data/model cache (default ~/.cache/sparsebert or $SPARSEBERT_CACHE)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: cores not busy with other work, at least 1)")


def _cmd_study(args) -> int:
    from .pretrain import configure_threads
    threads = configure_threads(args.threads)
    from .data import TASKS, DataUnavailable
    from .runner import PRESETS, Study

    p = PRESETS[args.preset]
    kw = {}
    if args.levels:
        kw["levels"] = tuple(sorted(set([0.0] + [_levels(x) for x in args.levels])))
    if args.modes:
        kw["modes"] = tuple(args.modes)
    if args.tasks:
        bad = [t for t in args.tasks if t not in TASKS]
        if bad:
            print(f"error: unknown task(s) {bad}; choose from {sorted(TASKS)}", file=sys.stderr)
            return 2
        kw["tasks"] = tuple(args.tasks)
    if args.controls is not None:
        kw["controls"] = tuple(c for c in args.controls if c != "none")
    if args.lrs:
        kw["lrs"] = tuple(args.lrs)
    if args.from_scratch:
        kw["model"] = "scratch"
    p = replace(p, **kw)
    out = Path(args.out or f"study_runs/{p.name}")
    print(f"torch CPU threads: {threads}")
    try:
        Study(p, out, args.cache_dir, device=args.device, progress=not args.no_progress).run()
    except DataUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


def _cmd_pretrain(args) -> int:
    from .pretrain import configure_threads
    configure_threads(args.threads)
    import torch

    from .data import DataCache, DataUnavailable, load_mlm_text, mlm_blocks
    from .pretrain import PretrainConfig, load_minilm_mlm, load_tokenizer, pick_device, pretrain, scratch_mlm, special_ids

    cache = DataCache(args.cache_dir)
    try:
        train_docs, dev_docs = load_mlm_text(cache, extra_text=args.extra_text)
        # --from-scratch: MiniLM's tokenizer if its archive is already here, else a word vocabulary
        mdir = cache.minilm_dir() if (not args.from_scratch or cache.has("minilm")) else None
        tok = load_tokenizer(mdir, texts=train_docs, vocab_dir=cache.root / "scratch-vocab")
    except DataUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    model = scratch_mlm(len(tok)) if args.from_scratch else load_minilm_mlm(mdir)
    mode = "dense" if args.sparsity == 0 else args.mode
    cfg = PretrainConfig(mode=mode, sparsity=args.sparsity, score=args.score, block=args.block, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, ramp_fraction=args.ramp_fraction,
                         prune_every=args.prune_every, backend=args.backend)
    train = mlm_blocks(train_docs, tok, args.seq_len, args.max_blocks, seed=0)
    dev = mlm_blocks(dev_docs, tok, args.seq_len, 128, seed=0)
    res = pretrain(model, cfg, train, dev, special_ids(tok), pick_device(args.device), progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.bert.cpu(), out / "encoder.pt")
    tok.save_pretrained(str(out / "tokenizer"))
    (out / "pretrain.json").write_text(json.dumps({"config": asdict(cfg), "result": res}, indent=1))
    print(f"dev MLM loss {res['dev_mlm_loss']:.3f}; sparsity {res['sparsity']:.3f}; "
          f"{res['seconds_per_step']:.3f} s/step; saved encoder to {out / 'encoder.pt'}")
    return 0


def _cmd_finetune(args) -> int:
    from .pretrain import configure_threads
    configure_threads(args.threads)
    import torch

    from .data import DataCache, DataUnavailable, load_task
    from .finetune import FinetuneConfig, finetune
    from .pretrain import load_tokenizer, pick_device

    ckpt = Path(args.checkpoint)
    if not (ckpt / "encoder.pt").exists():
        print(f"error: {ckpt / 'encoder.pt'} not found (write one with `sparsebert pretrain --out DIR`)", file=sys.stderr)
        return 2
    try:
        data = load_task(args.task, DataCache(args.cache_dir)).subset(args.max_train, args.max_dev)
    except DataUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    tok = load_tokenizer(ckpt / "tokenizer")
    enc = torch.load(ckpt / "encoder.pt", weights_only=False)
    control = {"none": "none", "deletion": "deletion", "finetune-prune": "prune"}[args.control]
    cfg = FinetuneConfig(task=args.task, lr=args.lr, epochs=args.epochs, max_steps=args.max_steps,
                         batch_size=args.batch_size, max_len=args.max_len, control=control,
                         prune_mode=args.mode, prune_sparsity=args.sparsity if control == "prune" else 0.0)
    res = finetune(enc, cfg, data, tok, pick_device(args.device), progress=not args.no_progress)
    res.pop("model", None)
    print(json.dumps(res, indent=1))
    return 0


def add_subcommands(subparsers) -> None:
    """Register ``study``, ``pretrain`` and ``finetune`` on an argparse subparsers object."""
    from .data import TASKS
    from .runner import CONTROLS, PRESETS

    s = subparsers.add_parser("study", help="the paper's experiment at small scale: prune in pre-training, "
                                            "fine-tune, report (cached, resumable)")
    s.add_argument("--preset", choices=sorted(PRESETS), default="cpu-demo")
    s.add_argument("--out", default=None, help="output folder (default study_runs/<preset>)")
    s.add_argument("--levels", nargs="+", default=None, help="sparsity levels, as fractions or percent (0 is always run)")
    s.add_argument("--modes", nargs="+", choices=["unstructured", "block"], default=None)
    s.add_argument("--tasks", nargs="+", default=None, help=f"from {sorted(TASKS)}")
    s.add_argument("--controls", nargs="*", choices=list(CONTROLS) + ["none"], default=None)
    s.add_argument("--lrs", nargs="+", type=float, default=None, help="fine-tuning learning-rate grid")
    s.add_argument("--from-scratch", action="store_true", help="small random BERT instead of MiniLM")
    _common(s)
    s.set_defaults(func=_cmd_study)

    s = subparsers.add_parser("pretrain", help="one continued MLM pre-training run with gradual pruning")
    s.add_argument("--mode", choices=["unstructured", "block"], default="unstructured")
    s.add_argument("--sparsity", type=_levels, default=0.0)
    s.add_argument("--score", choices=["magnitude", "random"], default="magnitude")
    s.add_argument("--block", type=int, default=32)
    s.add_argument("--steps", type=int, default=200)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--ramp-fraction", type=float, default=0.1)
    s.add_argument("--prune-every", type=int, default=10)
    s.add_argument("--max-blocks", type=int, default=None, help="cap on MLM training blocks")
    s.add_argument("--extra-text", action="store_true", help="add Debian documentation to the MLM text")
    s.add_argument("--from-scratch", action="store_true")
    s.add_argument("--backend", default="auto")
    s.add_argument("--out", required=True)
    _common(s)
    s.set_defaults(func=_cmd_pretrain)

    s = subparsers.add_parser("finetune", help="fine-tune a `sparsebert pretrain` output on one task, mask fixed")
    s.add_argument("--checkpoint", required=True, help="folder written by `sparsebert pretrain --out`")
    s.add_argument("--task", choices=sorted(TASKS), required=True)
    s.add_argument("--lr", type=float, default=5e-5)
    s.add_argument("--epochs", type=float, default=3.0)
    s.add_argument("--max-steps", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--max-len", type=int, default=128)
    s.add_argument("--max-train", type=int, default=None)
    s.add_argument("--max-dev", type=int, default=None)
    s.add_argument("--control", choices=["none", "deletion", "finetune-prune"], default="none")
    s.add_argument("--mode", choices=["unstructured", "block"], default="unstructured", help="for --control finetune-prune")
    s.add_argument("--sparsity", type=_levels, default=0.5, help="for --control finetune-prune")
    _common(s)
    s.set_defaults(func=_cmd_finetune)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparsebert-study")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
