"""Pure-torch implementations of block-sparse attention.

- :func:`reference_attention` materializes the token-level mask and the full score matrix. It is
  the independent reference the tests compare against (run it in float64); small N only.
- :func:`torch_block_sparse_attention` gathers only the listed key blocks per query block: the CPU
  backend, usable at demo sizes, with memory proportional to the visited pairs.
"""
from __future__ import annotations

import torch

from .mask import BlockSparseMask


def _tiled_position(order: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Position of each model token in the tiled sequence, -1 when the order leaves it out."""
    order = order.long()
    valid = order >= 0
    where = torch.full((seq_len,), -1, dtype=torch.long, device=order.device)
    where[order[valid]] = torch.arange(order.numel(), device=order.device)[valid]
    return where


def token_mask(
    mask: BlockSparseMask,
    seq_len: int,
    token_order: torch.Tensor | None = None,
    kv_token_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-level boolean mask ``[Bm, H, N, N]`` in model token order.

    Without ``token_order`` token ``t`` lies in block ``t // block``. With it, tiled position ``p``
    holds token ``token_order[p]`` (-1 = padding), so token ``token_order[p]`` lies in block
    ``p // block``. Keys follow ``kv_token_order`` when given; a token it leaves out is never a key.
    """
    dense = mask.to_dense()
    ar = torch.arange(seq_len, device=dense.device)
    if token_order is None:
        q_pos, kv_pos = ar, ar
    else:
        q_pos = _tiled_position(token_order.to(dense.device), seq_len)
        if (q_pos < 0).any():
            raise ValueError("token_order does not contain every token of the sequence")
        kv_pos = q_pos if kv_token_order is None else _tiled_position(kv_token_order.to(dense.device), seq_len)
    allowed = dense[:, :, q_pos // mask.q_block][:, :, :, kv_pos.clamp(min=0) // mask.kv_block]
    return allowed & (kv_pos >= 0)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask,
    scale: float | None = None,
    token_order: torch.Tensor | None = None,
    kv_token_order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked softmax attention, in the inputs' dtype (use float64 for a reference).

    q, k, v: [B, H, N, D]. Returns (o [B, H, N, D], lse [B, H, N]); rows with no visible key give
    o = 0 and lse = -inf.
    """
    B, H, N, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    allowed = token_mask(mask, N, token_order, kv_token_order)  # [Bm, Hm, N, N]
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isinf(lse)
    p = torch.exp(s - torch.where(empty, torch.zeros_like(lse), lse).unsqueeze(-1))
    o = torch.einsum("bhqk,bhkd->bhqd", p, v)
    o = o.masked_fill(empty.unsqueeze(-1), 0.0)
    return o, lse


def torch_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    token_order: torch.Tensor | None,
    kv_token_order: torch.Tensor | None,
    scale: float,
    q_block: int,
    kv_block: int,
    num_q_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-gather attention in torch (the CPU backend); same contract as the Triton launcher.

    Computes in fp32 (or float64 when given float64) and visits only listed key blocks.
    """
    B, H, N, D = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    L = num_q_blocks * q_block
    if token_order is None:
        order = torch.arange(L, device=q.device)
        order = torch.where(order < N, order, torch.full_like(order, -1))
    else:
        order = token_order.long()
    valid_pos = order >= 0
    gather = order.clamp(min=0)

    kv_gather = gather if kv_token_order is None else kv_token_order.long().clamp(min=0)

    def tiled(x, pad_len, idx):
        xt = x.to(compute)[:, :, idx]  # [B, H, L, D]
        if pad_len > L:
            xt = torch.nn.functional.pad(xt, (0, 0, 0, pad_len - L))
        return xt

    # Key blocks span the tiled sequence; without a token order they may reach past the query blocks.
    Lk = L if token_order is not None else max(L, -(-N // kv_block) * kv_block)
    qt = tiled(q, L, gather).view(B, H, num_q_blocks, q_block, D)
    kt = tiled(k, Lk, kv_gather)
    vt = tiled(v, Lk, kv_gather)
    key_order_valid = valid_pos if kv_token_order is None else kv_token_order >= 0
    key_valid = torch.nn.functional.pad(key_order_valid, (0, Lk - L))

    Bm, Hm = kv_counts.shape[:2]
    K = kv_indices.shape[-1]
    counts = kv_counts.long().expand(B if Bm == 1 else Bm, H if Hm == 1 else Hm, -1)
    idx = kv_indices.long().expand(B if Bm == 1 else Bm, H if Hm == 1 else Hm, -1, -1)
    slot_valid = torch.arange(K, device=q.device) < counts.unsqueeze(-1)  # [B, H, Mq, K]
    tok = (idx.unsqueeze(-1) * kv_block + torch.arange(kv_block, device=q.device))  # [B, H, Mq, K, bk]
    tok = tok.flatten(-2)  # [B, H, Mq, K*bk]
    visible = slot_valid.repeat_interleave(kv_block, dim=-1) & key_valid[tok]

    out = torch.empty(B, H, num_q_blocks, q_block, D, dtype=compute, device=q.device)
    lse = torch.empty(B, H, num_q_blocks, q_block, dtype=compute, device=q.device)
    # Loop over heads to bound memory at [B, Mq, bq, K*bk].
    for h in range(H):
        tok_h = tok[:, h]  # [B, Mq, K*bk]
        kg = torch.gather(kt[:, h].unsqueeze(1).expand(-1, num_q_blocks, -1, -1), 2,
                          tok_h.unsqueeze(-1).expand(-1, -1, -1, D))
        vg = torch.gather(vt[:, h].unsqueeze(1).expand(-1, num_q_blocks, -1, -1), 2,
                          tok_h.unsqueeze(-1).expand(-1, -1, -1, D))
        s = torch.einsum("bmqd,bmkd->bmqk", qt[:, h], kg) * scale
        s = s.masked_fill(~visible[:, h].unsqueeze(2), float("-inf"))
        lse_h = torch.logsumexp(s, dim=-1)
        empty = torch.isinf(lse_h)
        p = torch.exp(s - torch.where(empty, torch.zeros_like(lse_h), lse_h).unsqueeze(-1))
        out[:, h] = torch.einsum("bmqk,bmkd->bmqd", p, vg).masked_fill(empty.unsqueeze(-1), 0.0)
        lse[:, h] = lse_h

    out = out.view(B, H, L, D)
    lse = lse.view(B, H, L)
    o = q.new_zeros(B, H, N, D)
    lse_out = torch.full((B, H, N), float("-inf"), dtype=torch.float32, device=q.device)
    o[:, :, order[valid_pos]] = out[:, :, valid_pos].to(q.dtype)
    lse_out[:, :, order[valid_pos]] = lse[:, :, valid_pos].to(torch.float32)
    return o, lse_out
