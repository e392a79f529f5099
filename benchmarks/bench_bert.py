"""End-to-end: BERT-Base masked-LM training steps per second, dense vs block-pruned.

    python benchmarks/bench_bert.py [--out DIR] [--batch 128] [--seq 128] [--levels 0.5 0.9] [--block 64]

One training step = forward + MLM loss + backward + AdamW step, bf16 weights, random token ids
(timing only). The sparse model is the same BERT-Base after ``sparsebert.sparsify`` (encoder
linears + pooler block-sparse, backend ``auto``). Prints tokens/s and the speedup over dense eager.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _model(sparsity, block, device, dtype):
    from transformers import BertConfig, BertForMaskedLM

    import sparsebert

    torch.manual_seed(0)
    cfg = BertConfig()   # BERT-Base: 12 layers, hidden 768, intermediate 3072
    model = BertForMaskedLM(cfg)
    if sparsity is not None:
        sparsebert.sparsify(model, sparsity=sparsity, block=(block, block))
    return model.to(device, dtype).train(), cfg


def _time_steps(model, cfg, batch, seq, steps, warmup, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    labels = ids.clone()
    labels[torch.rand(batch, seq, generator=g).to(device) > 0.15] = -100

    def step():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):       # includes auto-dispatch timing and Triton autotuning
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return batch * seq / dt, float(loss)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.9])
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    variants = [("dense", None)] + [(f"block{args.block} {int(100 * s)}%", s) for s in args.levels]
    for name, s in variants:
        for compiled in ([False, True] if args.compile else [False]):
            model, cfg = _model(s, args.block, device, dtype)
            run = torch.compile(model) if compiled else model
            tps, loss = _time_steps(run, cfg, args.batch, args.seq, args.steps, args.warmup, device)
            rows.append(dict(model=name, compiled=compiled, tokens_per_s=tps, loss=loss))
            print(f"{name:<16} {'compile' if compiled else 'eager':<8} {tps / 1e3:9.1f} k tokens/s  (loss {loss:.3f})",
                  flush=True)
            del model, run
            torch.cuda.empty_cache()
    base = {r["compiled"]: r["tokens_per_s"] for r in rows if r["model"] == "dense"}
    print(f"\n{'model':<16} {'mode':<8} {'k tokens/s':>10} {'vs dense eager':>15}")
    for r in rows:
        print(f"{r['model']:<16} {'compile' if r['compiled'] else 'eager':<8} {r['tokens_per_s'] / 1e3:>10.1f} "
              f"{r['tokens_per_s'] / base[False]:>14.2f}x")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_bert.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, batch=args.batch,
                           seq=args.seq, block=args.block, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
