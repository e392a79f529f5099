"""Per-forward Python overhead of an optimized model at inference: this tree against another
commit's ``sparsebert``, in one process, interleaved round by round (issue #14).

    python benchmarks/bench_overhead.py [--baseline d61a214] [--rounds 11] [--batch 1] [--seq 128]
                                        [--sparsity 0.9] [--block 32] [--out FILE]

Rows (each built the same way for this tree and for ``@base``, then ``model.eval()``, run under
``torch.inference_mode``):

* ``minilm``: a MiniLM-size ``BertModel`` (hidden 384, 6 layers, 12 heads, intermediate 1536,
  vocab 30522) after ``sparsify(sparsity, block)`` + ``optimize``, at ``batch x seq`` tokens;
* ``floor``: the same 6-layer structure at hidden 64 / intermediate 128 / 2 heads and 8 tokens,
  where the kernels cost next to nothing: its time is the Python (and dispatch) floor of a
  forward — what Hugging Face, sparsebert and PyTorch's module calls cost per forward;
* ``layer``: one ``BlockSparseLinear`` (64 -> 64, 32x32 blocks, half kept) called on 8 tokens,
  microseconds per call.

Times are the process's CPU time (``time.process_time``, one thread), each round the mean of
``--reps`` calls, median and minimum over the rounds (interference on a shared machine only adds
time). The outputs of this tree and the baseline are compared bit for bit (``torch.equal``). The
baseline package is exported as in ``bench_infer_ab.py`` (same compiled kernels).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _bert(pkg, cfg, sparsity, block):
    from transformers import BertModel
    torch.manual_seed(0)
    m = BertModel(copy.deepcopy(cfg))
    pkg.sparsify(m, sparsity=sparsity, block=(block, block))
    pkg.optimize(m)
    return m.eval()


def _layer(pkg):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    return pkg.BlockSparseLinear.from_dense(lin, 0.5, block=(32, 32)).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="d61a214", help="git commit of the 'before' package")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--reps", type=int, default=0, help="calls per round (default: per row)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--out", default=None, help="JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, HERE)
    from bench_infer_ab import _export_baseline
    from transformers import BertConfig
    tmp = tempfile.mkdtemp(prefix="sb_overhead_")
    _export_baseline(args.baseline, tmp)
    sys.path.insert(0, tmp)
    import sbbase

    import sparsebert
    pkgs = (("", sparsebert), ("@base", sbbase))
    minilm = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, vocab_size=30522)
    floor = BertConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=2,
                       intermediate_size=128, vocab_size=30522)
    rows = {}   # name -> (callable, reps, output getter)
    for tag, pkg in pkgs:
        m = _bert(pkg, minilm, args.sparsity, args.block)
        ids = torch.randint(0, 30522, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
        rows["minilm" + tag] = (lambda m=m, ids=ids: m(input_ids=ids).last_hidden_state, 5)
        f = _bert(pkg, floor, 0.5, 32)
        fids = torch.randint(0, 30522, (1, 8), generator=torch.Generator().manual_seed(3))
        rows["floor" + tag] = (lambda m=f, ids=fids: m(input_ids=ids).last_hidden_state, 100)
        lay = _layer(pkg)
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
        rows["layer" + tag] = (lambda m=lay, x=x: m(x), 2000)
    times = {k: [] for k in rows}
    with torch.inference_mode():
        outs = {k: f() for k, (f, _) in rows.items()}     # warm-up (auto timing) and outputs
        for _ in range(args.rounds):
            for k, (f, reps) in rows.items():
                reps = args.reps or reps
                c = time.process_time()
                for _ in range(reps):
                    f()
                times[k].append((time.process_time() - c) / reps)
    load = os.getloadavg()
    print(f"bench_overhead: baseline {args.baseline}, {args.rounds} rounds, 1 thread, "
          f"minilm batch {args.batch} x {args.seq} at {args.sparsity:.0%} ({args.block}x{args.block}), "
          f"load {load[0]:.1f} {load[1]:.1f}")
    res = {}
    for name, unit, scale in (("minilm", "ms", 1e3), ("floor", "ms", 1e3), ("layer", "us", 1e6)):
        cur, base = times[name], times[name + "@base"]
        same = torch.equal(outs[name], outs[name + "@base"])
        r = dict(median=scale * statistics.median(cur), min=scale * min(cur),
                 base_median=scale * statistics.median(base), base_min=scale * min(base), unit=unit,
                 bitwise_equal=same)
        res[name] = r
        print(f"  {name:<7} now median {r['median']:8.3f} {unit} (min {r['min']:8.3f})   "
              f"base median {r['base_median']:8.3f} {unit} (min {r['base_min']:8.3f})   "
              f"now/base median {r['median'] / r['base_median']:.3f}, min {r['min'] / r['base_min']:.3f}"
              f"   outputs bitwise equal: {same}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(vars(args), torch=torch.__version__, load=load, results=res), fh, indent=1)


if __name__ == "__main__":
    main()
