"""The block-sparse linear op and its backends."""
from . import backends
from .bsr_linear import bsr_linear

__all__ = ["bsr_linear", "backends"]
