"""Head groups: layers share one mask per spec, text queries run dense beside the kernel, and the
result (values and gradients) equals one call with the layer's full per-head mask."""
import json

import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.integration import grouped_attention, text_queries
from sparse_vdit.ops import sparse_attention

from .helpers import tiled_launches

# Every backend test runs with torch.empty poisoned (NaN): a row a backend fails to write shows.
pytestmark = pytest.mark.usefixtures("nan_empty")

SPECS = [{"kind": "sliding_tile", "window": [1, 3, 3]}, "dense", "temporal", {"kind": "sliding_tile", "window": [1, 3, 3]}]


@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-10), ("triton", torch.float32, 2e-5)])
@pytest.mark.parametrize("position", ["after", "before"])
def test_grouped_attention_equals_the_full_mask(backend, dtype, tol, position):
    layout = sv.VideoLayout(3, 6, 10, (1, 4, 4), text_len=9, text_position=position)
    plan = sv.SparsityPlan(heads=[SPECS, SPECS], tile=(1, 4, 4))
    proc = sv.SparseAttnProcessor(plan)
    groups = proc.head_groups(0, layout, "cpu")
    assert len(groups) == 3 and [g.heads.tolist() for g in groups] == [[0, 3], [1], [2]]
    assert groups[0].mask is proc.head_groups(1, layout, "cpu")[0].mask  # shared across layers
    for g in groups:
        if g.mask is not None:  # text query rows left empty: they run dense beside the kernel
            assert g.mask.heads == 1 and (g.mask.kv_counts[0, 0, layout.num_video_blocks:] == 0).all()
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 2, 4, layout.seq_len, 16
    q, k, v = (torch.randn(B, N, H, D, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
    key_valid = torch.ones(B, N, dtype=torch.bool)
    key_valid[1, layout.text_offset + layout.text_len - 3: layout.text_offset + layout.text_len] = False  # padded text
    order = layout.token_order()
    out = grouped_attention(q, k, v, groups, order, key_valid, backend, text_queries(layout))
    full = sv.masks.build(SPECS, layout)
    ref = sparse_attention(q, k, v, full, order, key_valid=key_valid, backend=backend)
    assert (out - ref).abs().max() < tol
    w = torch.randn(out.shape, generator=g, dtype=dtype)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, want):
        assert torch.isfinite(a).all() and (a - b).abs().max() < 10 * tol


def test_plan_masks_cost_per_distinct_spec_not_per_layer():
    """60 layers x 8 heads drawn from 3 specs: the processor holds the 3 patterns and one stack of them
    that every layer's single launch reads through its head map."""
    layout = sv.VideoLayout(4, 16, 16, (1, 8, 8), text_len=20)
    specs = ["temporal", {"kind": "sliding_tile", "window": [1, 3, 3]}, "spatial"]
    g = torch.Generator().manual_seed(1)
    heads = [[specs[int(i)] for i in torch.randint(0, 3, (8,), generator=g)] for _ in range(60)]
    proc = sv.SparseAttnProcessor(sv.SparsityPlan(heads=heads, tile=(1, 8, 8)))
    groups = [proc.head_groups(layer, layout, "cpu") for layer in range(60)]
    mixed = [gs for gs, row in zip(groups, heads) if len({json.dumps(s, sort_keys=True) for s in row}) > 1]
    assert mixed and all(len(gs) == 1 and gs[0].head_map is not None for gs in mixed)  # one launch per layer
    stacks = {id(gs[0].mask) for gs in mixed}
    assert len(stacks) == 1  # one stack for every layer
    stack = mixed[0][0].mask
    assert stack.heads == 3  # the 3 patterns (no dense heads: no full pattern, rows as wide as the widest)
    patterns = {id(gr.mask): gr.mask for gs, row in zip(groups, heads) if gs not in mixed for gr in gs}
    assert len(patterns) <= 3
    held = proc.cached_mask_bytes(layout, "cpu")
    stack_bytes = stack.kv_counts.nbytes + stack.kv_indices.nbytes
    assert stack_bytes < held <= 2 * stack_bytes  # the patterns, and the stack (rows padded to one width)


def _reference_per_head(q, k, v, specs, layout, key_valid, temperatures=None):
    """float64 attention where head h sees exactly the token pairs its spec's blocks visit, on the
    spec's own layout (its ``order``); with ``temperatures``, head h's video queries' logits divided
    by its own (the text queries' are not)."""
    B, N, H, D = q.shape
    allowed = []
    for spec in specs:
        lay = sv.masks.spec_layout(spec, layout)
        blk = lay.block_of_token()
        allowed.append(sv.masks.block_matrix(spec, lay)[blk][:, blk])
    allowed = torch.stack(allowed)[None] & key_valid[:, None, None, :]  # [B, H, N, N]
    qh, kh, vh = (x.transpose(1, 2).double() for x in (q, k, v))
    s = (qh @ kh.transpose(-1, -2)) * D ** -0.5
    if temperatures is not None:
        rows = torch.ones(H, N, dtype=torch.float64)
        text = torch.zeros(N, dtype=torch.bool)
        text[layout.text_offset:layout.text_offset + layout.text_len] = True
        rows[:, ~text] = 1 / torch.tensor(temperatures, dtype=torch.float64)[:, None]
        s = s * rows[None, :, :, None]
    return (torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vh).transpose(1, 2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_heads_on_their_own_token_order(backend):
    """Sparse VideoGen's spatial and temporal heads in one layer: the temporal heads run position-major
    (their spec's order), the spatial ones raster, each exact against its own token pairs."""
    layout = sv.VideoLayout(4, 5, 6, (0, 0, 0), block=16, text_len=7, text_position="after")
    specs = [{"kind": "svg_spatial", "block": 16, "width_frames": 0.6}, {"kind": "svg_temporal", "block": 16,
             "width_frames": 0.6}, "dense", {"kind": "svg_temporal", "block": 16, "width_frames": 0.6}]
    proc = sv.SparseAttnProcessor(sv.SparsityPlan(heads=[specs], tile=(0, 0, 0), block=16))
    groups = proc.head_groups(0, layout, "cpu")
    hwf = sv.masks.spec_layout(specs[1], layout)
    assert hwf.order == "hwf" and layout.order == "fhw"
    by_heads = {tuple(g.heads.tolist()): g for g in groups}
    assert by_heads[(0,)].token_order is None and torch.equal(by_heads[(1, 3)].token_order, hwf.token_order())
    with pytest.raises(ValueError, match="different token orders"):
        sv.masks.build(specs, layout)
    g = torch.Generator().manual_seed(2)
    B, N, H, D = 2, layout.seq_len, 4, 16
    q, k, v = (torch.randn(B, N, H, D, generator=g) for _ in range(3))
    key_valid = torch.ones(B, N, dtype=torch.bool)
    key_valid[0, -2:] = False
    out = grouped_attention(q, k, v, groups, layout.token_order(), key_valid, backend, text_queries(layout))
    ref = _reference_per_head(q, k, v, specs, layout, key_valid)
    assert (out.double() - ref).abs().max() < 2e-5
    # the two orders really differ: the temporal heads' result on the raster order is another one
    wrong = _reference_per_head(q, k, v, [{**sv.masks.normalize_spec(s), "order": "fhw"} if s != "dense" else s
                                          for s in specs], layout, key_valid)
    assert (wrong - ref)[:, :, [1, 3]].abs().max() > 1e-3


@pytest.mark.parametrize("degree", [2, 3])
def test_ulysses_rank_groups_equal_the_rank_heads_of_the_full_result(degree):
    """Under Ulysses a rank runs the head groups of its contiguous chunk of heads (padded to a multiple
    of the degree): its output equals those heads of the single-process result."""
    layout = sv.VideoLayout(4, 5, 6, (0, 0, 0), block=16, text_len=5)
    specs = [{"kind": "svg_spatial", "block": 16, "width_frames": 0.6}, "dense",
             {"kind": "svg_temporal", "block": 16, "width_frames": 0.6}, {"kind": "svg_spatial", "block": 16,
                                                                          "width_frames": 0.6}, "dense"]
    proc = sv.SparseAttnProcessor(sv.SparsityPlan(heads=[specs], tile=(0, 0, 0), block=16))
    g = torch.Generator().manual_seed(3)
    B, N, H, D = 1, layout.seq_len, len(specs), 16
    q, k, v = (torch.randn(B, N, H, D, generator=g) for _ in range(3))
    order = layout.token_order()
    full = grouped_attention(q, k, v, proc.head_groups(0, layout, "cpu"), order, None, "torch", text_queries(layout))
    per = -(-H // degree)
    pad = per * degree - H
    qp, kp, vp = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    for rank in range(degree):
        groups = proc.head_groups(0, layout, "cpu", degree, rank)
        covered = sorted(h for gr in groups for h in (gr.heads.tolist() if gr.heads is not None else range(per)))
        assert covered == list(range(per))  # every local head, padded ones included, in exactly one group
        sl = slice(rank * per, (rank + 1) * per)
        o = grouped_attention(qp[:, :, sl], kp[:, :, sl], vp[:, :, sl], groups, order, None, "torch", text_queries(layout))
        real = min(per, H - rank * per)
        assert torch.allclose(o[:, :, :real], full[:, :, sl][:, :, :real], atol=1e-6)
        assert torch.isfinite(o).all()


def test_head_densities_equal_the_mask_and_take_each_heads_order():
    layout = sv.VideoLayout(4, 5, 6, (0, 0, 0), block=16, text_len=5)
    same = ["temporal", {"kind": "svg_spatial", "block": 16}, "dense"]
    assert torch.allclose(sv.masks.head_densities(same, layout), sv.masks.build(same, layout).head_density())
    mixed = same + [{"kind": "svg_temporal", "block": 16}]
    hwf = sv.masks.spec_layout(mixed[-1], layout)
    assert sv.masks.head_densities(mixed, layout)[-1] == sv.masks.build(mixed[-1:], hwf).head_density()[0]


@pytest.mark.parametrize("backend,dense", [("triton", True), ("torch", False), ("torch_masked", False)])
def test_a_layer_mixing_specs_runs_as_one_launch_over_stacked_patterns(backend, dense):
    """Heads of three specs (and dense heads, where the tiled kernel runs them with a full pattern):
    one group, one launch over the plan's stacked patterns through a head map, exact per head
    against a float64 reference of each head's own token pairs, with text rows and a key mask."""
    layout = sv.VideoLayout(2, 8, 8, tile=(1, 4, 4), text_len=6)
    specs = [{"kind": "sliding_tile", "window": [1, 1, 1]}, "radial", "spatial",
             "dense" if dense else {"kind": "temporal", "radius": 0}, "radial", {"kind": "sliding_tile", "window": [1, 1, 1]}]
    proc = sv.SparseAttnProcessor(sv.SparsityPlan(heads=[specs], tile=(1, 4, 4)), backend=backend)
    groups = proc.head_groups(0, layout, "cpu")
    assert len(groups) == 1 and groups[0].head_map is not None
    hm = groups[0].head_map.tolist()
    assert hm[0] == hm[5] and hm[1] == hm[4] and len(set(hm)) == 4
    g = torch.Generator().manual_seed(3)
    B, N, H, D = 2, layout.seq_len, len(specs), 16
    q, k, v = (torch.randn(B, N, H, D, generator=g) for _ in range(3))
    key_valid = torch.ones(B, N, dtype=torch.bool)
    key_valid[1, -3:] = False
    with tiled_launches() as launches:
        out = grouped_attention(q, k, v, groups, layout.token_order(), key_valid, backend, text_queries(layout))
    ref = _reference_per_head(q, k, v, specs, layout, key_valid)
    assert (out.double() - ref).abs().max() < 2e-5
    assert len(launches) == (1 if backend == "triton" else 0)
    # the same layer split into its groups (the path before) gives the same result
    split = sv.SparseAttnProcessor(sv.SparsityPlan(heads=[specs], tile=(1, 4, 4)), backend=backend)
    split._one_launch = lambda made, *a: tuple(made)
    parts = split.head_groups(0, layout, "cpu")
    assert len(parts) == 4
    again = grouped_attention(q, k, v, parts, layout.token_order(), key_valid, backend, text_queries(layout))
    assert (again.double() - ref).abs().max() < 2e-5


def test_gradients_through_a_layer_run_as_one_launch():
    layout = sv.VideoLayout(2, 8, 8, tile=(1, 4, 4), text_len=5)
    specs = [{"kind": "sliding_tile", "window": [1, 1, 1]}, "radial", "dense", "spatial"]
    groups = sv.SparseAttnProcessor(sv.SparsityPlan(heads=[specs], tile=(1, 4, 4)), backend="triton").head_groups(
        0, layout, "cpu")
    assert len(groups) == 1
    _check_gradients(layout, specs, groups, seed=4)


def _check_gradients(layout, specs, groups, seed, temperatures=None):
    """dq, dk, dv of the layer on the tiled kernel against float64 autograd of the per-head reference."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, layout.seq_len, 4, 16, generator=g, requires_grad=True) for _ in range(3))
    key_valid = torch.ones(1, layout.seq_len, dtype=torch.bool)
    w = torch.randn(1, layout.seq_len, 4, 16, generator=g, dtype=torch.float64)
    out = grouped_attention(q, k, v, groups, layout.token_order(), key_valid, "triton", text_queries(layout))
    grads = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref = _reference_per_head(q64, k64, v64, specs, layout, key_valid, temperatures)
    want = torch.autograd.grad((ref * w).sum(), (q64, k64, v64))
    for a, b in zip(grads, want):
        assert (a.double() - b).abs().max() < 1e-4


TEMPERATURES = [0.5, 1.0, 2.0, 1.25]


def _mixed_temperature_layer(backend):
    layout = sv.VideoLayout(2, 8, 8, tile=(1, 4, 4), text_len=5)
    base = [{"kind": "sliding_tile", "window": [1, 1, 1]}, "radial", {"kind": "sliding_tile", "window": [1, 1, 1]},
            "spatial"]
    specs = [dict(sv.masks.normalize_spec(s), **({} if t == 1.0 else {"temperature": t}))
             for s, t in zip(base, TEMPERATURES)]
    groups = sv.SparseAttnProcessor(sv.SparsityPlan(heads=[specs], tile=(1, 4, 4)), backend=backend).head_groups(
        0, layout, "cpu")
    return layout, [sv.masks.without_temperature(s) for s in specs], groups


@pytest.mark.parametrize("backend", ["triton", "torch", "torch_masked"])
def test_heads_at_different_temperatures_share_one_launch(backend):
    """A layer whose heads differ in softmax temperature is one group with a per-head scale factor:
    one launch on the tiled kernel (q scaled per head on the others), exact per head against float64."""
    layout, specs, groups = _mixed_temperature_layer(backend)
    assert len(groups) == 1 and groups[0].temperature == 1.0
    assert torch.equal(groups[0].head_factor, 1 / torch.tensor(TEMPERATURES))
    g = torch.Generator().manual_seed(5)
    B, N, H, D = 2, layout.seq_len, 4, 16
    q, k, v = (torch.randn(B, N, H, D, generator=g) for _ in range(3))
    key_valid = torch.ones(B, N, dtype=torch.bool)
    key_valid[0, -2:] = False
    with tiled_launches() as launches:
        out = grouped_attention(q, k, v, groups, layout.token_order(), key_valid, backend, text_queries(layout))
    ref = _reference_per_head(q, k, v, specs, layout, key_valid, TEMPERATURES)
    assert (out.double() - ref).abs().max() < 2e-5
    assert len(launches) == (1 if backend == "triton" else 0)
    plain = _reference_per_head(q, k, v, specs, layout, key_valid)
    assert (plain - ref).abs().max() > 1e-2  # the temperatures really act


def test_gradients_through_heads_at_different_temperatures_in_one_launch():
    layout, specs, groups = _mixed_temperature_layer("triton")
    assert len(groups) == 1 and groups[0].head_factor is not None
    _check_gradients(layout, specs, groups, seed=6, temperatures=TEMPERATURES)


@pytest.mark.parametrize("bad,match", [(torch.ones(3), r"float32 tensor \[4\]"), (torch.ones(4, dtype=torch.float64), "float32"),
                                       (torch.tensor([1.0, 0.0, 1.0, 1.0]), "positive")])
def test_a_bad_head_factor_is_refused_with_what_is_valid(bad, match):
    layout = sv.VideoLayout(2, 8, 8, tile=(1, 4, 4))
    mask = sv.masks.build({"kind": "sliding_tile", "window": [1, 1, 1]}, layout, heads=1)
    q = torch.randn(1, 4, layout.seq_len, 16)
    with pytest.raises(ValueError, match=match):
        sv.ops.block_sparse_attention(q, q, q, mask, token_order=layout.token_order(), backend="torch", head_factor=bad)
