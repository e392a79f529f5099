"""CPU benchmarks of the compiled ``cpu`` backend (pytest-benchmark suite + shared helpers).

    .venv/bin/python -m pytest benchmarks/bench_cpu.py --benchmark-enable -q -p no:cacheprovider
    .venv/bin/python benchmarks/cpu_table.py            # the same grid as a Markdown table

Grid: fp32, M = 2048 tokens, 768 -> 3072 and 3072 -> 768, blocks 32 and 64, block sparsity
0/50/75/90% (a random layout with exactly that kept fraction); providers ``dense`` (F.linear),
``torch_bsr`` (``weight.to_sparse_bsr`` + F.linear; forward only), ``reference`` and ``cpu``
(``sparsebert.ops.bsr_linear`` with that backend); modes ``fwd`` and ``fwd_bwd``
(forward + backward into x, the kept blocks and the bias). Plus an end-to-end MiniLM-sized BERT
(inference tokens/s, dense vs 90% / 32x32 block-pruned).
"""
from __future__ import annotations

import functools
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, Optional, Union

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparsebert.layout import BlockLayout  # noqa: E402

M_TOKENS = 2048
SHAPES = [(768, 3072), (3072, 768)]          # (in_features K, out_features N)
BLOCKS = [32, 64]
SPARSITIES = [0.0, 0.5, 0.75, 0.9]
PROVIDERS = ["dense", "torch_bsr", "reference", "cpu"]
MODES = ["fwd", "fwd_bwd"]


def random_layout(N: int, K: int, block: int, sparsity: float, seed: int = 0) -> BlockLayout:
    """Exactly round((1 - sparsity) * blocks) kept blocks, at random positions."""
    R, C = N // block, K // block
    keep = round(R * C * (1.0 - sparsity))
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(R * C, dtype=torch.bool)
    mask[torch.randperm(R * C, generator=g)[:keep]] = True
    return BlockLayout.from_mask(mask.view(R, C), (block, block))


class Case:
    """Inputs of one (shape, block, sparsity) point, shared by all providers."""

    def __init__(self, K, N, block, sparsity, M=M_TOKENS, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.K, self.N, self.block, self.sparsity, self.M = K, N, block, sparsity, M
        self.layout = random_layout(N, K, block, sparsity, seed)
        self.kept = self.layout.density
        w = torch.randn(N, K, generator=g) / K ** 0.5
        self.weight = w * self.layout.element_mask()       # dense weight with the zeros
        self.values = self.layout.gather(w)
        self.bias = torch.randn(N, generator=g)
        self.x = torch.randn(M, K, generator=g)
        self.dy = torch.randn(M, N, generator=g)


@functools.lru_cache(maxsize=1)
def get_case(K, N, block, sparsity) -> Case:
    return Case(K, N, block, sparsity)


def _bsr_linear():
    try:
        from sparsebert.ops import bsr_linear
        return bsr_linear
    except Exception:  # pragma: no cover - the op layer is not there
        return None


def build(provider: str, mode: str, case: Case) -> Union[Callable[[], object], str]:
    """A no-argument function running ``provider`` in ``mode`` on ``case``, or why it cannot."""
    x, dy = case.x, case.dy
    if provider == "dense":
        w = case.weight.clone().requires_grad_(mode == "fwd_bwd")
        b = case.bias.clone().requires_grad_(mode == "fwd_bwd")
        if mode == "fwd":
            return lambda: F.linear(x, w, b)
        xg = x.clone().requires_grad_()

        def dense_fwd_bwd():
            F.linear(xg, w, b).backward(dy)
            xg.grad = w.grad = b.grad = None
        return dense_fwd_bwd
    if provider == "torch_bsr":
        if mode != "fwd":
            return "torch BSR has no CPU backward"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wb = case.weight.to_sparse_bsr((case.block, case.block))
                F.linear(x[:8], wb, case.bias)
        except Exception as e:  # noqa: BLE001
            return f"torch BSR unavailable: {type(e).__name__}: {e}"
        return lambda: F.linear(x, wb, case.bias)
    if provider == "cpu_base":
        fn = build("cpu", mode, case)
        return fn if isinstance(fn, str) else with_baseline(fn)
    if provider in ("reference", "cpu"):
        from sparsebert.ops import backends
        reason = backends.unavailable_reason(provider, "cpu")
        if reason is not None:
            return reason
        op = _bsr_linear()
        if op is None:
            return "sparsebert.ops.bsr_linear is not importable"
        v = case.values.clone().requires_grad_(mode == "fwd_bwd")
        b = case.bias.clone().requires_grad_(mode == "fwd_bwd")
        lay = case.layout
        if mode == "fwd":
            return lambda: op(x, v, lay, b, backend=provider)
        xg = x.clone().requires_grad_()

        def sparse_fwd_bwd():
            op(xg, v, lay, b, backend=provider).backward(dy)
            xg.grad = v.grad = b.grad = None
        return sparse_fwd_bwd
    raise ValueError(f"unknown provider {provider!r}")


# ---- a baseline build: another commit's CPU kernels, loaded beside this build's --------------
BASELINE_NS = "sparsebert_cpu_base"


def build_baseline(commit: str, build_dir: str) -> str:
    """Compile the CPU kernels (``csrc/cpu``) of git ``commit`` as a separate library whose ops live
    under ``torch.ops.sparsebert_cpu_base`` (the namespace renamed, so they load beside this
    build's), with the flags of setup.py; load it and return its path. For before/after timings
    interleaved in one process (``cpu_table.py --baseline``)."""
    import subprocess
    from torch.utils import cpp_extension
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src_dir = os.path.join(build_dir, "src")
    os.makedirs(src_dir, exist_ok=True)
    names = subprocess.run(["git", "ls-tree", "--name-only", commit, "csrc/cpu/"], cwd=root, check=True,
                           capture_output=True, text=True).stdout.split()
    sources = []
    for name in names:
        text = subprocess.run(["git", "show", f"{commit}:{name}"], cwd=root, check=True,
                              capture_output=True, text=True).stdout
        path = os.path.join(src_dir, os.path.basename(name))
        with open(path, "w") as f:
            f.write(text.replace("sparsebert_cpu", BASELINE_NS))
        if path.endswith(".cpp"):
            sources.append(path)
    cpp_extension.load(name=BASELINE_NS, sources=sources, build_directory=build_dir, is_python_module=False,
                       extra_cflags=["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast"],
                       extra_ldflags=["-fopenmp"])
    lib = os.path.join(build_dir, f"{BASELINE_NS}.so")
    torch.ops.load_library(lib)
    return lib


def with_baseline(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` (a ``cpu`` provider, a model with cpu layers) run on the baseline build's kernels:
    the cpu backend's op namespace is swapped for the call."""
    from sparsebert.ops import cpu_bsr
    ops = getattr(torch.ops, BASELINE_NS)

    def run():
        # forward() keeps the op it resolved in _fwd_op: swap that too, or the "baseline" forward
        # would silently run the current build after the first call
        saved = cpu_bsr._require, cpu_bsr._fwd_op
        cpu_bsr._require, cpu_bsr._fwd_op = (lambda: ops), ops.forward.default
        try:
            return fn()
        finally:
            cpu_bsr._require, cpu_bsr._fwd_op = saved
    return run


def time_interleaved(fns: Dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 1,
                     max_seconds: float = 60.0) -> Dict[str, float]:
    """Median seconds per call of each function, the functions interleaved round by round so a
    change in machine load hits them all alike (the dev machine is shared)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, list] = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and r >= 2:
            break
    return {k: statistics.median(v) for k, v in times.items()}


# ---- end to end: a MiniLM-sized BERT ------------------------------------------------------
E2E = dict(hidden=384, layers=6, heads=12, intermediate=1536, seq=128, batch=16)


def build_bert(sparsity: Optional[float], block=(32, 32), backend="cpu", fuse_activation=True):
    """Random-weight BertModel (eval); ``sparsity`` None = dense, else block-pruned linears (with
    the intermediate GELU fused into the sparse layer unless ``fuse_activation`` is False)."""
    from transformers import BertConfig, BertModel
    cfg = BertConfig(hidden_size=E2E["hidden"], num_hidden_layers=E2E["layers"],
                     num_attention_heads=E2E["heads"], intermediate_size=E2E["intermediate"],
                     max_position_embeddings=512)
    torch.manual_seed(0)
    model = BertModel(cfg).eval()
    if sparsity is not None:
        import sparsebert
        sparsebert.sparsify(model, sparsity, block=block, backend=backend,
                            fuse_activation=fuse_activation)
    return model


def bert_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 30000, (E2E["batch"], E2E["seq"]), generator=g)


# ---- pytest-benchmark suite ---------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"s{int(s * 100)}")
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
def test_cpu_kernel(benchmark, shape, block, sparsity, provider, mode):
    case = get_case(shape[0], shape[1], block, sparsity)
    fn = build(provider, mode, case)
    if isinstance(fn, str):
        pytest.skip(f"{provider}: {fn}")
    benchmark.extra_info.update(kept=case.kept, M=case.M)
    rounds = 2 if provider == "reference" else 5
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize("variant", ["dense", "cpu_s90_b32"])
def test_bert_e2e(benchmark, variant):
    pytest.importorskip("transformers")
    if variant != "dense":
        from sparsebert.ops import backends
        reason = backends.unavailable_reason("cpu", "cpu")
        if reason is not None:
            pytest.skip(reason)
    model = build_bert(None if variant == "dense" else 0.9)
    ids = bert_inputs()

    def run():
        with torch.inference_mode():
            model(input_ids=ids)
    benchmark.extra_info["tokens"] = ids.numel()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
