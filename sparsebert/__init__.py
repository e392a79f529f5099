"""sparsebert: block-sparse kernels that make a pruned BERT faster, not just smaller.

Two steps, kept separate: pruning finds what to keep (:mod:`sparsebert.pruning`); swapping in
sparse layers turns it into speed (:func:`sparsify`, :class:`BlockSparseLinear`).
"""
from . import ops, pruning
from .checkpoint import CheckpointError, load_sparse, save_sparse
from .config import SparsityConfig
from .hf import densify, from_pretrained, get_sparsity_config, sparsify
from .layout import BlockLayout
from .nn import BlockSparseLinear, MaskedEmbedding, MaskedLinear
from .ops import bsr_linear
from .optimize import optimize

__version__ = "0.1.0"
__all__ = ["BlockLayout", "BlockSparseLinear", "MaskedLinear", "MaskedEmbedding", "bsr_linear",
           "sparsify", "densify", "optimize", "save_sparse", "load_sparse", "from_pretrained",
           "SparsityConfig", "get_sparsity_config", "CheckpointError", "ops", "pruning", "__version__"]
