"""Measurements behind calibration, on one attention call's q, k, v (no N x N matrix is kept), and
the typed record they go into.

- :func:`head_errors`: relative error ||O_mask - O_dense|| / ||O_dense|| per head for each candidate mask.
- :func:`layer_attention_mass`: attention mass at block level, [H, Mq, Mk] (``ops.attention_mass``).
- :func:`sink_frames`: the frames whose key blocks take far more than their share of attention.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..masks import VideoLayout, spec_name
from ..ops import BlockSparseMask, attention_mass, sparse_attention


def option_names(candidates: list[dict], temperatures: tuple[float, ...] = ()) -> list[str]:
    """The options calibration measures per head, in record order: every candidate, then every
    candidate with the head's sink frames added; then the same again at each of ``temperatures``
    (besides 1), named with ``/T<t>``."""
    names = [spec_name(c) for c in candidates]
    base = names + [n + "+sinks" for n in names]
    return base + [n + f"/T{t:g}" for t in temperatures for n in base]


@dataclass
class LayerMeasurement:
    """What one sampled attention call of one layer measured, per option (see :func:`option_names`)
    and head. JSON-able through :meth:`to_dict` / :meth:`from_dict`."""

    layer: int
    step: int
    options: list[str]
    errors: list[list[float]]  # [option][head]: relative output error against dense
    densities: list[list[float]]  # [option][head]: fraction of key blocks visited
    sink_frames: list[list[int]]  # [head]
    mass_inside: list[list[float]] = field(default_factory=list)  # [option][head]
    top1pct_key_mass: list[float] = field(default_factory=list)  # [head]
    # [option]: what selecting the option's blocks costs per call, as a fraction of dense attention's
    # FLOPs (dynamic options; 0 for static masks). Empty: none.
    selection_cost: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], options: list[str] | None = None) -> "LayerMeasurement":
        """From a record dict; one without ``options`` (hand-made) is taken to follow ``options``."""
        if not isinstance(d, dict) or not {"layer", "step", "errors", "densities", "sink_frames"} <= set(d):
            raise ValueError(f"a calibration record needs layer, step, errors, densities and sink_frames; got {d!r:.200}")
        opts = d.get("options", options)
        if opts is None or len(opts) != len(d["errors"]):
            raise ValueError(f"record of layer {d['layer']} step {d['step']} has {len(d['errors'])} option rows, "
                             f"expected options {opts}")
        return cls(layer=int(d["layer"]), step=int(d["step"]), options=list(opts), errors=d["errors"],
                   densities=d["densities"], sink_frames=d["sink_frames"], mass_inside=d.get("mass_inside", []),
                   top1pct_key_mass=d.get("top1pct_key_mass", []), selection_cost=d.get("selection_cost", []))


def head_errors(q, k, v, o_dense, masks: list[BlockSparseMask], order, backend, key_valid=None,
                scale=None) -> torch.Tensor:
    """float [C, H]: per candidate mask and head, the relative output error against dense, worst over
    the batch. q, k, v, o_dense: [B, N, H, D]. Rows of padded (invalid) queries are left out.
    ``order``: the token order of the masks' layout, or a list of them, one per mask. ``scale``: the
    sparse heads' softmax scale (a temperature; ``o_dense`` stays the model's own output)."""
    orders = order if isinstance(order, (list, tuple)) else [order] * len(masks)
    ref = o_dense.float()
    if key_valid is not None:
        ref = ref * key_valid[:, :, None, None]
    ref_norm = ref.pow(2).sum(dim=(1, 3)).sqrt().clamp(min=1e-12)  # [B, H]
    out = []
    for mask, mask_order in zip(masks, orders):
        o = sparse_attention(q, k, v, mask, mask_order, key_valid=key_valid, backend=backend, scale=scale).float()
        if key_valid is not None:
            o = o * key_valid[:, :, None, None]
        err = (o - ref).pow(2).sum(dim=(1, 3)).sqrt() / ref_norm  # [B, H]
        out.append(err.max(dim=0).values)
    return torch.stack(out)


@torch.no_grad()
def layer_attention_mass(q, k, layout: VideoLayout, key_valid=None, backend=None) -> torch.Tensor:
    """float [H, Mq, Mk]: mean attention probability mass each query block gives each key block
    (rows sum to 1), averaged over the batch. q, k: [B, N, H, D] in model order."""
    return attention_mass(q, k, layout.block_size, layout.token_order(q.device), key_valid=key_valid,
                          backend=backend).mean(0)


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
    dense = mask.to_dense().float().mean(0).to(mass.device)  # a per-batch (selected) mask: its mean over batch
    if dense.shape[0] == 1:
        dense = dense.expand(mass.shape[0], -1, -1)
    return (mass * dense).sum(dim=(1, 2)) / mass.sum(dim=(1, 2)).clamp(min=1e-12)


def top_key_share(mass: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """float [H]: the share of all attention that the top ``fraction`` of key blocks receive."""
    received = mass.mean(dim=1)  # [H, Mk]
    top = received.topk(max(1, int(received.shape[1] * fraction)), dim=-1).values.sum(-1)
    return top / received.sum(-1).clamp(min=1e-12)


__all__ = ["LayerMeasurement", "head_errors", "layer_attention_mass", "mass_inside", "option_names", "sink_frames",
           "top_key_share"]
