"""Sparse attention under diffusers' context parallelism (Ulysses).

With ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))`` each rank
holds 1/P of the sequence inside the blocks. Before attention an all-to-all gives each rank the whole
sequence for H/P heads (heads ``rank*H/P ... (rank+1)*H/P - 1``), the per-head masks apply to those
heads unchanged, and a second all-to-all brings the output back to the rank's part of the sequence.
When H % P != 0 the heads are padded with zeros to a multiple of P (and dropped afterwards).

Ring attention (KV shards arriving one by one) does not line up with a block mask: a sparse plan
under ``ring_degree > 1`` is refused. The process group is diffusers' own Ulysses group (read from
its config's device mesh, a private diffusers attribute checked by the gloo tests).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ulysses:
    """The Ulysses group of this rank: ``degree`` ranks, this one at ``rank``."""

    group: object
    degree: int
    rank: int


def ulysses_of(transformer, sparse: bool) -> Ulysses | None:
    """The Ulysses setting of a transformer after ``enable_parallelism``, None without context
    parallelism (or with degree 1). Raises ValueError for ring attention with a sparse plan."""
    config = getattr(transformer, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None) if config is not None else None
    if cp is None:
        return None
    ring, ulysses = int(getattr(cp, "ring_degree", 1) or 1), int(getattr(cp, "ulysses_degree", 1) or 1)
    if ring > 1 and sparse:
        raise ValueError(
            f"sparse attention under ring attention (ring_degree={ring}) is not supported: ring attention "
            "passes KV shards from rank to rank and a block mask does not line up with them. Use Ulysses "
            "instead: ContextParallelConfig(ulysses_degree=P) (each rank then holds all tokens of H/P heads), "
            "or a dense plan")
    if ulysses <= 1:
        return None
    mesh = getattr(cp, "_ulysses_mesh", None)
    if mesh is None:
        raise RuntimeError("context parallelism is enabled but diffusers' Ulysses mesh is not set up")
    group = mesh.get_group()
    return Ulysses(group, ulysses, dist.get_rank(group))


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)  # contiguous like x: the collective fills it chunk by chunk along dim 0
    dist.all_to_all_single(out, x, group=group)
    return out


def sequence_to_heads(x: torch.Tensor, u: Ulysses) -> torch.Tensor:
    """[B, S/P, H, D] (this rank's tokens, all heads) -> [B, S, Hp/P, D] (all tokens, this rank's
    heads); H is padded with zero heads to Hp, a multiple of P."""
    B, S_local, H, D = x.shape
    P = u.degree
    Hp = -(-H // P) * P
    if Hp != H:
        x = torch.nn.functional.pad(x, (0, 0, 0, Hp - H))
    x = x.reshape(B, S_local, P, Hp // P, D).permute(2, 0, 1, 3, 4)  # [P (head chunk), B, S/P, Hp/P, D]
    x = _all_to_all(x, u.group)  # now [P (sequence chunk), B, S/P, Hp/P, D]
    return x.permute(1, 0, 2, 3, 4).reshape(B, P * S_local, Hp // P, D)


def heads_to_sequence(x: torch.Tensor, u: Ulysses, heads: int) -> torch.Tensor:
    """Inverse of :func:`sequence_to_heads`: [B, S, Hp/P, D] -> [B, S/P, heads, D]."""
    B, S, Hl, D = x.shape
    P = u.degree
    x = x.reshape(B, P, S // P, Hl, D).permute(1, 0, 2, 3, 4)  # [P (sequence chunk), B, S/P, Hp/P, D]
    x = _all_to_all(x, u.group)  # now [P (head chunk), B, S/P, Hp/P, D]
    x = x.permute(1, 2, 0, 3, 4).reshape(B, S // P, P * Hl, D)
    return x[:, :, :heads]


def head_imbalance(plan, layout, degree: int) -> list[dict]:
    """Per layer, the share of visited key blocks each of ``degree`` Ulysses ranks computes (heads split
    in contiguous chunks, padded heads visiting nothing) and the imbalance max / mean (1 = balanced)."""
    from ..masks import head_densities

    rows = []
    for layer in range(plan.num_layers):
        density = head_densities(plan.layer_specs(layer), layout)  # [H], each head on its own order
        H = density.numel()
        per = -(-H // degree)
        padded = torch.nn.functional.pad(density, (0, per * degree - H))
        load = padded.view(degree, per).sum(1)
        mean = float(load.mean())
        rows.append({"layer": layer, "rank_load": [round(float(x), 4) for x in load],
                     "imbalance": float(load.max()) / mean if mean > 0 else 1.0})
    return rows
