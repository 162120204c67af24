"""Measurements behind calibration, on one attention call's q, k, v (no N x N matrix is kept).

- :func:`head_errors`: relative error ||O_mask - O_dense|| / ||O_dense|| per head for each candidate mask.
- :func:`block_mass`: attention mass at block level, [H, Mq, Mk] (``ops.block_attention_mass``).
- :func:`sink_frames`: the frames whose key blocks take far more than their share of attention.
"""
from __future__ import annotations

import torch

from ..masks import VideoLayout
from ..integration.processor import _attend, key_order
from ..ops import BlockSparseMask, block_attention_mass


def dense_attention(q, k, v, key_valid=None):
    """Dense attention on [B, N, H, D] (the reference the candidates are judged against)."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    attn_mask = None if key_valid is None else key_valid[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask).transpose(1, 2)


def head_errors(q, k, v, o_dense, masks: list[BlockSparseMask], order, backend, key_valid=None) -> torch.Tensor:
    """float [C, H]: per candidate mask and head, the relative output error against dense, worst over
    the batch. Rows of padded (invalid) queries are left out."""
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
def block_mass(q, k, layout: VideoLayout, key_valid=None, backend=None) -> torch.Tensor:
    """float [H, Mq, Mk]: mean attention probability mass each query block gives each key block
    (rows sum to 1), averaged over the batch. q, k: [B, N, H, D] in model order."""
    order = layout.token_order(q.device)
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    if key_valid is None:
        return block_attention_mass(qh, kh, layout.block_size, token_order=order, backend=backend).mean(0)
    per_batch = []
    for b in range(q.shape[0]):
        kv_order = key_order(order, key_valid[b])
        per_batch.append(block_attention_mass(qh[b:b + 1], kh[b:b + 1], layout.block_size, token_order=order,
                                              kv_token_order=kv_order, backend=backend))
    return torch.cat(per_batch).mean(0)


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
