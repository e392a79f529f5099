"""Dense fallback backend: scatter the kept blocks into a dense weight and call cuBLAS/oneDNN.

At low sparsity this is the fastest path, so ``auto`` considers it too and a sparse layer is
never slower than the dense one.

Pruned blocks are structural zeros (``docs/CONTRACT.md``): they must never multiply an input.
A dense product does multiply them, and ``0 * inf = nan`` would spread one non-finite input over
a whole output row. So ``forward`` and ``grad_input`` first check their token-major input with one
reduction (``isfinite(t.sum())``: a NaN or Inf anywhere makes the sum non-finite) and take the
structural path of :mod:`reference` only when it is not finite. ``grad_weight`` needs no check:
it computes every entry of ``dyᵀ x`` from one column of each and gathers the kept blocks, the same
entries a block-sparse kernel computes.

Cost of the check, CPU (one thread, best of 15; ``benchmarks`` shapes, M = 2048 tokens): 0.4-1.6%
of the fp32 GEMM, 2-7% of the (faster) bf16 GEMM. On CUDA it is one host sync per call (the
``bool()`` of a device scalar); while a CUDA graph is being captured no sync is allowed, so the
structural path is taken unconditionally there (correct, slower: prefer a sparse backend for
captured graphs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import LayoutTensors
from . import reference

NAME = "dense"


def unavailable_reason(device: torch.device | None = None) -> str | None:
    return None


def densify_values(values, lt: LayoutTensors):
    out = values.new_zeros(lt.n_row_blocks, lt.n_col_blocks, lt.bn, lt.bk)
    out[lt.row_idx.long(), lt.col_idx.long()] = values
    return out.transpose(1, 2).reshape(lt.N, lt.K)


def has_nonfinite(t: torch.Tensor) -> bool:
    """True if ``t`` may hold a NaN or Inf (exact for NaN/Inf; a finite sum that overflows also
    says True, which only costs the structural path)."""
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return True                  # no host sync while capturing: assume the worst
    # fp16 sums overflow at 65504: accumulate those in fp32 (bf16 has fp32's range).
    s = t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()
    return not bool(torch.isfinite(s))


def forward(x, values, bias, lt: LayoutTensors):
    if has_nonfinite(x):
        return reference.forward(x, values, bias, lt)
    return F.linear(x, densify_values(values, lt), bias)


def grad_input(dy, values, lt: LayoutTensors):
    if has_nonfinite(dy):
        return reference.grad_input(dy, values, lt)
    return dy @ densify_values(values, lt)


def grad_weight(x, dy, lt: LayoutTensors):
    dw = (dy.t() @ x).reshape(lt.n_row_blocks, lt.bn, lt.n_col_blocks, lt.bk).transpose(1, 2)
    return dw[lt.row_idx.long(), lt.col_idx.long()].contiguous()
