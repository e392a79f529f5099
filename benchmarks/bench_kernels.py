"""Kernel benchmarks: block-sparse linear vs dense, PyTorch BSR, 2:4 and the sparsebert backends.

Grid: shapes (in -> out) 768->768, 768->3072, 3072->768 (BERT-Base); M = 16384 tokens; bf16;
blocks 64, 32, 128 (that order: a run cut by ``--budget-s`` keeps the blocks the targets name);
block sparsity 0/50/75/90 % (random layouts keeping exactly that fraction of blocks). Providers:
``dense`` (cuBLAS on the densified weight), ``torch_bsr`` (PyTorch's BSR @ dense, forward),
``semi_structured_2:4`` (PyTorch's 2:4 sparse matmul where it runs: 50% only, forward),
``triton``, ``cuda`` (the backends, through ``sparsebert.ops.backends.get``), ``auto`` (the public
op ``bsr_linear(..., backend="auto")`` with autograd: what a layer runs). Modes: ``fwd``
(Y = X Wᵀ + b), ``fwd_bwd`` (Y, dX = dY W, dW on kept blocks, db), ``dx`` (grad_input) and ``dw``
(grad_weight; dense: the full dYᵀ X).

Roofline (per case and mode): ``t_ideal = max(kept * t_dense, bytes_min / bandwidth)``, bandwidth
from a device-to-device copy in the same run, ``bytes_min`` each operand read once and each output
written once: fwd X + Y + kept blocks + bias; dx dY + dX + kept blocks; dw X + dY + kept blocks;
fwd_bwd the forward plus dY read twice, dX written, X read again and dW's kept blocks.
``frac_ideal = t_ideal / t`` (1.0 = at the roofline); ``block_eff = kept * t_dense / t`` (the time
a dense GEMM would spend on the kept blocks over the time taken: per-block efficiency, the
speedup over dense at 0%).

Usage::

    python benchmarks/bench_kernels.py --out DIR [--quick] [--budget-s 180] [--providers ...]

Writes DIR/bench_kernels.{json,txt,png} (the JSON after every case, so a run cut short keeps its
numbers). ``--dry-run`` runs a tiny grid on the CPU (Triton interpreter, CPU-time timer) to check
every code path without a GPU (``benchmarks/test_bench_kernels.py`` runs it in CI).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from sparsebert.layout import BlockLayout  # noqa: E402
from sparsebert.ops import backends  # noqa: E402

SHAPES = [(768, 768), (768, 3072), (3072, 768)]   # (in_features K, out_features N)
BLOCKS = [64, 32, 128]
SPARSITIES = [0.0, 0.5, 0.75, 0.9]
M_TOKENS = 16384
DTYPE = torch.bfloat16
N_SETS = 3                                         # input sets rotated so none sits in L2
QUICK = dict(shapes=[(768, 3072)], blocks=[64], sparsities=[0.0, 0.5, 0.9])
DRY = dict(shapes=[(128, 256)], blocks=[64, 32, 128], sparsities=[0.0, 0.5])
PROVIDERS = ["dense", "torch_bsr", "semi_structured_2:4", "triton", "cuda", "auto"]
MODES = ["fwd", "fwd_bwd", "dx", "dw"]


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
def random_layout(N: int, K: int, block: int, sparsity: float, seed: int = 0) -> BlockLayout:
    """A random layout keeping exactly round((1 - sparsity) * blocks) blocks."""
    R, C = N // block, K // block
    kept = int(round((1.0 - sparsity) * R * C))
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(R * C, dtype=torch.bool)
    mask[torch.randperm(R * C, generator=g)[:kept]] = True
    return BlockLayout.from_mask(mask.view(R, C), (block, block), (N, K))


@dataclass
class Case:
    K: int
    N: int
    block: int
    sparsity: float
    M: int
    dtype: torch.dtype
    device: torch.device
    layout: BlockLayout
    xs: List[torch.Tensor]
    dys: List[torch.Tensor]
    weight: torch.Tensor          # dense [N, K] with zeros outside the kept blocks
    values: torch.Tensor          # [nnz, bn, bk]
    bias: torch.Tensor
    _i: int = field(default=0)

    @property
    def kept(self) -> float:
        return self.layout.density

    def next(self) -> int:
        self._i = (self._i + 1) % len(self.xs)
        return self._i

    @property
    def tag(self) -> str:
        return f"{self.K}->{self.N} b{self.block} s{int(round(self.sparsity * 100))}%"


def make_case(K, N, block, sparsity, M=M_TOKENS, dtype=DTYPE, device="cuda", n_sets=N_SETS, seed=0) -> Case:
    device = torch.device(device)
    layout = random_layout(N, K, block, sparsity, seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(device, dtype)
    w = w * layout.element_mask().to(device, dtype)
    values = layout.gather(w).contiguous()
    bias = torch.randn(N, generator=g).to(device, dtype)
    xs = [torch.randn(M, K, device=device, dtype=dtype) for _ in range(n_sets)]
    dys = [torch.randn(M, N, device=device, dtype=dtype) for _ in range(n_sets)]
    return Case(K, N, block, sparsity, M, dtype, device, layout, xs, dys, w, values, bias)


def bytes_min(case: Case, mode: str) -> int:
    """Fewest bytes a mode must move through device memory (each input read once, each output
    written once)."""
    e = torch.empty(0, dtype=case.dtype).element_size()
    M, K, N = case.M, case.K, case.N
    blocks = case.layout.nnz * case.block * case.block
    fwd = (M * K + M * N + blocks + N) * e
    if mode == "fwd":
        return fwd
    if mode == "dx":
        return (M * N + M * K + blocks) * e
    if mode == "dw":
        return (M * K + M * N + blocks) * e
    if mode == "fwd_bwd":
        return fwd + (2 * M * N + M * K + M * K + blocks) * e
    raise ValueError(f"unknown mode {mode!r}")


# ---------------------------------------------------------------------------------------------
# Providers: name -> (forward fn, forward+backward fn or None), or a string saying why not
# ---------------------------------------------------------------------------------------------
def _dense(case: Case):
    w, b = case.weight, case.bias

    def fwd():
        i = case.next()
        return F.linear(case.xs[i], w, b)

    def fwd_bwd():
        i = case.next()
        x, dy = case.xs[i], case.dys[i]
        y = F.linear(x, w, b)
        return y, dy @ w, dy.t() @ x, dy.sum(0)

    def dx():
        i = case.next()
        return case.dys[i] @ w

    def dw():
        i = case.next()
        return case.dys[i].t() @ case.xs[i]

    return fwd, fwd_bwd, dx, dw


def _torch_bsr(case: Case):
    w_bsr = case.weight.to_sparse_bsr((case.block, case.block))
    b = case.bias
    try:
        from torch.sparse._triton_ops import bsr_dense_mm
        if bsr_dense_mm is None:
            raise ImportError("bsr_dense_mm unavailable")

        def fwd():
            i = case.next()
            return bsr_dense_mm(w_bsr, case.xs[i].t()).t() + b   # (W Xᵀ)ᵀ
        fwd()
    except Exception:
        def fwd():   # cuSPARSE / generic BSR @ dense
            i = case.next()
            return (w_bsr @ case.xs[i].t()).t() + b
        fwd()
    return fwd, None


def _semi_structured(case: Case):
    if abs(case.sparsity - 0.5) > 1e-6:
        return "2:4 is 50% only"
    from torch.sparse import to_sparse_semi_structured
    w = case.weight.clone()
    # A 2:4 pattern: keep the 2 largest of every 4 (its own 50% sparsity, not the block layout).
    g = w.abs().view(-1, 4)
    idx = g.topk(2, dim=1).indices
    m = torch.zeros_like(g, dtype=torch.bool).scatter_(1, idx, True).view_as(w)
    w_ss = to_sparse_semi_structured(w * m)
    b = case.bias

    def fwd():
        i = case.next()
        return F.linear(case.xs[i], w_ss, b)

    fwd()
    return fwd, None


def _sparsebert(name: str):
    def build(case: Case):
        try:
            mod = backends.get(name)
        except Exception as e:
            return f"cannot load: {type(e).__name__}: {e}"
        lt = case.layout.tensors(case.device)
        why = backends.unsupported_reason(name, case.xs[0], case.values, lt)
        if why is not None:
            return why
        v, b = case.values, case.bias

        def fwd():
            i = case.next()
            return mod.forward(case.xs[i], v, b, lt)

        def fwd_bwd():
            i = case.next()
            x, dy = case.xs[i], case.dys[i]
            y = mod.forward(x, v, b, lt)
            if hasattr(mod, "grad_weight_bias"):
                return (y, mod.grad_input(dy, v, lt)) + tuple(mod.grad_weight_bias(x, dy, lt))
            return y, mod.grad_input(dy, v, lt), mod.grad_weight(x, dy, lt), dy.sum(0)

        def dx():
            i = case.next()
            return mod.grad_input(case.dys[i], v, lt)

        def dw():
            i = case.next()
            return mod.grad_weight(case.xs[i], case.dys[i], lt)

        # First calls compile / autotune; keep that out of the timings.
        fwd()
        fwd_bwd()
        return fwd, fwd_bwd, dx, dw
    return build


def _auto(case: Case):
    """The public op, ``sparsebert.bsr_linear(..., backend="auto")``, with autograd: what a
    BlockSparseLinear layer runs (dispatch and op overheads included)."""
    import sparsebert

    v = case.values.detach().clone().requires_grad_()
    b = case.bias.detach().clone().requires_grad_()
    xs = [x.detach().clone().requires_grad_() for x in case.xs]

    def fwd():
        i = case.next()
        with torch.no_grad():
            return sparsebert.bsr_linear(case.xs[i], case.values, case.layout, case.bias, backend="auto")

    def fwd_bwd():
        i = case.next()
        x = xs[i]
        x.grad = v.grad = b.grad = None
        sparsebert.bsr_linear(x, v, case.layout, b, backend="auto").backward(case.dys[i])

    fwd()
    fwd_bwd()
    return fwd, fwd_bwd


BUILDERS: Dict[str, Callable] = {
    "dense": _dense,
    "torch_bsr": _torch_bsr,
    "semi_structured_2:4": _semi_structured,
    "triton": _sparsebert("triton"),
    "cuda": _sparsebert("cuda"),
    "auto": _auto,
}


def build_provider(name: str, case: Case):
    """(fwd, fwd_bwd or None), or a string with the reason it is n/a."""
    try:
        return BUILDERS[name](case)
    except Exception as e:  # an unsupported torch feature on this GPU/stack
        return f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def time_fn(fn, device: torch.device, warmup_ms: int = 10, rep_ms: int = 50) -> float:
    """Median seconds of one call (triton.testing.do_bench, CUDA events, on CUDA; this process's
    CPU time, median of 3, on the CPU)."""
    if device.type == "cuda":
        import triton.testing
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e-3
    ts = []
    for _ in range(3):
        t = time.process_time()
        fn()
        ts.append(time.process_time() - t)
    return max(statistics.median(ts), 1e-9)


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + written)."""
    if device.type != "cuda":
        nbytes = 1 << 24
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup_ms=5, rep_ms=50)
    return 2 * nbytes / t


def run_case(case: Case, providers, bandwidth: float, rep_ms: int = 50) -> List[dict]:
    rows = []
    providers = list(providers)
    if "dense" not in providers:       # the baseline every ratio needs
        providers = ["dense"] + providers
    built = {p: build_provider(p, case) for p in providers}
    t_dense = {}
    dense = built["dense"]
    if isinstance(dense, tuple):
        for mode, fn in zip(MODES, dense):
            t_dense[mode] = time_fn(fn, case.device, rep_ms=rep_ms)
    ideal = {mode: max(case.kept * t_dense[mode], bytes_min(case, mode) / bandwidth) if mode in t_dense
             else bytes_min(case, mode) / bandwidth for mode in MODES}
    for p in providers:
        row = dict(shape=f"{case.K}->{case.N}", K=case.K, N=case.N, block=case.block,
                   sparsity=case.sparsity, kept=case.kept, M=case.M, dtype=str(case.dtype), provider=p)
        for mode in MODES:
            row[f"ideal_{mode}_s"] = ideal[mode]
        b = built[p]
        if isinstance(b, str):
            row["note"] = b
            rows.append(row)
            continue
        fns = list(b) + [None] * (len(MODES) - len(b))
        for mode, fn in zip(MODES, fns):
            if fn is None:
                continue
            try:
                t = t_dense[mode] if (p == "dense" and mode in t_dense) else time_fn(fn, case.device, rep_ms=rep_ms)
            except Exception as e:
                row["note"] = f"{mode} failed: {type(e).__name__}: {e}"[:200]
                continue
            row[f"{mode}_s"] = t
            row[f"{mode}_frac_ideal"] = ideal[mode] / t
            if mode in t_dense:
                row[f"{mode}_speedup"] = t_dense[mode] / t
                row[f"{mode}_block_eff"] = case.kept * t_dense[mode] / t
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "n/a"


def format_table(rows: List[dict]) -> str:
    head = (f"{'shape':>10} {'blk':>4} {'spars':>5} {'provider':>20} | {'fwd µs':>8} {'x dense':>7} "
            f"{'/ideal':>6} | {'f+b µs':>8} {'x dense':>7} {'/ideal':>6} | {'dX µs':>7} {'/ideal':>6} | "
            f"{'dW µs':>7} {'/ideal':>6}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        us = lambda k: r[k] * 1e6 if k in r else None
        lines.append(
            f"{r['shape']:>10} {r['block']:>4} {r['sparsity'] * 100:>4.0f}% {r['provider']:>20} | "
            f"{_fmt(us('fwd_s'), '8.1f'):>8} {_fmt(r.get('fwd_speedup'), '7.2f'):>7} "
            f"{_fmt(r.get('fwd_frac_ideal'), '6.2f'):>6} | {_fmt(us('fwd_bwd_s'), '8.1f'):>8} "
            f"{_fmt(r.get('fwd_bwd_speedup'), '7.2f'):>7} {_fmt(r.get('fwd_bwd_frac_ideal'), '6.2f'):>6} | "
            f"{_fmt(us('dx_s'), '7.1f'):>7} {_fmt(r.get('dx_frac_ideal'), '6.2f'):>6} | "
            f"{_fmt(us('dw_s'), '7.1f'):>7} {_fmt(r.get('dw_frac_ideal'), '6.2f'):>6}  {r.get('note', '')}")
    return "\n".join(lines)


def _geomean(vals):
    vals = [v for v in vals if isinstance(v, (int, float)) and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def summary(rows: List[dict]) -> List[dict]:
    """Per (provider, block): the issue-15 target quantities, as geomeans over the shapes (and
    over 50/75/90% for the roofline fractions); min over sparsities for auto's speedup."""
    out = []
    for p in sorted({r["provider"] for r in rows}):
        for blk in sorted({r["block"] for r in rows}):
            sub = [r for r in rows if r["provider"] == p and r["block"] == blk]
            if not sub:
                continue
            sparse = [r for r in sub if r["sparsity"] >= 0.5]
            zero = [r for r in sub if r["sparsity"] == 0.0]
            out.append(dict(
                provider=p, block=blk,
                block_eff_0=_geomean([r.get("fwd_block_eff") for r in zero]),
                fwd_bwd_block_eff_0=_geomean([r.get("fwd_bwd_block_eff") for r in zero]),
                fwd_frac_ideal=_geomean([r.get("fwd_frac_ideal") for r in sparse]),
                fwd_bwd_frac_ideal=_geomean([r.get("fwd_bwd_frac_ideal") for r in sparse]),
                dx_frac_ideal=_geomean([r.get("dx_frac_ideal") for r in sparse]),
                dw_frac_ideal=_geomean([r.get("dw_frac_ideal") for r in sparse]),
                min_fwd_speedup=min((r["fwd_speedup"] for r in sub if "fwd_speedup" in r), default=None),
                min_fwd_bwd_speedup=min((r["fwd_bwd_speedup"] for r in sub if "fwd_bwd_speedup" in r), default=None),
            ))
    return out


def format_summary(summ: List[dict]) -> str:
    head = (f"{'provider':>20} {'blk':>4} | {'eff@0% fwd':>10} {'f+b':>5} | {'/ideal 50-90% fwd':>17} "
            f"{'f+b':>5} {'dX':>5} {'dW':>5} | {'min x dense fwd':>15} {'f+b':>5}")
    lines = ["summary (geomeans over shapes; /ideal over 50/75/90%; targets: eff@0% >= 0.85 (b64) / 0.7 (b32), "
             "fwd /ideal >= 0.8 (b64) / 0.6 (b32), f+b >= 0.7, auto min x dense >= 0.95)", head, "-" * len(head)]
    for r in summ:
        lines.append(f"{r['provider']:>20} {r['block']:>4} | {_fmt(r['block_eff_0'], '10.2f'):>10} "
                     f"{_fmt(r['fwd_bwd_block_eff_0'], '5.2f'):>5} | {_fmt(r['fwd_frac_ideal'], '17.2f'):>17} "
                     f"{_fmt(r['fwd_bwd_frac_ideal'], '5.2f'):>5} {_fmt(r['dx_frac_ideal'], '5.2f'):>5} "
                     f"{_fmt(r['dw_frac_ideal'], '5.2f'):>5} | {_fmt(r['min_fwd_speedup'], '15.2f'):>15} "
                     f"{_fmt(r['min_fwd_bwd_speedup'], '5.2f'):>5}")
    return "\n".join(lines)


def plot(rows: List[dict], path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"no plot: {e}"
    groups = sorted({(r["shape"], r["block"]) for r in rows}, key=str)
    fig, axes = plt.subplots(len(MODES), len(groups), figsize=(3.6 * len(groups), 3.2 * len(MODES)),
                             squeeze=False)
    for j, (shape, block) in enumerate(groups):
        sub = [r for r in rows if r["shape"] == shape and r["block"] == block]
        for i, mode in enumerate(MODES):
            ax = axes[i][j]
            for p in sorted({r["provider"] for r in sub}):
                pts = sorted((r["sparsity"], r[f"{mode}_speedup"]) for r in sub
                             if r["provider"] == p and f"{mode}_speedup" in r)
                if pts:
                    ax.plot([100 * s for s, _ in pts], [v for _, v in pts], "o-", label=p)
            dense = {r["sparsity"]: r[f"{mode}_s"] for r in sub if r["provider"] == "dense" and f"{mode}_s" in r}
            ideal = sorted((r["sparsity"], dense[r["sparsity"]] / r[f"ideal_{mode}_s"]) for r in sub
                           if r["provider"] == "dense" and r["sparsity"] in dense)
            if ideal:
                ax.plot([100 * s for s, _ in ideal], [v for _, v in ideal], "k--", label="roofline ideal")
            ax.set_title(f"{shape} b{block} {mode}", fontsize=9)
            ax.set_xlabel("block sparsity %")
            ax.set_ylabel("speedup vs dense")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _write(out_dir, info, rows, partial):
    with open(os.path.join(out_dir, "bench_kernels.json"), "w") as f:
        json.dump(dict(info=info, rows=rows, summary=summary(rows), partial=partial), f, indent=1)


def run(out_dir: str, quick: bool = False, dry_run: bool = False, providers=None,
        budget_s: Optional[float] = None, rep_ms: Optional[int] = None, grid: Optional[dict] = None) -> List[dict]:
    os.makedirs(out_dir, exist_ok=True)
    grid_ = dict(shapes=SHAPES, blocks=BLOCKS, sparsities=SPARSITIES)
    M, device, n_sets, rep = M_TOKENS, torch.device("cuda"), N_SETS, 50
    if quick:
        grid_, rep = QUICK, 25
    if dry_run:   # CPU, Triton interpreter: a tiny grid that exercises every code path
        grid_ = DRY
        M, device, rep, n_sets = 64, torch.device("cpu"), 1, 2
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the benchmark needs a GPU (or --dry-run for a CPU check)")
    rep = rep_ms or rep
    grid = dict(grid_, **(grid or {}))
    providers = providers or PROVIDERS
    unknown = [p for p in providers if p not in BUILDERS]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; choose from {PROVIDERS}")
    bw = measure_bandwidth(device)
    info = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                torch=torch.__version__, bandwidth_GBps=bw / 1e9, M=M, dtype=str(DTYPE), quick=quick,
                dry_run=dry_run, rep_ms=rep, budget_s=budget_s, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                command=" ".join(sys.argv))
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        pass
    print(f"# {info}", flush=True)
    rows, skipped = [], []
    t0 = time.time()
    cases = [(K, N, block, sp) for block in grid["blocks"] for (K, N) in grid["shapes"] for sp in grid["sparsities"]]
    for K, N, block, sp in cases:
        if budget_s is not None and time.time() - t0 > budget_s:
            skipped.append(f"{K}->{N} b{block} s{int(round(sp * 100))}%")
            continue
        case = make_case(K, N, block, sp, M=M, device=device, n_sets=n_sets)
        case_rows = run_case(case, providers, bw, rep_ms=rep)
        rows += case_rows
        # Print and save as we go: a run cut short still leaves its numbers behind.
        print(format_table(case_rows), flush=True)
        print(f"# {case.tag} done ({time.time() - t0:.0f} s)", flush=True)
        _write(out_dir, info, rows, partial=True)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if skipped:
        info["skipped_for_budget"] = skipped
        print(f"# budget {budget_s} s spent: {len(skipped)} cases not run: {', '.join(skipped)}", flush=True)
    table = format_table(rows)
    summ = format_summary(summary(rows))
    print(table)
    print(summ)
    _write(out_dir, info, rows, partial=bool(skipped))
    with open(os.path.join(out_dir, "bench_kernels.txt"), "w") as f:
        f.write(f"# {info}\n{table}\n\n{summ}\n")
    note = plot(rows, os.path.join(out_dir, "bench_kernels.png"))
    if note:
        print(note)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (JSON, text table, PNG)")
    ap.add_argument("--quick", action="store_true", help="one shape, block 64, 3 sparsities")
    ap.add_argument("--dry-run", action="store_true", help="tiny CPU run (TRITON_INTERPRET=1) to test the script")
    ap.add_argument("--providers", nargs="*", default=None, help=f"subset of {PROVIDERS} (default: all)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new case after this many seconds (default: no limit); the JSON says what was skipped")
    ap.add_argument("--rep-ms", type=int, default=None, help="timed milliseconds per measurement (default 50, --quick 25)")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    run(args.out, quick=args.quick, dry_run=args.dry_run, providers=args.providers, budget_s=args.budget_s,
        rep_ms=args.rep_ms)


if __name__ == "__main__":
    main()
