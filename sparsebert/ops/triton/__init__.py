"""Triton backend (``backend="triton"``): block-sparse linear on the GPU, or on the CPU under
``TRITON_INTERPRET=1`` (slow; for tests). The backend contract of docs/CONTRACT.md.

One kernel per product, both reading the index arrays of :class:`~sparsebert.layout.LayoutTensors`:

* :mod:`.dsd` — forward (``y = act(x Wᵀ + bias)``) and input gradient (``dx = dy W``, through the
  transposed index);
* :mod:`.sdd` — weight gradient over the kept blocks (split-K), optionally with the bias gradient.

fp16/bf16 accumulate in fp32; fp32 runs through TF32 iff ``torch.backends.cuda.matmul.allow_tf32``,
else exact fp32 dots. Blocks 16, 32, 64, 128 (``bn`` and ``bk`` independently); any number of
tokens. Kernel configurations come from ``tuned.json`` (``benchmarks/tune_triton.py``), else are
autotuned once per shape on the GPU (with a one-time warning), see :mod:`.common`.
``python -m sparsebert.ops.triton.inspect`` compiles every shipped configuration for sm_90a and
prints what the compiler made of it.
"""
from __future__ import annotations

from ...layout import LayoutTensors
from . import common as _c
from . import dsd as _dsd
from . import sdd as _sdd

NAME = "triton"
ACTIVATIONS = ("none", "gelu")
SUPPORTED_DTYPES = _c.SUPPORTED_DTYPES
SUPPORTED_BLOCKS = _c.SUPPORTED_BLOCKS
unavailable_reason = _c.unavailable_reason
unsupported_reason = _c.unsupported_reason


def forward(x, values, bias, lt: LayoutTensors, activation: str = "none", *, config=None, n_progs=None):
    """``act(x @ Wᵀ + bias)``: x ``[M, K]``, values ``[nnz, bn, bk]``, bias ``[N]`` or None -> ``[M, N]``.

    ``config`` (a dict like ``dsd.CONFIGS[i]``) and ``n_progs`` force a kernel configuration and
    the number of persistent programs (tests, tuning)."""
    tensors = [("x", x), ("values", values)] + ([("bias", bias)] if bias is not None else [])
    _c.check("forward", lt, tensors=tensors, values=values)
    if activation not in ACTIVATIONS:
        raise ValueError(f"forward: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 2 or x.shape[1] != lt.K:
        raise ValueError(f"forward: x must be [M, K={lt.K}], got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (lt.N,):
        raise ValueError(f"forward: bias must be [N={lt.N}], got {tuple(bias.shape)}")
    return _dsd.run("forward", x, values, bias, lt, activation=activation, config=config,
                    n_progs=n_progs)


def grad_input(dy, values, lt: LayoutTensors, *, config=None, n_progs=None):
    """``dy @ W``: dy ``[M, N]`` -> dx ``[M, K]``."""
    _c.check("grad_input", lt, tensors=[("dy", dy), ("values", values)], values=values)
    if dy.dim() != 2 or dy.shape[1] != lt.N:
        raise ValueError(f"grad_input: dy must be [M, N={lt.N}], got {tuple(dy.shape)}")
    return _dsd.run("grad_input", dy, values, None, lt, config=config, n_progs=n_progs)


def _check_wgrad(name, x, dy, lt, split):
    _c.check(name, lt, tensors=[("x", x), ("dy", dy)])
    if x.dim() != 2 or dy.dim() != 2 or x.shape[0] != dy.shape[0] or x.shape[1] != lt.K \
            or dy.shape[1] != lt.N:
        raise ValueError(f"{name}: need x [M, K={lt.K}] and dy [M, N={lt.N}], got "
                         f"{tuple(x.shape)} and {tuple(dy.shape)}")
    if split is not None and split < 1:
        raise ValueError(f"{name}: split must be >= 1, got {split}")


def grad_weight(x, dy, lt: LayoutTensors, *, config=None, split=None, n_progs=None):
    """``(dyᵀ @ x)`` on the kept blocks: x ``[M, K]``, dy ``[M, N]`` -> ``[nnz, bn, bk]``.
    ``split`` (tests) forces the number of M chunks (split-K)."""
    _check_wgrad("grad_weight", x, dy, lt, split)
    return _sdd.run(x, dy, lt, with_bias=False, config=config, split=split, n_progs=n_progs)[0]


def grad_weight_bias(x, dy, lt: LayoutTensors, *, config=None, split=None, n_progs=None):
    """``(grad_weight(x, dy, lt), dy.sum(0))``, the bias gradient summed in the same kernel from
    the dy tiles it loads anyway."""
    _check_wgrad("grad_weight_bias", x, dy, lt, split)
    return _sdd.run(x, dy, lt, with_bias=True, config=config, split=split, n_progs=n_progs)
