"""``sparsebert study | pretrain | finetune``: registered on the main CLI by :func:`add_subcommands`.

Also runnable alone: ``python -m sparsebert.study.cli study --preset cpu-demo``. Values follow the
main command's conventions (``sparsebert --help``): a sparsity is a fraction in [0, 1) or a percent
in (1, 100); a bad value or file is one line and exit status 2; unavailable data is status 3.

``pretrain --out DIR`` writes ``DIR/encoder`` (a sparse checkpoint: safetensors, SHA-256 manifest),
``DIR/tokenizer`` and ``DIR/pretrain.json``; ``finetune --checkpoint DIR`` reads them. Nothing is
ever unpickled: an ``encoder.pt`` written by an older sparsebert is refused, not loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from ..cli import (SPARSITY_HELP, UsageError, block_size, check_out_dir, device, positive_float, positive_int,
                   require_device, run, sparsity, unit_fraction)

ENCODER = "encoder"                 # the sparse checkpoint folder inside a pretrain --out
LEGACY_ENCODER = "encoder.pt"       # what older versions pickled there


def _levels(s: str) -> float:
    """A sparsity level (kept for callers of the old name): see :func:`sparsebert.cli.sparsity`."""
    return sparsity(s)


def _level_arg(text: str) -> float:
    try:
        return sparsity(text)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"argument --levels: {e}") from None


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is out of range: a seed is 0 or more")
    return v


def _seq_len(text: str) -> int:
    v = positive_int(text)
    if v < 3:       # [CLS] and [SEP] take two of the tokens: at least one token of text
        raise argparse.ArgumentTypeError(f"{v} is out of range: at least 3 ([CLS], a token of text, [SEP])")
    return v


def _threads(text: str) -> int:
    v = positive_int(text)
    cap = max(16, 4 * (os.cpu_count() or 1))    # far past useful; huge counts crash torch's thread pool
    if v > cap:
        raise argparse.ArgumentTypeError(f"{v} is out of range: at most {cap} (4 per core, at least 16)")
    return v


def _distinct(name: str, values) -> tuple:
    """``values`` in the order given; a repeated value is a usage error (it would be one run twice)."""
    seen = []
    for v in values:
        if v in seen:
            raise UsageError(f"argument {name}: {v} given twice")
        seen.append(v)
    return tuple(seen)


def _backend(text: str) -> str:
    from ..ops.backends import NAMES
    if text != "auto" and text not in NAMES:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}: choose auto or one of {', '.join(NAMES)}")
    return text


def _require_backend(name: str, dev) -> None:
    if name == "auto":
        return
    from ..ops import backends
    reason = backends.unavailable_reason(name, dev)
    if reason is not None:
        raise UsageError(f"--backend {name} cannot run on {dev}: {reason}")


def _common(s):
    s.add_argument("--cache-dir", default=None, help="data/model cache (default ~/.cache/sparsebert or $SPARSEBERT_CACHE)")
    s.add_argument("--device", type=device, default="auto",
                   help="where to run: auto (a CUDA GPU if there is one, else the CPU), cpu, cuda or cuda:N "
                        "(default auto)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars (default off: bars shown)")
    s.add_argument("--threads", type=_threads, default=None,
                   help="CPU threads, at least 1 and at most 4 per core (or 16) (default: cores not busy with other "
                        "work, at least 1)")


def _cmd_study(args) -> int:
    # counted from the command's start: data fetch and head fit included
    deadline = None if args.time_limit is None else time.time() + args.time_limit
    require_device(args.device)
    from .training import configure_threads, keep_freed_memory
    from .data import TASKS, DataUnavailable
    from .runner import PRESETS, Study

    p = PRESETS[args.preset]
    kw = {}
    if args.levels:
        kw["levels"] = tuple(sorted(set([0.0] + [_level_arg(x) for x in args.levels])))
    if args.modes:
        kw["modes"] = _distinct("--modes", args.modes)
    if args.tasks:
        bad = [t for t in args.tasks if t not in TASKS]
        if bad:
            raise UsageError(f"argument --tasks: unknown task(s) {', '.join(bad)}: choose from {', '.join(sorted(TASKS))}")
        kw["tasks"] = _distinct("--tasks", args.tasks)
    if args.controls is not None:
        kw["controls"] = tuple(c for c in args.controls if c != "none")
    if args.lrs:
        kw["lrs"] = _distinct("--lrs", args.lrs)
    if args.from_scratch:
        kw["model"] = "scratch"
    if args.seeds:
        kw["seeds"] = _distinct("--seeds", args.seeds)
    if args.blocks:
        modes = kw.get("modes", p.modes)
        if "block" not in modes:
            raise UsageError(f"argument --blocks: block sizes apply to mode block, and the modes are "
                             f"{' '.join(modes)} (add --modes block ...)")
        kw["blocks"] = _distinct("--blocks", args.blocks)
    if args.workers is not None:
        kw["workers"] = args.workers
    p = replace(p, **kw)
    out = Path(check_out_dir(args.out or f"study_runs/{p.name}"))
    # as prune and pretrain: a folder of other files is refused (the report would replace its
    # results.*), but one holding a study's run cache is that study, resumed
    if out.is_dir() and any(out.iterdir()) and not (out / "runs").is_dir() and not (out / "results.json").is_file() \
            and not args.force:
        raise UsageError(f"--out {out} already holds files and no study (no runs/): pass --force to write the "
                         "study there (its results.* files are replaced)")
    from .. import distributed as D
    if D.launched():
        if args.workers is not None and args.workers > 1:
            raise UsageError(f"--workers {args.workers} under torchrun: the ranks already share the encoder jobs "
                             "(one rank, one process); leave --workers out")
        return run_study_ranks(replace(p, workers=1), out, args.cache_dir, args.device, args.threads,
                               progress=not args.no_progress, deadline=deadline)
    threads = configure_threads(args.threads)
    keep_freed_memory()
    print(f"torch CPU threads: {threads}")
    try:
        Study(p, out, args.cache_dir, device=args.device, progress=not args.no_progress, deadline=deadline).run()
    except DataUnavailable as e:
        print(f"sparsebert: error: {e}", file=sys.stderr)
        return 3
    return 0


def run_study_ranks(preset, out, cache_dir=None, device: str = "auto", threads=None, progress: bool = True,
                    timeout_h: float = 72.0, deadline=None) -> int:
    """``sparsebert study`` under torchrun: every rank is one process of the study's job pool
    (:meth:`Study.run_ranks`: rank r runs encoder jobs r, r + N, ...; rank 0 then reports).

    Each job runs alone on its rank (no DDP: the study's runs are many and small, so running them
    side by side uses N processes better than splitting each one's batches). Ranks meet only at
    two points, through a gloo process group of their own (:mod:`sparsebert.distributed` is not
    set up, so ``pretrain``/``finetune`` inside see one process); each point also tells every rank
    whether another failed, so a failure stops all of them instead of leaving them waiting."""
    import datetime

    import torch
    import torch.distributed as dist

    from .data import DataUnavailable
    from .training import configure_threads, keep_freed_memory
    from .runner import Study

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = device
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        dev = f"cuda:{local % max(1, torch.cuda.device_count())}"
    configure_threads(_local_threads(threads))
    keep_freed_memory()
    # a rank may wait at the second meeting for as long as the slowest rank's jobs take
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(hours=timeout_h))
    failed = {}

    def sync(ok: bool) -> bool:
        flag = torch.tensor([0 if ok else 1])
        dist.all_reduce(flag)
        return int(flag) == 0

    log = print if rank == 0 else (lambda m: None)
    try:
        st = Study(preset, out, cache_dir, device=dev, progress=progress and rank == 0, log=log, deadline=deadline)
        st.run_ranks(rank, world, sync, failed)
    except DataUnavailable as e:
        print(f"sparsebert: error: {e}", file=sys.stderr)
        return 3
    finally:
        dist.destroy_process_group()
    if failed.get("other"):
        print(f"sparsebert: error: rank {rank}: another rank failed {failed['other']} (see its message)",
              file=sys.stderr)
        return 1
    return 0


def _local_threads(threads):
    """Under torchrun, default threads are shared among the ranks on this machine."""
    if threads is None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        n, local = os.cpu_count() or 1, int(os.environ["LOCAL_WORLD_SIZE"])
        return max(1, n // local)
    return threads


def _set_dropout(model, p: float) -> None:
    from torch import nn
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = p
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def _cmd_pretrain(args) -> int:
    # counted from the command's start, as study's: data loading included
    args.deadline = None if args.time_limit is None else time.time() + args.time_limit
    require_device(args.device)
    out = Path(check_out_dir(args.out))
    from .pretrain import RESUME_DIR, has_train_state, train_state_run
    written = [n for n in (ENCODER, LEGACY_ENCODER, "pretrain.json") if (out / n).exists()]
    if args.resume:
        if not has_train_state(out):
            raise UsageError(f"--resume: {out / RESUME_DIR} holds no training state (written with --save-every)")
        _check_resume(out, train_state_run(out), _run_settings(args), written)
    elif written and not args.force:
        raise UsageError(f"--out {out} already holds a pretrain run ({', '.join(written)}): pass --force to "
                         "replace it")
    elif has_train_state(out) and not args.force:
        raise UsageError(f"--out {out} holds an unfinished pretrain run ({RESUME_DIR}/): pass --resume to continue "
                         "it or --force to start over")
    from .training import configure_threads, keep_freed_memory
    from .. import distributed as D
    configure_threads(_local_threads(args.threads))
    keep_freed_memory()
    ctx = D.setup(args.device)
    dev = ctx.device
    _require_backend(args.backend, dev)
    try:
        return _pretrain_run(args, out, dev, ctx)
    finally:
        D.teardown()


# Settings that make a pretrain run what it is: a resume must give the same (a different one would
# continue another run, or record one that never happened). Batch size and backend may change
# (resuming on another number of ranks), as may --save-every.
_RUN_FLAGS = ("mode", "sparsity", "score", "block", "steps", "lr", "ramp_fraction", "prune_every", "seq_len",
              "max_blocks", "extra_text", "from_scratch", "dropout")


def _run_settings(args) -> dict:
    d = {k: getattr(args, k) for k in _RUN_FLAGS}
    d["mode"] = "dense" if args.sparsity == 0 else args.mode
    if d["mode"] != "block":
        d.pop("block")                  # unused: any value continues the run
    return d


def _check_resume(out, saved, now: dict, written) -> None:
    if saved is None:
        # written by an older sparsebert, which recorded no settings: resumable only where no finished
        # run sits beside it (the state could be one that --force replaced)
        if written:
            raise UsageError(f"--resume: {out / 'resume'} records no settings (an older sparsebert wrote it) and "
                             f"--out also holds a finished run ({', '.join(written)}): it may not be that run's; "
                             "pass --force instead of --resume to start over")
        return
    diff = [f"--{k.replace('_', '-')} {_flag_text(now.get(k))} (saved run: {_flag_text(saved.get(k))})"
            for k in sorted(set(now) & set(saved)) if now[k] != saved[k]]   # block: only where both are block
    if diff:
        raise UsageError(f"--resume: the saved run in {out / 'resume'} has other settings: {'; '.join(diff)}; "
                         "give the saved run's values, or --force to start a new run")


def _flag_text(v) -> str:
    return "unset" if v is None else "on" if v is True else "off" if v is False else str(v)


def _pretrain_run(args, out, dev, ctx) -> int:
    from .. import distributed as D
    from .data import DataCache, DataUnavailable, load_mlm_text, mlm_blocks
    from .pretrain import (PretrainConfig, clear_train_state, load_minilm_mlm, load_tokenizer, pretrain, save_encoder,
                           scratch_mlm, special_ids)

    if args.force and not args.resume:
        if ctx.main:        # the replaced run's resume state: a later --resume would continue it
            clear_train_state(out)
        D.barrier()
    cache = DataCache(args.cache_dir)
    failed = None
    for turn in range(D.DATA_TURNS):    # rank 0 first (it may build the scratch vocabulary), then each node's first
        if turn == D.data_turn(ctx):
            try:
                train_docs, dev_docs = load_mlm_text(cache, extra_text=args.extra_text)
                # --from-scratch: MiniLM's tokenizer if its archive is already here, else a word vocabulary
                mdir = cache.minilm_dir() if (not args.from_scratch or cache.has("minilm")) else None
                tok = load_tokenizer(mdir, texts=train_docs, vocab_dir=cache.root / "scratch-vocab")
            except DataUnavailable as e:
                failed = e
        D.barrier()
    if failed is not None:
        print(f"sparsebert: error: {failed}", file=sys.stderr)
        return 3
    model = scratch_mlm(len(tok)) if args.from_scratch else load_minilm_mlm(mdir)
    if args.dropout is not None:
        _set_dropout(model, args.dropout)
    mode = "dense" if args.sparsity == 0 else args.mode
    cfg = PretrainConfig(mode=mode, sparsity=args.sparsity, score=args.score, block=args.block, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, ramp_fraction=args.ramp_fraction,
                         prune_every=args.prune_every, backend=args.backend)
    train = mlm_blocks(train_docs, tok, args.seq_len, args.max_blocks, seed=0)
    dev_blocks = mlm_blocks(dev_docs, tok, args.seq_len, 128, seed=0)
    if args.batch_size * ctx.world > len(train):
        raise UsageError(f"--batch-size {args.batch_size} x {ctx.world} ranks = a global batch of "
                         f"{args.batch_size * ctx.world}, more than the {len(train)} training blocks")
    res = pretrain(model, cfg, train, dev_blocks, special_ids(tok), dev, progress=not args.no_progress,
                   save_dir=out if (args.save_every or args.resume or args.deadline) else None,
                   save_every=args.save_every or 0, resume=args.resume, run_info=_run_settings(args),
                   deadline=args.deadline)
    if res.get("stopped_at") is not None:
        if ctx.main:        # no encoder: the run is not finished (an older one in --out stays as it was)
            print(f"time limit reached: stopped after step {res['stopped_at']} of {res['steps']}; training state "
                  f"saved to {out / 'resume'}: the same command with --resume continues")
        D.barrier()
        return 0
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        save_encoder(model.bert.cpu(), out / ENCODER)
        tok.save_pretrained(str(out / "tokenizer"))
        tmp = out / "pretrain.json.tmp"
        tmp.write_text(json.dumps({"config": asdict(cfg), "result": res}, indent=1))
        os.replace(tmp, out / "pretrain.json")
        print(f"dev MLM loss {res['dev_mlm_loss']:.3f}; sparsity {res['sparsity']:.3f}; "
              f"{res['seconds_per_step']:.3f} s/step; saved encoder to {out / ENCODER}"
              + (f" ({ctx.world} ranks, global batch {res['global_batch_size']})" if ctx.enabled else ""))
    D.barrier()
    return 0


def _cmd_finetune(args) -> int:
    require_device(args.device)
    ckpt = Path(args.checkpoint)
    enc_dir = ckpt / ENCODER
    if not enc_dir.is_dir():
        if (ckpt / LEGACY_ENCODER).exists():
            raise UsageError(f"{ckpt / LEGACY_ENCODER} is a pickle written by an older sparsebert and is not loaded "
                             "(unpickling a file can run any code in it): run `sparsebert pretrain` again to write "
                             f"{enc_dir}, or, for a file you trust, convert it once with sparsebert.study.pretrain."
                             f"save_encoder(torch.load(path, weights_only=False), '{enc_dir}')")
        raise UsageError(f"{enc_dir} not found (write one with `sparsebert pretrain --out DIR`)")
    if not (ckpt / "tokenizer").is_dir():
        raise UsageError(f"{ckpt / 'tokenizer'} not found (written by `sparsebert pretrain --out DIR`)")
    from .training import configure_threads, keep_freed_memory
    from .. import distributed as D
    configure_threads(_local_threads(args.threads))
    keep_freed_memory()
    ctx = D.setup(args.device)
    try:
        return _finetune_run(args, ckpt, enc_dir, ctx)
    finally:
        D.teardown()


def _checkpoint_tokenizer(tok_dir: Path, load_tokenizer):
    """The tokenizer pretrain saved in ``tok_dir``; a missing or unreadable one is a one-line
    error naming the folder or the file (not the loader's internals)."""
    names = ("vocab.txt", "tokenizer.json", "tokenizer_config.json")
    if not any((tok_dir / f).is_file() for f in names):
        raise UsageError(f"{tok_dir} holds no tokenizer (none of {', '.join(names)}): write it again with "
                         "`sparsebert pretrain --out DIR`")
    for f in sorted(tok_dir.glob("*.json")):
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"{f} is not valid JSON ({e}): the tokenizer cannot be read") from None
    return load_tokenizer(tok_dir)


def _finetune_run(args, ckpt, enc_dir, ctx) -> int:
    from .data import DataCache, DataUnavailable, load_task
    from .finetune import FinetuneConfig, finetune, load_encoder
    from .pretrain import load_tokenizer

    enc = load_encoder(enc_dir)                 # verified safetensors checkpoint; CheckpointError if not
    tok = _checkpoint_tokenizer(ckpt / "tokenizer", load_tokenizer)
    control = {"none": "none", "deletion": "deletion", "finetune-prune": "prune"}[args.control]
    if control == "prune" and args.sparsity == 0:
        raise UsageError("--control finetune-prune needs --sparsity above 0")
    if control == "prune":
        from ..hf import _SPARSE_LAYERS
        if any(isinstance(m, _SPARSE_LAYERS) for m in enc.modules()):
            raise UsageError(f"--control finetune-prune prunes a dense encoder while fine-tuning, and {enc_dir} is "
                             "sparse: give the checkpoint of a dense run (sparsebert pretrain --sparsity 0)")
    cfg = FinetuneConfig(task=args.task, lr=args.lr, epochs=args.epochs, max_steps=args.max_steps,
                         batch_size=args.batch_size, max_len=args.max_len, control=control,
                         prune_mode=args.mode, prune_sparsity=args.sparsity if control == "prune" else 0.0,
                         pooling=args.pooling,
                         **({} if args.dropout is None else {"dropout": args.dropout}))
    if args.dropout is not None:
        _set_dropout(enc, args.dropout)
    from .. import distributed as D
    failed = None
    for turn in range(D.DATA_TURNS):    # rank 0 first (it may unpack the archives), then each node's first
        if turn == D.data_turn(ctx):
            try:
                data = load_task(args.task, DataCache(args.cache_dir)).subset(args.max_train, args.max_dev)
            except DataUnavailable as e:
                failed = e
        D.barrier()
    if failed is not None:
        print(f"sparsebert: error: {failed}", file=sys.stderr)
        return 3
    res = finetune(enc, cfg, data, tok, ctx.device, progress=not args.no_progress)
    res.pop("model", None)
    if ctx.main:
        print(json.dumps(res, indent=1))
    return 0


def add_subcommands(subparsers) -> None:
    """Register ``study``, ``pretrain`` and ``finetune`` on an argparse subparsers object."""
    from .data import TASKS
    from .runner import CONTROLS, PRESETS

    s = subparsers.add_parser("study", help="the paper's experiment at small scale: prune in pre-training, "
                                            "fine-tune, report (cached, resumable)")
    s.add_argument("--preset", choices=sorted(PRESETS), default="cpu-demo",
                   help="the study's scale: cpu-demo (minutes on a CPU) or gpu (one GPU, sized for about 6 minutes on an H200; not yet measured) (default cpu-demo)")
    s.add_argument("--out", default=None, help="output folder: run cache and report (default study_runs/<preset>)")
    s.add_argument("--levels", nargs="+", default=None,   # checked by _cmd_study (kept as given here)
                   help=f"sparsity levels, each {SPARSITY_HELP}; 0 is always run (default: the preset's)")
    s.add_argument("--modes", nargs="+", choices=["unstructured", "block"], default=None,
                   help="pruning modes: unstructured (single weights) and/or block (default: the preset's)")
    s.add_argument("--tasks", nargs="+", default=None,
                   help=f"fine-tuning tasks, from {', '.join(sorted(TASKS))} (default: the preset's)")
    s.add_argument("--controls", nargs="*", choices=list(CONTROLS) + ["none"], default=None,
                   help="control runs: scratch (no pre-training), random (random masks), deletion (pruned "
                        "weights free to regrow), finetune-prune (prune while fine-tuning); none or nothing: "
                        "no controls (default: the preset's)")
    s.add_argument("--lrs", nargs="+", type=positive_float, default=None,
                   help="fine-tuning learning rates to try, each above 0 (default: the preset's)")
    s.add_argument("--seeds", nargs="+", type=_seed, default=None,
                   help="seeds, each a whole number 0 or more: each seed is its own pre-training and fine-tuning "
                        "of every level (default: the preset's, cpu-demo 0 1, gpu 0 1 2)")
    s.add_argument("--blocks", nargs="+", type=block_size, default=None,
                   help="block sizes of mode block, each a multiple of 16 from 16 to 256, in weights per side "
                        "(default: the preset's, cpu-demo 16, gpu 16 32)")
    s.add_argument("--workers", type=positive_int, default=None,
                   help="processes that run the encoders (pre-training, probe, fine-tuning) side by side, at "
                        "least 1; CPU threads are split between them (default: the preset's, cpu-demo 2, gpu 8)")
    s.add_argument("--time-limit", type=positive_float, default=None, metavar="SECONDS",
                   help="start no encoder after this many seconds (those running finish): the report covers "
                        "the encoders whose runs all completed and names the rest; the same command again "
                        "resumes from the cache (default: no limit)")
    s.add_argument("--from-scratch", action="store_true",
                   help="a small random BERT instead of MiniLM (default off: MiniLM)")
    s.add_argument("--force", action="store_true",
                   help="write into an --out that holds other files than a study's (default off: refuse; a "
                        "study's own folder is resumed either way)")
    _common(s)
    s.set_defaults(func=_cmd_study)

    s = subparsers.add_parser("pretrain", help="one continued MLM pre-training run with gradual pruning")
    s.add_argument("--mode", choices=["unstructured", "block"], default="unstructured",
                   help="unstructured: single weights masked (the paper's setting); block: --block x --block "
                        "blocks removed, BlockSparseLinear (default unstructured)")
    s.add_argument("--sparsity", type=sparsity, default=0.0,
                   help=f"target sparsity at the end of the ramp: {SPARSITY_HELP} (default 0: dense)")
    s.add_argument("--score", choices=["magnitude", "random"], default="magnitude",
                   help="which weights or blocks go: magnitude (the smallest) or random (a control) "
                        "(default magnitude)")
    s.add_argument("--block", type=block_size, default=32,
                   help="block side in weights for --mode block: a multiple of 16 from 16 to 256 (default 32)")
    s.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (default 200)")
    s.add_argument("--batch-size", type=positive_int, default=16,
                   help="sequences per step on each rank: under torchrun the global batch is this times the "
                        "world size (default 16)")
    s.add_argument("--seq-len", type=_seq_len, default=128,
                   help="tokens per MLM training sequence, at least 3 (default 128)")
    s.add_argument("--lr", type=positive_float, default=1e-4, help="peak learning rate, above 0 (default 1e-4)")
    s.add_argument("--ramp-fraction", type=unit_fraction, default=0.1,
                   help="fraction of --steps, in [0, 1], over which the sparsity ramps from 0 to --sparsity "
                        "(cubic schedule) (default 0.1)")
    s.add_argument("--prune-every", type=positive_int, default=10,
                   help="steps between mask updates during the ramp (default 10)")
    s.add_argument("--max-blocks", type=positive_int, default=None,
                   help="at most this many MLM training sequences of --seq-len tokens (default: all the text)")
    s.add_argument("--extra-text", action="store_true",
                   help="add Debian documentation to the MLM text (default off)")
    s.add_argument("--time-limit", type=positive_float, default=None, metavar="SECONDS",
                   help="start no optimizer step after this many seconds (from the command's start): the "
                        "training state is saved to --out/resume and no encoder is written; the same command "
                        "with --resume continues (default: no limit)")
    s.add_argument("--from-scratch", action="store_true",
                   help="start from a small random BERT instead of MiniLM (MiniLM's tokenizer if cached, else "
                        "a word vocabulary) (default off)")
    s.add_argument("--backend", type=_backend, default="auto",
                   help="sparse kernel backend: auto or a name that sparsebert info lists (default auto: the "
                        "best one available here)")
    s.add_argument("--out", required=True, help="required: folder for encoder/, tokenizer/ and pretrain.json")
    s.add_argument("--force", action="store_true",
                   help="replace a pretrain run already in --out, its resume state included (default off: refuse)")
    s.add_argument("--dropout", type=unit_fraction, default=None,
                   help="dropout probability in [0, 1] (default: the model's; 0 makes runs on different "
                        "numbers of ranks comparable)")
    s.add_argument("--save-every", type=positive_int, default=None,
                   help="write the full training state to --out/resume every this many steps and at the end "
                        "(default: not written)")
    s.add_argument("--resume", action="store_true",
                   help="continue from --out/resume (any number of ranks; same global batch for the same result); "
                        "the other settings must be the saved run's (default off: a new run)")
    _common(s)
    s.set_defaults(func=_cmd_pretrain)

    s = subparsers.add_parser("finetune", help="fine-tune the output of sparsebert pretrain on one task, the mask fixed")
    s.add_argument("--checkpoint", required=True, help="required: a folder written by sparsebert pretrain --out")
    s.add_argument("--task", choices=sorted(TASKS), required=True, help="required: the task to fine-tune on")
    s.add_argument("--lr", type=positive_float, default=5e-5, help="peak learning rate, above 0 (default 5e-5)")
    s.add_argument("--epochs", type=positive_float, default=3.0,
                   help="passes over the training examples, above 0 (default 3)")
    s.add_argument("--max-steps", type=positive_int, default=None,
                   help="at most this many optimizer steps (default: as many as --epochs take)")
    s.add_argument("--batch-size", type=positive_int, default=32,
                   help="examples per step on each rank: under torchrun the global batch is this times the "
                        "world size (default 32)")
    s.add_argument("--max-len", type=positive_int, default=128,
                   help="tokens per example; longer ones are truncated (default 128)")
    s.add_argument("--max-train", type=positive_int, default=None,
                   help="at most this many training examples (default: all)")
    s.add_argument("--max-dev", type=positive_int, default=None, help="at most this many dev examples (default: all)")
    s.add_argument("--control", choices=["none", "deletion", "finetune-prune"], default="none",
                   help="none: the mask held fixed; deletion: pruned weights start at zero but may regrow; "
                        "finetune-prune: start dense and prune while fine-tuning (default none)")
    s.add_argument("--mode", choices=["unstructured", "block"], default="unstructured",
                   help="for --control finetune-prune: unstructured or block (default unstructured)")
    s.add_argument("--sparsity", type=sparsity, default=0.5,
                   help=f"for --control finetune-prune: the target sparsity, {SPARSITY_HELP} (default 0.5)")
    s.add_argument("--dropout", type=unit_fraction, default=None,
                   help="dropout probability in [0, 1] for the encoder and the head (default: the encoder's, 0.1)")
    s.add_argument("--pooling", choices=["cls", "mean"], default="cls",
                   help="what the classifier reads: cls (BERT's pooler over [CLS]) or mean (the hidden states "
                        "averaged over real tokens, as the study's presets for MiniLM) (default cls)")
    _common(s)
    s.set_defaults(func=_cmd_finetune)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparsebert-study")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
