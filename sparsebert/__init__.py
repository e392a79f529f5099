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
# `sparsebert.optimize` is the function (it shadows its module): undo and query it from here too,
# since `sparsebert.optimize.unoptimize` and `import sparsebert.optimize as m` reach the function.
from .optimize import is_optimized, optimize, unoptimize

__version__ = "0.1.0"
__all__ = ["BlockLayout", "BlockSparseLinear", "MaskedLinear", "MaskedEmbedding", "bsr_linear",
           "sparsify", "densify", "optimize", "unoptimize", "is_optimized", "save_sparse", "load_sparse", "from_pretrained",
           "SparsityConfig", "get_sparsity_config", "CheckpointError", "ops", "pruning", "__version__"]
