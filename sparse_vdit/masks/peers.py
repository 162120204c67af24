"""The peers' own masks, written from their rules, and their projection onto any ``VideoLayout``.

Each peer builds its mask on a token partition of its own choosing: Sliding Tile Attention on
(6, 8, 8) tiles, Radial Attention and Sparse VideoGen's spatial head on 128-token blocks of the
raster sequence, Sparse VideoGen's temporal head on 128-token blocks of the position-major
sequence, Sparse-vDiT on 64-token raster blocks. A :class:`PeerMask` is that partition (the peer
block of every video token) plus the peer's boolean block matrix. :func:`project` turns it into
our block matrix on a layout: the smallest set of our blocks that covers every (query, key) token
pair the peer visits, so recall is 1 on every layout, and the density matches the peer's when the
layout's blocks nest in the peer's (``aligned_layout``). :func:`compare` counts both exactly.

Video tokens only: text keys and text queries are handled the same way for every family (text
keys visited by all queries, text queries dense), as the peers do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .layout import VideoLayout

Spec = dict[str, Any]


@dataclass(frozen=True)
class PeerMask:
    """A peer's mask on its own partition.

    assign: int64 ``[num_video_tokens]``: the peer block of each video token (raster order).
    blocks: bool ``[P, P]``: peer block i visits peer block j.
    """

    assign: torch.Tensor
    blocks: torch.Tensor

    def token_mask(self) -> torch.Tensor:
        """bool ``[N, N]`` over video tokens (small grids only: for tests and pictures)."""
        return self.blocks[self.assign[:, None], self.assign[None, :]]

    def density(self) -> float:
        """Share of (query, key) video-token pairs the peer visits."""
        n = torch.bincount(self.assign, minlength=self.blocks.shape[0]).double()
        return float(n @ self.blocks.double() @ n) / float(n.sum()) ** 2


def _grid_coords(layout: VideoLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    v = torch.arange(layout.num_video_tokens)
    hw = layout.height * layout.width
    return v // hw, (v // layout.width) % layout.height, v % layout.width


# ---------------------------------------------------------------------------- Sliding Tile Attention
def sta(spec: Spec, layout: VideoLayout) -> PeerMask:
    """FastVideo's STA: tiles of ``tile`` tokens; a query tile sees the ``window`` of tiles around it,
    the window's centre clamped to stay ``window // 2`` tiles inside the tile grid, so at the edges
    windows slide inward instead of being cut. Grids that tiles do not divide get partial edge tiles
    (the peer pads the video instead)."""
    tile, window = spec["tile"], spec["window"]
    f, h, w = _grid_coords(layout)
    n = [-(-size // t) for size, t in zip((layout.frames, layout.height, layout.width), tile)]
    assign = ((f // tile[0]) * n[1] + h // tile[1]) * n[2] + w // tile[2]
    keep = None
    for axis in range(3):
        c = torch.arange(n[axis])
        half = window[axis] // 2
        centre = torch.minimum(torch.maximum(c, torch.tensor(half)), torch.tensor(n[axis] - 1 - half))
        near = (centre[:, None] - c[None, :]).abs() <= half  # [query tile coord, key tile coord]
        shape = [1] * 6
        shape[axis], shape[3 + axis] = n[axis], n[axis]
        near = near.view(shape)
        keep = near if keep is None else keep & near
    P = n[0] * n[1] * n[2]
    return PeerMask(assign, keep.reshape(P, P))


# ---------------------------------------------------------------------------- Radial Attention
def radial_width(dist: int, frame_tokens: int, variant: str, decay_factor: float, block: int) -> float:
    """The band half-width (in-frame raster tokens) between two frames ``dist`` apart."""
    if dist == 0 or (variant == "hunyuan" and dist == 1):
        return float(frame_tokens)
    if dist == 1:  # wan
        return float(frame_tokens // 2)
    decay = 2 ** frame_tokens.bit_length() / 2 ** dist.bit_length() * decay_factor
    return max(decay, float(block))


def radial_frame_kept(dist: int, frame_tokens: int, block: int) -> bool:
    """Whether frames ``dist`` apart are visited at all (parity thinning once the band is at its floor)."""
    decay = 2 ** frame_tokens.bit_length() / 2 ** dist.bit_length()
    if decay >= block:
        return True
    return dist % int(block / decay) == 0


def _shrunk_band(frame_tokens: int, width: float, rem_r: int, rem_c: int, block: int) -> torch.Tensor:
    """Radial's block rule for one frame pair whose band is ``|c - r| <= width`` (in-frame raster
    indices), the query frame starting ``rem_r`` and the key frame ``rem_c`` tokens into a block:
    a block is kept when more than 60% of its touched key columns are covered on more than a third
    of its rows. Returns bool ``[k, k]``, k = ceil(frame_tokens / block) (rows beyond are dropped,
    as the peer does)."""
    k = -(-frame_tokens // block)
    R = torch.arange(k)
    lo = (R * block - rem_r).clamp(min=0)
    hi = (R * block + block - 1 - rem_r).clamp(max=frame_tokens - 1)
    x = torch.arange(k * block)
    c = x - rem_c
    in_frame = (c >= 0) & (c < frame_tokens)
    wd = int(math.floor(width))
    top = torch.minimum(c[None, :] + wd, hi[:, None])
    bottom = torch.maximum(c[None, :] - wd, lo[:, None])
    count = (top - bottom + 1).clamp(min=0) * in_frame[None, :]  # rows covering column c, per row block
    count = count.view(k, k, block)
    touched = (count > 0).sum(-1)
    high = (3 * count > block).sum(-1)
    return 5 * high > 3 * touched


def radial(spec: Spec, layout: VideoLayout) -> PeerMask:
    """Radial Attention (mit-han-lab): 128-token blocks of the raster video. Between frames i and j
    (distance d): key frame 0 is always seen (attention sink); otherwise a band on the in-frame raster
    index, the whole frame for d = 0 (and d = 1 on HunyuanVideo, half a frame on Wan), beyond that
    half as wide each time d doubles but never below one block; once the band is at that floor,
    frame pairs are kept only when d is a multiple of the thinning factor. Each frame pair's band is
    rounded to blocks by the peer's rule (see ``_shrunk_band``); the video's last partial block is dense."""
    S, F, B = layout.height * layout.width, layout.frames, spec["block"]
    N = S * F
    nb = -(-N // B)
    out = torch.zeros(nb, nb, dtype=torch.bool)
    border = N // B
    out[border:, :] = True
    out[:, border:] = True
    k = -(-S // B)
    cache: dict[tuple, torch.Tensor] = {}
    for i in range(F):
        for j in range(F):
            d = abs(i - j)
            if j == 0:
                width = float(S)
            elif radial_frame_kept(d, S, B):
                width = radial_width(d, S, spec["variant"], spec["decay_factor"], B)
            else:
                continue
            key = (min(width, float(S)), (i * S) % B, (j * S) % B)
            if key not in cache:
                cache[key] = _shrunk_band(S, *key, B)
            r0, c0 = (i * S) // B, (j * S) // B
            sub = cache[key][: nb - r0, : nb - c0]
            out[r0: r0 + k, c0: c0 + k] |= sub
    return PeerMask(torch.arange(N) // B, out)


# ---------------------------------------------------------------------------- Sparse VideoGen
def _band(nb: int, reach: int) -> torch.Tensor:
    i = torch.arange(nb)
    return (i[:, None] - i[None, :]).abs() < reach


def svg_spatial(spec: Spec, layout: VideoLayout) -> PeerMask:
    """Sparse VideoGen's spatial head: 128-token blocks of the raster video, block distance below
    ``floor(width_frames * frame_tokens) // 128`` (about 1.5 frames either side at the default)."""
    S, B = layout.height * layout.width, spec["block"]
    N = layout.num_video_tokens
    reach = int(math.floor(spec["width_frames"] * S)) // B
    return PeerMask(torch.arange(N) // B, _band(-(-N // B), reach))


def svg_temporal(spec: Spec, layout: VideoLayout) -> PeerMask:
    """Sparse VideoGen's temporal head: the spatial head's band, on the position-major sequence
    (index ``position * frames + frame``): each token sees every frame of the positions near it."""
    S, F, B = layout.height * layout.width, layout.frames, spec["block"]
    v = torch.arange(S * F)
    major = (v % S) * F + v // S
    reach = int(math.floor(spec["width_frames"] * S)) // B
    return PeerMask(major // B, _band(-(-(S * F) // B), reach))


# ---------------------------------------------------------------------------- Sparse-vDiT
def _offset_cover(layout: VideoLayout, block: int, width: int, period: int | None) -> torch.Tensor:
    """bool ``[nb, nb]`` over raster blocks: some token pair (q, k) of the two blocks has
    ``|q - k - d * period| <= width`` for an integer ``|d| < frames`` (d = 0 only without a period)."""
    N = layout.num_video_tokens
    nb = -(-N // block)
    start = torch.arange(nb) * block
    end = torch.clamp(start + block, max=N) - 1
    xlo = (start[:, None] - end[None, :]) - width  # smallest q - k, widened
    xhi = (end[:, None] - start[None, :]) + width
    if period is None:
        return (xlo <= 0) & (xhi >= 0)
    F = layout.frames
    dlo = torch.div(xlo + period - 1, period, rounding_mode="floor").clamp(min=-(F - 1))
    dhi = torch.div(xhi, period, rounding_mode="floor").clamp(max=F - 1)
    return dlo <= dhi


def svd_diagonal(spec: Spec, layout: VideoLayout) -> PeerMask:
    """Sparse-vDiT's diagonal pattern (our reading of the paper; its code is unreleased): raster
    tokens within ``width`` of each other, on ``block``-token raster blocks."""
    B = spec["block"]
    return PeerMask(torch.arange(layout.num_video_tokens) // B, _offset_cover(layout, B, spec["width"], None))


def svd_multi_diagonal(spec: Spec, layout: VideoLayout) -> PeerMask:
    """Sparse-vDiT's multi-diagonal pattern: the diagonal repeated one frame apart, i.e. the same
    position (within ``width`` raster tokens) in every frame."""
    B = spec["block"]
    S = layout.height * layout.width
    return PeerMask(torch.arange(layout.num_video_tokens) // B, _offset_cover(layout, B, spec["width"], S))


def svd_stripe(spec: Spec, layout: VideoLayout) -> PeerMask:
    """Sparse-vDiT's vertical-stripe pattern: every query sees the keys of the first ``frames``
    frames (the stripes) and its own neighbourhood of ``width`` raster tokens."""
    B = spec["block"]
    N, S = layout.num_video_tokens, layout.height * layout.width
    blocks = _offset_cover(layout, B, spec["width"], None)
    stripe_end = min(spec["frames"] * S, N)
    if stripe_end:
        blocks[:, : -(-stripe_end // B)] = True
    return PeerMask(torch.arange(N) // B, blocks)


PEERS = {
    "sta": sta, "radial_attn": radial, "svg_spatial": svg_spatial, "svg_temporal": svg_temporal,
    "svd_diagonal": svd_diagonal, "svd_multi_diagonal": svd_multi_diagonal, "svd_stripe": svd_stripe,
}


# ---------------------------------------------------------------------------- projection and comparison
def _incidence(layout: VideoLayout, assign: torch.Tensor, num_peer: int, device, counts: bool) -> torch.Tensor:
    """``[num_video_blocks, num_peer]``: tokens of our block i in peer block j (or 1 / 0)."""
    ours = layout.video_token_blocks().to(device)
    flat = ours * num_peer + assign.to(device)
    n = torch.bincount(flat, minlength=layout.num_video_blocks * num_peer).view(layout.num_video_blocks, num_peer)
    return n.double() if counts else (n > 0).float()


def project(peer: PeerMask, layout: VideoLayout, device=None) -> torch.Tensor:
    """Our video block matrix ``[num_video_blocks, num_video_blocks]`` covering every token pair the
    peer visits: block pair (a, b) is visited when some token of a and some token of b sit in peer
    blocks that the peer pairs. Built on ``device``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    C = _incidence(layout, peer.assign, peer.blocks.shape[0], device, counts=False)
    P = peer.blocks.to(device).float()
    return (C @ P @ C.T) > 0


def compare(video_blocks: torch.Tensor, layout: VideoLayout, peer: PeerMask) -> dict[str, float]:
    """Exact token-pair counts of our video block matrix against the peer's mask: ``recall`` (share of
    the peer's pairs we visit), ``density`` (share of all video pairs we visit), ``peer_density``."""
    C = _incidence(layout, peer.assign, peer.blocks.shape[0], "cpu", counts=True)
    ours = video_blocks.cpu().double()
    n_ours = C.sum(1)
    n_peer = C.sum(0)
    both = float(((C.T @ ours @ C) * peer.blocks.double()).sum())
    peer_pairs = float(n_peer @ peer.blocks.double() @ n_peer)
    our_pairs = float(n_ours @ ours @ n_ours)
    total = float(layout.num_video_tokens) ** 2
    return {"recall": both / peer_pairs if peer_pairs else 1.0, "density": our_pairs / total,
            "peer_density": peer_pairs / total}


def aligned_layout(kind: str, frames: int, height: int, width: int, spec: Spec | None = None,
                   block: int = 64) -> VideoLayout:
    """The layout on which a peer family reaches the peer's own density: STA's tiles, raster order
    for Radial, Sparse VideoGen's spatial head and Sparse-vDiT, position-major order for Sparse
    VideoGen's temporal head (blocks of ``block`` tokens nest in the peer's 128-token blocks)."""
    if kind == "sta":
        tile = tuple((spec or {}).get("tile", (6, 8, 8)))
        return VideoLayout(frames, height, width, tile=tile, block=block)
    order = "hwf" if kind == "svg_temporal" else "fhw"
    return VideoLayout(frames, height, width, tile=(0, 0, 0), block=block, order=order)
