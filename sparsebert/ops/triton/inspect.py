"""Compile the Triton kernels for sm_90a with Triton's real compiler (no GPU needed) and report
what came out: ``python -m sparsebert.ops.triton.inspect [--grid default|all|ci] [--json FILE]``.

Per kernel configuration: wgmma (Hopper tensor-core instructions in the PTX), TMA
(``cp.async.bulk.tensor`` loads), registers and spills (from ``ptxas -v``), shared memory. Needs
the interpreter off: when ``TRITON_INTERPRET=1`` is set, the command re-runs itself without it.

Which configurations: see :func:`grid`. Exit status 1 if any kernel failed to compile, lacks
wgmma, spills, exceeds the shared memory of an H100/H200, or asked for TMA and got none.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

from . import common as C

ARCH = 90
_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# name -> (dtype, tl.dot input precision): fp32 runs through TF32 when torch allows it, else
# exact fp32 dots (no tensor cores, so no wgmma expected there).
DTYPES = {"bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee"),
          "tf32": (torch.float32, "tf32"), "fp32": (torch.float32, "ieee")}
OPS = ("forward", "grad_input", "grad_weight")


def _blocks(op, bn, bk):
    """(BO, BR) of a DSD op, (BN, BK) of the SDD."""
    return (bk, bn) if op == "grad_input" else (bn, bk)


def compile_kernel(op: str, cfg: dict, dtype: torch.dtype, bn: int, bk: int, arch: int = ARCH,
                   precision: str | None = None):
    """Compile ``op``'s kernel with ``cfg`` (fitted as the launcher fits it) for ``sm_<arch>``;
    ``precision`` of fp32 dots: "tf32" (default) or "ieee". Returns ``(fitted cfg, compiled
    kernel)``; raises if the compiler rejects it."""
    if C._IMPORT_ERROR is not None:
        raise RuntimeError(C._IMPORT_ERROR)
    if C.INTERPRET:
        raise RuntimeError("compile_kernel needs TRITON_INTERPRET unset (run it in a subprocess)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from . import dsd, sdd

    t = _TL[dtype]
    elem = torch.empty(0, dtype=dtype).element_size()
    prec = precision or ("tf32" if dtype == torch.float32 else "ieee")
    if op == "grad_weight":
        cfg = sdd.fit(cfg, elem, bn, bk)
        if cfg is None:
            raise ValueError(f"{op}: config does not fit block ({bn}, {bk})")
        bm, tma = cfg["BLOCK_M"], cfg["TMA"]
        fn = sdd._sdd_kernel
        sig = {"x_ptr": f"*{t}", "x_desc": f"tensordesc<{t}[{bm},{bk}]>" if tma else "constexpr",
               "dy_ptr": f"*{t}", "dy_desc": f"tensordesc<{t}[{bm},{bn}]>" if tma else "constexpr",
               "out_ptr": "*fp32", "dbias_ptr": "*fp32",
               "gstart_ptr": "*i32", "grow_ptr": "*i32", "row_ptr_ptr": "*i32", "col_idx_ptr": "*i32",
               "M": "i32", "N": "i32", "n_groups": "i32", "n_items": "i32", "n_progs": "i32",
               "nnz": "i32", "ldx": "i32", "ldy": "i32", "chunk": "i32"}
        consts = {"BN": bn, "BK": bk, "G": cfg["G"], "T_ACC": sdd.t_acc(bn, bk, cfg["G"]),
                  "PARTIAL": True, "HAS_DBIAS": True, "UPCAST": False, "PRECISION": prec,
                  "BLOCK_M": bm, "TMA": tma}
        aligned = ("ldx", "ldy", "N", "chunk")
    else:
        BO, BR = _blocks(op, bn, bk)
        cfg = dsd.fit(cfg, elem, BO, BR, exact_fp32=dtype == torch.float32 and prec == "ieee")
        if cfg is None:
            raise ValueError(f"{op}: config does not fit blocks ({BO}, {BR})")
        bm, tma, trans = cfg["BLOCK_M"], cfg["TMA"], op == "grad_input"
        fn = dsd._dsd_kernel
        sig = {"a_ptr": f"*{t}", "a_desc": f"tensordesc<{t}[{bm},{BR}]>" if tma else "constexpr",
               "w_ptr": f"*{t}", "w_desc": f"tensordesc<{t}[{bn},{bk}]>" if tma else "constexpr",
               "bias_ptr": f"*{t}", "out_ptr": f"*{t}",
               "ptr_ptr": "*i32", "red_idx_ptr": "*i32", "perm_ptr": "*i32",
               "M": "i32", "n_out_blocks": "i32", "n_tiles": "i32", "n_progs": "i32",
               "lda": "i32", "ldo": "i32"}
        consts = {"BO": BO, "BR": BR, "W_TRANS": trans, "USE_PERM": trans, "HAS_BIAS": not trans,
                  "ACT": "none" if trans else "gelu", "UPCAST": False, "PRECISION": prec,
                  "BLOCK_M": bm, "TMA": tma, "SWAP": cfg["SWAP"]}
        aligned = ("lda", "ldo")
    if not tma:
        consts.update({k: None for k, v in sig.items() if v == "constexpr"})
    signature = dict(sig)
    for k in consts:
        signature[k] = "constexpr"
    # What a real launch specialises: torch's pointers and the leading dimensions (multiples of a
    # block) are 16-divisible; without it the pointer loads are not vectorised.
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n, ty in sig.items() if ty.startswith("*") or n in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    import triton
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    return cfg, k


def _ptxas():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(ARCH).path
    except Exception:  # pragma: no cover - other Triton versions
        from triton import knobs
        return knobs.nvidia.ptxas.path


def ptxas_usage(ptx: str, arch: int = ARCH) -> dict:
    """Registers and spill bytes reported by ``ptxas -v`` for the (single-kernel) PTX."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([_ptxas(), "-v", f"--gpu-name=sm_{arch}a", src, "-o",
                              os.path.join(d, "k.o")], capture_output=True, text=True, check=True).stderr
    regs = [int(v) for v in re.findall(r"Used (\d+) registers", log)]
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return {"registers": max(regs, default=None), "spill_bytes": max(spills, default=None)}


def kernel_report(k) -> dict:
    ptx = k.asm["ptx"]
    rep = {"wgmma": "wgmma.mma_async" in ptx, "tma": "cp.async.bulk.tensor" in ptx,
           "shared": k.metadata.shared, "target": (re.findall(r"\.target\s+(\S+)", ptx) or [None])[0]}
    rep.update(ptxas_usage(ptx))
    return rep


def grid(which: str = "default"):
    """``(op, dtype name, bn, bk, config index)`` of the kernels to compile.

    ``all``: every (op, dtype, block, config) the backend can pick; ``default``: every config in
    bf16 at blocks 32-128 and the first (untuned default) config at every block and dtype; ``ci``
    (tests/test_triton_compile.py): every config in bf16 at block 64, the first config at bf16
    16/32/128, fp16 64, tf32 and exact fp32 at 64 and 128 (where shared memory is tightest).
    Dtype names: bf16, fp16, tf32 (fp32 tensors, TF32 dots: torch allows TF32), fp32 (exact)."""
    from . import dsd, sdd
    seen, out = set(), []
    for op in OPS:
        configs = sdd.CONFIGS if op == "grad_weight" else dsd.CONFIGS
        for dt in DTYPES:
            for b in C.SUPPORTED_BLOCKS:
                for i, cfg in enumerate(configs):
                    if which == "default" and not (i == 0 or (dt == "bf16" and b >= 32)):
                        continue
                    if which == "ci" and not ((dt == "bf16" and (b == 64 or i == 0))
                                              or (i == 0 and (dt, b) in (("fp16", 64), ("tf32", 64),
                                                                         ("tf32", 128), ("fp32", 64),
                                                                         ("fp32", 128)))):
                        continue
                    elem = DTYPES[dt][0].itemsize
                    f = (sdd.fit(cfg, elem, b, b) if op == "grad_weight"
                         else dsd.fit(cfg, elem, b, b, exact_fp32=dt == "fp32"))
                    if f is None:
                        continue
                    key = (op, dt, b, json.dumps(f, sort_keys=True))
                    if key not in seen:
                        seen.add(key)
                        out.append((op, dt, b, b, i))
    return out


def _one(item):
    from . import dsd, sdd
    op, dt, bn, bk, i = item
    cfg = (sdd.CONFIGS if op == "grad_weight" else dsd.CONFIGS)[i]
    try:
        fitted, k = compile_kernel(op, cfg, DTYPES[dt][0], bn, bk, precision=DTYPES[dt][1])
        rep = kernel_report(k)
        rep["config"] = fitted
    except Exception as e:
        rep = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}",
               "config": cfg}
    rep.update(op=op, dtype=dt, block=f"{bn}x{bk}", config_index=i)
    return rep


def run_grid(items, jobs: int = 1):
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(jobs) as ex:
            return list(ex.map(_one, items))
    return [_one(it) for it in items]


def _cfg_str(c: dict) -> str:
    keys = [("BLOCK_M", "m"), ("num_warps", "w"), ("num_stages", "s"), ("G", "g"),
            ("PROGS_PER_SM", "p"), ("WAVES", "k")]
    s = "".join(f"{short}{c[k]}" for k, short in keys if k in c)
    flags = [f for f in ("TMA", "SWAP") if c.get(f)]
    return s + ("+" + "+".join(flags) if flags else "")


def format_table(rows) -> str:
    head = f"{'kernel':<11} {'dtype':<5} {'block':<8} {'#':>2} {'config':<24} {'wgmma':<5} {'TMA':<5} " \
           f"{'regs':>4} {'spills':>6} {'shared':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['op']:<11} {r['dtype']:<5} {r['block']:<8} {r['config_index']:>2} "
                         f"{_cfg_str(r['config']):<24} ERROR {r['error']}")
            continue
        lines.append(f"{r['op']:<11} {r['dtype']:<5} {r['block']:<8} {r['config_index']:>2} "
                     f"{_cfg_str(r['config']):<24} {'yes' if r['wgmma'] else 'NO':<5} "
                     f"{'yes' if r['tma'] else '-':<5} {r['registers']!s:>4} {r['spill_bytes']!s:>6} "
                     f"{r['shared']:>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparsebert.ops.triton.inspect",
                                 description="Compile the Triton block-sparse kernels for sm_90a "
                                             "(no GPU needed) and print wgmma / TMA / registers / "
                                             "spills / shared memory per kernel configuration.")
    ap.add_argument("--grid", choices=("default", "all", "ci"), default="default",
                    help="which kernels: all = every (op, dtype, block, config) the backend can "
                         "pick; default = every config in bf16 at blocks 32-128 and the default "
                         "config at every block and dtype; ci = the subset the tests compile "
                         "(default: default)")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    args = ap.parse_args(argv)
    if C.INTERPRET:   # the kernels were decorated for the interpreter: compile in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "sparsebert.ops.triton.inspect",
                                *(argv if argv is not None else sys.argv[1:])], env=env)
    rows = run_grid(grid(args.grid), args.jobs)
    print(format_table(rows))
    bad = [r for r in rows if "error" in r or (not r["wgmma"] and r["dtype"] != "fp32") or r["spill_bytes"]
           or r["shared"] > C.SMEM_BUDGET or (r["config"].get("TMA") and not r["tma"])]
    print(f"\n{len(rows)} kernels compiled for sm_{ARCH}a; {len(bad)} with an error, no wgmma "
          f"(expected only for exact fp32), "
          f"spills, shared memory over {C.SMEM_BUDGET} bytes, or TMA asked for and missing")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
