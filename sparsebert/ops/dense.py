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

A **full** layout (every block kept, so no structural zero) skips the check: a dense product then
multiplies exactly the entries the structural one does. It also needs no scatter: its blocks are
all there in row-major order, so the dense weight is one permuting copy of ``values``
(``[R, C, bn, bk] -> [R, bn, C, bk]``), and the weight gradient one permuting copy back. On the
MiniLM-size shapes (384x384 .. 1536x384, 32x32 blocks, one thread, weights in cache) that copy
took 0.05-0.30 ms against 0.24-1.12 ms for the former zero-fill + 2-D scatter + copy
(``RESULTS.md``, issue #14, run G); inside a model, with the weights coming from memory, it is
still a visible share of a small GEMM (same section). The copy is made on every call and dropped:
no dense weight outlives a call, so no update of ``values`` (fused optimizers, ``.data`` writes)
can be served stale.

Cost of the check, CPU (one thread, best of 15; ``benchmarks`` shapes, M = 2048 tokens): 0.4-1.6%
of the fp32 GEMM, 2-7% of the (faster) bf16 GEMM. On CUDA it is one host sync per call (the
``bool()`` of a device scalar); while a CUDA graph is being captured no sync is allowed, so the
structural path is taken unconditionally there (correct, slower: prefer a sparse backend for
captured graphs).
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..layout import LayoutTensors
from . import reference

NAME = "dense"


def unavailable_reason(device: torch.device | None = None) -> str | None:
    return None


def is_full(lt: LayoutTensors) -> bool:
    """Every block kept (then ``values[r * C + c]`` is block ``(r, c)``: row-major order)."""
    return lt.nnz == lt.n_row_blocks * lt.n_col_blocks


def _flat_block_index(lt: LayoutTensors) -> torch.Tensor:
    """Each kept block's position ``r * C + c`` in the row-major grid of all blocks."""
    return lt.row_idx.long() * lt.n_col_blocks + lt.col_idx.long()


_scratch = threading.local()     # .buffers: {dtype: flat CPU tensor}, this thread's dense weights


def _cpu_scratch(values, numel: int):
    """A flat tensor of ``numel`` elements for one call's dense weight on the CPU, kept per thread
    and per dtype and reused by the next call (grown, never shrunk), or None where a fresh tensor
    is needed: on other devices (another stream could still be reading it) and where autograd
    records the copy (a later call would overwrite what the graph saved).

    A new ``[N, K]`` weight on every call costs page faults where it matters: in a MiniLM forward
    at 0% sparsity (36 layer calls, 42 MB of weights) glibc maps fresh pages for them on every call,
    ~15,800 minor faults a forward at batch 8 against ~1,100 with the block kernels (measured,
    `getrusage`), while a layer timed alone reuses its freed pages and hides that cost."""
    if not values.is_cpu or (values.requires_grad and torch.is_grad_enabled()):
        return None
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get(values.dtype)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):    # a normal tensor: writable in and out of inference mode
            buf = buffers[values.dtype] = torch.empty(numel, dtype=values.dtype)
    return buf[:numel]


def empty_cache() -> None:
    """Drop this thread's scratch weights (they are rebuilt on the next call)."""
    _scratch.buffers = {}


def densify_values(values, lt: LayoutTensors, reuse: bool = False):
    """The dense ``[N, K]`` weight (zeros in pruned blocks): a new tensor, or with ``reuse`` this
    thread's scratch weight where :func:`_cpu_scratch` allows it (valid until the next call: for a
    caller that drops it before returning)."""
    R, C = lt.n_row_blocks, lt.n_col_blocks
    buf = _cpu_scratch(values, lt.N * lt.K) if reuse else None
    if is_full(lt):
        src = values
    else:
        # one flat index per kept block: a 1-D index_copy_ is several times cheaper than the
        # 2-D advanced-index assignment
        src = values.new_zeros(R * C, lt.bn, lt.bk)
        src.index_copy_(0, _flat_block_index(lt), values)
    blocks = src.view(R, C, lt.bn, lt.bk).transpose(1, 2)
    if buf is None:
        return blocks.reshape(lt.N, lt.K)
    out = buf.view(R, lt.bn, C, lt.bk)
    out.copy_(blocks)
    return out.view(lt.N, lt.K)


def has_nonfinite(t: torch.Tensor) -> bool:
    """True if ``t`` may hold a NaN or Inf (exact for NaN/Inf; a finite sum that overflows also
    says True, which only costs the structural path)."""
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return True                  # no host sync while capturing: assume the worst
    # fp16 sums overflow at 65504: accumulate those in fp32 (bf16 has fp32's range).
    s = t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()
    return not bool(torch.isfinite(s))


def forward(x, values, bias, lt: LayoutTensors):
    if not is_full(lt) and has_nonfinite(x):
        return reference.forward(x, values, bias, lt)
    return F.linear(x, densify_values(values, lt, reuse=True), bias)


def grad_input(dy, values, lt: LayoutTensors):
    if not is_full(lt) and has_nonfinite(dy):
        return reference.grad_input(dy, values, lt)
    return dy @ densify_values(values, lt, reuse=True)


def grad_weight(x, dy, lt: LayoutTensors):
    dw = (dy.t() @ x).reshape(lt.n_row_blocks, lt.bn, lt.n_col_blocks, lt.bk).transpose(1, 2)
    if is_full(lt):
        return dw.reshape(lt.nnz, lt.bn, lt.bk)      # all blocks, row-major: one copy
    return dw.reshape(-1, lt.bn, lt.bk).index_select(0, _flat_block_index(lt))
