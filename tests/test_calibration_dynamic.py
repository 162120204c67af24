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


A = normalize_spec({"kind": "sliding_tile", "window": [1, 3, 3]})
B = normalize_spec({"kind": "sliding_tile", "window": [3, 3, 3]})


def _ab_record(errors, densities):
    """One layer's record over [A, B] x (plain, +sinks), at temperature 1."""
    names = option_names([A, B], ())
    return {"layer": 0, "step": 5, "options": names, "errors": errors, "densities": densities,
            "sink_frames": [[] for _ in errors[0]], "selection_cost": None}


def _totals(out):
    """(summed squared error, mean cost) of a decision's heads."""
    info = out["per_head"][0]
    return sum(i["error"] ** 2 for i in info), sum(i["density"] for i in info) / len(info)


def test_target_density_spends_the_error_where_it_buys_the_most_density():
    """A stated invariant checked by brute force: the allocation's summed squared error is the least of every
    assignment of options (dense included) to heads that costs no more than it, and it meets the
    target; where a threshold spends error on a head that saves little, the allocation keeps it dense."""
    import itertools

    g = torch.Generator().manual_seed(3)
    heads = 6
    errors = (torch.rand(4, heads, generator=g) * 0.3).tolist()
    densities = (0.1 + torch.rand(4, heads, generator=g) * 0.6).tolist()
    rec = _ab_record(errors, densities)
    for target in (0.4, 0.55, 0.7, 0.85):
        out = decide([rec], [A, B], 1, heads, num_steps=10, error_budget=0.9, warmup_choices=(0.0,),
                     target_density=target)
        err, cost = _totals(out)
        assert cost <= target + 1e-6 and out["expected_attention_cost"] == pytest.approx(cost)
        options = [[(errors[o][h], densities[o][h]) for o in range(4)] + [(0.0, 1.0)] for h in range(heads)]
        best = min(sum(e * e for e, _ in combo) for combo in itertools.product(*options)
                   if sum(d for _, d in combo) / heads <= cost + 1e-9)
        assert err == pytest.approx(best, abs=1e-8), target
        # and it is on target: one trade-off for all heads can miss the best assignment within the
        # target by one head's change of option at most; on these heads it misses nothing
        at_target = min(sum(e * e for e, _ in combo) for combo in itertools.product(*options)
                        if sum(d for _, d in combo) / heads <= target + 1e-9)
        assert err <= at_target + 1e-8, target
    # Head 0: cheap and nearly free; head 1: its only mask costs error 0.09 for little saving.
    errors = [[0.01, 0.09], [0.01, 0.09], [0.01, 0.09], [0.01, 0.09]]
    densities = [[0.2, 0.9], [0.2, 0.9], [0.2, 0.9], [0.2, 0.9]]
    rec = _ab_record(errors, densities)
    threshold = decide([rec], [A, B], 1, 2, num_steps=10, error_budget=0.1, warmup_choices=(0.0,))
    t_err, t_cost = _totals(threshold)
    assert [s["kind"] for s in threshold["heads"][0]] == ["sliding_tile", "sliding_tile"]
    allocated = decide([rec], [A, B], 1, 2, num_steps=10, error_budget=0.1, warmup_choices=(0.0,),
                       target_density=0.6)
    a_err, a_cost = _totals(allocated)
    assert a_cost <= 0.6 + 1e-6 and a_err < t_err / 50 and t_cost == pytest.approx(0.55)
    assert allocated["heads"][0][1]["kind"] == "dense"
    assert "density target" in allocated["per_head"][0][1]["reason"]
    from sparse_vdit.calibration.calibrate import dense_reasons

    plan = type("P", (), {"metrics": {"per_head": allocated["per_head"], "target_density": 0.6,
                                      "error_budget": 0.1}})()
    assert dense_reasons(plan) == ["1/2 heads dense: the density target 0.6 is met without them (best candidate "
                                   "error 0.09 (median), sliding_tile(1,3,3))"]


def test_target_density_and_dense_steps_must_be_fractions():
    for bad in ({"target_density": 1.5}, {"target_density": 0.0}, {"dense_steps": 1.0}, {"dense_steps": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sv.calibrate(tiny_wan_transformer(num_layers=1), run=_wan_run(), **bad)


def test_dense_steps_fixes_the_warm_up():
    m = tiny_wan_transformer(num_layers=1)
    plant_local_attention(m, [0], sharpness=8.0)
    for warm in (0.0, 0.25):
        plan = sv.calibrate(m, run=_wan_run(), num_inference_steps=4, dense_steps=warm, error_budget=0.5,
                            progress=False)
        assert plan.dense_steps == warm


def test_sink_variant_masks_are_kept_for_one_set_of_sinks_at_a_time():
    """Each layer and step may find other sink frames; a mask holds its token-level form, so the
    calibration keeps at most one sink set's masks (a 29-rung calibration once ran out of memory)."""
    from sparse_vdit.calibration.calibrate import MeasuringAttention
    from sparse_vdit.masks import block_matrix

    layout = sv.VideoLayout(6, 16, 16, (1, 4, 4))
    measurer = MeasuringAttention([A, B], {0}, None, 4.0)
    blocks = [block_matrix(c, layout) for c in (A, B)]
    for frame in range(6):
        sinks = [[frame], [], [], []]
        made = [measurer._with_sinks(c, b, sinks, layout, torch.device("cpu")) for c, b in zip((A, B), blocks)]
        assert len(measurer._sink_masks) <= 2
        again = [measurer._with_sinks(c, b, sinks, layout, torch.device("cpu")) for c, b in zip((A, B), blocks)]
        assert all(x is y for x, y in zip(made, again))  # the current set is still reused
