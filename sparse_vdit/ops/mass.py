"""Block-level attention statistics: how much attention mass each query block gives each key block
under dense attention, without storing an N x N matrix (Triton kernel on CUDA, chunked torch
elsewhere). Calibration uses it to find where the mass is and which keys are sinks."""
from __future__ import annotations

import torch

from .attention import block_sparse_attention, default_backend
from .mask import BlockSparseMask, block_pair
from .torch_backend import torch_block_attention_mass


def block_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int | tuple[int, int] = 64,
    *,
    token_order: torch.Tensor | None = None,
    kv_token_order: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    chunk_bytes: int = 1 << 28,
) -> torch.Tensor:
    """Mean dense-attention probability mass per (query block, key block).

    Args:
        q, k: ``[B, H, N, D]`` (any strides).
        block_size: int or (q_block, kv_block).
        token_order, kv_token_order: as in :func:`block_sparse_attention` (tiled blocks; keys a
            kv order leaves out get no mass).
    Returns:
        fp32 ``[B, H, Mq, Mk]``; each row sums to 1 (0 for a block without valid queries).
    """
    q_block, kv_block = block_pair(block_size)
    B, H, N, D = q.shape
    length = N if token_order is None else token_order.numel()
    Mq, Mk = -(-length // q_block), -(-length // kv_block)
    backend = backend or default_backend(q.device)
    scale = D ** -0.5 if scale is None else float(scale)
    # Every key block for every query block, built directly (no block matrix to sort).
    dense = BlockSparseMask(torch.full((1, 1, Mq), Mk, dtype=torch.int32, device=q.device),
                            torch.arange(Mk, dtype=torch.int32, device=q.device).expand(1, 1, Mq, Mk),
                            q_block, kv_block, Mk)
    # The dense LSE per query (the value input is irrelevant to it: k stands in).
    _, lse = block_sparse_attention(q, k, k, dense, scale=scale, return_lse=True, token_order=token_order,
                                    kv_token_order=kv_token_order, backend=backend if backend != "flex" else "torch")
    if token_order is None:
        q_valid = torch.arange(Mq * q_block, device=q.device) < N
    else:
        q_valid = token_order >= 0
    counts = q_valid.view(Mq, q_block).sum(-1).clamp(min=1).float()
    # The mass kernel wherever a Triton backend would run: calibration passes "auto" on CUDA.
    if backend in ("triton", "triton_gather") or (backend == "auto" and q.device.type == "cuda"
                                                 and q.dtype in (torch.float16, torch.bfloat16)):
        from ..kernels import block_attention_mass_fwd

        sums = block_attention_mass_fwd(q, k, lse, token_order, kv_token_order, scale, q_block, kv_block, Mq, Mk)
    else:
        sums = torch_block_attention_mass(q, k, lse, token_order, kv_token_order, scale, q_block, kv_block, Mq, Mk, chunk_bytes)
    return sums / counts[None, None, :, None]
