"""The sparsebert command (also: python -m sparsebert).

Conventions shared by every subcommand:
  sparsity   a fraction in [0, 1) (0.5) or a percent in (1, 100) (50, or 50%); a bare 1 is
             ambiguous and refused (write 0.01 or 1%); 100% is never allowed
  block      a block side in 16..256, a multiple of 16 (what the CPU kernels run; the GPU
             kernels take 16-128 (Triton) or 32/64 (CUDA)); it must divide every pruned weight
  errors     a wrong value or a file problem is one line, "sparsebert: error: ...", exit
             status 2 (3: study data unavailable); SPARSEBERT_TRACEBACK=1 shows the traceback
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

MAX_BLOCK = 256
SPARSITY_RULE = "a fraction in [0, 1) or a percent in (1, 100), e.g. 0.5, 50 or 50%"
SPARSITY_HELP = SPARSITY_RULE.replace("%", "%%")      # argparse help strings are %-formatted


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2."""


# ---- argument types (argparse ``type=``): a bad value is one line naming it and the range ------
def sparsity(text: str) -> float:
    """A sparsity: a fraction in [0, 1), or a percent in (1, 100) (``"50"`` or ``"50%"``)."""
    s = str(text).strip()
    percent = s.endswith("%")
    try:
        v = float(s[:-1] if percent else s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a sparsity: give {SPARSITY_RULE}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"sparsity {text} is out of range: give {SPARSITY_RULE}")
    if not percent and v == 1:
        raise argparse.ArgumentTypeError("sparsity 1 is ambiguous: write 0.01 or 1% for one percent "
                                         "(100% is not allowed)")
    if percent or v > 1:
        if v >= 100:
            raise argparse.ArgumentTypeError(f"sparsity {text} is out of range: a percent must be below 100")
        return v / 100.0
    return v


def _number(text, kind, what):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
    v = _number(text, int, "a whole number")
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is out of range: must be at least 1")
    return v


def positive_float(text: str) -> float:
    v = _number(text, float, "a number")
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text} is out of range: must be a number above 0")
    return v


def unit_fraction(text: str) -> float:
    v = _number(text, float, "a number")
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is out of range: must be in [0, 1]")
    return v


def block_size(text: str) -> int:
    v = _number(text, int, "a whole number")
    if not (16 <= v <= MAX_BLOCK and v % 16 == 0):
        raise argparse.ArgumentTypeError(f"block size {v} is not supported: use a multiple of 16 "
                                         f"from 16 to {MAX_BLOCK} (16, 32, 48, 64, ...)")
    return v


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether it exists is checked when used)."""
    s = str(text).strip().lower()
    if s in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", s):
        return s
    raise argparse.ArgumentTypeError(f"unknown device {text!r}: choose auto, cpu, cuda or cuda:N")


def require_device(spec: str) -> str:
    """``spec`` if this machine has it; else a :class:`UsageError`."""
    if spec.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA GPU is available here (use --device cpu or auto)")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return spec


# ---- output folders --------------------------------------------------------------------------------
def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_out_dir(path: str, option: str = "--out") -> str:
    """``path`` if it can be a folder written here: not a file, and writable (or creatable)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path} is a file, not a folder")
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        raise UsageError(f"{option} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: cannot write to {base} (permission denied)")
    return path


def oserror_text(e: OSError) -> str:
    if e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return str(e)


# ---- commands ----------------------------------------------------------------------------------------
def _cmd_info(args) -> int:
    import platform

    import torch

    from .ops import backends

    print(f"sparsebert {__import__('sparsebert').__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  "
          f"cuda {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    try:
        import transformers
        print(f"transformers {transformers.__version__}")
    except ImportError:
        print("transformers not installed")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"\nbackends on {dev}:")
        for name, reason in backends.report(dev).items():
            detail = ""
            if name == "cpu" and reason is None:   # which compiled kernel set runs here
                detail = f" ({backends.get('cpu').isa()} kernels)"
            print(f"  {name:<10} {'available' + detail if reason is None else 'unavailable: ' + reason}")
    return 0


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def model_source(arg: str):
    """``(where, "local")`` for an existing folder, ``(arg, "hub")`` for a bare Hub id (``name`` or
    ``org/name``) that is not a local path; anything else is a :class:`UsageError`."""
    path = os.path.expanduser(arg)
    if os.path.isdir(path):
        return path, "local"
    if os.path.exists(path):
        raise UsageError(f"cannot load a model from {arg}: it is a file; give a Hugging Face model folder "
                         "(with config.json) or a Hub id such as org/name")
    first = arg.split("/", 1)[0]
    if HUB_ID.fullmatch(arg) and ".." not in arg and not ("/" in arg and os.path.isdir(first)):
        return arg, "hub"
    raise UsageError(f"cannot load a model from {arg}: no such folder")


def _load_hf_model(source: str, where: str, auto_model: bool):
    import logging

    import transformers

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)          # no page of retry warnings: the error says it once
    if where == "hub":
        print(f"{source} is not a local folder: fetching it from the Hugging Face Hub", file=sys.stderr)
    try:
        if auto_model:
            return transformers.AutoModel.from_pretrained(source)
        config = transformers.AutoConfig.from_pretrained(source)
        arch = (config.architectures or ["AutoModel"])[0]
        cls = getattr(transformers, arch, transformers.AutoModel)
        return cls.from_pretrained(source)
    except Exception as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        if where == "hub":
            raise UsageError(f"cannot load {source}: not a local folder, and the Hugging Face Hub did not "
                             f"provide it ({msg})") from None
        raise UsageError(f"cannot load a Hugging Face model from {source}: {msg}") from None
    finally:
        hub_log.setLevel(level)


def _same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _cmd_prune(args) -> int:
    from .checkpoint import META, save_sparse
    from .hf import kept_table, sparsify

    source, where = model_source(args.model_dir)
    out = check_out_dir(args.out)
    if where == "local" and os.path.isdir(out) and _same_folder(source, out):
        raise UsageError(f"--out {out} is the model folder itself: write the checkpoint somewhere else")
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        what = "a sparsebert checkpoint" if os.path.isfile(os.path.join(out, META)) else "files"
        raise UsageError(f"--out {out} already holds {what}: pass --force to replace the checkpoint "
                         "there (other files in it are kept)")
    model = _load_hf_model(source, where, args.auto_model)
    try:
        sparsify(model, sparsity=args.sparsity, block=(args.block, args.block), mode=args.mode,
                 scope=args.scope, score=args.score)
    except ValueError as e:
        raise UsageError(f"cannot prune {args.model_dir}: {e}") from None
    try:
        save_sparse(model, out)
    except OSError as e:
        raise UsageError(f"cannot write the checkpoint to {out}: {oserror_text(e)}") from None
    detail = f"{args.mode}, block {args.block}x{args.block}" if args.mode == "block" else args.mode
    print(f"pruned {args.model_dir} to sparsity {100 * args.sparsity:g}% ({detail}, {args.scope} scope)")
    rows = kept_table(model)
    width = max(len(r[0]) for r in rows)
    print(f"{'layer':<{width}}  {'kind':<18} {'shape':>12}  kept")
    for name, kind, shape, kept in rows:
        print(f"{name:<{width}}  {kind:<18} {str(tuple(shape)):>12}  {kept:.3f}")
    total = sum(s[0] * s[1] for *_, s, _k in rows)
    kept = sum(s[0] * s[1] * k for *_, s, k in rows)
    print(f"overall kept fraction of pruned layers: {kept / total:.3f}; saved to {out}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    try:
        run_demo(levels=args.levels, block=args.block, tokens=args.tokens)
    except ValueError as e:
        raise UsageError(f"demo: {e}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsebert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions and which backends are available here (and why not)")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("prune", help="prune a Hugging Face model (a local folder, or a Hub id) and save a "
                                     "sparse checkpoint")
    s.add_argument("model_dir", help="a local model folder (with config.json), or a Hub id such as org/name "
                                     "(only a bare id that is not a local path is fetched from the Hub)")
    s.add_argument("--sparsity", type=sparsity, required=True, help=f"fraction of weights to remove: {SPARSITY_HELP}")
    s.add_argument("--block", type=block_size, default=32,
                   help=f"block side for --mode block: a multiple of 16 from 16 to {MAX_BLOCK} dividing every "
                        "pruned weight (default 32)")
    s.add_argument("--mode", choices=["block", "unstructured"], default="block")
    s.add_argument("--scope", choices=["layer", "global"], default="layer")
    s.add_argument("--score", choices=["magnitude", "random"], default="magnitude")
    s.add_argument("--auto-model", action="store_true", help="load with AutoModel (no task head)")
    s.add_argument("--out", required=True, help="checkpoint folder to write")
    s.add_argument("--force", action="store_true",
                   help="replace a checkpoint already in --out (other files there are kept)")
    s.set_defaults(func=_cmd_prune)

    s = sub.add_parser("demo", help="prune a small BERT at several levels: kept fraction, drift, speed")
    s.add_argument("--levels", type=sparsity, nargs="+", default=[0.0, 0.5, 0.75, 0.9],
                   help=f"sparsity levels: each {SPARSITY_HELP}")
    s.add_argument("--block", type=block_size, default=32, help="block side (must divide 384 and 1536)")
    s.add_argument("--tokens", type=positive_int, default=2048)
    s.set_defaults(func=_cmd_demo)

    try:
        from .study.cli import add_subcommands
    except ImportError:
        pass
    else:
        add_subcommands(sub)
    return p


def _user_errors():
    from .checkpoint import CheckpointError
    return (UsageError, CheckpointError, ValueError, OSError)


def run(parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse ``argv`` and run the chosen command: the exit status, never a traceback for a user
    error (one line on stderr, status 2) unless ``SPARSEBERT_TRACEBACK`` is set."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:                   # argparse: --help (0) or a bad argument (2, said already)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if os.environ.get("SPARSEBERT_TRACEBACK"):
            raise
        msg = oserror_text(e) if isinstance(e, OSError) else " ".join(str(e).split())
        print(f"{parser.prog}: error: {msg or type(e).__name__}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
