"""The processor on tiny Wan models (CPU): exactness against the stock processors, plans, apply/remove."""
import json

import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.testing import plant_local_attention, tiny_wan_pipeline, tiny_wan_transformer


def _inputs(B=2, frames=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, frames, size, size, generator=g)
    e = torch.randn(B, 10, 64, generator=g)
    return x, e


@pytest.fixture(scope="module")
def model():
    m = tiny_wan_transformer(num_layers=3)
    plant_local_attention(m, [0, 1])
    return m


def _run(m, x, e, t=900):
    with torch.no_grad():
        return m(x, torch.full((x.shape[0],), t), e).sample


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_dense_plan_equals_stock(model):
    x, e = _inputs()
    ref = _run(model, x, e)
    model.set_attn_processor(sv.SparseAttnProcessor(sv.dense_plan(model)))
    try:
        out = _run(model, x, e)
    finally:
        sv.remove(model)
    assert _rel(out, ref) <= 1e-5


def test_covering_window_equals_dense_and_real_mask_differs(model):
    x, e = _inputs()
    ref = _run(model, x, e)
    cover = sv.uniform_plan(model, {"kind": "sliding_tile", "window": [99, 99, 99]}, tile=(1, 4, 4))
    proc = sv.apply(model, cover)
    out = _run(model, x, e)
    assert proc.bindings and proc.binding().stats["sparse"] == 3
    sv.remove(model)
    assert _rel(out, ref) <= 1e-5
    sparse = sv.uniform_plan(model, {"kind": "sliding_tile", "window": [1, 1, 1]}, tile=(1, 4, 4))
    sv.apply(model, sparse)
    out = _run(model, x, e)
    sv.remove(model)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) > 1e-3


def test_two_resolutions_in_a_row_and_remove_restores(model):
    plan = sv.uniform_plan(model, "radial", tile=(1, 4, 4))
    x1, e1 = _inputs(B=1, frames=3, size=16)
    x2, e2 = _inputs(B=2, frames=5, size=24)  # 12x12 tokens per frame: not a multiple of the tile
    ref1, ref2 = _run(model, x1, e1), _run(model, x2, e2)
    proc = sv.apply(model, plan)
    o1, o2 = _run(model, x1, e1), _run(model, x2, e2)
    layouts = set(proc.cached_layouts())
    assert {(lay.frames, lay.height, lay.width) for lay in layouts} == {(3, 8, 8), (5, 12, 12)}
    assert torch.isfinite(o1).all() and torch.isfinite(o2).all()
    sv.remove(model)
    assert torch.equal(_run(model, x1, e1), ref1) and torch.equal(_run(model, x2, e2), ref2)
    assert not any(isinstance(m.processor, sv.SparseAttnProcessor) for m in model.modules() if hasattr(m, "set_processor"))


PLAN_LAYOUTS = {  # spec, layout options of the plan
    "tiles": ("temporal", {"tile": (1, 4, 4)}),
    "sta-tiles": ({"kind": "sta", "tile": [2, 4, 4], "window": [1, 1, 3]}, {"tile": (2, 4, 4), "block": 16}),
    "raster": ({"kind": "radial_attn", "block": 16}, {"tile": (0, 0, 0), "block": 16}),
    "position-major": ({"kind": "svg_temporal", "block": 16, "width_frames": 0.5},
                       {"tile": (0, 0, 0), "block": 16, "order": "hwf"}),
    # per-head specs: SVG's spatial heads raster, its temporal heads position-major (their own order)
    "two orders": ([{"kind": "svg_spatial", "block": 16, "width_frames": 0.5}, "dense",
                    {"kind": "svg_temporal", "block": 16, "width_frames": 0.5},
                    {"kind": "svg_temporal", "block": 16, "width_frames": 0.5}], {"tile": (0, 0, 0), "block": 16}),
}


@pytest.mark.parametrize("which", list(PLAN_LAYOUTS))
def test_sparse_path_matches_layout_reference(model, which):
    """The processor's sparse output equals the model run with a reference attention restricted to
    the same token pairs (float64 reference on the layer's q, k, v), on the plan's layout."""
    x, e = _inputs(B=1, frames=3, size=16)
    spec, options = PLAN_LAYOUTS[which]
    specs = spec if isinstance(spec, list) else [spec] * 4
    plan = sv.SparsityPlan(heads=[specs] * 3, **options, model=sv.dense_plan(model).model)
    proc = sv.apply(model, plan)
    captured = {}
    adapter = proc.binding().adapter
    real = adapter.sparse_forward

    def spy(attn, attend, hidden_states, *a, **k):
        def wrapped(q, kk, v):
            o = attend(q, kk, v)
            captured.setdefault("qkvo", (q, kk, v, o))
            return o
        return real(attn, wrapped, hidden_states, *a, **k)

    adapter.sparse_forward = spy
    try:
        _run(model, x, e)
    finally:
        del adapter.sparse_forward
        sv.remove(model)
    q, k, v, o = (t.transpose(1, 2).double() for t in captured["qkvo"])
    layout = sv.VideoLayout(3, 8, 8, **options)
    assert proc.cached_layouts() == [layout]
    allowed = []
    for head_spec in specs:  # each head on its spec's layout
        lay = sv.masks.spec_layout(head_spec, layout)
        blk = lay.block_of_token()
        allowed.append(sv.masks.block_matrix(head_spec, lay)[blk][:, blk])
    allowed = torch.stack(allowed)
    assert 0.05 < allowed.double().mean() < 0.95
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    ref = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v
    assert (o - ref).abs().max() < 1e-5


def test_dense_steps_follow_timesteps(model):
    x, e = _inputs(B=1, frames=2, size=16)
    plan = sv.uniform_plan(model, {"kind": "sliding_tile", "window": [1, 1, 1]}, tile=(1, 4, 4), dense_steps=2)
    proc = sv.apply(model, plan)
    b = proc.binding()
    seen = []
    for t in (999, 999, 800, 600, 600, 400, 999):  # repeated t = CFG's second call; 999 again = new generation
        before = b.stats["sparse"]
        _run(model, x, e, t)
        seen.append((b.step, b.stats["sparse"] > before))
    sv.remove(model)
    assert seen == [(0, False), (0, False), (1, False), (2, True), (2, True), (3, True), (0, False)]


def test_fractional_dense_steps_need_the_step_count(model):
    x, e = _inputs(B=1, frames=2, size=16)
    plan = sv.uniform_plan(model, "radial", tile=(1, 4, 4), dense_steps=0.2)
    sv.apply(model, plan)
    try:
        with pytest.raises(ValueError, match="number of steps is unknown"):
            _run(model, x, e)
    finally:
        sv.remove(model)


def test_plan_json_round_trip_and_errors(model, tmp_path):
    plan = sv.uniform_plan(model, {"kind": "radial", "sinks": {"frames": [0]}}, dense_layers=[-1], dense_steps=0.25)
    path = plan.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["model"]["class"] == "WanTransformer3DModel"
    again = sv.SparsityPlan.load(path)
    assert again.to_dict() == plan.to_dict()
    assert again.head(2, 0)["kind"] == "dense" and again.head(0, 3)["kind"] == "radial"
    other = tiny_wan_transformer(num_layers=2)
    with pytest.raises(ValueError, match=r"attention layers: plan 3, model 2"):
        sv.apply(other, again)
    wide = tiny_wan_transformer(num_layers=3, num_attention_heads=2, attention_head_dim=64)
    with pytest.raises(ValueError, match=r"heads per layer: plan 4, model 2"):
        sv.SparseAttnProcessor(again).bind(wide)
    data["version"] = 99
    (tmp_path / "v.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version 99"):
        sv.SparsityPlan.load(tmp_path / "v.json")
    with pytest.raises(ValueError, match="dense_layers"):
        sv.uniform_plan(model, "radial", dense_layers=[7])
    with pytest.raises(ValueError, match="unknown mask kind"):
        sv.uniform_plan(model, "diagonal")
    with pytest.raises(ValueError, match="not a supported transformer"):
        sv.uniform_plan(torch.nn.Linear(2, 2), "radial")


def test_whole_pipeline_with_plan():
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    e, ne = torch.randn(1, 8, 64), torch.randn(1, 8, 64)

    def gen():
        with torch.no_grad():
            return pipe(prompt_embeds=e, negative_prompt_embeds=ne, height=128, width=128, num_frames=9,
                        num_inference_steps=4, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                        output_type="pt").frames

    dense = gen()
    proc = sv.apply(pipe, sv.uniform_plan(pipe.transformer, "sliding_tile", tile=(1, 4, 4), dense_steps=0.25))
    sparse = gen()
    stats = proc.binding().stats
    sv.remove(pipe)
    assert torch.isfinite(sparse).all() and sparse.shape == dense.shape
    assert stats["sparse"] == 4 * 3 * 2  # 4 layers x 3 sparse steps (1 of 4 dense) x 2 CFG calls
    assert not torch.equal(sparse, dense)
    assert torch.equal(gen(), dense)


def test_set_attn_processor_binds_on_first_forward_called_by_keyword(model):
    """Pipelines call the transformer with keyword arguments only: the processor binds during the
    first forward (which runs dense, with a warning when the plan has no dense warm-up) and follows
    the plan from the next forward on."""
    x, e = _inputs(B=1, frames=2, size=16)
    plan = sv.uniform_plan(model, {"kind": "sliding_tile", "window": [1, 1, 1]}, tile=(1, 4, 4))
    proc = sv.SparseAttnProcessor(plan)
    model.set_attn_processor(proc)

    def fwd(t):
        with torch.no_grad():
            return model(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=e).sample

    try:
        with pytest.warns(UserWarning, match="first forward"):
            first = fwd(900)
        second = fwd(900)
        stats = proc.binding().stats
    finally:
        sv.remove(model)
    assert stats["sparse"] == 3  # the second forward only
    assert torch.allclose(first, fwd(900)) and not torch.allclose(second, first)


def test_wan_i2v_image_cross_attention_stays_stock():
    m = tiny_wan_transformer(num_layers=2, image_dim=48, added_kv_proj_dim=128)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 16, 16, generator=g)
    e = torch.randn(1, 512, 64, generator=g)  # Wan I2V's processor takes the last 512 tokens as text
    img = torch.randn(1, 257, 48, generator=g)
    with torch.no_grad():
        ref = m(x, torch.tensor([900]), e, encoder_hidden_states_image=img).sample
        proc = sv.apply(m, sv.uniform_plan(m, {"kind": "sliding_tile", "window": [99, 99, 99]}, tile=(1, 4, 4)))
        out = m(x, torch.tensor([900]), e, encoder_hidden_states_image=img).sample
        stats = proc.binding().stats
        sv.remove(m)
    assert stats["sparse"] == 2 and _rel(out, ref) <= 1e-5


def test_wan22_second_transformer_needs_its_own_plan():
    from types import SimpleNamespace

    t1, t2 = tiny_wan_transformer(num_layers=2, seed=1), tiny_wan_transformer(num_layers=3, seed=2)
    pipe = SimpleNamespace(transformer=t1, transformer_2=t2, scheduler=None)
    p1 = sv.uniform_plan(t1, "radial", tile=(1, 4, 4))
    p2 = sv.uniform_plan(t2, "sliding_tile", tile=(1, 4, 4))
    with pytest.raises(ValueError, match="transformer_2"):
        sv.apply(pipe, p1)
    procs = list(sv.apply(pipe, {"transformer": p1, "transformer_2": p2}).values())
    assert [p.plan for p in procs] == [p1, p2]
    x, e = _inputs(B=1, frames=2, size=16)
    outs = [_run(t, x, e) for t in (t1, t2)]
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(p.binding().stats["sparse"] == n for p, n in zip(procs, (2, 3)))
    sv.remove(pipe)
    assert not any(isinstance(getattr(m, "processor", None), sv.SparseAttnProcessor)
                   for t in (t1, t2) for m in t.modules())


def test_apply_twice_replaces_the_earlier_plan(model):
    x, e = _inputs(B=1, frames=2, size=16)
    first = sv.apply(model, sv.uniform_plan(model, "temporal", tile=(1, 4, 4)))
    second = sv.apply(model, sv.uniform_plan(model, {"kind": "sliding_tile", "window": [99, 99, 99]}, tile=(1, 4, 4)))
    out = _run(model, x, e)
    assert not first.bindings and len(model._forward_pre_hooks) == 1
    sv.remove(model)
    ref = _run(model, x, e)
    assert _rel(out, ref) <= 1e-5 and not second.bindings


@pytest.mark.parametrize("metrics", [{}, {"per_head": [[{"chosen": "dense"}] * 4] * 3},
                                     {"a": 1, "per_head": [[{"chosen": "dense"}] * 4] * 3, "records": [1]}])
def test_plan_file_is_valid_json_for_any_metrics(model, tmp_path, metrics):
    plan = sv.uniform_plan(model, "radial")
    plan.metrics = metrics
    again = sv.SparsityPlan.load(plan.save(tmp_path / "p.json"))
    assert again.metrics == {k: v for k, v in metrics.items() if k != "records"}
    assert again.heads == plan.heads


def test_mixed_layer_dense_heads_go_to_dense_attention(model):
    """In a layer with dense and sparse heads, the dense heads run SDPA and the sparse ones the
    kernel; the result equals running every head through the kernel with full rows for the dense ones."""
    x, e = _inputs(B=2, frames=3, size=16)
    full = {"kind": "sliding_tile", "window": [99, 99, 99]}
    mixed = [{"kind": "dense"}, {"kind": "radial"}, {"kind": "dense"}, {"kind": "temporal"}]
    covered = [full, {"kind": "radial"}, full, {"kind": "temporal"}]
    outs = []
    for heads in (mixed, covered):
        proc = sv.apply(model, sv.SparsityPlan(heads=[heads] * 3, tile=(1, 4, 4), model=sv.dense_plan(model).model))
        outs.append(_run(model, x, e))
        slot, other = (next(s for s in proc.binding().slots if s.layer == i) for i in (0, 1))
        sv.remove(model)
        if heads is mixed:  # one group per spec; the dense one without a mask (SDPA off the tiled kernel)
            groups = [(g.mask is None, g.heads.tolist()) for g in slot.groups]
            assert sorted(groups) == [(False, [1]), (False, [3]), (True, [0, 2])]
            # layers with the same specs share the masks: one per spec, not per layer
            assert [g.mask for g in slot.groups] == [g.mask for g in other.groups]
        else:  # every head masked: one group over the stacked patterns, shared by the layers
            assert len(slot.groups) == 1 and slot.groups[0].head_map is not None
            assert slot.groups[0].mask is other.groups[0].mask
    assert _rel(outs[0], outs[1]) <= 1e-5
