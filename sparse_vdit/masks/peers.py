"""The peers' own masks, written from their current code, and their projection onto any ``VideoLayout``.

Each peer builds its mask on a token partition of its own choosing: Sliding Tile Attention on
(6, 8, 8) tiles, Radial Attention on 128-token blocks of the raster sequence, Sparse VideoGen on
128-token blocks of the raster sequence (spatial heads) or of the position-major sequence (temporal
heads), Sparse-vDiT on 64-token raster blocks. A :class:`PeerMask` is that partition (the peer's
sequence index and block of every video token), the peer block pairs it visits whole, and, for
peers that mask token by token (Sparse VideoGen at run time), the block pairs it visits in part
with the token predicate that decides them. :func:`project` turns it into our block matrix on a
layout: the smallest set of our blocks that covers every (query, key) token pair the peer visits,
so recall is 1 on every layout, and the density is near the peer's when the layout's blocks nest in
the peer's (``aligned_layout``). :func:`compare` counts both exactly.

The commits each transcription follows (``PEER_COMMITS``) are the ones ``bench peers --peer-src``
checks it against, by running the peer's own mask code.

Video tokens only: text keys and text queries are handled the same way for every family (text
keys visited by all queries, text queries dense), as the peers do.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .layout import VideoLayout

Spec = dict[str, Any]
# predicate(q_seq, k_seq) -> bool, on the peer's sequence indices (broadcasting int64 tensors)
Predicate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PEER_COMMITS = {
    "sta": "hao-ai-lab/FastVideo 908c43ca (fastvideo-kernel/tests/support_flex_sta.py, the last commit "
           "that has it; STA left FastVideo's HEAD in 7cd5d021)",
    "radial_attn": "mit-han-lab/radial-attention 72788d4 (radial_attn/attn_mask.py, 2025-11-11)",
    "svg": "svg-project/Sparse-VideoGen 5ce7b01 (svg/models/{wan,hyvideo}/utils.py and inference.py, 2025-12-09)",
}


@dataclass(frozen=True)
class PeerMask:
    """A peer's mask on its own partition.

    assign: int64 ``[num_video_tokens]``: the peer block of each video token (raster order).
    blocks: bool ``[P, P]``: peer block i visits every token pair with peer block j.
    partial: bool ``[P, P]`` or None: block pairs visited only where ``predicate`` holds.
    seq: int64 ``[num_video_tokens]`` or None: each video token's index in the peer's sequence
        (``assign == seq // block``); needed with ``partial``.
    predicate: ``predicate(q_seq, k_seq) -> bool`` on peer sequence indices, or None.
    block: tokens per peer block (with ``partial``).
    """

    assign: torch.Tensor
    blocks: torch.Tensor
    partial: torch.Tensor | None = None
    seq: torch.Tensor | None = None
    predicate: Predicate | None = None
    block: int = 0

    def token_mask(self) -> torch.Tensor:
        """bool ``[N, N]`` over video tokens (small grids only: for tests and pictures)."""
        a = self.assign
        out = self.blocks[a[:, None], a[None, :]]
        if self.partial is not None:
            out = out | (self.partial[a[:, None], a[None, :]] & self.predicate(self.seq[:, None], self.seq[None, :]))
        return out

    def density(self) -> float:
        """Share of (query, key) video-token pairs the peer visits."""
        n = torch.bincount(self.assign, minlength=self.blocks.shape[0]).double()
        pairs = float(n @ self.blocks.double() @ n)
        for _, _, hit in _partial_pairs(self):
            pairs += float(hit.sum())
        return pairs / float(n.sum()) ** 2


def _partial_pairs(peer: PeerMask, chunk: int = 64):
    """Yield ``(q_tok, k_tok, hit)`` over the peer's partial block pairs, ``chunk`` pairs at a time:
    raster token ids ``[c, B, 1]`` / ``[c, 1, B]`` (-1 where a block runs past the video) and bool
    ``hit [c, B, B]``: the pair is a video pair the predicate visits."""
    if peer.partial is None:
        return
    B = peer.block
    P = peer.blocks.shape[0]
    inv = torch.full((P * B,), -1, dtype=torch.long)
    inv[peer.seq] = torch.arange(peer.seq.numel())
    pairs = torch.nonzero(peer.partial & ~peer.blocks)
    r = torch.arange(B)
    for s in range(0, pairs.shape[0], chunk):
        i, j = pairs[s: s + chunk, 0], pairs[s: s + chunk, 1]
        q_seq = (i[:, None] * B + r)[:, :, None]
        k_seq = (j[:, None] * B + r)[:, None, :]
        q_tok, k_tok = inv[q_seq], inv[k_seq]
        hit = peer.predicate(q_seq, k_seq) & (q_tok >= 0) & (k_tok >= 0)
        yield q_tok, k_tok, hit


def count_pairs(layout: VideoLayout, predicate: Predicate, seq: torch.Tensor, chunk: int = 256,
                compile: bool = False) -> torch.Tensor:
    """int64 ``[num_video_blocks, num_video_blocks]``: for each pair of our video blocks, the token
    pairs ``predicate(seq[q], seq[k])`` visits, counted exactly by evaluating it on every video pair,
    ``chunk`` queries at a time (no ``N x N`` tensor). Slow (N^2 evaluations) but independent of how
    a peer's mask is structured: ``bench peers --peer-src`` feeds it the peers' own ``mask_mod``s.
    ``compile=True`` fuses each chunk's evaluation with ``torch.compile`` (several times faster on
    the CPU; the first chunk pays the compilation)."""
    ours = layout.video_token_blocks()
    nb = layout.num_video_blocks
    n = seq.numel()
    order = torch.argsort(ours, stable=True)  # keys grouped by our block
    seq = seq.to(torch.int32)  # half the memory traffic of int64
    k_seq = seq[order][None, :]
    bounds = torch.searchsorted(ours[order], torch.arange(nb + 1))
    lo, hi = bounds[:-1], bounds[1:]
    sizes = hi - lo
    size = int(sizes[0])
    if bool((sizes[:-1] == size).all()) and int(sizes[-1]) <= size:
        # equal blocks (the last one may be short): pad the keys to whole blocks and sum each block
        pad = nb * size - n
        valid = torch.nn.functional.pad(torch.ones(1, n, dtype=torch.int32), (0, pad))
        k_seq = torch.nn.functional.pad(k_seq, (0, pad))

        def step(q_seq: torch.Tensor, k_seq: torch.Tensor) -> torch.Tensor:
            hit = predicate(q_seq, k_seq).to(torch.int32) * valid
            return hit.view(hit.shape[0], nb, size).sum(-1)
    else:
        def step(q_seq: torch.Tensor, k_seq: torch.Tensor) -> torch.Tensor:
            hit = predicate(q_seq, k_seq).to(torch.int32)
            csum = torch.nn.functional.pad(hit.cumsum(1, dtype=torch.int64), (1, 0))
            return csum[:, hi] - csum[:, lo]  # [chunk, nb]

    out = torch.zeros(nb, nb, dtype=torch.long)
    with contextlib.ExitStack() as stack:
        if compile:
            # every call compiles its own closure: a run of many masks must not fall back to eager
            limit = max(64, torch._dynamo.config.recompile_limit)
            stack.enter_context(torch._dynamo.config.patch(recompile_limit=limit))
            step = torch.compile(step, dynamic=False)
        for s in range(0, n, chunk):
            q = torch.arange(s, s + chunk).clamp(max=n - 1)  # a whole chunk, the tail repeated (dropped below)
            per_block = step(seq[q][:, None], k_seq)
            keep = min(chunk, n - s)
            out.index_add_(0, ours[q[:keep]], per_block[:keep])
    return out


def count_block_pairs(layout: VideoLayout, assign: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``count_pairs`` for a mask given as peer blocks (``assign`` and bool ``blocks``, as ``PeerMask``):
    exact, through the token counts each of our blocks shares with each peer block."""
    C = _incidence(layout, assign, blocks.shape[0], "cpu", counts=True)
    return (C @ blocks.double() @ C.T).round().long()


def compare_counts(video_blocks: torch.Tensor, layout: VideoLayout, joint: torch.Tensor) -> dict[str, float]:
    """``compare`` from a joint count matrix (``count_pairs``) instead of a ``PeerMask``."""
    n = torch.bincount(layout.video_token_blocks(), minlength=layout.num_video_blocks).double()
    ours = video_blocks.cpu().double()
    peer_pairs = float(joint.sum())
    total = float(layout.num_video_tokens) ** 2
    return {"recall": float((joint.double() * ours).sum()) / peer_pairs if peer_pairs else 1.0,
            "density": float(n @ ours @ n) / total, "peer_density": peer_pairs / total}


def _grid_coords(layout: VideoLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    v = torch.arange(layout.num_video_tokens)
    hw = layout.height * layout.width
    return v // hw, (v // layout.width) % layout.height, v % layout.width


# ---------------------------------------------------------------------------- Sliding Tile Attention
def sta(spec: Spec, layout: VideoLayout) -> PeerMask:
    """FastVideo's STA (``generate_sta_mask`` in fastvideo-kernel/tests/support_flex_sta.py at 908c43ca,
    the flex reference of its kernel): tiles of ``tile`` tokens; a query tile sees the ``window`` of tiles around it,
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
RADIAL_RULES = ("2025-11", "2025-10")  # the current rule first (72788d4), then the one before (af371ca)
_RADIAL_SPLIT = 128  # the peer's parity thinning compares with 128 tokens whatever its block size


def radial_width(dist: int, frame_tokens: int, variant: str, decay_factor: float, block: int,
                 rule: str = "2025-11") -> float:
    """The band half-width (in-frame raster tokens) between two frames ``dist`` apart: the whole
    frame for dist 0 and 1 (half a frame at dist 1 on Wan under ``rule="2025-10"``), beyond that
    halving each time dist doubles, never below one block."""
    if dist == 0 or (dist == 1 and (variant == "hunyuan" or rule != "2025-10")):
        return float(frame_tokens)
    if dist == 1:  # wan, 2025-10
        return float(frame_tokens // 2)
    decay = 2 ** frame_tokens.bit_length() / 2 ** dist.bit_length() * decay_factor
    return max(decay, float(block))


def radial_frame_kept(dist: int, frame_tokens: int) -> bool:
    """Whether frames ``dist`` apart are visited at all (parity thinning once the undecayed band is
    below 128 tokens)."""
    decay = 2 ** frame_tokens.bit_length() / 2 ** dist.bit_length()
    if decay >= _RADIAL_SPLIT:
        return True
    return dist % int(_RADIAL_SPLIT / decay) == 0


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
    """Radial Attention (mit-han-lab, ``gen_log_mask_shrinked``): ``block``-token blocks of the raster
    video. Between frames i and j (distance d): on Wan, key frame 0 is always seen (attention sink;
    HunyuanVideo has none since 2025-07); otherwise a band on the in-frame raster index, the whole
    frame for d <= 1 (``rule="2025-10"``: half a frame at d = 1 on Wan), beyond that half as wide
    each time d doubles but never below one block; once the undecayed band is below 128 tokens,
    frame pairs are kept only when d is a multiple of the thinning factor. Each frame pair's band is
    rounded to blocks by the peer's rule (see ``_shrunk_band``); the video's last partial block is
    dense (the peer's mask on the sequence padded to whole blocks)."""
    S, F, B = layout.height * layout.width, layout.frames, spec["block"]
    variant, rule = spec["variant"], spec.get("rule", RADIAL_RULES[0])
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
            if j == 0 and variant == "wan":
                width = float(S)
            elif radial_frame_kept(d, S):
                width = radial_width(d, S, variant, spec["decay_factor"], B, rule)
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
SVG_CONTEXT = {"wan": 0, "hunyuan": 256}  # text tokens SVG counts in its width formula, per model
SVG_SELECT_FRAMES = {"wan": 2.0, "hunyuan": 1.5}  # the classification mask's reach, in frames


def svg_width_frames(sparsity: float, context: int, frames: int, frame_tokens: int) -> float:
    """SVG's ``sparsity_to_width``: the band half-width, in frames, of a band over the whole sequence
    (text included) whose density is ``sparsity`` once the dense text rows and columns are taken out."""
    seq = context + frames * frame_tokens
    total = seq ** 2
    s = (sparsity * total - 2 * seq * context) / total
    return seq * (1 - math.sqrt(1 - s)) / frame_tokens


def _svg_seq(layout: VideoLayout, temporal: bool) -> torch.Tensor:
    """Each raster video token's index in SVG's sequence: raster for spatial heads, position-major
    (``position * frames + frame``, SVG's head placement kernel) for temporal heads."""
    S, F = layout.height * layout.width, layout.frames
    v = torch.arange(S * F)
    return (v % S) * F + v // S if temporal else v


def _svg(spec: Spec, layout: VideoLayout, temporal: bool) -> PeerMask:
    S, F, B = layout.height * layout.width, layout.frames, spec["block"]
    N = S * F
    nb = -(-N // B)
    variant = spec["variant"]
    seq = _svg_seq(layout, temporal)
    i = torch.arange(nb)
    dist = (i[:, None] - i[None, :]).abs()
    sink = variant == "wan"  # Wan: keys among the first frame_tokens of the sequence, both masks
    if spec["mask"] == "select":
        # get_attention_mask: 128-token blocks closer than (frame_tokens * c) // 128 (c frames)
        c = spec["width_frames"] if spec["width_frames"] is not None else SVG_SELECT_FRAMES[variant]
        reach = int((S * c) // B)
        full = dist < reach
        predicate = (lambda q, k: k < S) if sink else None
    else:
        # generate_temporal_head_mask_mod: |q - k| within mul frames, rounded to a multiple of 128 tokens
        # (Wan: up, inclusive; HunyuanVideo: down, exclusive)
        mul = spec["width_frames"]
        if mul is None:
            context = spec["context"] if spec["context"] is not None else SVG_CONTEXT[variant]
            mul = svg_width_frames(spec["sparsity"], context, F, S)
        if variant == "wan":
            W = math.ceil(mul * S / B) * B
            band = lambda q, k: (q - k).abs() <= W  # noqa: E731
        else:
            W = math.floor(mul * S / B) * B
            band = lambda q, k: (q - k).abs() < W  # noqa: E731
        # W is m whole blocks: block distance < m is inside the band, m is cut by its edge, beyond is out
        m = W // B
        full, band_partial = dist < m, dist == m
        predicate = (lambda q, k: band(q, k) | (k < S)) if sink else band
    partial = None
    if sink:
        full = full.clone()
        full[:, : S // B] = True  # whole key blocks inside the sink
        partial = torch.zeros(nb, nb, dtype=torch.bool)
        if S % B and S // B < nb:
            partial[:, S // B] = True
    if spec["mask"] != "select":
        partial = band_partial if partial is None else partial | band_partial
    if partial is not None:
        partial = partial & ~full
        if not bool(partial.any()):
            partial = None
    return PeerMask(seq // B, full, partial, seq if partial is not None else None,
                    predicate if partial is not None else None, B)


def svg_spatial(spec: Spec, layout: VideoLayout) -> PeerMask:
    """Sparse VideoGen's spatial head on the raster video. ``mask="attend"`` (the default) is the mask
    it attends with (``generate_temporal_head_mask_mod``): tokens whose sequence indices are within
    ``mul`` frames, ``mul`` from its ``sparsity`` parameter (``svg_width_frames``) unless
    ``width_frames`` is given, the width rounded to 128 tokens (Wan: up and inclusive, plus the
    first-frame sink; HunyuanVideo: down and exclusive). ``mask="select"`` is the mask it classifies
    heads with (``get_attention_mask``): 128-token blocks less than ``width_frames`` frames apart
    (2 on Wan, with the first-frame sink; 1.5 on HunyuanVideo)."""
    return _svg(spec, layout, temporal=False)


def svg_temporal(spec: Spec, layout: VideoLayout) -> PeerMask:
    """Sparse VideoGen's temporal head: ``svg_spatial``'s masks on the position-major sequence
    (index ``position * frames + frame``), sink included, as its placement kernel permutes them."""
    return _svg(spec, layout, temporal=True)


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
    blocks that the peer pairs whole, or in a partial pair where the peer's predicate visits them.
    Built on ``device``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    C = _incidence(layout, peer.assign, peer.blocks.shape[0], device, counts=False)
    P = peer.blocks.to(device).float()
    out = (C @ P @ C.T) > 0
    if peer.partial is not None:
        ours = layout.video_token_blocks()
        nb = layout.num_video_blocks
        flat = torch.zeros(nb * nb, dtype=torch.bool)
        for q_tok, k_tok, hit in _partial_pairs(peer):
            q_blk, k_blk = ours[q_tok.clamp(min=0)], ours[k_tok.clamp(min=0)]
            flat[(q_blk * nb + k_blk)[hit]] = True
        out |= flat.view(nb, nb).to(device)
    return out


def compare(video_blocks: torch.Tensor, layout: VideoLayout, peer: PeerMask) -> dict[str, float]:
    """Exact token-pair counts of our video block matrix against the peer's mask: ``recall`` (share of
    the peer's pairs we visit), ``density`` (share of all video pairs we visit), ``peer_density``."""
    C = _incidence(layout, peer.assign, peer.blocks.shape[0], "cpu", counts=True)
    ours = video_blocks.cpu().double()
    n_ours = C.sum(1)
    n_peer = C.sum(0)
    both = float(((C.T @ ours @ C) * peer.blocks.double()).sum())
    peer_pairs = float(n_peer @ peer.blocks.double() @ n_peer)
    if peer.partial is not None:
        blocks = layout.video_token_blocks()
        visited = video_blocks.cpu()
        for q_tok, k_tok, hit in _partial_pairs(peer):
            q_blk, k_blk = blocks[q_tok.clamp(min=0)], blocks[k_tok.clamp(min=0)]
            peer_pairs += float(hit.sum())
            both += float((hit & visited[q_blk, k_blk]).sum())
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
