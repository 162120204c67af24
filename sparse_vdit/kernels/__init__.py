"""Triton kernels (``*_kernel``) and their launchers. Only ``sparse_vdit.ops`` imports this package;
it imports Triton, so ``ops`` imports it lazily, when the Triton backend runs.

Layering inside, as in flash-linear-attention: kernel (``*_kernel``) -> launcher (``*_fwd``, here)
-> custom op and public function (``sparse_vdit.ops``).
"""
from .attention import block_sparse_attention_fwd
from .mass import block_attention_mass_fwd
from .rope import rope_fwd
from .tiled_attention import block_sparse_attention_tiled_fwd
from .tiled_attention_bwd import block_sparse_attention_tiled_bwd

__all__ = ["block_attention_mass_fwd", "block_sparse_attention_fwd", "block_sparse_attention_tiled_bwd",
           "block_sparse_attention_tiled_fwd", "rope_fwd"]
