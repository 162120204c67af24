"""Dynamic key-block selection: per call and head, score key blocks from block-pooled q and k and
keep the best ones beside a static part, as a ``BlockSparseMask`` built on the device.

The estimate: the mass a query block gives a key block is taken as ``count * exp(scale * q_mean .
k_mean)`` (mean-pooled q and k of the blocks, ``count`` the key block's valid tokens), normalized
over the row. Per query block the ``keep`` best key blocks outside the static part are added, or,
with ``mass``, the fewest of them (at most ``keep``) that bring the estimated mass, static part
included, to ``mass``. Every shape is fixed by the arguments (the mask's width is the static
part's widest row plus ``keep``), so nothing is read back to the host and it traces under
``torch.compile``. Only the selection is approximate: the attention over the selected blocks is
exact.

Cost, counted: pooling reads q and k once; the scores are ``2 Mq Mk D`` multiply-adds per (batch,
head), ``1 / (2 block^2)`` of dense attention's ``4 N^2 D`` (:func:`selection_flops`).
"""
from __future__ import annotations

import torch

from .mask import BlockSparseMask, blocks_to_indices


def pooled_blocks(x: torch.Tensor, token_order: torch.Tensor, block: int,
                  key_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 ``[B, M, H, D]`` mean of each block's valid tokens, fp32 ``[B or 1, M]`` their count) of
    ``x`` ``[B, N, H, D]`` (model order) in the tiled order ``token_order`` (-1: padding), with the
    tokens ``key_valid`` (bool ``[B, N]``) rules out left out."""
    B, N, H, D = x.shape
    L = token_order.numel()
    M = L // block
    idx = token_order.clamp(min=0).long()
    weight = (token_order >= 0)[None]  # [1, L]
    if key_valid is not None:
        weight = weight & key_valid[:, idx]  # [B, L]
    weight = weight.to(x.dtype)
    xt = x.index_select(1, idx).view(B, M, block, H * D)
    # A weighted sum over each block's tokens (a batched matmul: fp32 accumulation, no fp32 copy of x).
    w = weight.view(weight.shape[0], M, 1, block).expand(B, M, 1, block)
    sums = torch.matmul(w, xt).view(B, M, H, D).float()
    counts = weight.float().view(weight.shape[0], M, block).sum(-1)
    return sums / counts.clamp(min=1.0)[..., None, None], counts


def select_blocks(q: torch.Tensor, k: torch.Tensor, static: torch.Tensor, token_order: torch.Tensor, block: int,
                  keep: int, static_width: int, *, mass: float | None = None, key_valid: torch.Tensor | None = None,
                  scale: float | None = None, digest=None) -> BlockSparseMask:
    """The ``BlockSparseMask`` ``[B, H, M, width]`` of ``static`` (bool ``[Hs, M, M]``, Hs 1 or H: the
    blocks always visited) plus, per (batch, head, query block), the selected key blocks.

    q, k: ``[B, N, H, D]`` in model order; ``token_order``: the tiled order of the layout ``static``
    is on (``block`` tokens per block); ``static_width``: the widest row of ``static`` (the caller
    knows it once per layout; with it the mask's width is fixed, no read-back). Query blocks whose
    static row is empty (text queries that run dense beside the kernel, blocks without tokens)
    select nothing. ``scale`` (default ``D ** -0.5``) is the softmax scale the heads run at
    (temperature included). ``digest``: the layout's ``order_digest``, recorded on the mask."""
    B, N, H, D = q.shape
    if static.dim() != 3 or static.dtype != torch.bool or static.shape[0] not in (1, H):
        raise ValueError(f"static must be a bool block matrix [1 or {H}, M, M], got {tuple(static.shape)} {static.dtype}")
    M = static.shape[-1]
    if token_order.numel() != M * block:
        raise ValueError(f"token_order has {token_order.numel()} positions, but {M} blocks of {block} need {M * block}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1 (key blocks selected per query block), got {keep!r}")
    scale = D ** -0.5 if scale is None else float(scale)
    qm, _ = pooled_blocks(q, token_order, block)
    km, kcount = pooled_blocks(k, token_order, block, key_valid)
    scores = torch.einsum("bmhd,bnhd->bhmn", qm, km) * scale
    scores = scores + torch.where(kcount > 0, kcount.clamp(min=1.0).log(),
                                  torch.full_like(kcount, float("-inf")))[:, None, None, :]
    rows = static.any(-1)  # [Hs, M]: query blocks that attend here
    free = ~static & rows[..., None]  # candidates: outside the static part, on rows that attend
    cand = scores.masked_fill(~free, float("-inf"))
    n = min(keep, M)
    top, which = cand.topk(n, dim=-1)  # [B, H, M, n], best first
    take = top > float("-inf")
    if mass is not None:
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no valid key: all -inf
        static_mass = (p * static).sum(-1, keepdim=True)
        picked = p.gather(-1, which)
        before = static_mass + picked.cumsum(-1) - picked  # mass covered before each candidate
        take = take & (before < mass)
    added = torch.zeros(B, H, M, M, dtype=torch.bool, device=q.device).scatter_(-1, which, take)
    blocks = static.expand(B, H, M, M) | added
    counts, indices = blocks_to_indices(blocks, min(M, static_width + n))
    return BlockSparseMask(counts, indices, block, block, M, token_order_digest=digest, selected=True)


def selection_flops(num_tokens: int, block: int, head_dim: int) -> tuple[float, float]:
    """(selection FLOPs, dense attention FLOPs) per (batch, head) for ``num_tokens`` tokens in blocks
    of ``block``: pooling (one add per element of q and k) and the block scores, against the
    ``4 N^2 D`` of dense attention's two matmuls."""
    M = -(-num_tokens // block)
    select = 2.0 * num_tokens * head_dim + 2.0 * M * M * head_dim
    return select, 4.0 * num_tokens * num_tokens * head_dim
