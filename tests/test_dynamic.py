"""The ``dynamic`` family (issue 20, part 1): key blocks selected per call from block-pooled q and k,
beside a static window, text keys and sinks. The attention over the selected blocks is checked
against a float64 reference for the mask the selection produced; the selection against the true
block mass of planted attention; the call against the sync counter."""
import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.integration.processor import grouped_attention, text_queries
from sparse_vdit.masks import DynamicSelection, normalize_spec
from sparse_vdit.ops import reference_attention, select_blocks, selection_flops
from sparse_vdit.testing import FAMILIES, make
from sparse_vdit.testing.counting import DispatchCounter, attention_kernel_stubs

from .helpers import compiled_like_eager

TILE = (1, 4, 4)


def _layout(text=0, where="after"):
    return sv.VideoLayout(2, 8, 8, tile=TILE, text_len=text, text_position=where)  # 8 blocks of 16


def _qkv(layout, B=2, H=3, D=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, layout.seq_len, H, D, generator=g, dtype=dtype) for _ in range(3)]


def _reference(q, k, v, mask, order, scale=None, key_valid=None):
    """float64 attention of [B, N, H, D] tensors over exactly the blocks of ``mask``, per batch element."""
    outs = []
    for b in range(q.shape[0]):
        kv_order = None if key_valid is None else sv.ops.key_order(order, key_valid[b])
        o, _ = reference_attention(*(x[b:b + 1].transpose(1, 2).double() for x in (q, k, v)),
                                   mask.batch_element(b), scale=scale, token_order=order, kv_token_order=kv_order)
        outs.append(o.transpose(1, 2))
    return torch.cat(outs)


def test_spec_defaults_ladder_names_and_refusals():
    s = normalize_spec("dynamic")
    assert s == {"kind": "dynamic", "keep": 4, "mass": None, "window": [1, 1, 1]}
    assert sv.masks.spec_name({"kind": "dynamic", "keep": 8, "mass": 0.9}) == "dynamic(k=8,p=0.9,w=1,1,1)"
    rungs = sv.masks.ladder("dynamic")
    assert [r["keep"] for r in rungs] == sorted(r["keep"] for r in rungs) and all(sv.masks.is_dynamic(r) for r in rungs)
    assert not sv.masks.is_dynamic("sliding_tile")
    for bad, what in (({"keep": 0}, "keep must be an int >= 1"), ({"mass": 1.5}, r"mass must be None .* \(0, 1\]"),
                      ({"window": [2, 1, 1]}, "dynamic window must be 3 odd")):
        with pytest.raises(ValueError, match=what):
            normalize_spec({"kind": "dynamic", **bad})


@pytest.mark.parametrize("text", [0, 5])
@pytest.mark.parametrize("backend", ["torch", "torch_masked", "triton"])
def test_attention_over_the_selected_blocks_matches_a_float64_reference(backend, text):
    layout = _layout(text)
    spec = {"kind": "dynamic", "keep": 2, "window": [1, 1, 1]}
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v = _qkv(layout, dtype=dtype)
    sel = DynamicSelection(spec, layout)
    mask = sel(q, k)
    assert mask.selected and mask.batch == 2 and mask.heads == 3 and mask.kv_indices.shape[-1] == sel.width
    order = layout.token_order("cpu")
    out = sv.ops.sparse_attention(q, k, v, mask, order, backend=backend)
    ref = _reference(q, k, v, mask, order)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    if text:  # the text query rows are left empty by the selection: the processor runs them dense
        nv = layout.num_video_tokens
        a = layout.text_offset
        assert float(out[:, a:a + text].abs().max()) == 0
        torch.testing.assert_close(out[:, :a].double(), ref[:, :a], rtol=tol, atol=tol)
        torch.testing.assert_close(out[:, a + text:].double(), ref[:, a + text:], rtol=tol, atol=tol)
        assert nv == layout.seq_len - text
    else:
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    # The mask differs between batch elements and heads: it is the call's own.
    dense = mask.to_dense()
    assert not torch.equal(dense[0], dense[1]) or not torch.equal(dense[0, 0], dense[0, 1])


def test_selection_finds_the_planted_key_blocks_and_keeps_the_static_part():
    """Each query block's attention is planted on one far key block: the top-1 selection is that
    block (the true block mass, computed densely in float64, agrees), and the window stays."""
    layout = _layout()
    M, b, D = layout.num_blocks, layout.block_size, 16
    order = layout.token_order("cpu").long()
    target = torch.tensor([(i + 4) % M for i in range(M)])  # never inside the own-tile window
    dirs = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))[0][:M]  # orthonormal direction per block
    q = torch.zeros(1, layout.seq_len, 1, D, dtype=torch.float64)
    k = torch.zeros_like(q)
    for blk in range(M):
        toks = order[blk * b:(blk + 1) * b]
        q[0, toks, 0] = 6.0 * dirs[blk] + 0.1 * torch.randn(b, D, dtype=torch.float64)
        k[0, toks, 0] = 6.0 * dirs[int((target == blk).nonzero())] + 0.1 * torch.randn(b, D, dtype=torch.float64)
    mask = DynamicSelection({"kind": "dynamic", "keep": 1}, layout)(q, k)
    blocks = mask.to_dense()[0, 0]
    static = sv.masks.block_matrix({"kind": "sliding_tile", "window": [1, 1, 1]}, layout)
    assert torch.equal(blocks & static, static)
    assert torch.equal(blocks & ~static, torch.nn.functional.one_hot(target, M).bool())
    mass = sv.ops.attention_mass(q, k, b, layout.token_order("cpu"))[0, 0]  # the true block mass
    assert torch.equal(mass.masked_fill(static, -1).argmax(-1), target)


def test_keep_everything_is_dense_and_mass_stops_early():
    layout = _layout()
    q, k, v = _qkv(layout)
    order = layout.token_order("cpu")
    full = DynamicSelection({"kind": "dynamic", "keep": layout.num_blocks}, layout)(q, k)
    assert bool(full.to_dense().all())
    dense = sv.ops.dense_attention(q, k, v)
    torch.testing.assert_close(sv.ops.sparse_attention(q, k, v, full, order, backend="torch"), dense,
                               rtol=1e-10, atol=1e-10)
    static = sv.masks.block_matrix({"kind": "sliding_tile", "window": [1, 1, 1]}, layout)
    tiny = DynamicSelection({"kind": "dynamic", "keep": 4, "mass": 1e-6}, layout)(q, k)
    assert torch.equal(tiny.to_dense(), static.expand(2, 3, -1, -1))  # the window alone already covers 1e-6
    some = DynamicSelection({"kind": "dynamic", "keep": 4, "mass": 0.5}, layout)(q, k).kv_counts
    most = DynamicSelection({"kind": "dynamic", "keep": 4}, layout)(q, k).kv_counts
    assert bool((some <= most).all()) and int(some.sum()) < int(most.sum())


def test_keys_ruled_out_are_never_selected_and_each_batch_element_gets_its_own_mask():
    layout = _layout(text=6)
    q, k, v = _qkv(layout)
    key_valid = torch.ones(2, layout.seq_len, dtype=torch.bool)
    a = layout.text_offset
    key_valid[1, a + 2:a + 6] = False  # padded text of the second prompt
    key_valid[0, :layout.num_video_tokens // 2] = False  # and, to test it, half the video keys of the first
    sel = DynamicSelection({"kind": "dynamic", "keep": 3}, layout)
    mask = sel(q, k, key_valid=key_valid)
    order = layout.token_order("cpu").long()
    tok_valid = (order >= 0) & key_valid[:, order.clamp(min=0)]
    block_valid = tok_valid.view(2, -1, layout.block_size).any(-1)  # [B, M]
    added = mask.to_dense() & ~sel.static
    assert not bool((added & ~block_valid[:, None, None, :]).any())
    out = sv.ops.sparse_attention(q, k, v, mask, layout.token_order("cpu"), key_valid=key_valid, backend="torch")
    ref = _reference(q, k, v, mask, layout.token_order("cpu"), key_valid=key_valid)
    video = torch.ones(layout.seq_len, dtype=torch.bool)
    video[a:a + 6] = False
    torch.testing.assert_close(out[:, video], ref[:, video], rtol=1e-10, atol=1e-10)


def test_a_dynamic_layer_call_makes_no_host_sync_and_selection_is_cheap():
    layout = sv.VideoLayout(2, 8, 16, tile=(1, 8, 8), text_len=6)
    spec = {"kind": "dynamic", "keep": 2, "mass": 0.9}
    plan = sv.SparsityPlan(heads=[[spec, spec, "dense", {"kind": "sliding_tile", "window": [1, 1, 1]}]], tile=(1, 8, 8))
    groups = sv.SparseAttnProcessor(plan, backend="triton").head_groups(0, layout, "cpu")
    assert sum(g.select is not None for g in groups) == 1
    q, k, v = (torch.randn(2, layout.seq_len, 4, 32) for _ in range(3))
    key_valid = torch.ones(2, layout.seq_len, dtype=torch.bool)
    key_valid[:, -2:] = False
    args = (q, k, v, groups, layout.token_order("cpu"), key_valid, "triton", text_queries(layout))
    with torch.no_grad(), DispatchCounter(attention_kernel_stubs()):
        grouped_attention(*args)  # the order tables of the first call
    with torch.no_grad(), DispatchCounter(attention_kernel_stubs()) as c:
        grouped_attention(*args)
    assert c.summary()["syncs"] == 0, c.syncs
    # Counted against dense attention at a real size: Wan2.1-1.3B's 32,760 tokens in blocks of 64.
    select, dense = selection_flops(32760, 64, 128)
    assert select / dense <= 0.05 and select / dense == pytest.approx(1 / (2 * 64 * 64) + 1 / (2 * 32760), rel=0.02)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dynamic_plan_in_every_family_keeping_every_block_is_the_stock_model(family, tmp_path):
    """Through the processor, the adapters, text and key masks: a dynamic plan whose selection may take
    every block gives the stock output; one that keeps 1 block changes it; the plan round-trips."""
    model, call = make(family)
    with torch.no_grad():
        stock = call(model)
    try:
        for keep, same in ((64, True), (1, False)):
            plan = sv.uniform_plan(model, {"kind": "dynamic", "keep": keep}, tile=(1, 4, 4))
            plan.save(tmp_path / "plan.json")
            sv.apply(model, sv.SparsityPlan.load(tmp_path / "plan.json"))
            with torch.no_grad():
                out = call(model)
            sv.remove(model)
            err = float((out - stock).norm() / stock.norm())
            assert (err < 1e-5) if same else (err > 1e-3), (keep, err)
    finally:
        sv.remove(model)


def test_a_dynamic_plan_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    model, call = make("wan")
    sv.apply(model, sv.uniform_plan(model, {"kind": "dynamic", "keep": 1, "mass": 0.8}, tile=(1, 4, 4)))
    try:
        compiled_like_eager(model, call)
    finally:
        sv.remove(model)
        torch._dynamo.reset()


def test_the_most_a_dynamic_spec_visits_bounds_what_it_selects():
    layout = _layout(text=5)
    q, k, _ = _qkv(layout)
    for spec in ({"kind": "dynamic", "keep": 2}, {"kind": "dynamic", "keep": 3, "mass": 0.5}):
        bound = sv.masks.dynamic_max_density(spec, layout)
        made = DynamicSelection(spec, layout, text_rows=True)(q, k).head_density()
        assert bool((made <= bound + 1e-12).all())
        if spec.get("mass") is None:  # keep fills every row: the bound is reached
            assert float(made.min()) == pytest.approx(bound)
        assert sv.masks.head_densities([spec], layout)[0] == pytest.approx(bound)
