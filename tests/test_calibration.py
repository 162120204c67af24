"""Calibration on planted structure (CPU, tiny models) and on synthetic heads whose failure modes are
known: global heads stay dense, local heads get sparse masks, sink heads get sink-aware masks or
stay dense, and a head that looks sparse by attention mass but fails by output error stays dense."""
import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.calibration import decide, layer_attention_mass, head_errors, mass_inside, sink_frames
from sparse_vdit.ops import dense_attention
from sparse_vdit.testing import plant_local_attention, tiny_wan_transformer
from sparse_vdit.testing import FAMILIES, make

CANDIDATES = ["sliding_tile", "temporal", "spatial"]


def _wan_run(grid=(6, 12, 12), steps=4):
    f, h, w = grid
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, f, 2 * h, 2 * w, generator=g)
    e = torch.randn(1, 10, 64, generator=g)

    def run(model, i):
        with torch.no_grad():
            for t in torch.linspace(999, 100, steps):
                out = model(x + 0.1 * i, torch.tensor([float(t)]), e).sample
        return out
    return run


@pytest.fixture(scope="module")
def planted():
    m = tiny_wan_transformer(num_layers=3)
    plant_local_attention(m, [0, 1], sharpness=8.0)  # layers 0, 1 local; layer 2 random (global)
    return m


@pytest.fixture(scope="module")
def planted_plan(planted):
    return sv.calibrate(planted, run=_wan_run(), num_prompts=2, num_inference_steps=4, candidates=CANDIDATES,
                        error_budget=0.05, tile=(1, 4, 4), sample_steps=(0.0, 0.5, 1.0), progress=False)


def test_planted_local_sparse_global_dense(planted_plan):
    plan = planted_plan
    for layer in (0, 1):
        kinds = {s["kind"] for s in plan.layer_specs(layer)}
        assert "dense" not in kinds, (layer, kinds)
    assert all(s["kind"] == "dense" for s in plan.layer_specs(2))
    assert 2 in plan.dense_layers
    for row in plan.metrics["per_head"][:2]:
        for h in row:
            assert h["density"] < 1.0 and h["error"] <= 0.05
    assert plan.metrics["records"] and plan.metrics["sampled_steps"] == [0, 2, 3]
    assert plan.metrics["layout"].startswith("grid 6x12x12 tokens, tile 1x4x4")


def test_planted_sink_layer_gets_sink_aware_mask_or_dense():
    """Layer 0 local, layer 1 local plus a first-frame sink every query attends to, layer 2 global."""
    from sparse_vdit.testing import plant_sink_frame

    m = tiny_wan_transformer(num_layers=3)
    plant_local_attention(m, [0, 1], sharpness=8.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 6, 24, 24, generator=g)
    x[:, :, 0] += 3.0  # a distinctive first frame, like an I2V conditioning frame
    e = torch.randn(1, 10, 64, generator=g)
    plant_sink_frame(m, 1, x, torch.tensor([999.0]), e, frame=0)

    def run(model, i):
        with torch.no_grad():
            for t in torch.linspace(999, 100, 4):
                out = model(x + 0.05 * i * torch.randn(x.shape, generator=torch.Generator().manual_seed(i)),
                            torch.tensor([float(t)]), e).sample
        return out

    plan = sv.calibrate(m, run=run, num_prompts=2, num_inference_steps=4, candidates=["sliding_tile"],
                        error_budget=0.05, tile=(1, 4, 4), sample_steps=(0.0, 1.0), progress=False)
    sink_records = [r for r in plan.metrics["records"] if r["layer"] == 1]
    assert all(r["sink_frames"][h] == [0] for r in sink_records for h in range(4))  # the sink is found
    plain = plan.metrics["per_head"][1][0]["worst_error_by_option"]["sliding_tile(3,3,3)"]
    assert plain > 0.05  # without the sink the local mask fails ...
    for spec in plan.layer_specs(1):  # ... so the layer gets the sink-aware mask, or stays dense
        assert spec["kind"] == "dense" or spec.get("sinks", {}).get("frames") == [0]
    assert all("sinks" not in s for s in plan.layer_specs(0))
    assert all(s["kind"] == "dense" for s in plan.layer_specs(2))


def test_chosen_plan_end_to_end_error_within_budget(planted, planted_plan):
    f, h, w = 6, 12, 12
    g = torch.Generator().manual_seed(5)  # a held-out input
    x = torch.randn(1, 16, f, 2 * h, 2 * w, generator=g)
    e = torch.randn(1, 10, 64, generator=g)
    with torch.no_grad():
        ref = planted(x, torch.tensor([500.0]), e).sample
        sv.apply(planted, planted_plan)
        out = planted(x, torch.tensor([500.0]), e).sample
        sv.remove(planted)
    assert ((out - ref).norm() / ref.norm()).item() <= 0.05


def test_same_seed_same_plan_and_resume(planted, planted_plan, tmp_path):
    kw = dict(run=_wan_run(), num_prompts=2, num_inference_steps=4, candidates=CANDIDATES, error_budget=0.05,
              tile=(1, 4, 4), sample_steps=(0.0, 0.5, 1.0), progress=False)
    again = sv.calibrate(planted, **kw)
    assert again.heads == planted_plan.heads and again.dense_steps == planted_plan.dense_steps
    ckpt = tmp_path / "ckpt.json"
    sv.calibrate(planted, checkpoint=ckpt, **{**kw, "num_prompts": 1})  # stopped after one prompt
    resumed = sv.calibrate(planted, checkpoint=ckpt, **kw)
    assert resumed.metrics["records"] == planted_plan.metrics["records"]
    assert resumed.heads == planted_plan.heads


def test_global_budget_tightens_until_the_held_out_error_fits(planted, planted_plan):
    kw = dict(run=_wan_run(), num_prompts=2, num_inference_steps=4, candidates=CANDIDATES, error_budget=0.05,
              tile=(1, 4, 4), sample_steps=(0.0, 0.5, 1.0), progress=False)
    # An impossible end-to-end budget: every tightening is tried, then the plan falls back to dense.
    strict = sv.calibrate(planted, global_budget=1e-12, **kw)
    history = strict.metrics["global_budget"]["history"]
    assert len(history) == 6 and history[0]["head_budget"] == 0.05
    assert all(b["head_budget"] < a["head_budget"] for a, b in zip(history, history[1:]))
    assert all(h["end_to_end_error"] > 1e-12 for h in history)
    assert all(s["kind"] == "dense" for row in strict.heads for s in row)
    # A loose one: the per-head plan is kept, its held-out error is recorded and fits.
    loose = sv.calibrate(planted, global_budget=0.05, **kw)
    (check,) = loose.metrics["global_budget"]["history"]
    assert loose.heads == planted_plan.heads and check["end_to_end_error"] <= 0.05


# ---------------------------------------------------------------------------- synthetic heads
def _local_qk(layout, heads, sharp=10.0, D=32, freq=0.5):
    """q, k whose logits fall with the 3D token distance (like the planted model), [1, N, H, D]."""
    N = layout.seq_len
    idx = torch.arange(N)
    f = idx // (layout.height * layout.width)
    r = (idx // layout.width) % layout.height
    c = idx % layout.width
    pos = torch.stack([f, r, c], 1).double()
    freqs = torch.tensor([freq, freq, freq])
    ang = pos * freqs  # [N, 3]
    feat = torch.cat([ang.cos(), ang.sin()], 1) * sharp  # dot products ~ sum cos(delta)
    feat = torch.nn.functional.pad(feat, (0, D - feat.shape[1])).float()
    q = feat[None, :, None, :].expand(1, N, heads, D).clone()
    return q, q.clone()


def _records_for(q, k, v, layout, candidates, sink_factor=4.0):
    o = dense_attention(q, k, v)
    heads = q.shape[2]
    masks = [sv.masks.build(c, layout, heads=heads) for c in candidates]
    mass = layer_attention_mass(q, k, layout)
    sinks = sink_frames(mass, layout, sink_factor)
    sink_masks = [sv.masks.build([{"kind": c, "sinks": {"frames": sinks[h]}} if sinks[h] else c
                                  for h in range(heads)], layout) for c in candidates]
    errors = head_errors(q, k, v, o, masks + sink_masks, layout.token_order(), "torch")
    rec = {"layer": 0, "step": 5, "errors": errors.tolist(), "sink_frames": sinks,
           "densities": [m.head_density().tolist() for m in masks + sink_masks]}
    return rec, mass, masks


def _leaky_head(logit):
    """Two local heads on a 6x16x16 grid; in head 1 the first tile's keys also get a fixed logit
    ``logit`` from every query (local peaks are about 53) and carry large values."""
    layout = sv.VideoLayout(6, 16, 16, (1, 4, 4))
    leak = layout.token_order()[:16].long()
    q, k = _local_qk(layout, heads=2, sharp=10.0, freq=0.3)
    k[:, leak, 1] = 0.0
    k[:, leak, 1, -1] = logit * 32 ** 0.5
    q[:, :, 1, -1] = 1.0
    v = torch.randn(1, layout.seq_len, 2, 32, generator=torch.Generator().manual_seed(0))
    v[:, leak, 1] = 20.0
    return layout, q, k, v


def test_sparse_by_mass_but_failing_by_output_error_stays_dense():
    layout, q, k, v = _leaky_head(logit=47.0)
    rec, mass, masks = _records_for(q, k, v, layout, ["sliding_tile"])
    inside = mass_inside(mass, masks[0])
    assert (inside > 0.95).all(), inside  # by attention mass both heads look equally sparse
    out = decide([rec], [sv.masks.normalize_spec("sliding_tile")], 1, 2, num_steps=10, error_budget=0.1,
                 warmup_choices=(0.0,))
    assert out["heads"][0][0]["kind"] == "sliding_tile"
    assert out["heads"][0][1]["kind"] == "dense"
    assert out["per_head"][0][1]["worst_error_by_option"]["sliding_tile(3,3,3)"] > 0.1


def test_sink_head_gets_sink_aware_mask_or_dense():
    layout, q, k, v = _leaky_head(logit=52.0)  # the first tile is now a strong sink in head 1
    rec, mass, _ = _records_for(q, k, v, layout, ["sliding_tile"])
    assert rec["sink_frames"][1] == [0] and rec["sink_frames"][0] == []
    out = decide([rec], [sv.masks.normalize_spec("sliding_tile")], 1, 2, num_steps=10, error_budget=0.1,
                 warmup_choices=(0.0,))
    sink_head = out["heads"][0][1]
    assert sink_head["kind"] == "dense" or sink_head.get("sinks", {}).get("frames") == [0]
    assert out["heads"][0][0]["kind"] == "sliding_tile" and "sinks" not in out["heads"][0][0]


def test_calibrate_errors(planted):
    with pytest.raises(ValueError, match="error_budget"):
        sv.calibrate(planted, run=_wan_run(), error_budget=2.0)
    with pytest.raises(ValueError, match="candidates"):
        sv.calibrate(planted, run=_wan_run(), candidates=["dense"])
    with pytest.raises(ValueError, match="bare transformer needs run"):
        sv.calibrate(planted, prompt_embeds=[torch.zeros(1, 4, 64)])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_calibrates(family, tmp_path):
    model, call = make(family)

    def run(m, i):
        with torch.no_grad():
            for t in (900, 500):
                call(m, batch=1, t=t, seed=i)

    plan = sv.calibrate(model, run=run, num_prompts=1, num_inference_steps=2, candidates=["temporal"],
                        error_budget=0.5, tile=(1, 4, 4), sample_steps=(0.0, 1.0), progress=False)
    layers, heads = sv.integration.attention_shape(model)
    assert (plan.num_layers, plan.num_heads) == (layers, heads)
    assert len(plan.metrics["records"]) == 2 * layers
    plan.save(tmp_path / "p.json")
    assert sv.SparsityPlan.load(tmp_path / "p.json").heads == plan.heads
    paths = sv.calibration.save_report(plan, tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)


LADDER_CASES = {
    "own family, tiles": (["sliding_tile"], {"tile": (1, 4, 4)}),
    # svg_temporal's heads run position-major: measured (and later run) on their own order
    "peer families, raster": (["svg_spatial", "svg_temporal", "svd_diagonal", "radial_attn"],
                              {"tile": (0, 0, 0), "block": 16}),
}


@pytest.mark.parametrize("which", list(LADDER_CASES))
def test_ladders_pick_the_cheapest_rung_within_budget(planted, planted_plan, which):
    """With ladders every rung of every family is measured, each head gets the sparsest option whose
    worst error fits the budget across all families, and no head ends up denser than with the family
    defaults alone."""
    kinds, options = LADDER_CASES[which]
    kw = dict(run=_wan_run(), num_prompts=2, num_inference_steps=4, error_budget=0.05,
              sample_steps=(0.0, 0.5, 1.0), progress=False, **options)
    plan = sv.calibrate(planted, candidates=kinds, ladders=True, **kw)
    default = sv.calibrate(planted, candidates=kinds, **kw)
    assert plan.layout_options() == {"tile": (1, 4, 4), "block": None, "order": "fhw", **options}
    rungs = [sv.masks.spec_name(s) for k in kinds for s in sv.masks.ladder(k)]
    assert set(plan.metrics["candidates"]) == set(rungs) and len(rungs) > len(kinds)
    records = plan.metrics["records"]
    for layer, row in enumerate(plan.metrics["per_head"]):
        rec = [r for r in records if r["layer"] == layer][-1]
        for h, head in enumerate(row):
            density = dict(zip(rec["options"], (d[h] for d in rec["densities"])))
            fitting = [density[o] for o, e in head["worst_error_by_option"].items() if e <= 0.05 and density[o] < 1]
            if fitting:
                assert head["chosen"] != "dense" and abs(head["density"] - min(fitting)) < 1e-6
            else:
                assert head["chosen"] == "dense"
            assert head["density"] <= default.metrics["per_head"][layer][h]["density"] + 1e-9
    proc = sv.apply(planted, plan)  # the plan runs (heads of different orders included)
    try:
        _wan_run()(planted, 0)
        assert proc.binding().stats["sparse"] > 0
    finally:
        sv.remove(planted)


def test_classify_heads_as_svg_does_then_attend_as_svg_does(planted):
    """Sparse VideoGen picks each head's type with its selection masks and attends with its runtime
    masks: calibrate on the ``mask="select"`` specs, then ``map_specs(svg_attend)``."""
    select = [{"kind": "svg_spatial", "mask": "select", "block": 16},
              {"kind": "svg_temporal", "mask": "select", "block": 16}]
    plan = sv.calibrate(planted, run=_wan_run(), num_prompts=1, num_inference_steps=4, candidates=select,
                        error_budget=0.2, sample_steps=(0.0, 1.0), progress=False, tile=(0, 0, 0), block=16)
    runs = plan.map_specs(lambda s: sv.masks.svg_attend(s, sparsity=0.4))
    sparse = 0
    for row, new_row in zip(plan.heads, runs.heads):
        for old, new in zip(row, new_row):
            if old["kind"] == "dense":
                assert new == old
            else:
                sparse += 1
                assert (new["kind"], new["variant"], new["mask"], new["sparsity"]) == (old["kind"], old["variant"],
                                                                                         "attend", 0.4)
    assert sparse > 0
    assert plan.heads[0][0]["mask"] == "select" if plan.heads[0][0]["kind"] != "dense" else True  # the original is kept
    proc = sv.apply(planted, runs)
    try:
        _wan_run()(planted, 0)
        assert proc.binding().stats["sparse"] > 0
    finally:
        sv.remove(planted)
