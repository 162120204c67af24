"""Mask families on tile coordinates, and ``build`` to turn specs into a ``BlockSparseMask``.

A spec is a small JSON-able dict ``{"kind": ..., params}``; a bare name uses the defaults. Every
spec may carry ``"sinks": {"frames": [...], "tokens": [[start, end], ...]}``: key blocks holding
those latent frames / model token ranges are visited by every query. Text tokens (when the layout
has them) are always handled the same way: text keys visited by every query, text queries dense.

Distances are in tiles: ``dt``, ``dh``, ``dw`` are the absolute differences of tile coordinates.
"""
from __future__ import annotations

import copy
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..ops import BlockSparseMask
from .layout import VideoLayout

Spec = dict[str, Any]
# rule(dt, dh, dw) -> bool "visit", on tile-distance tensors
Rule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _nonneg_int(kind: str, name: str, value, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{kind} {name} must be an int >= 0{extra}, got {value!r}")


@dataclass(frozen=True)
class MaskFamily:
    """One mask family: everything about it in one place.

    defaults: its parameters and their default values (the spec keys besides "kind" and "sinks").
    check: validates (and may normalize) a spec with defaults filled; raises ValueError.
    label: the short human-readable name of a spec, without "+sinks".
    rule: ``rule(spec, layout) -> Rule`` on tile-coordinate distances.
    ladder: parameter sets for calibration's search, sparsest first (each a partial spec).
    """

    kind: str
    defaults: dict[str, Any]
    check: Callable[[Spec], None]
    label: Callable[[Spec], str]
    rule: Callable[[Spec, VideoLayout], Rule]
    ladder: tuple[dict[str, Any], ...] = ()
    doc: str = ""


FAMILIES: dict[str, MaskFamily] = {}


def register_family(family: MaskFamily) -> MaskFamily:
    """Add a family to the registry (its kind must be new)."""
    if family.kind in FAMILIES:
        raise ValueError(f"mask kind {family.kind!r} is already registered")
    FAMILIES[family.kind] = family
    return family


def _check_window(spec: Spec) -> None:
    w = spec["window"]
    if isinstance(w, int) and not isinstance(w, bool):
        w = [w, w, w]
    if not (isinstance(w, (list, tuple)) and len(w) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 and x % 2 for x in w)):
        raise ValueError(f"sliding_tile window must be 3 odd positive ints (t, h, w) in tiles, got {spec['window']!r}")
    spec["window"] = list(w)


def _window_rule(spec: Spec, layout: VideoLayout) -> Rule:
    ht, hh, hw = (w // 2 for w in spec["window"])
    return lambda dt, dh, dw: (dt <= ht) & (dh <= hh) & (dw <= hw)


def _check_radial(spec: Spec) -> None:
    _nonneg_int("radial", "dense_frames", spec["dense_frames"])
    _nonneg_int("radial", "spatial_radius", spec["spatial_radius"], allow_none=True)


def _radial_rule(spec: Spec, layout: VideoLayout) -> Rule:
    gt, gh, gw = layout.tile_grid
    radius0 = spec["spatial_radius"] if spec["spatial_radius"] is not None else max(gh, gw)
    return lambda dt, dh, dw: radial_rule(dt, dh, dw, spec["dense_frames"], radius0)


def _check_union(spec: Spec) -> None:
    if not isinstance(spec["of"], (list, tuple)) or not spec["of"]:
        raise ValueError("union needs a non-empty list 'of' specs")
    spec["of"] = [normalize_spec(s) for s in spec["of"]]


def _union_rule(spec: Spec, layout: VideoLayout) -> Rule:
    rules = [_rule(s, layout) for s in spec["of"]]

    def union(dt, dh, dw):
        out = rules[0](dt, dh, dw)
        for r in rules[1:]:
            out = out | r(dt, dh, dw)
        return out

    return union


register_family(MaskFamily(
    "dense", {}, check=lambda s: None, label=lambda s: "dense",
    rule=lambda s, lay: (lambda dt, dh, dw: torch.ones_like(dt, dtype=torch.bool)),
    doc="every key block"))
register_family(MaskFamily(
    "sliding_tile", {"window": [3, 3, 3]}, check=_check_window,
    label=lambda s: f"sliding_tile({','.join(map(str, s['window']))})", rule=_window_rule,
    ladder=({"window": [1, 1, 1]}, {"window": [1, 3, 3]}, {"window": [3, 3, 3]}, {"window": [3, 5, 5]},
            {"window": [5, 5, 5]}),
    doc="Sliding Tile Attention: window (t, h, w) in tiles, odd sizes centred on the query tile"))
register_family(MaskFamily(
    "radial", {"dense_frames": 1, "spatial_radius": None}, check=_check_radial,
    label=lambda s: f"radial(d={s['dense_frames']})", rule=_radial_rule,
    ladder=({"dense_frames": 0}, {"dense_frames": 1}, {"dense_frames": 2}),
    doc="Radial Attention: all space within dense_frames tile-frames; beyond, the spatial radius (in "
        "tiles) halves each time the temporal distance doubles; once it reaches 0 only the same spatial "
        "tile is kept, on every 2nd, 4th, ... tile-frame, so work grows as O(n log n)"))
register_family(MaskFamily(
    "spatial", {"frames": 1}, check=lambda s: _nonneg_int("spatial", "frames", s["frames"]),
    label=lambda s: f"spatial(f={s['frames']})",
    rule=lambda s, lay: (lambda dt, dh, dw: dt <= s["frames"]),
    ladder=({"frames": 0}, {"frames": 1}, {"frames": 2}),
    doc="Sparse VideoGen's spatial head: |dt| <= frames, all of space"))
register_family(MaskFamily(
    "temporal", {"radius": 0}, check=lambda s: _nonneg_int("temporal", "radius", s["radius"]),
    label=lambda s: f"temporal(r={s['radius']})",
    rule=lambda s, lay: (lambda dt, dh, dw: (dh <= s["radius"]) & (dw <= s["radius"])),
    ladder=({"radius": 0}, {"radius": 1}),
    doc="Sparse VideoGen's temporal head: |dh|, |dw| <= radius, all frames"))
register_family(MaskFamily(
    "union", {"of": []}, check=_check_union, label=lambda s: "|".join(spec_name(x) for x in s["of"]),
    rule=_union_rule, doc="key blocks any of the specs 'of' visits"))

# Views of the registry, kept for callers that read them.
DEFAULTS: dict[str, dict[str, Any]] = {k: f.defaults for k, f in FAMILIES.items()}
KINDS = tuple(FAMILIES)
_SINK_KEYS = ("frames", "tokens")


def normalize_spec(spec: str | Spec) -> Spec:
    """Fill defaults and check a spec; raises ValueError naming what is wrong and what is valid."""
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"a mask spec is a kind name or a dict with a 'kind' key, got {spec!r}")
    kind = spec["kind"]
    family = FAMILIES.get(kind) if isinstance(kind, str) else None
    if family is None:
        raise ValueError(f"unknown mask kind {kind!r}; valid kinds: {list(FAMILIES)}")
    allowed = set(family.defaults) | {"kind", "sinks"}
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for mask kind {kind!r}; valid: {sorted(allowed - {'kind'})}")
    out = {"kind": kind, **copy.deepcopy(family.defaults), **{k: v for k, v in spec.items() if k != "kind"}}
    family.check(out)
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
    return FAMILIES[s["kind"]].label(s) + ("+sinks" if s.get("sinks") else "")


def ladder(kind: str) -> list[Spec]:
    """The family's calibration ladder as full specs, sparsest first (the default alone if none)."""
    family = FAMILIES.get(kind)
    if family is None:
        raise ValueError(f"unknown mask kind {kind!r}; valid kinds: {list(FAMILIES)}")
    rungs = family.ladder or ({},)
    return [normalize_spec({"kind": kind, **r}) for r in rungs]


def _rule(spec: Spec, layout: VideoLayout) -> Rule:
    return FAMILIES[spec["kind"]].rule(spec, layout)


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
_BLOCK_MATRICES: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
MAX_CACHED_BLOCK_MATRICES = 32  # distinct (spec, layout) pairs kept; a plan has few distinct head specs


def block_matrix(spec: str | Spec, layout: VideoLayout, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean block matrix ``[num_blocks, num_blocks]`` of one head's spec on ``layout``, built on
    ``device`` (default CPU) and cached per spec, layout and device (least recently used dropped:
    layers of a plan share their heads' patterns). The result is shared: do not modify it in place."""
    spec = normalize_spec(spec)
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (json.dumps(spec, sort_keys=True), layout, str(device))
    cached = _BLOCK_MATRICES.get(key)
    if cached is not None:
        _BLOCK_MATRICES.move_to_end(key)
        return cached
    out = _block_matrix(spec, layout, device)
    _BLOCK_MATRICES[key] = out
    while len(_BLOCK_MATRICES) > MAX_CACHED_BLOCK_MATRICES:
        _BLOCK_MATRICES.popitem(last=False)
    return out


def _block_matrix(spec: Spec, layout: VideoLayout, device: torch.device) -> torch.Tensor:
    coords = layout.tile_coords().to(device)
    d = (coords[:, None, :] - coords[None, :, :]).abs()
    video = _rule(spec, layout)(d[..., 0], d[..., 1], d[..., 2])
    nb, nv = layout.num_blocks, layout.num_video_blocks
    out = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    out[:nv, :nv] = video
    if layout.num_text_blocks:
        out[:, nv:] = True  # text keys visited by every query
        out[nv:, :] = True  # text queries attend densely
    sinks = spec.get("sinks")
    if sinks:
        out[:, sink_blocks(sinks, layout).to(device)] = True
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
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a VideoLayout, got {type(layout).__name__}")
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
        raise ValueError(f"heads must be a positive int (or None to broadcast one head row), got {heads!r}")
    if isinstance(spec, (list, tuple)):
        specs = list(spec)
        if heads is not None and heads != len(specs):
            raise ValueError(f"got {len(specs)} per-head specs for heads={heads}")
    else:
        specs = [spec] * (heads or 1)
    if not specs:
        raise ValueError("need at least one spec")
    mats = [block_matrix(s, layout, device) for s in specs]  # built on the device, shared across calls
    blocks = torch.stack(mats).unsqueeze(0)
    return BlockSparseMask.from_dense(blocks, layout.block_size).for_token_order(layout.order_digest)
