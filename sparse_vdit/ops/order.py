"""Token orders: the tiled sequence's position -> model token tables that every backend reads."""
from __future__ import annotations

import torch


def tiled_position(order: torch.Tensor, seq_len: int) -> torch.Tensor:
    """int64 ``[seq_len]``: the tiled position of each model token (the inverse of ``order``), -1
    where the order leaves a token out."""
    order = order.long()
    valid = order >= 0
    where = torch.full((seq_len,), -1, dtype=torch.long, device=order.device)
    where[order[valid]] = torch.arange(order.numel(), device=order.device)[valid]
    return where


def key_order(order: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """``order`` with the tokens that ``key_valid`` (bool [N], model order) rules out set to -1."""
    return torch.where((order >= 0) & key_valid[order.clamp(min=0).long()], order, torch.full_like(order, -1))


def order_digest(order: torch.Tensor | None) -> tuple[int, int] | None:
    """A cheap fingerprint of a token order, (length, position-weighted checksum): a mask built for
    one layout records it, and the attention entry compares it with the order it is given."""
    if order is None:
        return None
    o = order.long()
    weights = torch.arange(1, o.numel() + 1, device=o.device) % 65521
    return int(o.numel()), int(((o + 2) * weights).sum())
