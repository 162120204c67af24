"""Mask families on tile coordinates, and ``build`` to turn specs into a ``BlockSparseMask``.

A spec is a small JSON-able dict ``{"kind": ..., params}``; a bare name uses the defaults. Every
spec may carry ``"sinks": {"frames": [...], "tokens": [[start, end], ...]}``: key blocks holding
those latent frames / model token ranges are visited by every query. A sparse spec may carry
``"order": "fhw" | "hwf"``: its heads run on the layout with that axis order instead of the plan's
(``spec_layout``), as Sparse VideoGen runs its temporal heads position-major (``svg_temporal``'s
default). Text tokens (when the layout
has them) are always handled the same way: text keys visited by every query, text queries dense.

Our own families are rules on tile distances: ``dt``, ``dh``, ``dw`` are the absolute differences
of tile coordinates. The peer families (``sta``, ``radial_attn``, ``svg_spatial``, ``svg_temporal``,
``svd_*``) are the peers' own masks on their own token partitions (``peers.py``), projected onto the
layout; they reach the peer's density on ``peers.aligned_layout``.
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
from . import peers
import dataclasses

from .layout import VideoLayout, check_block, check_order

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
    rule: ``rule(spec, layout) -> Rule`` on tile-coordinate distances (our own families).
    ladder: parameter sets for calibration's search, sparsest first (each a partial spec).
    peer: ``peer(spec, layout) -> peers.PeerMask``, the peer's own mask (peer families, instead of ``rule``).
    dynamic: the family selects key blocks per call from q and k (``masks.dynamic``); its ``rule``
        is the static part (always visited), and its blocks depend on the call.
    """

    kind: str
    defaults: dict[str, Any]
    check: Callable[[Spec], None]
    label: Callable[[Spec], str]
    rule: Callable[[Spec, VideoLayout], Rule] | None = None
    ladder: tuple[dict[str, Any], ...] = ()
    doc: str = ""
    peer: Callable[[Spec, VideoLayout], "peers.PeerMask"] | None = None
    dynamic: bool = False


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
    if any("order" in s for s in spec["of"]):
        raise ValueError("the specs of a union share one token order: give 'order' on the union, not its members")


def _ints(kind: str, name: str, value, length: int, minimum: int) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * length
    if not (isinstance(value, (list, tuple)) and len(value) == length
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum for x in value)):
        raise ValueError(f"{kind} {name} must be {length} ints >= {minimum}, got {value!r}")
    return list(value)


def _check_sta(spec: Spec) -> None:
    spec["window"] = _ints("sta", "window (t, h, w in tiles)", spec["window"], 3, 1)
    spec["tile"] = _ints("sta", "tile (t, h, w in tokens)", spec["tile"], 3, 1)


def _positive(kind: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{kind} {name} must be a number > 0, got {value!r}")


def _peer_block(kind: str, spec: Spec) -> None:
    try:
        check_block(spec["block"])
    except ValueError as e:
        raise ValueError(f"{kind} {e}") from None


def _check_radial_attn(spec: Spec) -> None:
    if spec["variant"] not in ("wan", "hunyuan"):
        raise ValueError(f"radial_attn variant must be 'wan' or 'hunyuan' (the peer's two rules for "
                         f"neighbouring frames), got {spec['variant']!r}")
    if spec["rule"] not in peers.RADIAL_RULES:
        raise ValueError(f"radial_attn rule must be one of {list(peers.RADIAL_RULES)} (the peer's current "
                         f"rule, then its 2025-10 one), got {spec['rule']!r}")
    _positive("radial_attn", "decay_factor", spec["decay_factor"])
    _peer_block("radial_attn", spec)


def _check_svg(kind: str):
    def check(spec: Spec) -> None:
        if spec["mask"] not in ("attend", "select"):
            raise ValueError(f"{kind} mask must be 'attend' (the mask Sparse VideoGen attends with) or "
                             f"'select' (the mask it classifies heads with), got {spec['mask']!r}")
        if spec["variant"] not in ("wan", "hunyuan"):
            raise ValueError(f"{kind} variant must be 'wan' or 'hunyuan' (Sparse VideoGen's two rules), "
                             f"got {spec['variant']!r}")
        sp = spec["sparsity"]
        if isinstance(sp, bool) or not isinstance(sp, (int, float)) or not 0 < sp < 1:
            raise ValueError(f"{kind} sparsity must be a number in (0, 1) (Sparse VideoGen's parameter: the "
                             f"band's share of the attention map, 0.3 in its Wan scripts), got {sp!r}")
        if spec["width_frames"] is not None:
            _positive(kind, "width_frames", spec["width_frames"])
        _nonneg_int(kind, "context", spec["context"], allow_none=True)
        _peer_block(kind, spec)
    return check


def _check_svd(kind: str, keys: tuple[str, ...]):
    def check(spec: Spec) -> None:
        for k in keys:
            _nonneg_int(kind, k, spec[k])
        _peer_block(kind, spec)
    return check


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
def _check_dynamic(spec: Spec) -> None:
    keep = spec["keep"]
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"dynamic keep must be an int >= 1 (key blocks selected per query block), got {keep!r}")
    mass = spec["mass"]
    if mass is not None and (isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0 < mass <= 1):
        raise ValueError(f"dynamic mass must be None (always keep) or a number in (0, 1] (stop once the estimated "
                         f"attention mass reaches it), got {mass!r}")
    if mass is not None:
        spec["mass"] = float(mass)
    try:
        _check_window(spec)
    except ValueError as e:
        raise ValueError(str(e).replace("sliding_tile", "dynamic")) from None


register_family(MaskFamily(
    "dynamic", {"keep": 4, "mass": None, "window": [1, 1, 1]}, check=_check_dynamic,
    label=lambda s: (f"dynamic(k={s['keep']}" + (f",p={s['mass']:g}" if s["mass"] is not None else "")
                     + f",w={','.join(map(str, s['window']))})"),
    rule=_window_rule, dynamic=True,
    ladder=({"keep": 4}, {"keep": 8}, {"keep": 16}, {"keep": 32}, {"keep": 64, "mass": 0.95}),
    doc="selected per call: the sliding-tile window (t, h, w tiles) always, plus per query block the keep key "
        "blocks of highest estimated mass from block-pooled q and k (with mass: the fewest of them that reach "
        "that estimated mass)"))
register_family(MaskFamily(
    "union", {"of": []}, check=_check_union, label=lambda s: "|".join(spec_name(x) for x in s["of"]),
    doc="key blocks any of the specs 'of' visits"))
# ---- the peers' own masks (peers.py); the ladders scale each one's reach
register_family(MaskFamily(
    "sta", {"window": [3, 3, 3], "tile": [6, 8, 8]}, check=_check_sta,
    label=lambda s: f"sta({','.join(map(str, s['window']))})", peer=lambda s, lay: peers.sta(s, lay),
    ladder=({"window": [1, 3, 3]}, {"window": [3, 3, 3]}, {"window": [3, 5, 5]}, {"window": [5, 5, 5]}),
    doc="Sliding Tile Attention as FastVideo builds it: window in (6, 8, 8)-token tiles, its centre "
        "clamped inside the tile grid; exact on tile=(6, 8, 8), block=64"))
register_family(MaskFamily(
    "radial_attn", {"variant": "wan", "decay_factor": 1.0, "block": 128, "rule": "2025-11"},
    check=_check_radial_attn,
    label=lambda s: (f"radial_attn({s['variant']},{s['decay_factor']:g}"
                     + ("" if s["rule"] == peers.RADIAL_RULES[0] else f",{s['rule']}") + ")"),
    peer=lambda s, lay: peers.radial(s, lay),
    ladder=({"decay_factor": 0.2}, {"decay_factor": 0.5}, {"decay_factor": 1.0}, {"decay_factor": 2.0}),
    doc="Radial Attention as mit-han-lab builds it at 72788d4: frame-0 sink on Wan, whole frames at "
        "distance <= 1, an in-frame raster band halving as the frame distance doubles (floor: one block), "
        "parity thinning; rule='2025-10' keeps half a frame at distance 1 on Wan (af371ca); exact on raster order"))
_SVG_DEFAULTS = {"mask": "attend", "variant": "wan", "sparsity": 0.25, "width_frames": None, "context": None,
                 "block": 128}
_SVG_LADDER = ({"sparsity": 0.1}, {"sparsity": 0.2}, {"sparsity": 0.3}, {"sparsity": 0.45})


def _svg_label(kind: str):
    def label(s: Spec) -> str:
        if s["mask"] == "select":
            reach = "" if s["width_frames"] is None else f",{s['width_frames']:g}"
            return f"{kind}(select,{s['variant']}{reach})"
        width = f"w={s['width_frames']:g}" if s["width_frames"] is not None else f"{s['sparsity']:g}"
        return f"{kind}({s['variant']},{width})"
    return label


register_family(MaskFamily(
    "svg_spatial", dict(_SVG_DEFAULTS), check=_check_svg("svg_spatial"), label=_svg_label("svg_spatial"),
    peer=lambda s, lay: peers.svg_spatial(s, lay), ladder=_SVG_LADDER,
    doc="Sparse VideoGen's spatial head at 5ce7b01: mask='attend' is the token band it attends with, its "
        "width from sparsity (or width_frames), with the first-frame sink on Wan; mask='select' is the "
        "128-token block band it classifies heads with"))
register_family(MaskFamily(
    "svg_temporal", {**_SVG_DEFAULTS, "order": "hwf"}, check=_check_svg("svg_temporal"),
    label=_svg_label("svg_temporal"), peer=lambda s, lay: peers.svg_temporal(s, lay), ladder=_SVG_LADDER,
    doc="Sparse VideoGen's temporal head: svg_spatial's masks on the position-major sequence; its heads run "
        "position-major (order 'hwf')"))
register_family(MaskFamily(
    "svd_diagonal", {"width": 256, "block": 64}, check=_check_svd("svd_diagonal", ("width",)),
    label=lambda s: f"svd_diagonal({s['width']})", peer=lambda s, lay: peers.svd_diagonal(s, lay),
    ladder=({"width": 64}, {"width": 256}, {"width": 1024}),
    doc="Sparse-vDiT's diagonal pattern: raster tokens within width of each other"))
register_family(MaskFamily(
    "svd_multi_diagonal", {"width": 64, "block": 64}, check=_check_svd("svd_multi_diagonal", ("width",)),
    label=lambda s: f"svd_multi_diagonal({s['width']})", peer=lambda s, lay: peers.svd_multi_diagonal(s, lay),
    ladder=({"width": 32}, {"width": 64}, {"width": 256}),
    doc="Sparse-vDiT's multi-diagonal pattern: the same position, within width raster tokens, in every frame"))
register_family(MaskFamily(
    "svd_stripe", {"frames": 1, "width": 64, "block": 64}, check=_check_svd("svd_stripe", ("frames", "width")),
    label=lambda s: f"svd_stripe(f={s['frames']},{s['width']})", peer=lambda s, lay: peers.svd_stripe(s, lay),
    ladder=({"frames": 1, "width": 64}, {"frames": 1, "width": 256}),
    doc="Sparse-vDiT's vertical-stripe pattern: keys of the first frames, plus a width-token diagonal"))

def svg_attend(spec: str | Spec, sparsity: float | None = None) -> Spec:
    """The Sparse VideoGen mask a head classified with ``spec`` attends with: an ``svg_spatial`` or
    ``svg_temporal`` ``mask="select"`` spec becomes the same kind and variant with ``mask="attend"``
    (at ``sparsity``, default the family's); any other spec is returned unchanged (normalized).
    ``SparsityPlan.map_specs(svg_attend)`` turns a plan calibrated on the selection masks into the
    one SVG would run."""
    s = normalize_spec(spec)
    if s["kind"] not in ("svg_spatial", "svg_temporal") or s["mask"] != "select":
        return s
    out = {**s, "mask": "attend", "width_frames": None}
    if sparsity is not None:
        out["sparsity"] = sparsity
    return normalize_spec(out)


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
    allowed = set(family.defaults) | {"kind", "sinks", "temperature"} | ({"order"} if kind != "dense" else set())
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for mask kind {kind!r}; valid: {sorted(allowed - {'kind'})}")
    out = {"kind": kind, **copy.deepcopy(family.defaults), **{k: v for k, v in spec.items() if k != "kind"}}
    family.check(out)
    if "order" in out:
        check_order(out["order"])
    if "temperature" in out:
        t = out["temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a positive number (softmax logits are divided by it; 1 = none), "
                             f"got {t!r}")
        out["temperature"] = float(t)
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
    family = FAMILIES[s["kind"]]
    order = f"@{s['order']}" if "order" in s and s["order"] != family.defaults.get("order") else ""
    temp = f"/T{s['temperature']:g}" if s.get("temperature", 1.0) != 1.0 else ""
    return family.label(s) + order + ("+sinks" if s.get("sinks") else "") + temp


def is_dynamic(spec: str | Spec) -> bool:
    """Whether the spec's blocks are selected per call (``MaskFamily.dynamic``)."""
    return FAMILIES[normalize_spec(spec)["kind"]].dynamic


def without_temperature(spec: str | Spec) -> Spec:
    """The spec's mask part: a per-head ``temperature`` scales the head's logits and changes no block."""
    return {k: v for k, v in normalize_spec(spec).items() if k != "temperature"}


def spec_layout(spec: str | Spec, layout: VideoLayout) -> VideoLayout:
    """The layout a spec's heads run on: ``layout``, with the spec's ``order`` where it has one."""
    order = normalize_spec(spec).get("order")
    return layout if order is None or order == layout.order else dataclasses.replace(layout, order=order)


def ladder(kind: str) -> list[Spec]:
    """The family's calibration ladder as full specs, sparsest first (the default alone if none)."""
    family = FAMILIES.get(kind)
    if family is None:
        raise ValueError(f"unknown mask kind {kind!r}; valid kinds: {list(FAMILIES)}")
    rungs = family.ladder or ({},)
    return [normalize_spec({"kind": kind, **r}) for r in rungs]


def video_blocks(spec: str | Spec, layout: VideoLayout, device: torch.device | str | None = None) -> torch.Tensor:
    """bool ``[num_video_blocks, num_video_blocks]``: the spec's video-to-video blocks (no text, no sinks)."""
    spec = normalize_spec(spec)
    device = torch.device(device) if device is not None else torch.device("cpu")
    family = FAMILIES[spec["kind"]]
    if spec["kind"] == "union":
        out = video_blocks(spec["of"][0], layout, device)
        for s in spec["of"][1:]:
            out = out | video_blocks(s, layout, device)
        return out
    if family.peer is not None:
        return peers.project(family.peer(spec, layout), layout, device)
    coords = layout.tile_coords().to(device)
    d = (coords[:, None, :] - coords[None, :, :]).abs()
    return family.rule(spec, layout)(d[..., 0], d[..., 1], d[..., 2])


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
    spec = without_temperature(spec)
    layout = spec_layout(spec, layout)
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
    video = video_blocks(spec, layout, device)
    nb, nv = layout.num_blocks, layout.num_video_blocks
    out = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    out[:nv, :nv] = video
    if layout.num_text_blocks:
        out[:, nv:] = True  # text keys visited by every query
        out[nv:, :] = True  # text queries attend densely
    sinks = spec.get("sinks")
    if sinks:
        out[:, sink_blocks(sinks, layout).to(device)] = True
    if layout.blocks_per_tile > 1:
        empty = ~layout.block_has_tokens().to(device)
        out[empty, :] = False
        out[:, empty] = False
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
    keep = keep & layout.block_has_tokens()
    return keep.nonzero().squeeze(1)


def build(
    spec: str | Spec | Sequence[str | Spec],
    layout: VideoLayout,
    heads: int | None = None,
    device: torch.device | str | None = None,
) -> BlockSparseMask:
    """Build a ``BlockSparseMask`` ``[1, H, M, M]`` from one spec (shared by ``heads`` heads, or
    broadcast when ``heads`` is None) or a list of specs, one per head. The mask is on
    ``mask_layout(specs, layout)`` (a spec's ``order`` applied): pass that layout's token order."""
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
    layout = mask_layout(specs, layout)
    mats = [block_matrix(s, layout, device) for s in specs]  # built on the device, shared across calls
    blocks = torch.stack(mats).unsqueeze(0)
    return BlockSparseMask.from_dense(blocks, layout.block_size).for_token_order(layout.order_digest)


def head_densities(specs: Sequence[str | Spec], layout: VideoLayout) -> torch.Tensor:
    """float64 ``[H]``: the block density of each head's spec, each on its own layout (``spec_layout``),
    as ``build(specs, layout).head_density()`` gives when the specs share one order; for a dynamic
    spec, the most it can visit (:func:`dynamic_max_density`)."""
    return torch.tensor([dynamic_max_density(s, layout) if normalize_spec(s)["kind"] != "dense" and is_dynamic(s)
                         else float(block_matrix(s, layout).double().mean()) for s in specs], dtype=torch.float64)


def dynamic_max_density(spec: str | Spec, layout: VideoLayout) -> float:
    """The most a dynamic spec's heads can visit on ``layout``: its static part plus ``keep`` more key
    blocks on each query row that attends, as a fraction of all block pairs (the selection may take
    fewer: with ``mass``, or where fewer blocks hold tokens)."""
    spec = normalize_spec(spec)
    static = block_matrix(spec, layout)
    visits = static.sum(-1)
    extra = torch.clamp(static.shape[-1] - visits, max=spec["keep"]) * static.any(-1)
    return (int(visits.sum()) + int(extra.sum())) / static.numel()


def mask_layout(specs: Sequence[str | Spec], layout: VideoLayout) -> VideoLayout:
    """The one layout per-head ``specs`` can share in a mask: their ``order`` (dense heads follow the
    others); raises ValueError when sparse specs ask for different orders."""
    layouts = {spec_layout(s, layout) for s in specs if normalize_spec(s)["kind"] != "dense"}
    if len(layouts) > 1:
        raise ValueError(f"these specs run on different token orders ({sorted(x.order for x in layouts)}), so one "
                         "mask cannot hold them; build one mask per order (the processor groups heads by spec)")
    return layouts.pop() if layouts else layout
