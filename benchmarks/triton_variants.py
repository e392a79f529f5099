"""Time every Triton kernel variant of ``sparsebert/ops/triton_bsr.py`` on the benchmark grid.

    python benchmarks/triton_variants.py --out results/variants [--rep-ms 10] [--jobs 8]

Grid: (K -> N) 768->768, 768->3072, 3072->768; M = 16384; bf16; blocks 32 and 64; block sparsity
50/75/90 % (random layouts, exactly that kept fraction, same layouts as bench_kernels.py).
For each case and each variant spec (see ``_VARIANT_TABLE`` in triton_bsr.py) it times forward
(bias, no activation), grad_input and grad_weight separately, each checked against an fp32 dense
reference first (rel err > 2e-2 -> marked FAIL, not timed, never a winner). Then fwd+bwd
(forward + grad_input + grad_weight + dy.sum(0)) for the current default choice and for the
combination of per-op winners. Prints per (shape, block, sparsity, op) the winner and its speedup
over the current default and the "legacy" kernel, the roofline ideal (max(kept x dense,
bytes_min / bandwidth)), and finally a ready-to-paste ``_VARIANT_OVERRIDES`` dict.

Compile time: every (op, block, spec) is one Triton compile; ``--jobs`` worker processes compile
them all in parallel first (shared on-disk Triton cache), so the timed pass only loads them.
Legacy kernels run with SPARSEBERT_TRITON_AUTOTUNE=0 (first config, BLOCK_M=128 w4 s3).
Designed to finish in about 1-2 minutes on an H200.

``--dry-run``: tiny CPU run under TRITON_INTERPRET=1 (checks the code paths, no timings).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

os.environ.setdefault("SPARSEBERT_TRITON_AUTOTUNE", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SHAPES = [(768, 768), (768, 3072), (3072, 768)]
BLOCKS = [32, 64]
SPARSITIES = [0.5, 0.75, 0.9]
M_TOKENS = 16384
OPS = ("forward", "grad_input", "grad_weight")
TOL = 2e-2


def DSD_FAMILIES(block: int):
    """Forward / grad_input specs timed for this block size (keep short: each is a compile)."""
    if block >= 64:
        return ["legacy", "g1r1m128w4s3", "g2r1m128w4s3", "g2r1m128w8s3", "g2r1m128w8s4",
                "g2r1m256w8s3", "g4r1m128w8s3", "g1r2m128w4s3", "g2r2m128w4s3", "g2r2m256w8s3"]
    return ["legacy", "g2r1m128w4s3", "g4r1m128w4s3", "g4r1m128w8s4", "g4r1m256w8s3",
            "g8r1m128w8s3", "g2r2m128w4s3", "g4r2m128w4s3", "g4r2m256w8s3", "g4r4m128w8s3"]


def SDD_FAMILIES(block: int):
    """grad_weight specs timed for this block size."""
    if block >= 64:
        return ["legacy", "g1m128w4s3a2", "g1m128w4s3p2", "g2m128w4s3p2", "g2m128w4s3a2",
                "g2m128w8s4p2", "g4m128w8s3p2", "g2m256w8s3p2", "g2m128w4s3p4", "g2m64w4s3p1"]
    return ["legacy", "g2m128w4s3p2", "g4m128w4s3p2", "g4m128w4s3a2", "g4m128w8s4p2",
            "g8m128w8s3p2", "g4m256w8s3p2", "g4m128w4s3p4", "g4m64w4s3p1"]


def families(op, block):
    return SDD_FAMILIES(block) if op == "grad_weight" else DSD_FAMILIES(block)


# ---------------------------------------------------------------------------------------------
def make_case(K, N, block, sparsity, M, device, dtype):
    import torch
    import bench_kernels as bk
    return bk.make_case(K, N, block, sparsity, M=M, dtype=dtype, device=device, n_sets=1)


def references(case):
    import torch
    x, dy, w = case.xs[0].float(), case.dys[0].float(), case.weight.float()
    y = torch.addmm(case.bias.float(), x, w.t())
    dx = dy @ w
    dw = case.layout.gather(dy.t() @ x)
    return y, dx, dw


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def op_call(tb, op, spec, case, lt):
    x, dy, v, b = case.xs[0], case.dys[0], case.values, case.bias
    if op == "forward":
        return lambda: tb.forward(x, v, b, lt, variant=spec)
    if op == "grad_input":
        return lambda: tb.grad_input(dy, v, lt, variant=spec)
    return lambda: tb.grad_weight(x, dy, lt, variant=spec)


def time_fn(fn, device, rep_ms):
    import torch
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    import triton.testing
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=max(1, rep_ms // 4), rep=rep_ms, return_mode="median") * 1e-3


# ---------------------------------------------------------------------------------------------
def prewarm_worker(jobs: list, M: int):
    """Compile (by running once) the given (op, block, spec) on the GPU; the on-disk Triton cache
    is shared, so the main process later only loads them."""
    import torch
    from sparsebert.ops import triton_bsr as tb
    dev = torch.device("cuda")
    cases = {}
    # grad_weight: a small layout (split M, fp32 partials) and a large one (often split 1, direct store)
    for op, block, spec in jobs:
        for shape in ([(768, 768), (768, 3072)] if op == "grad_weight" else [(768, 768)]):
            key = (block,) + shape
            if key not in cases:
                cases[key] = make_case(shape[0], shape[1], block, 0.5, M, dev, torch.bfloat16)
            case = cases[key]
            try:
                op_call(tb, op, spec, case, case.layout.tensors(dev))()
            except Exception as e:   # reported again (and not timed) by the main pass
                print(f"prewarm {op} b{block} {spec}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    torch.cuda.synchronize()


def prewarm(n_jobs: int, M: int, blocks):
    all_jobs = [(op, b, s) for b in blocks for op in OPS for s in families(op, b)]
    # legacy autotunes per shape key (not compiled here: autotune is off, so one config)
    chunks = [all_jobs[i::n_jobs] for i in range(n_jobs)]
    procs = []
    for ch in chunks:
        if not ch:
            continue
        procs.append(subprocess.Popen([sys.executable, __file__, "--prewarm-worker", json.dumps(ch),
                                       "--M", str(M)], cwd=ROOT))
    for p in procs:
        p.wait()


# ---------------------------------------------------------------------------------------------
def run(out_dir, rep_ms=10, jobs=8, dry_run=False, shapes=None, blocks=None, sparsities=None):
    import torch
    import bench_kernels as bk
    from sparsebert.ops import triton_bsr as tb

    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    shapes, blocks, sparsities = shapes or SHAPES, blocks or BLOCKS, sparsities or SPARSITIES
    M = M_TOKENS
    if dry_run:
        device = torch.device("cpu")
        shapes, blocks, sparsities, M = [(128, 256)], [32, 64], [0.75], 64
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --dry-run)")
        device = torch.device("cuda")
        if jobs > 0:
            prewarm(jobs, M, blocks)
            print(f"# prewarm (parallel compiles) done in {time.time() - t0:.0f} s", flush=True)
    dtype = torch.bfloat16
    bw = bk.measure_bandwidth(device)
    info = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                torch=torch.__version__, bandwidth_GBps=bw / 1e9, M=M, rep_ms=rep_ms,
                table={str(k): v for k, v in tb._VARIANT_TABLE.items()}, overrides={str(k): v for k, v in tb._VARIANT_OVERRIDES.items()})
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        pass
    print(f"# {info['device']} torch {info['torch']} triton {info.get('triton')} "
          f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    rows, winners, summary = [], {}, []

    for (K, N) in shapes:
        for block in blocks:
            for sp in sparsities:
                case = make_case(K, N, block, sp, M, device, dtype)
                lt = case.layout.tensors(device)
                y_ref, dx_ref, dw_ref = references(case)
                x, dy, w = case.xs[0], case.dys[0], case.weight
                t_dense = {
                    "forward": time_fn(lambda: torch.nn.functional.linear(x, w, case.bias), device, rep_ms),
                    "grad_input": time_fn(lambda: dy @ w, device, rep_ms),
                    "grad_weight": time_fn(lambda: dy.t() @ x, device, rep_ms),
                }
                e = 2
                blocks_b = case.layout.nnz * block * block * e
                mem = {"forward": (M * K + M * N + N) * e + blocks_b,
                       "grad_input": (M * N + M * K) * e + blocks_b,
                       "grad_weight": (M * N + M * K) * e + blocks_b}
                ideal = {op: max(case.kept * t_dense[op], mem[op] / bw) for op in OPS}
                tag = f"{K}->{N} b{block} s{int(round(sp * 100))}"
                best = {}
                for op in OPS:
                    refv = {"forward": y_ref, "grad_input": dx_ref, "grad_weight": dw_ref}[op]
                    default = tb.choose_variant(op, lt)
                    res = {}
                    for spec in families(op, block) + ([default] if default not in families(op, block) else []):
                        fn = op_call(tb, op, spec, case, lt)
                        row = dict(shape=f"{K}->{N}", K=K, N=N, block=block, sparsity=sp, op=op, spec=spec,
                                   default=spec == default, dense_s=t_dense[op], ideal_s=ideal[op])
                        try:
                            err = rel_err(fn(), refv)
                            row["rel_err"] = err
                            if not (err <= TOL):
                                row["note"] = f"FAIL rel err {err:.2e}"
                            else:
                                t = time_fn(fn, device, rep_ms)
                                row.update(t_s=t, frac_ideal=ideal[op] / t, speedup=t_dense[op] / t)
                                res[spec] = t
                        except Exception as ex:
                            row["note"] = f"error {type(ex).__name__}: {str(ex)[:160]}"
                        rows.append(row)
                    if res:
                        win = min(res, key=res.get)
                        best[op] = win
                        winners[(op, K, N, block, int(round(sp * 100)))] = win
                        t_def, t_leg = res.get(default), res.get("legacy")
                        summary.append(dict(case=tag, op=op, winner=win, t_us=res[win] * 1e6,
                                            frac_ideal=ideal[op] / res[win], dense_us=t_dense[op] * 1e6,
                                            default=default, default_us=t_def * 1e6 if t_def else None,
                                            legacy_us=t_leg * 1e6 if t_leg else None))
                # fwd+bwd: default choice and per-op winners
                for label, specs in (("default", {op: tb.choose_variant(op, lt) for op in OPS}),
                                     ("best", best)):
                    if len(specs) < 3:
                        continue
                    f, gi, gw = (op_call(tb, op, specs[op], case, lt) for op in OPS)
                    t = time_fn(lambda: (f(), gi(), gw(), dy.sum(0)), device, rep_ms)
                    rows.append(dict(shape=f"{K}->{N}", K=K, N=N, block=block, sparsity=sp, op="fwd_bwd",
                                     spec=label, specs=specs, t_s=t))
                    summary.append(dict(case=tag, op=f"fwd_bwd[{label}]", winner="+".join(specs[o] for o in OPS),
                                        t_us=t * 1e6, frac_ideal=None, dense_us=None, default=None,
                                        default_us=None, legacy_us=None))
                print(format_case(rows, tag, K, N, block, sp), flush=True)
                print(f"# {tag} done ({time.time() - t0:.0f} s)", flush=True)
                with open(os.path.join(out_dir, "triton_variants.json"), "w") as fh:
                    json.dump(dict(info=info, rows=rows, summary=summary, partial=True), fh, indent=1, default=str)
                del case

    text = format_summary(summary) + "\n\n" + format_overrides(winners)
    print(text)
    with open(os.path.join(out_dir, "triton_variants.json"), "w") as fh:
        json.dump(dict(info=info, rows=rows, summary=summary,
                       winners={"|".join(map(str, k)): v for k, v in winners.items()},
                       total_s=time.time() - t0), fh, indent=1, default=str)
    with open(os.path.join(out_dir, "triton_variants.txt"), "w") as fh:
        fh.write(text + "\n")
    print(f"# total {time.time() - t0:.0f} s", flush=True)
    return rows


def _us(v):
    return f"{v * 1e6:8.1f}" if isinstance(v, float) else f"{'n/a':>8}"


def format_case(rows, tag, K, N, block, sp):
    sub = [r for r in rows if r["K"] == K and r["N"] == N and r["block"] == block and r["sparsity"] == sp]
    out = [f"== {tag}"]
    for op in OPS + ("fwd_bwd",):
        rs = [r for r in sub if r["op"] == op]
        if not rs:
            continue
        if op == "fwd_bwd":
            out.append("  fwd_bwd: " + "  ".join(f"{r['spec']} {_us(r.get('t_s'))} µs" for r in rs))
            continue
        out.append(f"  {op:<11} dense {_us(rs[0]['dense_s'])} ideal {_us(rs[0]['ideal_s'])}")
        line = []
        for r in sorted(rs, key=lambda r: r.get("t_s", 1e9)):
            mark = "*" if r.get("default") else ""
            line.append(f"{r['spec']}{mark} {(r['t_s'] * 1e6):.1f}" if "t_s" in r else f"{r['spec']}{mark} {r.get('note', '?')}")
        out.append("    " + " | ".join(line))
    return "\n".join(out)


def format_summary(summary):
    head = f"{'case':<18} {'op':<20} {'winner':<34} {'µs':>8} {'/ideal':>6} {'dense':>8} {'default µs':>10} {'legacy µs':>9}"
    lines = ["# winners per (shape, block, sparsity, op)", head, "-" * len(head)]
    f = lambda v, s: format(v, s) if isinstance(v, (int, float)) else "n/a"
    for s in summary:
        lines.append(f"{s['case']:<18} {s['op']:<20} {s['winner']:<34} {f(s['t_us'], '8.1f'):>8} "
                     f"{f(s['frac_ideal'], '6.2f'):>6} {f(s['dense_us'], '8.1f'):>8} "
                     f"{f(s['default_us'], '10.1f'):>10} {f(s['legacy_us'], '9.1f'):>9}")
    return "\n".join(lines)


def format_overrides(winners):
    lines = ["# paste into sparsebert/ops/triton_bsr.py (exact-shape winners):", "_VARIANT_OVERRIDES: dict = {"]
    for k, v in sorted(winners.items()):
        lines.append(f"    {k!r}: {v!r},")
    lines.append("}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/variants")
    ap.add_argument("--rep-ms", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=8, help="parallel compile processes (0: none)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--blocks", type=int, nargs="*")
    ap.add_argument("--prewarm-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--M", type=int, default=M_TOKENS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.prewarm_worker is not None:
        prewarm_worker([tuple(j) for j in json.loads(args.prewarm_worker)], args.M)
        return
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    run(args.out, rep_ms=args.rep_ms, jobs=args.jobs, dry_run=args.dry_run, blocks=args.blocks)


if __name__ == "__main__":
    main()
