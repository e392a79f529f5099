"""Fused CPU attention (sparsebert.ops.cpu_attention) against torch's scaled_dot_product_attention.

Same inputs for both, laid out as BERT passes them ([B, S, H * D] projections viewed as
[B, H, S, D]); the fused kernel returns [B, S, H, D], SDPA [B, H, S, D] (its caller's transpose
and copy are not counted). CPU time (time.process_time), interleaved rounds, medians. Masks:
none, and a padding mask as transformers builds it for sdpa (bool [B, 1, S, S], the same row for
every query; batch element b keeps S - b * S // (2 B) keys, so on average ~3/4 of them).

    python benchmarks/bench_attention.py [--threads N] [--rounds R] [--json OUT]
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from sparsebert.ops import cpu_attention as ca

SHAPES = [  # (label, B, H, S, D)
    ("MiniLM", 1, 12, 128, 32),
    ("MiniLM", 8, 12, 128, 32),
    ("MiniLM", 64, 12, 128, 32),
    ("BERT-Base", 1, 12, 128, 64),
    ("BERT-Base", 8, 12, 128, 64),
    ("BERT-Base", 1, 12, 512, 64),
    ("BERT-Base", 8, 12, 512, 64),
]


def inputs(B, H, S, D, padded):
    def make():
        return torch.randn(B, S, H * D).view(B, S, H, D).transpose(1, 2)
    q, k, v = make(), make(), make()
    mask = None
    if padded:
        keep = torch.arange(S)[None, :] < (S - torch.arange(B) * S // (2 * B))[:, None]
        mask = keep[:, None, None, :].expand(B, 1, S, S).contiguous()
    return q, k, v, mask


def cpu_ms(fn, reps):
    t0 = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t0) / reps * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--budget-ms", type=float, default=60.0, help="CPU time per timed sample")
    ap.add_argument("--shapes", default="", help="comma-separated indices into SHAPES (default all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not ca.available():
        raise SystemExit(f"fused attention unavailable: {ca.unsupported_reason(*inputs(1, 1, 2, 8, False)[:3])}")
    torch.set_num_threads(args.threads)
    chosen = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"threads {args.threads}, kernel {ca.isa()}, torch {torch.__version__}, "
          f"load average {load}, {platform.processor() or platform.machine()}")
    print(f"{'shape':>10} {'B':>3} {'H':>3} {'S':>4} {'D':>3} {'mask':>7} | "
          f"{'fused ms':>9} {'GF/s':>6} | {'sdpa ms':>8} {'GF/s':>6} | speedup")
    rows = []
    with torch.no_grad():
        for label, B, H, S, D in chosen:
            for padded in (False, True):
                q, k, v, mask = inputs(B, H, S, D, padded)
                fused = lambda: ca.attention(q, k, v, mask)  # noqa: E731
                sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
                torch.testing.assert_close(fused(), sdpa().transpose(1, 2), rtol=1e-4, atol=1e-5)
                once = max(cpu_ms(sdpa, 1), 1e-3)
                reps = max(1, int(args.budget_ms / once))
                a, b = [], []
                for _ in range(args.rounds):  # interleaved: both see the same machine load
                    a.append(cpu_ms(fused, reps))
                    b.append(cpu_ms(sdpa, reps))
                ma, mb = statistics.median(a), statistics.median(b)
                flops = 4 * B * H * S * S * D  # q k^T and p v, all keys (padding included)
                row = dict(shape=label, B=B, H=H, S=S, D=D, mask="padding" if padded else "none",
                           fused_ms=ma, sdpa_ms=mb, fused_gflops=flops / ma / 1e6,
                           sdpa_gflops=flops / mb / 1e6, speedup=mb / ma, reps=reps)
                rows.append(row)
                print(f"{label:>10} {B:>3} {H:>3} {S:>4} {D:>3} {row['mask']:>7} | {ma:9.3f} "
                      f"{row['fused_gflops']:6.1f} | {mb:8.3f} {row['sdpa_gflops']:6.1f} | "
                      f"{row['speedup']:5.2f}x", flush=True)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average at the end {load_end}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=args.threads, kernel=ca.isa(), torch=torch.__version__,
                           load_start=load, load_end=load_end, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
