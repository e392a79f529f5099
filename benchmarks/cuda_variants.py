"""Compare the CUDA backend's DSD kernel variants (forward, grad_input) and its weight gradient
against dense cuBLAS, on the BERT FFN / attention-projection shapes.

    python3 setup.py build_ext --inplace          # sparsebert._C with CUDA, built in place
    python3 benchmarks/cuda_variants.py --out DIR  [--quick] [--triton] [--variants 0,1,2,3]

1. Correctness: every variant against ``sparsebert.ops.reference`` (fp64) on fresh random inputs
   (M = 4099, a ragged tail), relative Frobenius error; a failing variant is reported and not timed.
2. Timing (triton.testing.do_bench median, inputs rotated over 3 random sets so no op reads a
   result cache): forward, grad_input, grad_weight separately, M = 16384, bf16, shapes
   768->768, 768->3072, 3072->768, blocks 32/64, sparsity 0.5/0.75/0.9, beside dense
   (F.linear; dy @ W; dy^T @ x). Roofline ideal per op = max(kept * t_dense, bytes_min / BW),
   BW = 4.25e12 B/s (H200 HBM3e sustained copy; override with --bw).
Prints one table row per case and op with each variant's µs and fraction of ideal, the winner,
and writes DIR/cuda_variants.json. Designed to finish in well under 90 s on an H200.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparsebert.layout import BlockLayout  # noqa: E402
from sparsebert.ops import cuda_bsr, reference  # noqa: E402

SHAPES = [(768, 768), (768, 3072), (3072, 768)]   # (K = in, N = out)
BLOCKS = [64, 32]
SPARSITIES = [0.5, 0.75, 0.9]
M_TOKENS = 16384
N_SETS = 3
DTYPE = torch.bfloat16
TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3}


def random_layout(N, K, block, sparsity, seed=0):
    R, C = N // block, K // block
    kept = max(1, int(round((1.0 - sparsity) * R * C)))
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(R * C, dtype=torch.bool)
    mask[torch.randperm(R * C, generator=g)[:kept]] = True
    return BlockLayout.from_mask(mask.view(R, C), (block, block), (N, K))


def bench(fn, rep_ms):
    import triton.testing
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=max(2, rep_ms // 4), rep=rep_ms, return_mode="median") * 1e-3


def rotating(fn, n):
    state = [0]

    def call():
        state[0] = (state[0] + 1) % n
        return fn(state[0])
    return call


def rel_err(out, ref):
    if not torch.isfinite(out).all():
        return float("inf")
    scale = ref.norm().item()
    d = (out.double() - ref).norm().item()
    return d / scale if scale > 0 else d


def check_variants(variants, dtype, seed=0):
    """{variant: max rel err over ops/blocks/shapes}; grad_weight under key 'gw'."""
    errs = {v: 0.0 for v in variants}
    errs["gw"] = 0.0
    M = 4099
    for (K, N) in [(768, 768), (768, 3072)]:
        for block in BLOCKS:
            layout = random_layout(N, K, block, 0.6, seed=seed + block)
            lt = layout.tensors("cuda")
            g = torch.Generator(device="cuda").manual_seed(seed + K + N + block)
            x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
            dy = torch.randn(M, N, device="cuda", generator=g).to(dtype)
            v = torch.randn(layout.nnz, block, block, device="cuda", generator=g).to(dtype)
            b = torch.randn(N, device="cuda", generator=g).to(dtype)
            ry = reference.forward(x.double(), v.double(), b.double(), lt)
            rdx = reference.grad_input(dy.double(), v.double(), lt)
            for var in variants:
                try:
                    e1 = rel_err(cuda_bsr.forward(x, v, b, lt, variant=var), ry)
                    e2 = rel_err(cuda_bsr.grad_input(dy, v, lt, variant=var), rdx)
                    torch.cuda.synchronize()
                except RuntimeError as ex:  # an invalid variant or a launch error: report, go on
                    print(f"  variant {var}: ERROR {ex}".splitlines()[0])
                    e1 = e2 = float("inf")
                errs[var] = max(errs[var], e1, e2)
            errs["gw"] = max(errs["gw"], rel_err(cuda_bsr.grad_weight(x, dy, lt),
                                                 reference.grad_weight(x.double(), dy.double(), lt)))
    return errs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="cuda_variants_out")
    ap.add_argument("--quick", action="store_true", help="64-blocks and FFN shapes only, shorter reps")
    ap.add_argument("--triton", action="store_true", help="also time the triton backend (autotunes: slower)")
    ap.add_argument("--variants", default="", help="comma list (default: all the library has)")
    ap.add_argument("--bw", type=float, default=4.25e12, help="bytes/s for the memory roofline")
    ap.add_argument("--rep-ms", type=int, default=25)
    ap.add_argument("--budget-s", type=float, default=80.0, help="stop timing new cases after this")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.environ.pop("TRITON_INTERPRET", None)
    t_start = time.time()

    reason = cuda_bsr.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        print("cuda backend unavailable:", reason)
        return 2
    n_var, default = cuda_bsr.variants()
    variants = [int(s) for s in args.variants.split(",") if s.strip()] or list(range(n_var))
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"variants {variants} (library default {default}), dtype {DTYPE}, M {M_TOKENS}")

    errs = check_variants(variants, DTYPE)
    tol = TOL[DTYPE]
    ok_vars = [v for v in variants if errs[v] < tol]
    print("correctness (max rel err vs fp64, tol %.0e): " % tol
          + ", ".join(f"v{v} {errs[v]:.2e}{'' if errs[v] < tol else ' FAIL'}" for v in variants)
          + f", grad_weight {errs['gw']:.2e}{'' if errs['gw'] < tol else ' FAIL'}")

    triton_bsr = None
    if args.triton:
        try:
            from sparsebert.ops import triton_bsr as _tb
            if _tb.unavailable_reason(torch.device("cuda")) is None:
                triton_bsr = _tb
        except Exception as ex:  # noqa: BLE001
            print("triton backend not timed:", ex)

    shapes = SHAPES if not args.quick else [(768, 3072), (3072, 768)]
    blocks = BLOCKS if not args.quick else [64]
    rep = args.rep_ms if not args.quick else max(10, args.rep_ms // 2)
    rows = []
    hdr = (f"{'case':<24} {'op':<4} {'dense':>7} {'ideal':>7} | "
           + " ".join(f"{'v' + str(v):>7}" for v in ok_vars)
           + (f" {'triton':>7}" if triton_bsr else "") + " | best  x dense  /ideal")
    print(hdr)
    print("-" * len(hdr))
    for (K, N) in shapes:
        M = M_TOKENS
        e = torch.empty(0, dtype=DTYPE).element_size()
        xs = [torch.randn(M, K, device="cuda", dtype=DTYPE) for _ in range(N_SETS)]
        dys = [torch.randn(M, N, device="cuda", dtype=DTYPE) for _ in range(N_SETS)]
        W = torch.randn(N, K, device="cuda", dtype=DTYPE) / math.sqrt(K)
        bias = torch.randn(N, device="cuda", dtype=DTYPE)
        t_dense = {
            "fwd": bench(rotating(lambda i: F.linear(xs[i], W, bias), N_SETS), rep),
            "gi": bench(rotating(lambda i: dys[i] @ W, N_SETS), rep),
            "gw": bench(rotating(lambda i: dys[i].t() @ xs[i], N_SETS), rep),
        }
        for block in blocks:
            for sp in SPARSITIES:
                if time.time() - t_start > args.budget_s:
                    print(f"(time budget {args.budget_s:.0f} s reached: remaining cases skipped)")
                    break
                layout = random_layout(N, K, block, sp, seed=int(sp * 100) + block)
                lt = layout.tensors("cuda")
                kept = layout.nnz / ((N // block) * (K // block))
                vals = torch.randn(layout.nnz, block, block, device="cuda", dtype=DTYPE) / math.sqrt(K)
                blocks_b = layout.nnz * block * block * e
                bytes_min = {"fwd": (M * K + M * N + N) * e + blocks_b,
                             "gi": (M * N + M * K) * e + blocks_b,
                             "gw": (M * N + M * K) * e + blocks_b}
                case = f"{K}->{N} b{block} s{int(sp * 100)}%"
                for op in ("fwd", "gi", "gw"):
                    ideal = max(kept * t_dense[op], bytes_min[op] / args.bw)
                    times = {}
                    if op == "gw":
                        times["cuda"] = bench(rotating(lambda i: cuda_bsr.grad_weight(xs[i], dys[i], lt), N_SETS), rep)
                    else:
                        for v in ok_vars:
                            if op == "fwd":
                                f = rotating(lambda i, v=v: cuda_bsr.forward(xs[i], vals, bias, lt, variant=v), N_SETS)
                            else:
                                f = rotating(lambda i, v=v: cuda_bsr.grad_input(dys[i], vals, lt, variant=v), N_SETS)
                            times[f"v{v}"] = bench(f, rep)
                    if triton_bsr is not None:
                        try:
                            if op == "fwd":
                                f = rotating(lambda i: triton_bsr.forward(xs[i], vals, bias, lt), N_SETS)
                            elif op == "gi":
                                f = rotating(lambda i: triton_bsr.grad_input(dys[i], vals, lt), N_SETS)
                            else:
                                f = rotating(lambda i: triton_bsr.grad_weight(xs[i], dys[i], lt), N_SETS)
                            times["triton"] = bench(f, rep)
                        except Exception as ex:  # noqa: BLE001
                            print("  triton failed:", str(ex).splitlines()[0])
                    cuda_times = {k: t for k, t in times.items() if k != "triton"}
                    if not cuda_times:
                        continue
                    best = min(cuda_times, key=cuda_times.get)
                    tb = cuda_times[best]
                    cols = " ".join(f"{times[k] * 1e6:7.1f}" for k in (["cuda"] if op == "gw" else
                                                                       [f"v{v}" for v in ok_vars]))
                    if op == "gw":
                        cols = f"{cols:>{8 * len(ok_vars) - 1}}"
                    tri = f" {times['triton'] * 1e6:7.1f}" if "triton" in times else (
                        f" {'-':>7}" if triton_bsr else "")
                    print(f"{case:<24} {op:<4} {t_dense[op] * 1e6:7.1f} {ideal * 1e6:7.1f} | {cols}{tri} | "
                          f"{best:<5} {t_dense[op] / tb:6.2f} {ideal / tb:6.2f}")
                    rows.append(dict(K=K, N=N, M=M, block=block, sparsity=sp, kept=kept, op=op,
                                     dense_s=t_dense[op], ideal_s=ideal,
                                     times_s=times, best=best, best_s=tb,
                                     speedup_vs_dense=t_dense[op] / tb, frac_ideal=ideal / tb))
        del xs, dys
        torch.cuda.empty_cache()

    # Summary: per op, how often each variant wins and its geometric-mean fraction of ideal.
    print("\nsummary (fwd / gi): variant -> wins, geomean(t_best / t_variant), geomean(/ideal)")
    summary = {}
    for op in ("fwd", "gi"):
        sub = [r for r in rows if r["op"] == op]
        for v in ok_vars:
            k = f"v{v}"
            sub_v = [r for r in sub if k in r["times_s"]]
            if not sub_v:
                continue
            wins = sum(r["best"] == k for r in sub_v)
            rel = math.exp(sum(math.log(r["best_s"] / r["times_s"][k]) for r in sub_v) / len(sub_v))
            fid = math.exp(sum(math.log(r["ideal_s"] / r["times_s"][k]) for r in sub_v) / len(sub_v))
            summary.setdefault(op, {})[k] = dict(wins=wins, geomean_vs_best=rel, geomean_frac_ideal=fid)
            print(f"  {op:<3} {k}: wins {wins:2d}/{len(sub_v)}, vs best {rel:.2f}, /ideal {fid:.2f}")
    gw = [r for r in rows if r["op"] == "gw"]
    if gw:
        fid = math.exp(sum(math.log(r["frac_ideal"]) for r in gw) / len(gw))
        print(f"  gw  cuda: /ideal geomean {fid:.2f}")
    path = os.path.join(args.out, "cuda_variants.json")
    with open(path, "w") as fh:
        json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, dtype=str(DTYPE),
                       M=M_TOKENS, bandwidth=args.bw, variants=variants, library_default=default,
                       correctness=errs, rows=rows, summary=summary), fh, indent=1)
    print(f"wrote {path} ({time.time() - t_start:.0f} s)")
    return 0 if all(errs[v] < tol for v in variants) and errs["gw"] < tol else 1


if __name__ == "__main__":
    sys.exit(main())
