"""Public tensor API: block-sparse attention, its mask type, the float64 reference, the backends
(triton / torch / flex), the attention seam at the model layout [B, N, H, D] and the rotary pass that
writes k in the packed key order."""
from .attention import BACKENDS, block_sparse_attention, default_backend
from .device import device_name
from .mask import BlockSparseMask
from .mass import block_attention_mass
from .model_layout import attention_mass, dense_attention, sparse_attention, sparse_attention_tiled, tiled_keys
from .order import freeze, frozen, key_order, order_digest, tiled_position
from .reference import reference_attention, token_mask
from .rotary import rope
from .select import pooled_blocks, select_blocks, selection_flops
from .torch_backend import torch_block_sparse_attention

__all__ = [
    "BACKENDS",
    "BlockSparseMask",
    "attention_mass",
    "block_attention_mass",
    "block_sparse_attention",
    "default_backend",
    "dense_attention",
    "device_name",
    "freeze",
    "frozen",
    "key_order",
    "order_digest",
    "pooled_blocks",
    "reference_attention",
    "rope",
    "select_blocks",
    "selection_flops",
    "sparse_attention",
    "sparse_attention_tiled",
    "tiled_keys",
    "tiled_position",
    "token_mask",
    "torch_block_sparse_attention",
]
