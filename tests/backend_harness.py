"""One correctness harness for every backend (docs/CONTRACT.md's backend modules), one tolerance rule.

The rule: on fresh random inputs, a backend's error against the float64 result must be within
``FACTOR`` (2) times PyTorch's own error in the same dtype on the same device, plus a tiny floor::

    err(backend) <= 2 * err(torch, same dtype) + FLOOR

``err`` is the relative Frobenius error ``||out - ref64|| / ||ref64||`` (the absolute
``||out||`` where the float64 result is exactly zero: an empty layout's gradients, rows of no kept
block); ``FLOOR`` only matters there, where PyTorch is exact as well. "PyTorch's own" is the dense
computation of the same product with ``torch.nn.functional.linear`` / ``@`` / ``sum`` on the
densified weight, in the test dtype, on the device: forward ``x Wᵀ + b`` (and ``gelu`` of it),
grad_input ``dy W``, grad_weight ``(dyᵀ x)`` at the kept blocks, the bias gradient ``dy.sum(0)``.

Backends come from ``sparsebert.ops.backends.get(name)`` only. What each one claims (dtypes,
block sizes) is in ``CLAIMS``; the tests assert that a backend still accepts what it claims, so a
backend cannot drop a case silently.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from sparsebert.layout import BlockLayout
from sparsebert.ops import backends

FACTOR = 2.0
FLOOR = 1e-12
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# What each backend says it handles (README's backend table, docs/CONTRACT.md).
CLAIMS = {
    "reference": dict(dtypes=ALL_DTYPES, blocks=(16, 32, 64, 128)),
    "dense": dict(dtypes=ALL_DTYPES, blocks=(16, 32, 64, 128)),
    "cpu": dict(dtypes=(torch.float32, torch.bfloat16), blocks=(16, 32, 64, 128)),
    "triton": dict(dtypes=ALL_DTYPES, blocks=(16, 32, 64, 128)),
    "cuda": dict(dtypes=ALL_DTYPES, blocks=(32, 64)),
}
# Where a backend runs: "cpu" backends on the CPU, GPU backends on CUDA (triton also on the CPU
# under TRITON_INTERPRET=1).
DEVICE = {"reference": "cpu", "dense": "cpu", "cpu": "cpu", "triton": "cpu", "cuda": "cuda"}


def session_seed() -> int:
    """Fresh inputs every run; SPARSEBERT_TEST_SEED=N reproduces a failing run (the seed is in
    every failure message)."""
    if not hasattr(session_seed, "_seed"):
        env = os.environ.get("SPARSEBERT_TEST_SEED")
        session_seed._seed = int(env) if env else random.SystemRandom().randrange(1 << 30)
    return session_seed._seed


def skip_reason(name: str, device) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device`` here (None: it can)."""
    return backends.unavailable_reason(name, device)


# ---- problems ----------------------------------------------------------------------------------
def make_layout(N: int, K: int, block, kind: str, seed: int) -> BlockLayout:
    """kinds: ``random`` (about half kept), ``holes`` (random, plus an empty row block and an empty
    column block), ``empty`` (nothing kept), ``dense`` (everything kept), ``single`` (one block)."""
    bn, bk = block
    R, C = N // bn, K // bk
    g = torch.Generator().manual_seed(seed)
    if kind in ("random", "holes"):
        mask = torch.rand(R, C, generator=g) < 0.5
        mask[torch.randint(R, (1,), generator=g), torch.randint(C, (1,), generator=g)] = True
        if kind == "holes":
            mask[R // 2] = False
            mask[:, C - 1] = False
            mask[0, 0] = True
    elif kind == "empty":
        mask = torch.zeros(R, C, dtype=torch.bool)
    elif kind == "dense":
        mask = torch.ones(R, C, dtype=torch.bool)
    elif kind == "single":
        mask = torch.zeros(R, C, dtype=torch.bool)
        mask[R - 1, 0] = True
    else:
        raise ValueError(f"unknown layout kind {kind!r}")
    return BlockLayout.from_mask(mask, (bn, bk), (N, K))


@dataclass
class Problem:
    layout: BlockLayout
    x: torch.Tensor        # [M, K]
    dy: torch.Tensor       # [M, N]
    values: torch.Tensor   # [nnz, bn, bk]
    bias: torch.Tensor     # [N]
    seed: int

    @property
    def dtype(self):
        return self.x.dtype

    @property
    def device(self):
        return self.x.device


def make_problem(layout: BlockLayout, M: int, dtype, device="cpu", seed: int = 0) -> Problem:
    """Random normal inputs (values scaled by 1/sqrt(K), so outputs are O(1) in every dtype)."""
    N, K = layout.shape
    bn, bk = layout.block
    g = torch.Generator(device=device).manual_seed(seed)   # drawn where they are used: no host copies
    x = torch.randn(M, K, generator=g, device=device)
    dy = torch.randn(M, N, generator=g, device=device)
    values = torch.randn(layout.nnz, bn, bk, generator=g, device=device) / K ** 0.5
    bias = torch.randn(N, generator=g, device=device)
    return Problem(layout, *(t.to(dtype) for t in (x, dy, values, bias)), seed=seed)


# ---- the rule ----------------------------------------------------------------------------------
def rel_err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    diff = (out.detach().to(ref64.device, torch.float64) - ref64).norm().item()
    scale = ref64.norm().item()
    return diff / scale if scale > 0 else diff


# Outputs that are known to miss the rule, with what was measured (seeds 0-7 of test_backend_harness's
# cases); a case failing only on these is reported as xfail with the reason, any other miss fails.
KNOWN_DEVIATIONS = {}
# (cpu fp32 used to be here: the bias added before the products, 3.55x; an A&S erf in the GELU
# epilogue, 2.8x on gelu(bias); one FMA chain per output at M = 1 in grad_input, 2.3x. Fixed in
# csrc/cpu; now at most 1.02x, 0.98x and 0.72x PyTorch's error over seeds 0-39.)
if os.environ.get("TRITON_INTERPRET") == "1":
    for _out in ("forward", "forward_nobias"):
        KNOWN_DEVIATIONS[("triton", torch.float32, _out)] = (
            "interpreted triton fp32 forward: numpy's fp32 dot sums in another order than oneDNN, up to "
            "2.3x PyTorch's error on single 64-long dots (M5 128->256 b128x64 holes, 12 seeds)")


def check_rule(out, torch_out, ref64, dtype, what: str) -> float:
    """Asserts the rule for one output; returns err(out) / allowed (for reports)."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
    assert tuple(out.shape) == tuple(ref64.shape), f"{what}: shape {tuple(out.shape)}, expected {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten output tiles?)"
    err, err_torch = rel_err(out, ref64), rel_err(torch_out, ref64)
    allowed = FACTOR * err_torch + FLOOR
    assert err <= allowed, (f"{what}: rel err {err:.3e} > {allowed:.3e} = {FACTOR:g} x PyTorch's own "
                            f"{err_torch:.3e} + {FLOOR:g}")
    return err / allowed


def _dense_ops(p: Problem, x, dy, values, bias, gelu: bool):
    """The products computed densely with PyTorch in the dtype/device of the given tensors."""
    w = p.layout.scatter(values)
    y = F.linear(x, w, bias)
    out = dict(forward=y, forward_nobias=F.linear(x, w), grad_input=dy @ w,
               grad_weight=p.layout.gather(dy.t() @ x), grad_bias=dy.sum(0))
    if gelu:
        out["forward_gelu"] = F.gelu(y)
    return out


def _truncate_to_bf16(t: torch.Tensor) -> torch.Tensor:
    bits = t.detach().float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)


def interpreted_bf16(name: str, dtype) -> bool:
    """Triton's interpreter converts fp32 to bf16 by truncation, not rounding (triton 3.7.1: a plain
    fp32 -> bf16 store has 2.07x torch's error), so interpreted bf16 kernels are held to PyTorch's
    fp32 result truncated the same way. Compiled Triton rounds to nearest and gets the plain rule."""
    return name == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def check_backend(name: str, p: Problem, ops=("forward", "grad_input", "grad_weight"),
                  gelu: bool = True, tag: str = "", before=None) -> dict:
    """Runs backend ``name``'s ops on ``p`` and asserts the rule for each output (the fused bias
    gradient and the GELU epilogue too, where the backend offers them). ``before()``, if given, runs
    before each op (GPU tests poison the allocator's free blocks there). Returns {output: ratio}."""
    mod = backends.get(name)
    lt = p.layout.tensors(p.device)
    why = mod.unsupported_reason(p.x, p.values, lt) if hasattr(mod, "unsupported_reason") else None
    assert why is None, f"{name} refuses a case it claims ({tag}): {why}"
    want = _dense_ops(p, *(t.double() for t in (p.x, p.dy, p.values, p.bias)), gelu=True)  # on the device
    lowp = _dense_ops(p, p.x, p.dy, p.values, p.bias, gelu=True)
    if interpreted_bf16(name, p.dtype) and p.device.type == "cpu":
        f32 = _dense_ops(p, *(t.float() for t in (p.x, p.dy, p.values, p.bias)), gelu=True)
        lowp = {k: _truncate_to_bf16(v) for k, v in f32.items()}
    what = f"{name} {tag} seed={p.seed} (SPARSEBERT_TEST_SEED={session_seed()})"
    ratios, known = {}, []

    def rule(key, out, torch_out, ref64, label):
        try:
            ratios[key] = check_rule(out, torch_out, ref64, p.dtype, f"{label} {what}")
        except AssertionError as e:
            reason = KNOWN_DEVIATIONS.get((name, p.dtype, key))
            if reason is None or not torch.isfinite(out).all():
                raise
            known.append(f"{e} [known: {reason}]")

    def prepare():
        if before is not None:
            before()

    def sync():
        if p.device.type == "cuda":
            torch.cuda.synchronize()   # a kernel fault shows up here, attributed to this op

    if "forward" in ops:
        prepare()
        y = mod.forward(p.x, p.values, p.bias, lt)
        sync()
        rule("forward", y, lowp["forward"], want["forward"], "forward")
        prepare()
        y0 = mod.forward(p.x, p.values, None, lt)
        sync()
        rule("forward_nobias", y0, lowp["forward_nobias"], want["forward_nobias"], "forward without bias")
        if gelu and "gelu" in getattr(mod, "ACTIVATIONS", ()):
            prepare()
            yg = mod.forward(p.x, p.values, p.bias, lt, activation="gelu")
            sync()
            rule("forward_gelu", yg, lowp["forward_gelu"], want["forward_gelu"], "forward+gelu")
    if "grad_input" in ops:
        prepare()
        dx = mod.grad_input(p.dy, p.values, lt)
        sync()
        rule("grad_input", dx, lowp["grad_input"], want["grad_input"], "grad_input")
    if "grad_weight" in ops:
        prepare()
        dv = mod.grad_weight(p.x, p.dy, lt)
        sync()
        rule("grad_weight", dv, lowp["grad_weight"], want["grad_weight"], "grad_weight")
        if hasattr(mod, "grad_weight_bias"):
            prepare()
            dv2, db = mod.grad_weight_bias(p.x, p.dy, lt)
            sync()
            rule("grad_weight_bias", dv2, lowp["grad_weight"], want["grad_weight"], "grad_weight_bias (weight)")
            rule("grad_bias", db, lowp["grad_bias"], want["grad_bias"], "grad_weight_bias (bias)")
    if known:
        import pytest
        pytest.xfail("; ".join(known))
    return ratios
