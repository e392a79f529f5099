"""The CPU benchmark grid of ``bench_cpu.py`` as a Markdown table (paste into RESULTS).

    .venv/bin/python benchmarks/cpu_table.py [--rounds 7] [--quick] [--no-e2e | --e2e-only] [--providers dense,cpu]
                                         [--tokens 2048] [--modes fwd,fwd_bwd] [--threads N] [--baseline COMMIT]

Per (shape, block, sparsity, mode) the providers are timed interleaved, round by round, and the
median is reported: time, speedup over dense F.linear and fraction of the ideal, where
ideal = dense time x kept fraction (1.0 = the sparse kernel is exactly as efficient as dense).
Then, unless --no-e2e, a MiniLM-size BertModel end to end: inference (dense, 90% block-sparse
with and without the fused GELU) and a training step (forward, backward, AdamW, plain and fused).
``--baseline COMMIT`` compiles that commit's CPU kernels under another op namespace and adds them,
interleaved, as provider ``cpu_base`` and as ``@base`` rows of the end-to-end tables (before/after
on the same load).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cpu as bc  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except Exception:  # noqa: BLE001
        pass
    return platform.processor() or "unknown CPU"


def kernel_table(rounds: int, providers, shapes, blocks, sparsities, modes, M: int = bc.M_TOKENS):
    print("| shape K→N | block | sparsity | mode | provider | ms | × dense | of ideal |")
    print("|---|---|---|---|---|---:|---:|---:|")
    for (K, N) in shapes:
        for block in blocks:
            for sp in sparsities:
                case = bc.Case(K, N, block, sp, M=M)
                for mode in modes:
                    fns, skipped = {}, {}
                    for p in providers:
                        fn = bc.build(p, mode, case)
                        (skipped if isinstance(fn, str) else fns)[p] = fn
                    r = rounds if "reference" not in fns else max(3, rounds // 2)
                    t = bc.time_interleaved(fns, rounds=r)
                    dense = t.get("dense")
                    for p in providers:
                        if p in skipped:
                            print(f"| {K}→{N} | {block} | {sp:.0%} | {mode} | {p} | n/a | | |")
                            continue
                        ms = t[p] * 1e3
                        ms_s = f"{ms:.1f}" if ms >= 10 else f"{ms:.3f}"
                        sx = f"{dense / t[p]:.2f}" if dense else ""
                        ideal = f"{dense * case.kept / t[p]:.2f}" if dense and sp > 0 and p != "dense" else ""
                        print(f"| {K}→{N} | {block} | {sp:.0%} | {mode} | {p} | {ms_s} | {sx} | {ideal} |",
                              flush=True)


def e2e_train_table(rounds: int, baseline: bool = False):
    """A training step (forward, backward into every parameter, AdamW step) of the same model,
    with the default (for-loop) AdamW and with ``fused=True`` (what the study's loops use; it
    updates the weights without bumping their version counter). Each row trains its own model."""
    ids = bc.bert_inputs()
    rows = {"dense": (None, False), "cpu, 90% 32×32": (0.9, False),
            "dense, fused AdamW": (None, True), "cpu, 90% 32×32, fused AdamW": (0.9, True)}
    if baseline:
        rows.update({"cpu@base, 90% 32×32": (0.9, False), "cpu@base, 90% 32×32, fused AdamW": (0.9, True)})

    def runner(sparsity, fused, base):
        m = bc.build_bert(sparsity).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=fused)

        def run():
            m(input_ids=ids).last_hidden_state.square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return bc.with_baseline(run) if base else run
    t = bc.time_interleaved({k: runner(*v, "@base" in k) for k, v in rows.items()}, rounds=rounds)
    print("\nSame model, training step (forward + backward + AdamW), dropout on, fp32\n")
    print("| model | ms / step | tokens/s | × dense (same optimizer) |")
    print("|---|---:|---:|---:|")
    for k, v in t.items():
        dense = t["dense, fused AdamW" if "fused" in k else "dense"]
        print(f"| {k} | {v * 1e3:.1f} | {ids.numel() / v:,.0f} | {dense / v:.2f} |")


def e2e_table(rounds: int, baseline: bool = False):
    ids = bc.bert_inputs()
    models = {"dense": bc.build_bert(None), "cpu, 90% 32×32": bc.build_bert(0.9),
              "cpu, 90% 32×32, GELU not fused": bc.build_bert(0.9, fuse_activation=False)}
    if baseline:
        models["cpu@base, 90% 32×32"] = models["cpu, 90% 32×32"]

    def runner(m, base):
        def run():
            with torch.inference_mode():
                m(input_ids=ids)
        return bc.with_baseline(run) if base else run
    t = bc.time_interleaved({k: runner(m, "@base" in k) for k, m in models.items()}, rounds=rounds)
    e = bc.E2E
    print(f"\nEnd to end: BertModel hidden {e['hidden']}, {e['layers']} layers, intermediate "
          f"{e['intermediate']}, batch {e['batch']} x seq {e['seq']}, inference, fp32\n")
    print("| model | ms / batch | tokens/s | × dense |")
    print("|---|---:|---:|---:|")
    for k, v in t.items():
        print(f"| {k} | {v * 1e3:.1f} | {ids.numel() / v:,.0f} | {t['dense'] / v:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--providers", default=",".join(bc.PROVIDERS))
    ap.add_argument("--quick", action="store_true", help="block 32 only, sparsity 50/90%%, no reference")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--e2e-only", action="store_true")
    ap.add_argument("--tokens", type=int, default=bc.M_TOKENS, help="M, the tokens per call")
    ap.add_argument("--modes", default=",".join(bc.MODES), help="fwd,fwd_bwd")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--baseline", metavar="COMMIT",
                    help="also time this commit's CPU kernels (built under another op namespace)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    providers = args.providers.split(",")
    if args.baseline:
        import tempfile
        bc.build_baseline(args.baseline, os.path.join(tempfile.gettempdir(), f"sparsebert_cpu_base_{args.baseline}"))
        providers.insert(providers.index("cpu") if "cpu" in providers else len(providers), "cpu_base")
    blocks, sparsities = bc.BLOCKS, bc.SPARSITIES
    if args.quick:
        blocks, sparsities = [32], [0.5, 0.9]
        providers = [p for p in providers if p != "reference"]
    try:
        from sparsebert.ops import cpu_bsr
        isa = cpu_bsr.isa()
    except Exception as e:  # noqa: BLE001
        isa = f"unavailable ({e})"
    print(f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), cpu kernels: {isa}, "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}, M = {args.tokens}, fp32, "
          f"median of {args.rounds} interleaved rounds"
          + (f", cpu_base = the kernels of {args.baseline}" if args.baseline else "") + "\n")
    t0 = time.time()
    if not args.e2e_only:
        kernel_table(args.rounds, providers, bc.SHAPES, blocks, sparsities, args.modes.split(","),
                     M=args.tokens)
    if not args.no_e2e:
        e2e_table(args.rounds, bool(args.baseline))
        e2e_train_table(args.rounds, bool(args.baseline))
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
