"""Which blocks of one weight are kept: :class:`BlockLayout`.

A weight ``W`` of shape ``[N, K]`` (``out_features, in_features``) is cut into blocks of
``[bn, bk]``; block ``(r, c)`` covers ``W[r*bn:(r+1)*bn, c*bk:(c+1)*bk]``. A layout lists the
kept blocks in row-major (CSR) order; a tensor ``values`` of shape ``[nnz, bn, bk]`` holds them
in that order. Example, ``N = K = 4``, ``block = (2, 2)``, block mask ``[[1, 0], [1, 1]]``::

    kept blocks (row-major)  : (0,0) (1,0) (1,1)       -> values[0], values[1], values[2]
    row_ptr  [R+1]           : [0, 1, 3]               blocks of row r: row_ptr[r]:row_ptr[r+1]
    col_idx  [nnz]           : [0, 0, 1]
    row_idx  [nnz]           : [0, 1, 1]
    col_ptr  [C+1]           : [0, 2, 3]               transposed (CSC) index for dX = dY W
    t_row_idx[nnz]           : [0, 1, 1]               row block of the j-th entry in column order
    t_perm   [nnz]           : [0, 1, 2]               its index into ``values``

The forward and the weight gradient walk the CSR order; the input gradient walks columns.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Tuple

import torch


class LayoutTensors(NamedTuple):
    """The index arrays of a layout on one device (all int32, contiguous)."""

    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    row_idx: torch.Tensor
    col_ptr: torch.Tensor
    t_row_idx: torch.Tensor
    t_perm: torch.Tensor
    N: int
    K: int
    bn: int
    bk: int
    index: "torch.Tensor | None" = None   # the packed tensor these are views of, if any

    def packed(self) -> torch.Tensor:
        """The packed index (:func:`pack_index`): free when these are views of one."""
        return self.index if self.index is not None else pack_index(*self[:6])

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    @property
    def n_row_blocks(self) -> int:
        return self.N // self.bn

    @property
    def n_col_blocks(self) -> int:
        return self.K // self.bk


def pack_index(row_ptr, col_idx, row_idx, col_ptr, t_row_idx, t_perm) -> torch.Tensor:
    """All index arrays in one int32 tensor, so the custom op takes a single index argument."""
    return torch.cat([row_ptr, col_idx, row_idx, col_ptr, t_row_idx, t_perm]).to(torch.int32).contiguous()


def unpack_index(index: torch.Tensor, N: int, K: int, bn: int, bk: int, nnz: int) -> LayoutTensors:
    """Views into a packed index (see :func:`pack_index`)."""
    R, C = N // bn, K // bk
    sizes = [R + 1, nnz, nnz, C + 1, nnz, nnz]
    if index.numel() != sum(sizes):
        raise ValueError(
            f"layout index has {index.numel()} entries, expected {sum(sizes)} for a "
            f"[{N}, {K}] weight with block ({bn}, {bk}) and {nnz} kept blocks"
        )
    parts = torch.split(index, sizes)
    return LayoutTensors(*parts, N=N, K=K, bn=bn, bk=bk, index=index)


def _as_block(block) -> Tuple[int, int]:
    """``(bn, bk)`` from a positive int or a pair (tuple/list) of positive ints.

    Nothing else is read as a block size: not a string (``"32"`` is not ``(3, 2)``), a bool
    (``True`` is not ``1``), a float or a sequence of another length.
    """
    def is_int(b):
        return isinstance(b, numbers.Integral) and not isinstance(b, bool)

    if is_int(block):
        block = (block, block)
    if not (isinstance(block, (tuple, list)) and len(block) == 2 and all(is_int(b) for b in block)):
        raise ValueError(f"block must be a positive int or a pair of positive ints (bn, bk), got {block!r}")
    bn, bk = int(block[0]), int(block[1])
    if bn <= 0 or bk <= 0:
        raise ValueError(f"block sizes must be positive, got ({bn}, {bk})")
    return bn, bk


def as_bool_mask(mask, what: str = "mask") -> torch.Tensor:
    """The one rule for every mask (block masks, element masks, the masked layers' masks): a
    boolean tensor, or integers that are all 0 or 1. Floats are refused, whatever their values:
    a float mask is usually scores or a soft mask, and reading it as "nonzero = kept" would
    silently keep everything."""
    try:
        m = torch.as_tensor(mask)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{what} must be a boolean tensor, got {type(mask).__name__}") from None
    if m.dtype == torch.bool:
        return m
    if m.dtype.is_floating_point or m.dtype.is_complex:
        raise ValueError(f"{what} must be boolean (or 0/1 integers), got {m.dtype}")
    if ((m != 0) & (m != 1)).any():
        raise ValueError(f"{what} holds values other than 0 and 1")
    return m != 0


def _as_device(device) -> torch.device:
    """A ``torch.device`` (a cache key: equal devices hash equal, as their strings do)."""
    return device if isinstance(device, torch.device) else torch.device(device if device is not None else "cpu")


class BlockLayout:
    """The kept ``[bn, bk]`` blocks of an ``[N, K]`` weight. Immutable and hashable.

    Build with :meth:`from_mask` (a boolean block mask ``[N // bn, K // bk]``), :meth:`dense`
    or :meth:`from_element_mask` (an ``[N, K]`` mask that is constant on blocks).
    """

    __slots__ = ("shape", "block", "_mask", "_key", "_cache")

    def __init__(self, block_mask: torch.Tensor, shape: Tuple[int, int], block: Tuple[int, int]):
        # Private: validated by from_mask.
        self.shape = shape
        self.block = block
        self._mask = block_mask
        self._key = (shape, block, bytes(block_mask.to(torch.uint8).numpy().tobytes()))
        self._cache = {"nnz": int(block_mask.sum())}

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_mask(cls, block_mask, block=(32, 32), shape=None) -> "BlockLayout":
        """Layout from a boolean ``[N // bn, K // bk]`` block mask (or 0/1 integers, see :func:`as_bool_mask`).

        ``shape`` (``(N, K)``) defaults to ``block_mask.shape * block``; when given, the block
        size must divide it and the mask must have exactly ``(N // bn, K // bk)`` entries.
        """
        bn, bk = _as_block(block)
        m = as_bool_mask(block_mask, "block_mask")
        if m.dim() != 2:
            raise ValueError(f"block_mask must be 2-D [N // bn, K // bk], got shape {tuple(m.shape)}")
        m = m.detach().to("cpu", copy=True).contiguous()
        if shape is None:
            shape = (m.shape[0] * bn, m.shape[1] * bk)
        N, K = (int(s) for s in shape)
        if N <= 0 or K <= 0:
            raise ValueError(f"weight shape must be positive, got ({N}, {K})")
        if N % bn or K % bk:
            raise ValueError(
                f"block ({bn}, {bk}) does not divide the weight shape ({N}, {K}): "
                f"out_features must be a multiple of {bn} and in_features of {bk}"
            )
        if tuple(m.shape) != (N // bn, K // bk):
            raise ValueError(
                f"block_mask has shape {tuple(m.shape)} but a ({N}, {K}) weight with block "
                f"({bn}, {bk}) needs ({N // bn}, {K // bk})"
            )
        return cls(m, (N, K), (bn, bk))

    @classmethod
    def from_blocks(cls, rows, cols, shape, block=(32, 32)) -> "BlockLayout":
        """Layout from lists of kept (row-block, col-block) pairs; rejects out-of-range and duplicates."""
        bn, bk = _as_block(block)
        N, K = (int(s) for s in shape)
        if N % bn or K % bk:
            raise ValueError(f"block ({bn}, {bk}) does not divide the weight shape ({N}, {K})")
        R, C = N // bn, K // bk
        rows = torch.as_tensor(rows, dtype=torch.long).flatten()
        cols = torch.as_tensor(cols, dtype=torch.long).flatten()
        if rows.numel() != cols.numel():
            raise ValueError(f"rows and cols differ in length ({rows.numel()} vs {cols.numel()})")
        if rows.numel() and (rows.min() < 0 or rows.max() >= R):
            raise ValueError(f"row-block index out of range [0, {R})")
        if cols.numel() and (cols.min() < 0 or cols.max() >= C):
            raise ValueError(f"col-block index out of range [0, {C})")
        flat = rows * C + cols
        if torch.unique(flat).numel() != flat.numel():
            raise ValueError("duplicate (row-block, col-block) pairs in layout")
        m = torch.zeros(R, C, dtype=torch.bool)
        m[rows, cols] = True
        return cls(m, (N, K), (bn, bk))

    @classmethod
    def dense(cls, shape, block=(32, 32)) -> "BlockLayout":
        bn, bk = _as_block(block)
        N, K = (int(s) for s in shape)
        if N % bn or K % bk:
            raise ValueError(f"block ({bn}, {bk}) does not divide the weight shape ({N}, {K})")
        return cls.from_mask(torch.ones(N // bn, K // bk, dtype=torch.bool), (bn, bk), (N, K))

    @classmethod
    def from_element_mask(cls, mask: torch.Tensor, block=(32, 32)) -> "BlockLayout":
        """Layout from an ``[N, K]`` mask (boolean or 0/1 integers) that must be constant on each block."""
        bn, bk = _as_block(block)
        mask = as_bool_mask(mask, "mask").detach().cpu()
        if mask.dim() != 2:
            raise ValueError(f"mask must be 2-D [N, K], got shape {tuple(mask.shape)}")
        N, K = mask.shape
        if N % bn or K % bk:
            raise ValueError(f"block ({bn}, {bk}) does not divide the weight shape ({N}, {K})")
        blocks = mask.view(N // bn, bn, K // bk, bk)
        any_, all_ = blocks.any(3).any(1), blocks.all(3).all(1)
        if not torch.equal(any_, all_):
            raise ValueError(f"mask is not constant on ({bn}, {bk}) blocks: it cannot be a block layout")
        return cls(any_.contiguous(), (N, K), (bn, bk))

    # ---- properties ---------------------------------------------------------------------
    @property
    def block_mask(self) -> torch.Tensor:
        """Boolean ``[N // bn, K // bk]`` mask of kept blocks (a copy)."""
        return self._mask.clone()

    @property
    def grid(self) -> Tuple[int, int]:
        return tuple(self._mask.shape)

    @property
    def nnz(self) -> int:
        return int(self._cached("nnz", lambda: int(self._mask.sum())))

    @property
    def density(self) -> float:
        return self.nnz / max(1, self._mask.numel())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def __eq__(self, other):
        return isinstance(other, BlockLayout) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def __repr__(self):
        return (f"BlockLayout(shape={self.shape}, block={self.block}, nnz={self.nnz}/"
                f"{self._mask.numel()}, density={self.density:.3f})")

    def __getstate__(self):
        return {"shape": self.shape, "block": self.block, "mask": self._mask}

    def __setstate__(self, state):
        BlockLayout.__init__(self, state["mask"], tuple(state["shape"]), tuple(state["block"]))

    def _cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    # ---- index arrays -------------------------------------------------------------------
    def _cpu_index(self) -> torch.Tensor:
        def build():
            m = self._mask
            R, C = m.shape
            rows, cols = m.nonzero(as_tuple=True)               # row-major order
            row_ptr = torch.zeros(R + 1, dtype=torch.long)
            row_ptr[1:] = torch.cumsum(m.sum(1), 0)
            # Column order: sort by (col, row); t_perm maps back to the CSR position.
            t_perm = torch.argsort(cols * R + rows, stable=True)
            col_ptr = torch.zeros(C + 1, dtype=torch.long)
            col_ptr[1:] = torch.cumsum(m.sum(0), 0)
            return pack_index(row_ptr, cols, rows, col_ptr, rows[t_perm], t_perm)
        return self._cached("index_cpu", build)

    def index(self, device=None) -> torch.Tensor:
        """The packed int32 index (see :func:`pack_index`) on ``device``, cached per device."""
        key = ("index", _as_device(device))
        if key not in self._cache:
            self._cache[key] = self._cpu_index().to(key[1])
        return self._cache[key]

    def tensors(self, device=None) -> LayoutTensors:
        """The index arrays (views of :meth:`index`) on ``device``, cached per device."""
        key = ("tensors", _as_device(device))
        hit = self._cache.get(key)     # on every layer call: keep a hit to one lookup
        if hit is None:
            N, K = self.shape
            bn, bk = self.block
            hit = self._cache[key] = unpack_index(self.index(key[1]), N, K, bn, bk, self.nnz)
        return hit

    # ---- conversions --------------------------------------------------------------------
    def element_mask(self) -> torch.Tensor:
        """Boolean ``[N, K]`` mask."""
        bn, bk = self.block
        return self._mask.repeat_interleave(bn, 0).repeat_interleave(bk, 1)

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """Kept blocks of a dense ``[N, K]`` weight as ``[nnz, bn, bk]`` (row-major order)."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, layout expects {self.shape}")
        N, K = self.shape
        bn, bk = self.block
        lt = self.tensors(weight.device)
        blocks = weight.reshape(N // bn, bn, K // bk, bk).transpose(1, 2)
        return blocks[lt.row_idx.long(), lt.col_idx.long()].contiguous()

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """Dense ``[N, K]`` weight with ``values`` in the kept blocks and zeros elsewhere."""
        self.check_values(values)
        N, K = self.shape
        bn, bk = self.block
        lt = self.tensors(values.device)
        out = values.new_zeros(N // bn, K // bk, bn, bk)
        out[lt.row_idx.long(), lt.col_idx.long()] = values
        return out.transpose(1, 2).reshape(N, K)

    def check_values(self, values: torch.Tensor) -> None:
        bn, bk = self.block
        if values.dim() != 3 or tuple(values.shape) != (self.nnz, bn, bk):
            raise ValueError(
                f"values has shape {tuple(values.shape)}, but the layout needs "
                f"[nnz={self.nnz}, bn={bn}, bk={bk}] (one [bn, bk] block per kept block)"
            )

    def intersect(self, keep_mask: torch.Tensor) -> "BlockLayout":
        """A layout keeping only blocks kept both here and in ``keep_mask``."""
        keep_mask = as_bool_mask(keep_mask, "keep_mask").cpu()
        if tuple(keep_mask.shape) != tuple(self._mask.shape):
            raise ValueError(f"keep_mask has shape {tuple(keep_mask.shape)}, the layout's block grid is "
                             f"{tuple(self._mask.shape)}")
        return BlockLayout.from_mask(self._mask & keep_mask, self.block, self.shape)

    def positions_in(self, sub: "BlockLayout") -> torch.Tensor:
        """For a sub-layout of this one, the indices (into this layout's values) of its blocks."""
        if sub.shape != self.shape or sub.block != self.block:
            raise ValueError("layouts differ in shape or block")
        if (sub._mask & ~self._mask).any():
            raise ValueError("the new layout keeps blocks this layout does not: layouts only shrink")
        pos = torch.full(self._mask.shape, -1, dtype=torch.long)
        pos[self._mask] = torch.arange(self.nnz)
        return pos[sub._mask]
