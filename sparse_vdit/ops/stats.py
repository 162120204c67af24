"""Block-level attention statistics: how much attention mass each query block gives each key block
under dense attention, without storing an N x N matrix (Triton kernel on CUDA, chunked torch
elsewhere). Calibration uses it to find where the mass is and which keys are sinks."""
from __future__ import annotations

import torch

from .attention import block_sparse_attention, default_backend
from .mask import BlockSparseMask, _pair


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
    q_block, kv_block = _pair(block_size)
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
    if backend == "triton":
        from sparse_vdit.kernels import block_attn_mass

        sums = block_attn_mass(q, k, lse, token_order, kv_token_order, scale, q_block, kv_block, Mq, Mk)
    else:
        sums = _torch_block_mass(q, k, lse, token_order, kv_token_order, scale, q_block, kv_block, Mq, Mk, chunk_bytes)
    return sums / counts[None, None, :, None]


def _torch_block_mass(q, k, lse, token_order, kv_token_order, scale, q_block, kv_block, Mq, Mk, chunk_bytes):
    B, H, N, D = q.shape
    Lq, Lk = Mq * q_block, Mk * kv_block

    def positions(order, length):
        if order is None:
            idx = torch.arange(length, device=q.device)
            return idx.clamp(max=N - 1), idx < N
        return order.long().clamp(min=0), order >= 0

    q_idx, q_ok = positions(token_order, Lq)
    k_idx, k_ok = positions(kv_token_order if kv_token_order is not None else token_order, Lk)
    sums = torch.zeros(B, H, Mq, Mk, dtype=torch.float64, device=q.device)
    chunk = max(q_block, (chunk_bytes // max(1, H * Lk * 4)) // q_block * q_block)
    for b in range(B):
        kt = k[b][:, k_idx].float()  # [H, Lk, D]
        lse_t = lse[b][:, q_idx]  # [H, Lq]
        for c0 in range(0, Lq, chunk):
            c1 = min(Lq, c0 + chunk)
            qt = q[b][:, q_idx[c0:c1]].float()
            s = torch.einsum("hcd,hld->hcl", qt, kt) * scale
            row_lse = lse_t[:, c0:c1]
            ok = q_ok[c0:c1][None, :, None] & k_ok[None, None, :] & torch.isfinite(row_lse)[..., None]
            p = torch.where(ok, torch.exp(s - torch.where(torch.isfinite(row_lse), row_lse, 0)[..., None]), 0.0)
            per = p.view(H, (c1 - c0) // q_block, q_block, Mk, kv_block).sum(dim=(2, 4))
            sums[b, :, c0 // q_block:c1 // q_block] += per.double()
    return sums.float()
