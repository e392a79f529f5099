"""Encoder inference before/after: this tree's ``sparsebert`` against another commit's, in one
process, interleaved round by round (CPU mode of ``bench_bert.py``'s MiniLM-size model).

    python benchmarks/bench_infer_ab.py --baseline COMMIT [--block 32] [--levels 0 0.5 0.9]
                                        [--batches 1 8 64] [--rounds 11] [--full-layout-dense]

The baseline's Python package is exported (``git archive``) to a temporary directory as
``sbbase`` (its ``sparsebert::`` custom ops renamed ``sbbase::``) and shares this build's
``sparsebert._C`` (so the kernels are the same: this compares the Python layers, ``optimize``
and the dense backend, not the C++ kernels — ``cpu_table.py --baseline`` does those). Rows: dense
Hugging Face (the baseline of every ratio), dense + ``optimize``, and each level after
``sparsify`` + ``optimize``, for this tree and ``@base``. Times: the process's CPU time per
``model.bert(ids)`` call (``time.process_time``, one thread), median and minimum over the rounds
(interference on a shared machine only adds time, so the minimum is the steadier figure).
``--full-layout-dense``: this tree's ``auto`` takes the dense backend for full layouts (an
experiment on ``backends.choose``, which this tree does not own).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _export_baseline(commit: str, dest: str) -> None:
    tar = subprocess.run(["git", "-C", ROOT, "archive", commit, "sparsebert"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=tar, check=True)
    pkg = os.path.join(dest, "sbbase")
    os.rename(os.path.join(dest, "sparsebert"), pkg)
    for d, _, files in os.walk(pkg):
        for f in files:
            p = os.path.join(d, f)
            if f.endswith(".py"):
                s = open(p).read()
                s2 = s.replace('"sparsebert.ops.', '"sbbase.ops.').replace("sparsebert::", "sbbase::")
                if s2 != s:
                    open(p, "w").write(s2)
    import sparsebert
    so = [f for f in os.listdir(os.path.dirname(sparsebert.__file__)) if f.startswith("_C") and f.endswith(".so")]
    for f in so:
        os.symlink(os.path.join(os.path.dirname(sparsebert.__file__), f), os.path.join(pkg, f))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="git commit of the 'before' sparsebert package")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--rounds", type=int, default=11, help="interleaved rounds (half, at least 3, at batch >= 64)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--full-layout-dense", action="store_true")
    ap.add_argument("--out", default=None, help="JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="sb_ab_")
    _export_baseline(args.baseline, tmp)
    sys.path.insert(0, tmp)
    sys.path.insert(0, HERE)
    import sbbase
    from transformers import BertForMaskedLM

    import bench_bert as bb
    import sparsebert
    if args.full_layout_dense:
        from sparsebert.ops import backends
        real = backends.choose
        backends.choose = lambda x, v, lay, train=False: (
            "dense" if backends._layout_key(lay)[2] == 1.0 and x.device.type == "cpu" else real(x, v, lay, train))
    cpu = torch.device("cpu")
    cfg = bb._config(cpu, False)

    def build(pkg, sparsity, optimized):
        torch.manual_seed(0)
        import copy
        m = BertForMaskedLM(copy.deepcopy(cfg))
        if sparsity is not None:
            pkg.sparsify(m, sparsity=sparsity, block=(args.block, args.block))
        if optimized:
            pkg.optimize(m)
        return m.eval()

    models = {"dense": build(sparsebert, None, False)}
    for tag, pkg in (("", sparsebert), ("@base", sbbase)):
        models["dense + optimize" + tag] = build(pkg, None, True)
        for s in args.levels:
            models[f"{round(100 * s)}%{tag}"] = build(pkg, s, True)
    res = {}
    for b in args.batches:
        ids, _ = bb._inputs(cfg, b, args.seq, cpu, seed=2)
        ts = {k: [] for k in models}
        n = args.rounds if b < 64 else max(3, args.rounds // 2)
        with torch.inference_mode():
            for m in models.values():
                m.bert(input_ids=ids)
            for _ in range(n):
                for k, m in models.items():
                    c = time.process_time()
                    m.bert(input_ids=ids)
                    ts[k].append(time.process_time() - c)
        med0, min0 = statistics.median(ts["dense"]), min(ts["dense"])
        res[b] = {k: dict(median_ms=1e3 * statistics.median(v), min_ms=1e3 * min(v),
                          x_dense_median=med0 / statistics.median(v), x_dense_min=min0 / min(v))
                  for k, v in ts.items()}
        print(f"batch {b} ({n} rounds, load {os.getloadavg()[0]:.1f}):", flush=True)
        for k, r in res[b].items():
            print(f"  {k:<22} median {r['median_ms']:8.1f} ms ({r['x_dense_median']:.2f}x)   "
                  f"min {r['min_ms']:8.1f} ms ({r['x_dense_min']:.2f}x)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(baseline=args.baseline, block=args.block, seq=args.seq, threads=1,
                           full_layout_dense=args.full_layout_dense, torch=torch.__version__,
                           load=os.getloadavg(), results=res), f, indent=1)


if __name__ == "__main__":
    main()
