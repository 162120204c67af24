"""The independent reference: :func:`reference_attention` materializes the token-level mask and the
full score matrix (run it in float64; small N only). Tests compare every backend against it."""
from __future__ import annotations

import torch

from .mask import BlockSparseMask
from .order import tiled_position


def token_mask(
    mask: BlockSparseMask,
    seq_len: int,
    token_order: torch.Tensor | None = None,
    kv_token_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-level boolean mask ``[Bm, H, N, N]`` in model token order (``[B, H, N, N]`` for a
    ``[B, L]`` table of key orders, one per batch element).

    Without ``token_order`` token ``t`` lies in block ``t // block``. With it, tiled position ``p``
    holds token ``token_order[p]`` (-1 = padding), so token ``token_order[p]`` lies in block
    ``p // block``. Keys follow ``kv_token_order`` when given; a token it leaves out is never a key.
    """
    dense = mask.to_dense()
    ar = torch.arange(seq_len, device=dense.device)
    if token_order is None:
        q_pos, kv_pos = ar, ar
    else:
        q_pos = tiled_position(token_order.to(dense.device), seq_len)
        if (q_pos < 0).any():
            raise ValueError("token_order does not contain every token of the sequence")
        kv_pos = q_pos if kv_token_order is None else tiled_position(kv_token_order.to(dense.device), seq_len)
    if kv_pos.dim() == 2:  # a [B, L] table: each batch element's keys follow its own row
        B, H = kv_pos.shape[0], dense.shape[1]
        rows = dense.expand(B, -1, -1, -1)[:, :, q_pos // mask.q_block]  # [B, H, N, Mk]
        idx = (kv_pos.clamp(min=0) // mask.kv_block)[:, None, None, :].expand(B, H, seq_len, seq_len)
        return torch.gather(rows, 3, idx) & (kv_pos >= 0)[:, None, None, :]
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
