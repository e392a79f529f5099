"""The quick kernel demo: prune a small BERT at several levels and compare with dense."""
from __future__ import annotations

import copy
import time

import torch


def _time(fn, reps=5):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn(); sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); sync()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def run_demo(levels=(0.0, 0.5, 0.75, 0.9), block=32, tokens=2048, hidden=384, layers=2):
    from transformers import BertConfig, BertModel

    from .hf import densify, kept_table, sparsify
    from .ops import backends

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                     intermediate_size=4 * hidden)
    dense = BertModel(cfg).to(dev, dtype).eval()
    seq = 128
    ids = torch.randint(0, cfg.vocab_size, (max(1, tokens // seq), seq), device=dev)
    print(f"small BERT (hidden {hidden}, {layers} layers) on {dev} ({dtype}), {ids.numel()} tokens, "
          f"block {block}x{block}; backends: "
          + ", ".join(n for n, r in backends.report(dev).items() if r is None))
    t_dense = _time(lambda: dense(input_ids=ids))
    print(f"{'sparsity':>8} {'kept':>6} {'drift vs masked dense':>22} {'forward ms':>11} {'vs dense':>9}")
    print(f"{'dense':>8} {1.0:>6.3f} {'-':>22} {t_dense * 1e3:>11.1f} {1.0:>8.2f}x")
    for s in levels:
        model = sparsify(copy.deepcopy(dense), sparsity=s, block=(block, block))
        kept = [k for *_, k in kept_table(model)]
        ref = densify(copy.deepcopy(model))             # same weights, dense layers
        y, y_ref = model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state
        drift = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
        t = _time(lambda: model(input_ids=ids))
        print(f"{s:>8.2f} {sum(kept) / len(kept):>6.3f} {drift:>22.2e} {t * 1e3:>11.1f} {t_dense / t:>8.2f}x")
