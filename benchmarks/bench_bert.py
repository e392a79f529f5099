"""End-to-end: BERT-Base masked-LM training steps per second, dense vs block-pruned.

    python benchmarks/bench_bert.py [--out DIR] [--batch 128] [--seq 128] [--levels 0.5 0.9] [--block 64]
                                    [--head full|masked|both] [--compile] [--device cpu --tiny]

One training step = forward + MLM loss + backward + AdamW step, bf16 weights, random token ids
(timing only). The sparse model is the same BERT-Base after ``sparsebert.sparsify`` (encoder
linears + pooler block-sparse, backend ``auto``). Prints tokens/s and the speedup over dense eager.

``--head full`` is Hugging Face's loss (``model(input_ids, labels=...).loss``: the 30522-way decoder
and softmax over every token); ``--head masked`` is the study's ``mlm_loss``, which runs the
prediction head on the ~15% masked positions only (same loss value). ``--head both`` (default)
times both, for the dense model too, so every row compares with dense eager Hugging Face BERT.
``--device cpu --tiny`` is a quick smoke run of the same code without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
            vocab_size=1000)


def _model(sparsity, block, device, dtype, tiny=False):
    from transformers import BertConfig, BertForMaskedLM

    import sparsebert

    torch.manual_seed(0)
    cfg = BertConfig(**TINY) if tiny else BertConfig()   # BERT-Base: 12 layers, hidden 768, intermediate 3072
    model = BertForMaskedLM(cfg)
    if sparsity is not None:
        sparsebert.sparsify(model, sparsity=sparsity, block=(block, block))
    return model.to(device, dtype).train(), cfg


def _time_steps(model, cfg, batch, seq, steps, warmup, device, head="full", compiled=False):
    from sparsebert.study.pretrain import mlm_loss

    # torch.compile wraps the whole loss computation (a compiled module's .bert would run eager).
    if head == "masked":
        loss_fn = lambda ids, labels: mlm_loss(model, ids, labels)  # noqa: E731
    else:
        loss_fn = lambda ids, labels: model(input_ids=ids, labels=labels).loss  # noqa: E731
    if compiled:
        loss_fn = torch.compile(loss_fn)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    labels = ids.clone()
    labels[torch.rand(batch, seq, generator=g).to(device) > 0.15] = -100
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        loss = loss_fn(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):       # includes auto-dispatch timing and Triton autotuning
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    return batch * seq / dt, float(loss.detach())


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
    ap.add_argument("--head", choices=["full", "masked", "both"], default="both",
                    help="MLM head on every token (Hugging Face) or on the masked positions only")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny BERT (smoke test, e.g. on a CPU)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --device cpu --tiny for a smoke run)")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads = ["full", "masked"] if args.head == "both" else [args.head]
    rows = []
    variants = [("dense", None)] + [(f"block{args.block} {int(100 * s)}%", s) for s in args.levels]
    for name, s in variants:
        for head in heads:
            for compiled in ([False, True] if args.compile else [False]):
                model, cfg = _model(s, args.block, device, dtype, tiny=args.tiny)
                tps, loss = _time_steps(model, cfg, args.batch, args.seq, args.steps, args.warmup, device,
                                        head, compiled)
                rows.append(dict(model=name, head=head, compiled=compiled, tokens_per_s=tps, loss=loss))
                print(f"{name:<16} {head:<6} {'compile' if compiled else 'eager':<8} {tps / 1e3:9.1f} k tokens/s"
                      f"  (loss {loss:.3f})", flush=True)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    # The baseline is dense eager Hugging Face BERT as users run it: the full head.
    dense_eager = [r for r in rows if r["model"] == "dense" and not r["compiled"]]
    base = next((r for r in dense_eager if r["head"] == "full"), dense_eager[0])["tokens_per_s"]
    print(f"\n{'model':<16} {'head':<6} {'mode':<8} {'k tokens/s':>10} {'vs dense eager':>15}")
    for r in rows:
        print(f"{r['model']:<16} {r['head']:<6} {'compile' if r['compiled'] else 'eager':<8} "
              f"{r['tokens_per_s'] / 1e3:>10.1f} {r['tokens_per_s'] / base:>14.2f}x")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        with open(os.path.join(args.out, "bench_bert.json"), "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, batch=args.batch, seq=args.seq,
                           block=args.block, tiny=args.tiny, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
