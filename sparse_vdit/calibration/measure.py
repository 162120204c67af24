"""Measurements behind calibration, on one attention call's q, k, v (no N x N matrix is kept).

- :func:`head_errors`: relative error ||O_mask - O_dense|| / ||O_dense|| per head for each candidate mask.
- :func:`block_mass`: attention mass at block level, [H, Mq, Mk], computed in query chunks.
- :func:`sink_frames`: the frames whose key blocks take far more than their share of attention.
"""
from __future__ import annotations

import torch

from ..masks import VideoLayout
from ..ops import BlockSparseMask


def dense_attention(q, k, v, key_valid=None):
    """Dense attention on [B, N, H, D] (the reference the candidates are judged against)."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    attn_mask = None if key_valid is None else key_valid[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask).transpose(1, 2)


def head_errors(q, k, v, o_dense, masks: list[BlockSparseMask], order, backend, key_valid=None) -> torch.Tensor:
    """float [C, H]: per candidate mask and head, the relative output error against dense, worst over
    the batch. Rows of padded (invalid) queries are left out."""
    from ..integration.processor import _attend

    ref = o_dense.float()
    if key_valid is not None:
        ref = ref * key_valid[:, :, None, None]
    ref_norm = ref.pow(2).sum(dim=(1, 3)).sqrt().clamp(min=1e-12)  # [B, H]
    out = []
    for mask in masks:
        o = _attend(q, k, v, mask, order, backend, key_valid).float()
        if key_valid is not None:
            o = o * key_valid[:, :, None, None]
        err = (o - ref).pow(2).sum(dim=(1, 3)).sqrt() / ref_norm  # [B, H]
        out.append(err.max(dim=0).values)
    return torch.stack(out)


@torch.no_grad()
def block_mass(q, k, layout: VideoLayout, key_valid=None, scale=None, budget_bytes: int = 1 << 28) -> torch.Tensor:
    """float [H, Mq, Mk]: mean attention probability mass each query block gives each key block
    (rows sum to 1), averaged over the batch; computed in query chunks of the tiled sequence."""
    B, N, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    order = layout.token_order(q.device).long()
    valid = order >= 0
    safe = order.clamp(min=0)
    L, bs, M = order.numel(), layout.block_size, layout.num_blocks
    total = torch.zeros(H, M, M, dtype=torch.float64, device=q.device)
    counts = torch.zeros(M, dtype=torch.float64, device=q.device)
    chunk = max(bs, (budget_bytes // max(1, H * L * 4)) // bs * bs)
    for b in range(B):
        kt = k[b, safe].transpose(0, 1).float()  # [H, L, D]
        key_ok = valid if key_valid is None else valid & key_valid[b, safe]
        for c0 in range(0, L, chunk):
            c1 = min(L, c0 + chunk)
            qt = q[b, safe[c0:c1]].transpose(0, 1).float()  # [H, c, D]
            s = torch.einsum("hcd,hld->hcl", qt, kt) * scale
            s = s.masked_fill(~key_ok[None, None, :], float("-inf"))
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)
            p = p * valid[c0:c1][None, :, None]  # padding queries give nothing
            per_key_block = p.view(H, c1 - c0, M, bs).sum(-1)  # [H, c, M]
            per_block = per_key_block.view(H, (c1 - c0) // bs, bs, M).sum(2)  # [H, c/bs, M]
            total[:, c0 // bs:c1 // bs] += per_block.double()
            counts[c0 // bs:c1 // bs] += valid[c0:c1].view(-1, bs).sum(-1).double()
    return (total / counts.clamp(min=1)[None, :, None]).float()


def sink_frames(mass: torch.Tensor, layout: VideoLayout, factor: float = 4.0) -> list[list[int]]:
    """Per head, the latent frames whose key blocks receive at least ``factor`` times the attention a
    uniform spread would give them (averaged over query blocks)."""
    H = mass.shape[0]
    nv = layout.num_video_blocks
    received = mass[:, :, :nv].mean(dim=1)  # [H, nv] share per key block
    uniform = received.sum(-1, keepdim=True) / nv
    frames = layout.frame_range_of_blocks()[:, 0]
    out = []
    for h in range(H):
        hot = (received[h] >= factor * uniform[h]).nonzero().squeeze(1)
        out.append(sorted({int(f) for f in frames[hot].tolist()}))
    return out


def mass_inside(mass: torch.Tensor, mask: BlockSparseMask) -> torch.Tensor:
    """float [H]: share of attention mass that falls inside ``mask``'s blocks."""
    dense = mask.to_dense()[0].to(mass.device)
    if dense.shape[0] == 1:
        dense = dense.expand(mass.shape[0], -1, -1)
    return (mass * dense).sum(dim=(1, 2)) / mass.sum(dim=(1, 2)).clamp(min=1e-12)


__all__ = ["block_mass", "dense_attention", "head_errors", "mass_inside", "sink_frames"]
