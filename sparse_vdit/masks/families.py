"""Mask families on tile coordinates, and ``build`` to turn specs into a ``BlockSparseMask``.

A spec is a small JSON-able dict ``{"kind": ..., params}``; a bare name uses the defaults. Every
spec may carry ``"sinks": {"frames": [...], "tokens": [[start, end], ...]}``: key blocks holding
those latent frames / model token ranges are visited by every query. Text tokens (when the layout
has them) are always handled the same way: text keys visited by every query, text queries dense.

Distances are in tiles: ``dt``, ``dh``, ``dw`` are the absolute differences of tile coordinates.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from ..ops import BlockSparseMask
from .layout import VideoLayout

Spec = dict[str, Any]

DEFAULTS: dict[str, dict[str, Any]] = {
    "dense": {},
    # Sliding Tile Attention: window (t, h, w) in tiles, odd sizes centred on the query tile.
    "sliding_tile": {"window": [3, 3, 3]},
    # Radial Attention: all space within dense_frames tile-frames; beyond, the spatial radius (in
    # tiles) halves each time the temporal distance doubles; once it reaches 0 only the same
    # spatial tile is kept, on every 2nd, 4th, ... tile-frame, so work grows as O(n log n).
    "radial": {"dense_frames": 1, "spatial_radius": None},
    # Sparse VideoGen's two head types.
    "spatial": {"frames": 1},  # |dt| <= frames, all of space
    "temporal": {"radius": 0},  # |dh|, |dw| <= radius, all frames
    "union": {"of": []},
}
KINDS = tuple(DEFAULTS)
_SINK_KEYS = ("frames", "tokens")


def normalize_spec(spec: str | Spec) -> Spec:
    """Fill defaults and check a spec; raises ValueError naming what is wrong and what is valid."""
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"a mask spec is a kind name or a dict with a 'kind' key, got {spec!r}")
    kind = spec["kind"]
    if kind not in DEFAULTS:
        raise ValueError(f"unknown mask kind {kind!r}; valid kinds: {list(KINDS)}")
    allowed = set(DEFAULTS[kind]) | {"kind", "sinks"}
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for mask kind {kind!r}; valid: {sorted(allowed - {'kind'})}")
    out = {"kind": kind, **{k: v for k, v in DEFAULTS[kind].items()}, **{k: v for k, v in spec.items() if k != "kind"}}
    if kind == "sliding_tile":
        w = out["window"]
        if isinstance(w, int):
            w = [w, w, w]
        if not (isinstance(w, (list, tuple)) and len(w) == 3 and all(isinstance(x, int) and x >= 1 and x % 2 for x in w)):
            raise ValueError(f"sliding_tile window must be 3 odd positive ints (t, h, w) in tiles, got {out['window']!r}")
        out["window"] = list(w)
    elif kind == "radial":
        if not (isinstance(out["dense_frames"], int) and out["dense_frames"] >= 0):
            raise ValueError(f"radial dense_frames must be an int >= 0, got {out['dense_frames']!r}")
        r = out["spatial_radius"]
        if r is not None and not (isinstance(r, int) and r >= 0):
            raise ValueError(f"radial spatial_radius must be None (the whole frame) or an int >= 0, got {r!r}")
    elif kind == "spatial":
        if not (isinstance(out["frames"], int) and out["frames"] >= 0):
            raise ValueError(f"spatial frames must be an int >= 0, got {out['frames']!r}")
    elif kind == "temporal":
        if not (isinstance(out["radius"], int) and out["radius"] >= 0):
            raise ValueError(f"temporal radius must be an int >= 0, got {out['radius']!r}")
    elif kind == "union":
        if not isinstance(out["of"], (list, tuple)) or not out["of"]:
            raise ValueError("union needs a non-empty list 'of' specs")
        out["of"] = [normalize_spec(s) for s in out["of"]]
    if "sinks" in out:
        sinks = out["sinks"]
        if not isinstance(sinks, dict) or set(sinks) - set(_SINK_KEYS):
            raise ValueError(f"sinks must be a dict with keys among {list(_SINK_KEYS)}, got {sinks!r}")
        frames = [int(f) for f in sinks.get("frames", [])]
        tokens = [[int(a), int(b)] for a, b in sinks.get("tokens", [])]
        if any(f < 0 for f in frames) or any(a < 0 or b <= a for a, b in tokens):
            raise ValueError(f"sink frames must be >= 0 and token ranges [start, end) with end > start, got {sinks!r}")
        out["sinks"] = {"frames": frames, "tokens": tokens}
    return out


def spec_name(spec: str | Spec) -> str:
    """Short human-readable name, e.g. 'sliding_tile(3,3,3)+sinks'."""
    s = normalize_spec(spec)
    kind = s["kind"]
    if kind == "sliding_tile":
        name = f"sliding_tile({','.join(map(str, s['window']))})"
    elif kind == "radial":
        name = f"radial(d={s['dense_frames']})"
    elif kind == "spatial":
        name = f"spatial(f={s['frames']})"
    elif kind == "temporal":
        name = f"temporal(r={s['radius']})"
    elif kind == "union":
        name = "|".join(spec_name(x) for x in s["of"])
    else:
        name = kind
    return name + ("+sinks" if s.get("sinks") else "")


# ---------------------------------------------------------------------------- family rules
# Each rule maps tile-coordinate differences (and the query/key tile coordinates) to "visit".
def _rule(spec: Spec, layout: VideoLayout) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    kind = spec["kind"]
    gt, gh, gw = layout.tile_grid
    if kind == "dense":
        return lambda dt, dh, dw: torch.ones_like(dt, dtype=torch.bool)
    if kind == "sliding_tile":
        ht, hh, hw = (w // 2 for w in spec["window"])
        return lambda dt, dh, dw: (dt <= ht) & (dh <= hh) & (dw <= hw)
    if kind == "spatial":
        return lambda dt, dh, dw: dt <= spec["frames"]
    if kind == "temporal":
        return lambda dt, dh, dw: (dh <= spec["radius"]) & (dw <= spec["radius"])
    if kind == "radial":
        return lambda dt, dh, dw: radial_rule(dt, dh, dw, spec["dense_frames"],
                                              spec["spatial_radius"] if spec["spatial_radius"] is not None else max(gh, gw))
    if kind == "union":
        rules = [_rule(s, layout) for s in spec["of"]]

        def union(dt, dh, dw):
            out = rules[0](dt, dh, dw)
            for r in rules[1:]:
                out = out | r(dt, dh, dw)
            return out

        return union
    raise AssertionError(kind)


def radial_rule(dt: torch.Tensor, dh: torch.Tensor, dw: torch.Tensor, dense_frames: int, radius0: int) -> torch.Tensor:
    """Radial mask on distances (in tiles). See ``DEFAULTS['radial']``.

    For ``dt <= d0`` everything; else level ``k = ceil(log2(dt / d0))`` (``d0 = max(dense_frames, 1)``)
    has spatial radius ``radius0 >> k``; from the level ``kz`` where that reaches 0, only ``dh = dw = 0``
    on tile-frames with ``dt % 2**(k - kz + 1) == 0``.
    """
    d0 = max(dense_frames, 1)
    dense_band = dt <= dense_frames
    ratio = dt.double().clamp(min=1) / d0
    k = torch.ceil(torch.log2(ratio)).long().clamp(min=1)
    radius = torch.bitwise_right_shift(torch.full_like(k, radius0), k.clamp(max=62))
    spatial = torch.maximum(dh, dw)
    banded = (radius >= 1) & (spatial <= radius)
    kz = int(math.floor(math.log2(radius0))) + 1 if radius0 >= 1 else 0  # first level with radius 0
    stride = torch.bitwise_left_shift(torch.ones_like(k), (k - kz + 1).clamp(min=0, max=62))
    thinned = (radius == 0) & (spatial == 0) & (dt % stride == 0)
    return dense_band | banded | thinned


# ---------------------------------------------------------------------------- building
def block_matrix(spec: str | Spec, layout: VideoLayout) -> torch.Tensor:
    """Boolean block matrix ``[num_blocks, num_blocks]`` of one head's spec on ``layout``."""
    spec = normalize_spec(spec)
    coords = layout.tile_coords()
    d = (coords[:, None, :] - coords[None, :, :]).abs()
    video = _rule(spec, layout)(d[..., 0], d[..., 1], d[..., 2])
    nb, nv = layout.num_blocks, layout.num_video_blocks
    out = torch.zeros(nb, nb, dtype=torch.bool)
    out[:nv, :nv] = video
    if layout.num_text_blocks:
        out[:, nv:] = True  # text keys visited by every query
        out[nv:, :] = True  # text queries attend densely
    sinks = spec.get("sinks")
    if sinks:
        out[:, sink_blocks(sinks, layout)] = True
    return out


def sink_blocks(sinks: Spec, layout: VideoLayout) -> torch.Tensor:
    """Indices of the key blocks that hold the sink frames / token ranges."""
    keep = torch.zeros(layout.num_blocks, dtype=torch.bool)
    frames = sinks.get("frames", [])
    if frames:
        bad = [f for f in frames if f >= layout.frames]
        if bad:
            raise ValueError(f"sink frames {bad} outside the video's {layout.frames} latent frames")
        fr = layout.frame_range_of_blocks()
        for f in frames:
            keep[: layout.num_video_blocks] |= (fr[:, 0] <= f) & (f <= fr[:, 1])
    tokens = sinks.get("tokens", [])
    if tokens:
        block_of = layout.block_of_token()
        for a, b in tokens:
            if b > layout.seq_len:
                raise ValueError(f"sink token range [{a}, {b}) outside the sequence of {layout.seq_len} tokens")
            keep[block_of[a:b]] = True
    return keep.nonzero().squeeze(1)


def build(
    spec: str | Spec | Sequence[str | Spec],
    layout: VideoLayout,
    heads: int | None = None,
    device: torch.device | str | None = None,
) -> BlockSparseMask:
    """Build a ``BlockSparseMask`` ``[1, H, M, M]`` from one spec (shared by ``heads`` heads, or
    broadcast when ``heads`` is None) or a list of specs, one per head."""
    if isinstance(spec, (list, tuple)):
        specs = list(spec)
        if heads is not None and heads != len(specs):
            raise ValueError(f"got {len(specs)} per-head specs for heads={heads}")
    else:
        specs = [spec] * (heads or 1)
    if not specs:
        raise ValueError("need at least one spec")
    cache: dict[str, torch.Tensor] = {}
    mats = []
    for s in specs:
        key = repr(normalize_spec(s))
        if key not in cache:
            cache[key] = block_matrix(s, layout)
        mats.append(cache[key])
    blocks = torch.stack(mats).unsqueeze(0)
    if device is not None:
        blocks = blocks.to(device)
    return BlockSparseMask.from_dense(blocks, layout.block_size)
