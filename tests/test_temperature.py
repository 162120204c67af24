"""Per-head softmax temperature in plans (issue 20, part 2): a spec's ``temperature`` divides its
heads' logits (folded into the scale), leaves the mask as it is, and round-trips through plan files;
checked against float64 references per head."""
import json

import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.integration.processor import grouped_attention, text_queries

TILE = (1, 4, 4)
SPARSE = {"kind": "sliding_tile", "window": [1, 3, 3]}


def _specs():
    return [dict(SPARSE, temperature=0.5), dict(SPARSE), {"kind": "dense", "temperature": 2.0}, {"kind": "dense"}]


@pytest.mark.parametrize("text", [0, 8])
@pytest.mark.parametrize("backend", ["torch", "torch_masked", "triton"])
def test_heads_with_a_temperature_match_a_float64_reference_with_scaled_logits(backend, text):
    layout = sv.VideoLayout(2, 8, 8, tile=TILE, text_len=text, text_position="after")
    specs = _specs()
    proc = sv.SparseAttnProcessor(sv.SparsityPlan(heads=[specs], tile=TILE), backend=backend)
    groups = proc.head_groups(0, layout, "cpu")
    if backend == "triton":  # one launch for the layer: a per-head scale factor (1 / temperature)
        assert len(groups) == 1 and groups[0].head_factor.tolist() == [2.0, 1.0, 0.5, 1.0]
    else:  # dense heads take SDPA there: a group per spec
        assert sorted(g.temperature for g in groups) == [0.5, 1.0, 1.0, 2.0]
        # the two sliding-tile groups share one mask: the temperature changes no block
        sparse_masks = {id(g.mask) for g in groups if g.mask is not None}
        assert len(sparse_masks) == 1
    order = layout.token_order("cpu")
    N, D = layout.seq_len, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, N, len(specs), D, generator=g) for _ in range(3))
    out = grouped_attention(q, k, v, groups, order, backend=backend, text=text_queries(layout))
    mask = sv.masks.build(SPARSE, layout, heads=1)
    q64, k64, v64 = (x.double().transpose(1, 2) for x in (q, k, v))
    for h, spec in enumerate(specs):
        scale = D ** -0.5 / spec.get("temperature", 1.0)
        if spec["kind"] == "dense":
            ref = torch.softmax(q64[:, h] @ k64[:, h].transpose(-1, -2) * scale, -1) @ v64[:, h]
        else:
            ref = sv.ops.reference_attention(q64[:, h:h + 1], k64[:, h:h + 1], v64[:, h:h + 1], mask, scale=scale,
                                             token_order=order)[0][:, 0]
        if text:  # the text queries attend every key at temperature 1
            t0 = layout.text_offset
            ref[:, t0:t0 + text] = torch.softmax(q64[:, h, t0:t0 + text] @ k64[:, h].transpose(-1, -2) * D ** -0.5,
                                                 -1) @ v64[:, h]
        torch.testing.assert_close(out[:, :, h].double(), ref, rtol=1e-4, atol=1e-4, msg=f"head {h} {spec}")
    plain = grouped_attention(q, k, v, sv.SparseAttnProcessor(sv.SparsityPlan(
        heads=[[sv.masks.without_temperature(s) for s in specs]], tile=TILE), backend=backend).head_groups(
        0, layout, "cpu"), order, backend=backend, text=text_queries(layout))
    assert float((plain[:, :, 0] - out[:, :, 0]).abs().max()) > 1e-3  # the temperature really acts
    torch.testing.assert_close(plain[:, :, 1], out[:, :, 1], rtol=0, atol=0)  # heads without one are untouched


def test_temperature_round_trips_through_a_plan_file_and_is_named(tmp_path):
    plan = sv.SparsityPlan(heads=[_specs()], tile=TILE)
    path = tmp_path / "plan.json"
    plan.save(path)
    again = sv.SparsityPlan.load(path)
    assert again.layer_specs(0)[0]["temperature"] == 0.5 and again.layer_specs(0)[2]["temperature"] == 2.0
    assert "temperature" not in again.layer_specs(0)[1]
    assert sv.masks.spec_name(again.layer_specs(0)[0]) == "sliding_tile(1,3,3)/T0.5"
    assert json.loads(path.read_text())


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), "hot", True])
def test_a_bad_temperature_is_refused_with_what_is_valid(bad):
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        sv.masks.normalize_spec(dict(SPARSE, temperature=bad))
