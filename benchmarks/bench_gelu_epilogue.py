"""The GELU epilogue's cost in the CPU forward, this build against a baseline commit's, interleaved.

    .venv/bin/python benchmarks/bench_gelu_epilogue.py --baseline COMMIT [--rounds 11] [--out F.json]

For each (shape, block sparsity, block, M, forced path) it times ``torch.ops.sparsebert_cpu.forward``
with activation "none" and "gelu", and the baseline's (``bench_cpu.build_baseline``: COMMIT's
csrc/cpu compiled beside this build, ops under ``torch.ops.sparsebert_cpu_base``): one thread, CPU
time (``time.process_time``) per call, medians over rounds in which all four run back to back (so
they see the same machine load). "GELU cost" = gelu - none. Also prints whether the "none"
outputs are bitwise equal and the largest gelu difference between the builds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparsebert.ops.cpu_bsr as cb  # noqa: E402
from bench_cpu import BASELINE_NS, build_baseline, random_layout  # noqa: E402


def cells(quick: bool):
    for K, N in ((384, 1536), (768, 3072)):
        for sparsity in (0.9, 0.5):
            for block in (32, 16):
                for M in (128, 1024, 8192):
                    if M == 8192 and (sparsity < 0.9 or quick):
                        continue   # 8192 tokens at 50%: seconds per round
                    yield K, N, sparsity, block, M, "panel"
                yield K, N, sparsity, block, 128, "tpanel"
                yield K, N, sparsity, block, 16, "dot"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--build-dir", default=os.path.join(tempfile.gettempdir(), "sb_gelu_baseline"))
    ap.add_argument("--quick", action="store_true", help="no 8192-token cells")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    cb._require()
    build_baseline(a.baseline, a.build_dir)
    ops = {"new": torch.ops.sparsebert_cpu.forward, "base": getattr(torch.ops, BASELINE_NS).forward}
    rows = []
    print(f"load average at start: {os.getloadavg()}")
    print("| shape | sparsity | block | M | path | none ms (new / base) | GELU cost ms, base | GELU cost ms, new | base / new |")
    print("|---|---|---|---|---|---|---|---|---|")
    for K, N, sparsity, block, M, path in cells(a.quick):
        os.environ["SPARSEBERT_CPU_FWD"] = path
        g = torch.Generator().manual_seed(0)
        lay = random_layout(N, K, block, sparsity)
        lt = lay.tensors()
        w = torch.randn(N, K, generator=g) / (K * (1 - sparsity)) ** 0.5   # pre-activations ~ N(0, 1)
        values = lay.gather(w)
        bias = 0.3 * torch.randn(N, generator=g)
        x = torch.randn(M, K, generator=g)
        args = (x, values, bias, lt.packed(), lt.N, lt.K, lt.bn, lt.bk)
        fns = {(b, act): (lambda op=op, act=act: op(*args, act)) for b, op in ops.items() for act in ("none", "gelu")}
        outs = {k: f() for k, f in fns.items()}
        same_none = torch.equal(outs[("new", "none")], outs[("base", "none")])
        gdiff = (outs[("new", "gelu")] - outs[("base", "gelu")]).abs().max().item()
        times = {k: [] for k in fns}
        for _ in range(a.rounds):
            for k, f in fns.items():
                t0 = time.process_time()
                f()
                times[k].append(time.process_time() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        cost = {b: med[(b, "gelu")] - med[(b, "none")] for b in ops}
        row = dict(K=K, N=N, sparsity=sparsity, block=block, M=M, path=path, median_ms={f"{b}_{act}": v for (b, act), v in med.items()},
                   none_bitwise_equal=same_none, gelu_max_abs_diff=gdiff)
        rows.append(row)
        ratio = cost["base"] / cost["new"] if cost["new"] > 0 else float("inf")
        print(f"| {K}->{N} | {sparsity:.0%} | {block} | {M} | {path} | {med[('new', 'none')]:.3f} / {med[('base', 'none')]:.3f} "
              f"| {cost['base']:.3f} | {cost['new']:.3f} | {ratio:.1f}x |"
              + ("" if same_none else " (none outputs differ!)") + f" <!-- gelu diff {gdiff:.1e} -->", flush=True)
    print(f"load average at end: {os.getloadavg()}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(baseline=a.baseline, rounds=a.rounds, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
