"""Pure-PyTorch block-sparse linear: the ground truth every kernel is checked against.

Vectorised over blocks (gather + batched matmul + index_add); tokens are processed in chunks
so the gathered ``[nnz, M, b]`` intermediates stay bounded. Half types accumulate in fp32.
Runs on any device and in float64 (for ``gradcheck``).

Backend contract (shared by every backend module): with ``x`` ``[M, K]``, ``dy`` ``[M, N]`` 2-D
contiguous, ``values`` ``[nnz, bn, bk]`` and ``lt`` a :class:`~sparsebert.layout.LayoutTensors`
on the same device:

* ``forward(x, values, bias, lt) -> y [M, N]``           y = x Wᵀ + bias
* ``grad_input(dy, values, lt) -> dx [M, K]``             dx = dy W
* ``grad_weight(x, dy, lt) -> dvalues [nnz, bn, bk]``     dW restricted to the kept blocks
"""
from __future__ import annotations

import torch

from ..layout import LayoutTensors

NAME = "reference"
# Upper bound on elements of one gathered [nnz, chunk, b] intermediate.
_CHUNK_ELEMS = 1 << 24


def unavailable_reason(device: torch.device | None = None) -> str | None:
    return None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(M: int, nnz: int, width: int):
    step = max(1, _CHUNK_ELEMS // max(1, nnz * width))
    for start in range(0, M, step):
        yield start, min(M, start + step)


def forward(x, values, bias, lt: LayoutTensors):
    M = x.shape[0]
    acc = _acc_dtype(x.dtype)
    R, C, bn, bk = lt.n_row_blocks, lt.n_col_blocks, lt.bn, lt.bk
    y = torch.zeros(R, M, bn, device=x.device, dtype=acc)
    if lt.nnz:
        w_t = values.to(acc).transpose(1, 2)                     # [nnz, bk, bn]
        rows, cols = lt.row_idx.long(), lt.col_idx.long()
        for s, e in _chunks(M, lt.nnz, max(bn, bk)):
            xb = x[s:e].to(acc).reshape(e - s, C, bk).transpose(0, 1)  # [C, m, bk]
            prod = torch.bmm(xb[cols], w_t)                          # [nnz, m, bn]
            y[:, s:e].index_add_(0, rows, prod)
    y = y.transpose(0, 1).reshape(M, R * bn)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def grad_input(dy, values, lt: LayoutTensors):
    M = dy.shape[0]
    acc = _acc_dtype(dy.dtype)
    R, C, bn, bk = lt.n_row_blocks, lt.n_col_blocks, lt.bn, lt.bk
    dx = torch.zeros(C, M, bk, device=dy.device, dtype=acc)
    if lt.nnz:
        w = values.to(acc)                                           # [nnz, bn, bk]
        rows, cols = lt.row_idx.long(), lt.col_idx.long()
        for s, e in _chunks(M, lt.nnz, max(bn, bk)):
            dyb = dy[s:e].to(acc).reshape(e - s, R, bn).transpose(0, 1)  # [R, m, bn]
            dx[:, s:e].index_add_(0, cols, torch.bmm(dyb[rows], w))     # [nnz, m, bk]
    return dx.transpose(0, 1).reshape(M, C * bk).to(dy.dtype)


def grad_weight(x, dy, lt: LayoutTensors):
    M = x.shape[0]
    acc = _acc_dtype(x.dtype)
    R, C, bn, bk = lt.n_row_blocks, lt.n_col_blocks, lt.bn, lt.bk
    dw = torch.zeros(lt.nnz, bn, bk, device=x.device, dtype=acc)
    if lt.nnz:
        rows, cols = lt.row_idx.long(), lt.col_idx.long()
        for s, e in _chunks(M, lt.nnz, max(bn, bk)):
            dyb = dy[s:e].to(acc).reshape(e - s, R, bn).permute(1, 2, 0)   # [R, bn, m]
            xb = x[s:e].to(acc).reshape(e - s, C, bk).transpose(0, 1)      # [C, m, bk]
            dw += torch.bmm(dyb[rows], xb[cols])
    return dw.to(x.dtype)
