"""The ``sparsebert`` command (also ``python -m sparsebert``)."""
from __future__ import annotations

import argparse
import sys


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


def _cmd_prune(args) -> int:
    import transformers

    from .checkpoint import save_sparse
    from .hf import kept_table, sparsify

    try:
        model = transformers.AutoModel.from_pretrained(args.model_dir) if args.auto_model else None
        if model is None:
            config = transformers.AutoConfig.from_pretrained(args.model_dir)
            arch = (config.architectures or ["AutoModel"])[0]
            cls = getattr(transformers, arch, transformers.AutoModel)
            model = cls.from_pretrained(args.model_dir)
    except (OSError, ValueError) as e:
        print(f"error: cannot load a Hugging Face model from {args.model_dir}: {e}", file=sys.stderr)
        return 2
    sparsify(model, sparsity=args.sparsity, block=(args.block, args.block), mode=args.mode,
             scope=args.scope, score=args.score)
    save_sparse(model, args.out)
    rows = kept_table(model)
    width = max(len(r[0]) for r in rows)
    print(f"{'layer':<{width}}  {'kind':<18} {'shape':>12}  kept")
    for name, kind, shape, kept in rows:
        print(f"{name:<{width}}  {kind:<18} {str(tuple(shape)):>12}  {kept:.3f}")
    total = sum(s[0] * s[1] for *_, s, _k in rows)
    kept = sum(s[0] * s[1] * k for *_, s, k in rows)
    print(f"overall kept fraction of pruned layers: {kept / total:.3f}; saved to {args.out}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(levels=args.levels, block=args.block, tokens=args.tokens)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsebert", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions and which backends are available here (and why not)")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("prune", help="prune a local Hugging Face model folder and save a sparse checkpoint")
    s.add_argument("model_dir")
    s.add_argument("--sparsity", type=float, required=True)
    s.add_argument("--block", type=int, default=32)
    s.add_argument("--mode", choices=["block", "unstructured"], default="block")
    s.add_argument("--scope", choices=["layer", "global"], default="layer")
    s.add_argument("--score", choices=["magnitude", "random"], default="magnitude")
    s.add_argument("--auto-model", action="store_true", help="load with AutoModel (no task head)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_prune)

    s = sub.add_parser("demo", help="prune a small BERT at several levels: kept fraction, drift, speed")
    s.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.9])
    s.add_argument("--block", type=int, default=32)
    s.add_argument("--tokens", type=int, default=2048)
    s.set_defaults(func=_cmd_demo)

    try:
        from .study.cli import add_subcommands
    except ImportError:
        pass
    else:
        add_subcommands(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
