"""SparsityPlan on its own (no model): construction, queries and validation errors."""
import pytest

import sparse_vdit as sv


def test_plan_from_shape_and_queries():
    plan = sv.SparsityPlan.uniform((3, 2), {"kind": "sliding_tile", "window": [1, 3, 3]}, dense_layers=[-1],
                                   dense_steps=0.25)
    assert (plan.num_layers, plan.num_heads) == (3, 2) and plan.dense_layers == [2]
    assert plan.head(0, 1) == {"kind": "sliding_tile", "window": [1, 3, 3]}
    assert plan.head(-1, 0) == {"kind": "dense"} and plan.layer_is_dense(2) and not plan.layer_is_dense(0)
    assert plan.dense_step_count(50) == 13 and plan.dense_step_count(4) == 1
    with pytest.raises(ValueError, match="number of steps is unknown"):
        plan.dense_step_count(None)
    with pytest.raises(IndexError, match="out of range"):
        plan.head(3, 0)
    assert "dense heads: 2/6" in plan.summary()
    dense = sv.SparsityPlan.dense((2, 4))
    assert all(dense.layer_is_dense(i) for i in range(2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(heads=[]), "non-empty"),
    (dict(heads=[[{"kind": "dense"}], [{"kind": "dense"}, {"kind": "dense"}]]), "same number of heads"),
    (dict(heads=[[{"kind": "dense"}]], dense_steps=1.5), r"\[0, 1\)"),
    (dict(heads=[[{"kind": "dense"}]], dense_steps=-1), ">= 0"),
    (dict(heads=[[{"kind": "dense"}]], dense_steps="10%"), "int count or a float fraction"),
    (dict(heads=[[{"kind": "dense"}]], dense_layers=[1]), "out of range for 1 layers"),
    (dict(heads=[[{"kind": "blocky"}]]), "unknown mask kind"),
])
def test_plan_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sv.SparsityPlan(**kwargs)


def test_load_rejects_other_files(tmp_path):
    (tmp_path / "x.json").write_text('{"heads": [[{"kind": "dense"}]]}')
    with pytest.raises(ValueError, match="not a sparse_vdit plan"):
        sv.SparsityPlan.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sv.SparsityPlan.load(tmp_path / "y.json")


def test_plan_layout_options_round_trip(tmp_path):
    """tile / block / order survive save and load; old plans (no block, no order) keep the defaults."""
    import json

    plan = sv.SparsityPlan.uniform((2, 3), "sta", tile=(6, 8, 8), block=64, order="hwf")
    again = sv.SparsityPlan.load(plan.save(tmp_path / "p.json"))
    assert again.layout_options() == {"tile": (6, 8, 8), "block": 64, "order": "hwf"}
    assert "block 64" in again.summary() and "hwf" in again.summary()
    d = json.loads((tmp_path / "p.json").read_text())
    del d["block"], d["order"]
    d["tile"] = [1, 4, 4]
    (tmp_path / "old.json").write_text(json.dumps(d))
    assert sv.SparsityPlan.load(tmp_path / "old.json").layout_options() == {"tile": (1, 4, 4), "block": None,
                                                                           "order": "fhw"}
    with pytest.raises(ValueError, match="plan order: order must be one of"):
        sv.SparsityPlan.uniform((2, 3), "sta", tile=(6, 8, 8), block=64, order="whf")
    with pytest.raises(ValueError, match="plan tile: .*give a kernel block size"):
        sv.SparsityPlan.uniform((2, 3), "sta", tile=(6, 8, 8))
