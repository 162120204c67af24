"""Public tensor API: block-sparse attention, its mask type, the torch reference and backends."""
from .attention import BACKENDS, block_sparse_attention, default_backend
from .mask import BlockSparseMask
from .reference import reference_attention, token_mask, torch_block_sparse_attention
from .stats import block_attention_mass

__all__ = [
    "BACKENDS",
    "BlockSparseMask",
    "block_attention_mass",
    "block_sparse_attention",
    "default_backend",
    "reference_attention",
    "token_mask",
    "torch_block_sparse_attention",
]
