"""Tune the Triton backend on this GPU: time every shipped kernel configuration per
(dtype, op, tokens, shape, block, density) and write the winners to the data file the backend
reads (``sparsebert/ops/triton/tuned.json``), keyed by ``gpu|dtype|op|tokens bucket|NxK|bnxbk|
density bucket`` (:func:`sparsebert.ops.triton.common.tune_key`).

Usage (on the GPU machine)::

    python benchmarks/tune_triton.py [--out sparsebert/ops/triton/tuned.json] [--quick]
        [--shapes 768x768,768x3072,3072x768] [--blocks 64,32,128] [--sparsity 0,50,75,90]
        [--tokens 16384] [--dtypes bf16] [--ops forward,grad_input,grad_weight] [--rep-ms 25]
        [--budget-s 480] [--replace]

Each config is first checked against a dense fp32 computation of the same product (relative
error below 2e-2; failures are reported and never chosen), then timed with
``triton.testing.do_bench`` (median, input sets rotated so none sits in L2). ``grad_weight`` is
timed as ``grad_weight_bias`` (what a layer with a bias runs). Entries of other keys already in
the file are kept (``--replace`` drops them); the file is rewritten after every key, so a run cut
short keeps what it measured. ``--dry-run`` runs a tiny grid on the CPU (Triton interpreter, wall
clock) to check the script without a GPU; it writes nowhere unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# tf32: fp32 tensors with torch.backends.cuda.matmul.allow_tf32 on; fp32: off (exact dots)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
OPS = ("forward", "grad_input", "grad_weight")
N_SETS = 3


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Time every shipped Triton kernel config on this GPU "
                                             "and write the winners to the backend's data file.")
    ap.add_argument("--out", default=None,
                    help="data file to write (default: sparsebert/ops/triton/tuned.json on a GPU, "
                         "nothing with --dry-run)")
    ap.add_argument("--shapes", default="768x768,768x3072,3072x768",
                    help="layers as KxN = in_features x out_features, comma-separated (default: "
                         "the BERT-Base shapes 768x768,768x3072,3072x768; the data file's keys "
                         "name the weight's shape, NxK)")
    ap.add_argument("--blocks", default="64,32,128", help="square block sizes (default: 64,32,128)")
    ap.add_argument("--sparsity", default="0,50,75,90",
                    help="block sparsity in percent, comma-separated (default: 0,50,75,90)")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens M (default: 16384)")
    ap.add_argument("--dtypes", default="bf16",
                    help="bf16, fp16, tf32 (fp32 with TF32 allowed), fp32 (exact), comma-separated "
                         "(default: bf16)")
    ap.add_argument("--ops", default=",".join(OPS), help="ops to tune (default: all three)")
    ap.add_argument("--rep-ms", type=int, default=25, help="do_bench repetition time per config in ms "
                                                           "(default: 25)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="stop starting new keys after this many seconds (default: 480)")
    ap.add_argument("--quick", action="store_true",
                    help="only 768x3072, block 64, sparsity 0/50/90 (about a minute)")
    ap.add_argument("--replace", action="store_true", help="drop the file's other entries")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny grid on the CPU under TRITON_INTERPRET=1 (checks the script)")
    return ap.parse_args(argv)


def _random_layout(N, K, block, sparsity, seed):
    from sparsebert.layout import BlockLayout
    g = torch.Generator().manual_seed(seed)
    R, C = N // block, K // block
    keep = int(round((1 - sparsity) * R * C))
    mask = torch.zeros(R * C, dtype=torch.bool)
    mask[torch.randperm(R * C, generator=g)[:keep]] = True
    return BlockLayout.from_mask(mask.view(R, C), (block, block), (N, K))


def _timer(device):
    if device.type == "cuda":
        import triton.testing

        def bench(fn, rep_ms):
            return triton.testing.do_bench(fn, warmup=max(2, rep_ms // 4), rep=rep_ms,
                                           return_mode="median") * 1e-3
        return bench

    def bench(fn, rep_ms):   # the CPU (dry run): one timed call after a warm-up
        fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return bench


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tune_key_configs(op, dtype, M, N, K, block, sparsity, device, rep_ms, seed=0):
    """``(key, [(config, seconds or None, note)])`` for one key; the layout is random with exactly
    the kept fraction."""
    import sparsebert.ops.triton as tb
    from sparsebert.ops.triton import common, dsd, sdd
    layout = _random_layout(N, K, block, sparsity, seed)
    lt = layout.tensors(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    xs = [torch.randn(M, K, device=device, generator=gen).to(dtype) for _ in range(N_SETS)]
    dys = [torch.randn(M, N, device=device, generator=gen).to(dtype) for _ in range(N_SETS)]
    values = (torch.randn(layout.nnz, block, block, device=device, generator=gen) / K ** 0.5).to(dtype)
    bias = torch.randn(N, device=device, generator=gen).to(dtype)
    w = layout.scatter(values.float())                  # the dense [N, K] weight
    elem = xs[0].element_size()
    exact = dtype == torch.float32 and common.precision(dtype) == "ieee"
    if op == "grad_weight":
        cands = sdd.candidates(elem, block, block)
        expect = layout.gather((dys[0].float().T @ xs[0].float()))
        call = lambda cfg, i: tb.grad_weight_bias(xs[i], dys[i], lt, config=cfg)   # noqa: E731
        first = lambda out: out[0]                                                  # noqa: E731
    elif op == "forward":
        cands = dsd.candidates(elem, block, block, exact)
        expect = xs[0].float() @ w.T + bias.float()
        call = lambda cfg, i: tb.forward(xs[i], values, bias, lt, config=cfg)       # noqa: E731
        first = lambda out: out                                                     # noqa: E731
    else:
        cands = dsd.candidates(elem, block, block, exact)
        expect = dys[0].float() @ w
        call = lambda cfg, i: tb.grad_input(dys[i], values, lt, config=cfg)         # noqa: E731
        first = lambda out: out                                                     # noqa: E731
    gpu = common.device_name(torch.device(device))
    key = common.tune_key(gpu, dtype, op, M, lt)
    bench = _timer(torch.device(device))
    results = []
    for cfg in cands:
        try:
            err = _rel_err(first(call(cfg, 0)), expect) if expect.numel() else 0.0
            if not err < 2e-2:
                results.append((cfg, None, f"wrong: rel err {err:.2e}"))
                continue
            state = {"i": 0}

            def fn(cfg=cfg):
                state["i"] = (state["i"] + 1) % N_SETS
                call(cfg, state["i"])
            results.append((cfg, bench(fn, rep_ms), f"rel err {err:.1e}"))
        except Exception as e:   # a config the compiler or the device rejects: reported, not chosen
            results.append((cfg, None, f"failed: {type(e).__name__}: {str(e).strip()[:120]}"))
    return key, results


def _cfg_str(c):
    from sparsebert.ops.triton.inspect import _cfg_str as s
    return s(c)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
        shapes, blocks, sparsities, M = [(64, 128)], [32], [0.5], 100
        dtypes = ["fp32"]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on the GPU machine, or --dry-run", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        blocks = [int(b) for b in args.blocks.split(",")]
        sparsities = [int(s) / 100 for s in args.sparsity.split(",")]
        M = args.tokens
        dtypes = args.dtypes.split(",")
        if args.quick:
            shapes, blocks, sparsities = [(768, 3072)], [64], [0.0, 0.5, 0.9]
    ops = args.ops.split(",")
    for o in ops:
        if o not in OPS:
            raise SystemExit(f"--ops: unknown op {o!r} (choose from {', '.join(OPS)})")
    from sparsebert.ops.triton import common
    out_path = args.out or (None if args.dry_run else common.TUNED_PATH)
    data = {"format": 1, "entries": {}}
    if out_path and os.path.exists(out_path) and not args.replace:
        with open(out_path) as f:
            data = json.load(f)
    import triton
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton.__version__, "command": "python benchmarks/tune_triton.py "
            + " ".join(argv if argv is not None else sys.argv[1:])}
    start = time.time()
    print(f"{'key':<64} {'best config':<26} {'µs':>8} {'default µs':>10}  others")
    for dt in dtypes:
        torch.backends.cuda.matmul.allow_tf32 = dt == "tf32"
        for (K, N) in shapes:
            for block in blocks:
                for sp in sparsities:
                    for op in ops:
                        if time.time() - start > args.budget_s:
                            print(f"budget of {args.budget_s:.0f} s spent: stopping")
                            return 0
                        key, res = tune_key_configs(op, DTYPES[dt], M, N, K, block, sp, device,
                                                    args.rep_ms)
                        timed = [(c, t) for c, t, _ in res if t is not None]
                        for c, t, note in res:
                            if t is None:
                                print(f"  {key} {_cfg_str(c)}: {note}")
                        if not timed:
                            continue
                        best, t_best = min(timed, key=lambda ct: ct[1])
                        t_default = res[0][1]
                        data["entries"][key] = {
                            "config": best, "us": round(t_best * 1e6, 2),
                            "all_us": {_cfg_str(c): (None if t is None else round(t * 1e6, 2))
                                       for c, t, _ in res},
                            "sparsity": sp, "tokens": M, **meta}
                        others = " ".join(f"{_cfg_str(c)}={t * 1e6:.1f}" for c, t in timed if c is not best)
                        print(f"{key:<64} {_cfg_str(best):<26} {t_best * 1e6:8.1f} "
                              f"{'-' if t_default is None else f'{t_default * 1e6:.1f}':>10}  {others}")
                        if out_path:
                            with open(out_path, "w") as f:
                                json.dump(data, f, indent=1, sort_keys=True)
                                f.write("\n")
    if out_path:
        print(f"wrote {len(data['entries'])} entries to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
