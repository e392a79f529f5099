"""MiniLM-size encoder inference with this build's CPU kernels against a baseline commit's kernels,
in one process, interleaved round by round (for kernel changes; ``bench_infer_ab.py`` compares
the Python layers and shares one build's kernels).

    .venv/bin/python benchmarks/bench_gelu_e2e.py --baseline COMMIT [--levels 0.9] [--block 32] \\
        [--batches 8 64] [--rounds 11] [--out F.json]

The baseline's csrc/cpu is compiled beside this build (``bench_cpu.build_baseline``) and swapped in
for a call by ``bench_cpu.with_baseline`` (the cpu backend's op namespace and its cached forward
op). The same model object (``sparsify`` + ``optimize``, bench_bert.py's config) runs both.
Times: the process's CPU time per ``model.bert(ids)`` (one thread), median and minimum.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.9])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--build-dir", default=os.path.join(tempfile.gettempdir(), "sb_gelu_baseline"))
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import BertForMaskedLM

    import bench_bert as bb
    import sparsebert
    from bench_cpu import build_baseline, with_baseline
    build_baseline(a.baseline, a.build_dir)
    cpu = torch.device("cpu")
    cfg = bb._config(cpu, False)
    models = {}
    for s in a.levels:
        torch.manual_seed(0)
        m = BertForMaskedLM(cfg)
        sparsebert.sparsify(m, sparsity=s, block=(a.block, a.block))
        sparsebert.optimize(m)
        models[f"{round(100 * s)}%"] = m.eval()
    res = {}
    for b in a.batches:
        ids, _ = bb._inputs(cfg, b, a.seq, cpu, seed=2)
        fns = {}
        for k, m in models.items():
            fns[k] = (lambda m=m: m.bert(input_ids=ids))
            fns[k + "@base"] = with_baseline(lambda m=m: m.bert(input_ids=ids))
        ts = {k: [] for k in fns}
        with torch.inference_mode():
            outs = {k: f().last_hidden_state for k, f in fns.items()}
            for k in models:
                d = (outs[k] - outs[k + "@base"]).abs().max().item()
                print(f"{k} batch {b}: max |new - base| of the last hidden state {d:.2e}")
            for _ in range(a.rounds):
                for k, f in fns.items():
                    c = time.process_time()
                    f()
                    ts[k].append(time.process_time() - c)
        res[b] = {k: dict(median_ms=1e3 * statistics.median(v), min_ms=1e3 * min(v)) for k, v in ts.items()}
        print(f"batch {b} ({a.rounds} rounds, load {os.getloadavg()[0]:.1f}):", flush=True)
        for k, r in res[b].items():
            print(f"  {k:<10} median {r['median_ms']:8.1f} ms   min {r['min_ms']:8.1f} ms", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(baseline=a.baseline, block=a.block, seq=a.seq, threads=1, torch=torch.__version__,
                           load=os.getloadavg(), results=res), f, indent=1)


if __name__ == "__main__":
    main()
