"""VideoLayout and the mask families: property tests against brute-force token-level definitions."""
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sparse_vdit as sv
from sparse_vdit.masks import VideoLayout, block_matrix, build, normalize_spec
from sparse_vdit.ops import block_sparse_attention

TILES = [(1, 4, 4), (2, 2, 4), (1, 2, 8), (2, 4, 2), (4, 2, 2), (1, 8, 8), (2, 4, 8)]
# Tiles of several kernel blocks (block=16), 0 = the whole axis; with either axis order.
MULTI_BLOCK_TILES = [(2, 3, 4), (0, 0, 0), (1, 0, 0), (3, 4, 4), (2, 8, 8), (0, 2, 2)]
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layouts(draw, max_tokens=600):
    multi = draw(st.booleans())
    tile = draw(st.sampled_from(MULTI_BLOCK_TILES if multi else TILES))
    extra = {"block": 16, "order": draw(st.sampled_from(["fhw", "hwf"]))} if multi else {}
    f = draw(st.integers(1, 6))
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    while f * h * w > max_tokens:
        f = max(1, f - 1)
        h = max(1, h - 1)
    text = draw(st.sampled_from([0, 0, 5, 17, 40]))
    pos = draw(st.sampled_from(["before", "after"]))
    return VideoLayout(f, h, w, tile, text_len=text, text_position=pos, **extra)


SPECS = [
    "dense",
    {"kind": "sliding_tile", "window": [1, 1, 1]},
    {"kind": "sliding_tile", "window": [3, 1, 3]},
    {"kind": "sliding_tile", "window": [3, 3, 3]},
    "radial",
    {"kind": "radial", "dense_frames": 0, "spatial_radius": 2},
    {"kind": "spatial", "frames": 0},
    {"kind": "temporal", "radius": 1},
    {"kind": "union", "of": ["temporal", {"kind": "spatial", "frames": 0}]},
    {"kind": "sliding_tile", "window": [1, 1, 1], "sinks": {"frames": [0], "tokens": [[3, 5]]}},
]


# ---------------------------------------------------------------------------- brute force
def token_coords(layout):
    """Per model token: (is_video, frame, row, col, tile t/h/w), straight from the definition."""
    rows = []
    for i in range(layout.seq_len):
        j = i - layout.video_offset
        if 0 <= j < layout.num_video_tokens:
            f, rem = divmod(j, layout.height * layout.width)
            h, w = divmod(rem, layout.width)
            t = layout.tile_shape
            rows.append((True, f, h, w, f // t[0], h // t[1], w // t[2]))
        else:
            rows.append((False, -1, -1, -1, -1, -1, -1))
    return rows


def rule_scalar(spec, layout, dt, dh, dw):
    kind = spec["kind"]
    if kind == "dense":
        return True
    if kind == "sliding_tile":
        return all(d <= w // 2 for d, w in zip((dt, dh, dw), spec["window"]))
    if kind == "spatial":
        return dt <= spec["frames"]
    if kind == "temporal":
        return dh <= spec["radius"] and dw <= spec["radius"]
    if kind == "union":
        return any(rule_scalar(s, layout, dt, dh, dw) for s in spec["of"])
    if kind == "radial":
        r0 = spec["spatial_radius"] if spec["spatial_radius"] is not None else max(layout.tile_grid[1:])
        if dt <= spec["dense_frames"]:
            return True
        k = max(1, math.ceil(math.log2(dt / max(spec["dense_frames"], 1))))
        r = r0 >> k
        s = max(dh, dw)
        if r >= 1:
            return s <= r
        kz = math.floor(math.log2(r0)) + 1 if r0 >= 1 else 0
        return s == 0 and dt % (2 ** max(k - kz + 1, 0)) == 0
    raise AssertionError(kind)


def brute_force_token_mask(spec, layout):
    """Token-level mask from the definitions: text rows/columns dense, sink keys visited, otherwise
    the family's scalar rule on the tile distance of the two tokens (evaluated once per distinct
    distance triple)."""
    spec = normalize_spec(spec)
    c = torch.tensor(token_coords(layout))  # [n, 7]
    video = c[:, 0].bool()
    d = (c[:, None, 4:] - c[None, :, 4:]).abs()  # [n, n, 3] tile distances
    triples, inverse = torch.unique(d.reshape(-1, 3), dim=0, return_inverse=True)
    ok = torch.tensor([rule_scalar(spec, layout, *map(int, t)) for t in triples])
    m = ok[inverse].reshape(d.shape[:2])
    sinks = spec.get("sinks", {})
    sink_key = torch.tensor([bool(video[j]) and (int(c[j, 1]) in sinks.get("frames", [])
                                                 or any(a <= j < b for a, b in sinks.get("tokens", [])))
                             for j in range(layout.seq_len)], dtype=torch.bool)
    m |= sink_key[None, :]
    m |= ~video[None, :] | ~video[:, None]
    return m


def block_reduce(token_mask, layout):
    blk = layout.block_of_token()
    nb = layout.num_blocks
    out = torch.zeros(nb, nb, dtype=torch.bool)
    ii, jj = token_mask.nonzero(as_tuple=True)
    out[blk[ii], blk[jj]] = True
    return out


# ---------------------------------------------------------------------------- layout
@SETTINGS
@given(layouts())
def test_permutation_is_bijection_and_inverse_restores(layout):
    order = layout.token_order().long()
    assert order.numel() == layout.padded_len == layout.num_blocks * layout.block_size
    real = order[order >= 0]
    assert torch.equal(real.sort().values, torch.arange(layout.seq_len))  # every token exactly once
    x = torch.randn(2, layout.seq_len, 3)
    tiled = layout.to_tiled(x, dim=1)
    assert (tiled[:, order < 0] == 0).all()
    assert torch.equal(layout.from_tiled(tiled, dim=1), x)
    # every block holds tokens of one tile only
    c = token_coords(layout)
    for b in range(layout.num_video_blocks):
        toks = order[b * layout.block_size:(b + 1) * layout.block_size]
        tiles = {c[t][4:] for t in toks.tolist() if t >= 0}
        assert len(tiles) <= 1
    assert layout.padding_overhead == pytest.approx(layout.padded_len / layout.seq_len - 1)


def test_layout_errors():
    with pytest.raises(ValueError, match="power of two"):
        VideoLayout(4, 8, 8, tile=(1, 6, 6))
    with pytest.raises(ValueError, match="positive ints"):
        VideoLayout(0, 8, 8)
    with pytest.raises(ValueError, match="text_position"):
        VideoLayout(4, 8, 8, text_len=3, text_position="middle")


def test_real_grid_shapes_are_handled():
    layout = VideoLayout(21, 30, 52, (1, 8, 8))  # Wan 480p: 30 and 52 do not divide by 8
    assert layout.tile_grid == (21, 4, 7) and layout.padded_len == 588 * 64
    assert 0.14 < layout.padding_overhead < 0.16


# ---------------------------------------------------------------------------- families
@pytest.mark.parametrize("spec", SPECS, ids=[sv.masks.spec_name(s) for s in SPECS])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(layout=VideoLayout(8, 12, 12, (1, 4, 4), text_len=5))
@example(layout=VideoLayout(7, 9, 5, (2, 2, 4), text_len=0))
@given(layout=layouts(max_tokens=300))
def test_block_mask_equals_block_reduction_of_token_definition(layout, spec):
    if normalize_spec(spec).get("sinks") and layout.seq_len < 5:
        return  # the sink token range [3, 5) needs 5 tokens (its error is tested elsewhere)
    got = block_matrix(spec, layout)
    want = block_reduce(brute_force_token_mask(spec, layout), layout)
    # Blocks of padding only (partly filled multi-block tiles) are neither visited nor filled, so the
    # two must agree exactly.
    assert torch.equal(got, want)


@SETTINGS
@given(layouts(), st.sampled_from(SPECS))
def test_structural_invariants(layout, spec):
    if normalize_spec(spec).get("sinks") and layout.seq_len < 5:
        return  # the sink token range [3, 5) needs 5 tokens (its error is tested elsewhere)
    m = block_matrix(spec, layout)
    nv = layout.num_video_blocks
    real = layout.block_has_tokens()
    assert torch.equal(m.diagonal(), real), "every query block visits itself; padding-only blocks nothing"
    assert not m[~real].any() and not m[:, ~real].any()
    assert torch.equal(m, m.T) or normalize_spec(spec).get("sinks"), "window masks are symmetric"
    if layout.text_len:
        assert m[real][:, nv:].all() and m[nv:, :][:, real].all(), "text rows and columns dense"
    sinks = normalize_spec(spec).get("sinks")
    if sinks:
        cols = sv.masks.sink_blocks(sinks, layout)
        assert m[real][:, cols].all(), "sinks present in every row"


@pytest.mark.parametrize("kind,param,values", [
    ("sliding_tile", "window", [[1, 1, 1], [1, 3, 3], [3, 3, 3], [5, 5, 5], [9, 9, 9]]),
    ("spatial", "frames", [0, 1, 2, 4]),
    ("temporal", "radius", [0, 1, 2, 3]),
    ("radial", "dense_frames", [0, 1, 2, 4]),
])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts())
def test_density_monotone_in_window(kind, param, values, layout):
    masks = [block_matrix({"kind": kind, param: v}, layout) for v in values]
    # a larger window visits a superset of blocks, so density never falls
    for small, large in zip(masks, masks[1:]):
        assert not (small & ~large).any()
    d = [float(m.float().mean()) for m in masks]
    assert all(a <= b for a, b in zip(d, d[1:])), d


def test_density_grows_strictly_on_a_large_grid():
    layout = VideoLayout(12, 24, 32, (1, 4, 4))
    for kind, param, values in [("sliding_tile", "window", [[1, 1, 1], [9, 9, 9]]), ("spatial", "frames", [0, 4]),
                                ("temporal", "radius", [0, 3]), ("radial", "dense_frames", [0, 4])]:
        d = [build({"kind": kind, param: v}, layout).density() for v in values]
        assert d[0] < d[1], (kind, d)


def test_radial_density_falls_with_frames_and_is_n_log_n():
    counts, dens = [], []
    frames = [8, 16, 32, 64, 128]
    for f in frames:
        layout = VideoLayout(f, 16, 16, (1, 4, 4))
        m = build("radial", layout)
        n = layout.num_video_blocks
        counts.append(int(m.kv_counts.sum()) / (n * math.log2(n)))
        dens.append(m.density())
    assert all(a > b for a, b in zip(dens, dens[1:])), dens
    # visited blocks / (n log n) stays within a constant band as n grows 16x (n^2 would grow 16x)
    assert max(counts) / min(counts) < 2.5, counts


def test_spec_errors():
    layout = VideoLayout(4, 8, 8, (1, 4, 4))
    with pytest.raises(ValueError, match="unknown mask kind 'radiall'"):
        build("radiall", layout)
    with pytest.raises(ValueError, match="unknown parameter"):
        build({"kind": "radial", "window": 3}, layout)
    with pytest.raises(ValueError, match="odd"):
        build({"kind": "sliding_tile", "window": [2, 2, 2]}, layout)
    with pytest.raises(ValueError, match="outside the video"):
        build({"kind": "dense", "sinks": {"frames": [9]}}, layout)
    with pytest.raises(ValueError, match="per-head specs"):
        build(["dense", "radial"], layout, heads=3)


def test_per_head_specs_in_one_mask():
    layout = VideoLayout(6, 16, 16, (1, 4, 4), text_len=10)
    specs = ["dense", "radial", "sliding_tile", "temporal"]
    mask = build(specs, layout)
    assert mask.heads == 4
    for h, s in enumerate(specs):
        assert torch.equal(mask.to_dense()[0, h], block_matrix(s, layout))
    assert mask.head_density()[0] == 1.0 and (mask.head_density()[1:] < 1).all()
    assert "#" in mask.to_string(max_blocks=8)


PEER_LAYOUTS = {
    "tile": (VideoLayout(3, 6, 10, (1, 4, 4), text_len=7, text_position="before"),
             [{"kind": "sliding_tile", "window": [1, 3, 1]}, "temporal"]),
    "sta-tiles": (VideoLayout(4, 6, 10, (2, 4, 4), block=16, text_len=7),
                  [{"kind": "sta", "window": [1, 1, 3], "tile": [2, 4, 4]}, "temporal"]),
    "raster": (VideoLayout(5, 4, 7, (0, 0, 0), block=16, text_len=3, text_position="before"),
               [{"kind": "radial_attn", "block": 16}, {"kind": "svd_multi_diagonal", "width": 2, "block": 16}]),
    "position-major": (VideoLayout(5, 4, 7, (0, 0, 0), block=16, order="hwf"),
                       [{"kind": "svg_temporal", "block": 16, "width_frames": 0.6}, "dense"]),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("which", list(PEER_LAYOUTS))
def test_attention_through_layout_equals_restricted_dense(backend, which):
    """Kernel reading through the layout's permutation == float64 dense attention over exactly the
    token pairs whose blocks the mask visits (padding never attended); for tile, multi-block-tile,
    raster and position-major layouts."""
    layout, specs = PEER_LAYOUTS[which]
    mask = build(specs, layout)
    B, H, N, D = 2, 2, layout.seq_len, 32
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    o = block_sparse_attention(q, k, v, mask, token_order=layout.token_order(), backend=backend)
    blk = layout.block_of_token()
    allowed = mask.to_dense()[0][:, blk][:, :, blk]  # [H, N, N]
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * D ** -0.5
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    ref = torch.einsum("bhqk,bhkd->bhqd", p, v.double())
    assert (o.double() - ref).abs().max() < 1e-5


def test_save_mask_png(tmp_path):
    layout = VideoLayout(4, 8, 8, (1, 4, 4))
    mask = build(["radial", "sliding_tile"], layout)
    path = sv.viz.save_mask_png(mask, tmp_path / "m.png", names=["radial", "st"])
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="out of range"):
        sv.viz.save_mask_png(mask, tmp_path / "x.png", heads=[5])
