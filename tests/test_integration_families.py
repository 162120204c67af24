"""Every supported family on a tiny random model (CPU): all-dense and covering plans reproduce the
stock output, a real sparse plan changes it, resolutions can change, remove() restores stock."""
import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.testing import FAMILIES, make

COVER = {"kind": "sliding_tile", "window": [99, 99, 99]}
SPARSE = {"kind": "sliding_tile", "window": [1, 1, 1]}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model, call = make(request.param)
    return request.param, model, call


def _run(call, model, **kw):
    with torch.no_grad():
        return call(model, **kw)


def test_dense_plan_is_stock(family):
    name, model, call = family
    ref = _run(call, model)
    if name != "mochi":  # MochiAttention has no set_processor: only sv.apply reaches it
        model.set_attn_processor(sv.SparseAttnProcessor(sv.dense_plan(model)))
    else:
        sv.apply(model, sv.dense_plan(model))
    out = _run(call, model)
    sv.remove(model)
    assert _rel(out, ref) <= 1e-5


def test_covering_mask_is_stock_and_real_mask_differs(family):
    name, model, call = family
    ref = _run(call, model)
    proc = sv.apply(model, sv.uniform_plan(model, COVER, tile=(1, 4, 4)))
    out = _run(call, model)
    stats = proc.binding().stats
    sv.remove(model)
    layers, _ = sv.integration.attention_shape(model)
    assert stats["sparse"] == layers, stats  # every sparse-eligible layer took the sparse path
    assert _rel(out, ref) <= 1e-5
    sv.apply(model, sv.uniform_plan(model, SPARSE, tile=(1, 4, 4)))
    out = _run(call, model)
    sv.remove(model)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) > 1e-3


def test_two_resolutions_then_remove(family):
    name, model, call = family
    grids = [(2, 8, 8), (3, 6, 10)]  # the second does not divide by the 4x4 tile
    refs = [_run(call, model, grid=g) for g in grids]
    proc = sv.apply(model, sv.uniform_plan(model, COVER, tile=(1, 4, 4)))
    outs = [_run(call, model, grid=g) for g in grids]
    seen = {(lay.frames, lay.height, lay.width) for lay in proc.cached_layouts()}
    sv.remove(model)
    assert seen == set(grids)
    for o, r in zip(outs, refs):
        assert _rel(o, r) <= 1e-5
    for g, r in zip(grids, refs):
        assert torch.equal(_run(call, model, grid=g), r)


def test_key_mask_boolean_or_additive():
    from sparse_vdit.integration import key_valid_from_mask

    keep = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.equal(key_valid_from_mask(keep[:, None, None, :]), keep)
    additive = torch.zeros(2, 3).masked_fill(~keep, torch.finfo(torch.float32).min)
    assert torch.equal(key_valid_from_mask(additive[:, None, None, :]), keep)
    assert torch.equal(key_valid_from_mask(additive.masked_fill(~keep, float("-inf"))), keep)


def test_plan_for_another_family_is_refused():
    wan, _ = make("wan")
    cog, _ = make("cogvideox")
    plan = sv.uniform_plan(wan, "radial")
    with pytest.raises(ValueError, match="model class: plan WanTransformer3DModel, model CogVideoXTransformer3DModel"):
        sv.apply(cog, plan)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", FAMILIES)
def test_gpu_bf16_covering_mask_close_to_stock(name):
    """On the GPU the Triton kernel runs in bf16: a covering mask stays within bf16 noise of stock."""
    model, call = make(name)
    model = model.to("cuda", torch.bfloat16)

    def run():
        with torch.no_grad(), torch.device("cuda"):
            return call(model).float()

    torch.manual_seed(0)
    ref = run()
    sv.apply(model, sv.uniform_plan(model, COVER, tile=(1, 4, 4)))
    torch.manual_seed(0)
    out = run()
    sv.remove(model)
    assert torch.isfinite(out).all() and _rel(out, ref) < 3e-2
