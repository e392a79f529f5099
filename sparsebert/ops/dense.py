"""Dense fallback backend: scatter the kept blocks into a dense weight and call cuBLAS/oneDNN.

At low sparsity this is the fastest path, so ``auto`` considers it too and a sparse layer is
never slower than the dense one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import LayoutTensors

NAME = "dense"


def unavailable_reason(device: torch.device | None = None) -> str | None:
    return None


def densify_values(values, lt: LayoutTensors):
    out = values.new_zeros(lt.n_row_blocks, lt.n_col_blocks, lt.bn, lt.bk)
    out[lt.row_idx.long(), lt.col_idx.long()] = values
    return out.transpose(1, 2).reshape(lt.N, lt.K)


def forward(x, values, bias, lt: LayoutTensors):
    return F.linear(x, densify_values(values, lt), bias)


def grad_input(dy, values, lt: LayoutTensors):
    return dy @ densify_values(values, lt)


def grad_weight(x, dy, lt: LayoutTensors):
    dw = (dy.t() @ x).reshape(lt.n_row_blocks, lt.bn, lt.n_col_blocks, lt.bk).transpose(1, 2)
    return dw[lt.row_idx.long(), lt.col_idx.long()].contiguous()
