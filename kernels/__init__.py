"""Triton kernels of sparse_vdit (installed as ``sparse_vdit.kernels``).

Importing this package imports Triton; ``sparse_vdit.ops`` imports it lazily, only when the Triton
backend is used.
"""
from .block_sparse_attn import block_sparse_attn_fwd
from .block_stats import block_attn_mass

__all__ = ["block_attn_mass", "block_sparse_attn_fwd"]
