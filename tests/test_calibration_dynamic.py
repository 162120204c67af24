"""Calibration with the dynamic family and per-head temperatures (issue 20, parts 2 and 4): the
cost model counts a dynamic candidate's selection, a temperature is kept only where it lowers the
error of the head's chosen mask, and the measurements behind both come from the calls' own q, k."""
import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.calibration import decide, option_names
from sparse_vdit.masks import normalize_spec
from sparse_vdit.testing import plant_local_attention, tiny_wan_transformer

from .test_calibration import _wan_run

STATIC = normalize_spec({"kind": "sliding_tile", "window": [1, 3, 3]})
DYNAMIC = normalize_spec({"kind": "dynamic", "keep": 2})


def _record(errors, densities, selection):
    """One layer's record over [STATIC, DYNAMIC] x (plain, +sinks) x (T=1, T=1.25), six heads."""
    names = option_names([STATIC, DYNAMIC], (1.25,))
    return {"layer": 0, "step": 5, "options": names, "errors": errors, "densities": densities,
            "sink_frames": [[] for _ in range(6)], "selection_cost": selection}


def test_decide_counts_the_selection_and_keeps_a_temperature_only_where_it_lowers_the_error():
    inf = 9.0
    #            h0    h1    h2    h3    h4    h5
    st_t1 = [0.20, 0.05, 0.05, inf, 0.05, inf]
    st_t2 = [0.05, 0.03, 0.05, inf, 0.05, inf]
    dy_t1 = [inf, inf, inf, 0.05, 0.05, 0.05]
    dy_t2 = [inf, inf, inf, 0.06, 0.05, 0.05]
    errors = [st_t1, dy_t1, st_t1, dy_t1, st_t2, dy_t2, st_t2, dy_t2]  # the sink variants equal the plain ones
    st_d = [0.3] * 6
    dy_d = [0.25, 0.25, 0.25, 0.25, 0.25, 0.95]
    densities = [st_d, dy_d] * 4
    selection = [0.0, 0.1] * 4
    out = decide([_record(errors, densities, selection)], [STATIC, DYNAMIC], 1, 6, num_steps=10,
                 error_budget=0.1, warmup_choices=(0.0,), temperatures=(1.25,))
    h = out["heads"][0]
    assert h[0]["kind"] == "sliding_tile" and h[0]["temperature"] == 1.25  # fits only with the temperature
    assert h[1]["kind"] == "sliding_tile" and h[1]["temperature"] == 1.25  # fits at 1, lower error at 1.25
    assert h[2]["kind"] == "sliding_tile" and "temperature" not in h[2]  # equal error: no temperature
    assert h[3]["kind"] == "dynamic" and "temperature" not in h[3]  # only the dynamic mask fits
    assert h[4]["kind"] == "sliding_tile"  # sparser dynamic (0.25) costs more with its selection (0.35)
    assert h[5]["kind"] == "dense"  # 0.95 + 0.1 selection is no cheaper than dense
    info = out["per_head"][0]
    assert info[0]["error"] == pytest.approx(0.05) and info[0]["error_at_temperature_1"] == pytest.approx(0.20)
    assert info[3]["density"] == pytest.approx(0.25)
    assert out["expected_attention_cost"] == pytest.approx((0.3 * 3 + 0.35 + 0.3 + 1.0) / 6)


def _run(steps=3):
    return _wan_run(grid=(4, 8, 8), steps=steps)


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_wan_transformer(num_layers=2)
    plant_local_attention(model, [0], sharpness=8.0)
    plan = sv.calibrate(model, run=_run(), num_prompts=1, num_inference_steps=3, candidates=[STATIC, DYNAMIC],
                        temperatures=(0.8, 1.25), error_budget=0.6, tile=(1, 4, 4), sample_steps=(0.5, 1.0),
                        progress=False)
    return model, plan


def test_calibration_measures_dynamic_candidates_and_temperatures_on_the_calls(calibrated):
    model, plan = calibrated
    rec = plan.metrics["records"][0]
    names = rec["options"]
    assert names == option_names([DYNAMIC, STATIC], (0.8, 1.25)) or names == option_names([STATIC, DYNAMIC], (0.8, 1.25))
    assert plan.metrics["temperatures"] == [0.8, 1.25]
    for name, cost, dens in zip(names, rec["selection_cost"], rec["densities"]):
        assert (cost > 0) == name.startswith("dynamic"), name
        if name.startswith("dynamic"):
            assert cost < 0.05 and all(0 < d < 1 for d in dens)
    # a temperature measures differently from temperature 1 (the same masks, another scale)
    base = names.index(sv.masks.spec_name(STATIC))
    hot = names.index(sv.masks.spec_name(STATIC) + "/T1.25")
    assert rec["errors"][base] != rec["errors"][hot] and rec["densities"][base] == rec["densities"][hot]
    # (a loose budget, so that the random layer's heads have something to choose: they fit only hotter)
    chosen = [head for row in plan.metrics["per_head"] for head in row]
    assert any("/T" in h["chosen"] for h in chosen) and any(h["chosen"].startswith("dynamic") for h in chosen)
    for head in chosen:
        if "/T" in head["chosen"]:
            assert head["error"] < head["error_at_temperature_1"]
    sv.apply(model, plan)
    try:
        with torch.no_grad():
            out = _run()(model, 0)
    finally:
        sv.remove(model)
    assert torch.isfinite(out).all()


def test_calibration_refuses_candidates_with_a_temperature_and_bad_temperatures():
    model = tiny_wan_transformer(num_layers=1)
    with pytest.raises(ValueError, match="candidates carry no temperature"):
        sv.calibrate(model, run=_run(), candidates=[dict(STATIC, temperature=1.2)], progress=False)
    with pytest.raises(ValueError, match="temperatures must be positive"):
        sv.calibrate(model, run=_run(), candidates=[STATIC], temperatures=(0.0,), progress=False)
