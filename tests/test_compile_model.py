"""Whole-model ``torch.compile(transformer, fullgraph=True)`` with a plan applied (issue 18): every
family, dense, sparse and mixed plans, the same output as eager, no recompile on a repeated call,
and in a pipeline one recompile per phase (the dense warm-up, then sparse)."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import sparse_vdit as sv
from sparse_vdit.testing import FAMILIES, make, tiny_wan_pipeline

from .helpers import compiled_like_eager

SPARSE = {"kind": "sliding_tile", "window": [1, 1, 1]}


def _plan(model, which):
    if which == "dense":
        return sv.dense_plan(model, tile=(1, 4, 4))
    plan = sv.uniform_plan(model, SPARSE, tile=(1, 4, 4))
    if which == "mixed":
        for row in plan.heads:
            row[0] = {"kind": "dense"}
    return plan


@pytest.mark.parametrize("which", ["dense", "sparse", "mixed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fullgraph_compile_of_the_whole_model_matches_eager(family, which):
    torch._dynamo.reset()
    model, call = make(family)
    with torch.no_grad():
        stock = call(model)
    proc = sv.apply(model, _plan(model, which))
    try:
        eager, first = compiled_like_eager(model, call)
        if which == "dense":
            torch.testing.assert_close(first, stock, rtol=1e-5, atol=1e-5)
        else:
            assert float((first - stock).norm() / stock.norm()) > 1e-3  # really sparse under compile
        assert proc.binding(model).compiled
    finally:
        sv.remove(model)
        torch._dynamo.reset()


def test_compiled_transformer_in_a_pipeline_recompiles_once_per_phase():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    es, neg = torch.randn(1, 16, 64, generator=g), torch.randn(1, 16, 64, generator=g)

    def generate(pipe):
        with torch.no_grad():
            return pipe(prompt_embeds=es, negative_prompt_embeds=neg, height=64, width=64, num_frames=5,
                        num_inference_steps=4, output_type="latent", guidance_scale=5.0,
                        generator=torch.Generator().manual_seed(0)).frames

    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    plan = sv.uniform_plan(pipe.transformer, SPARSE, tile=(1, 4, 4), dense_steps=1)
    proc = sv.apply(pipe, plan)
    try:
        eager = generate(pipe)
        assert proc.binding().stats == {"sparse": 24, "dense": 8}  # step 0 dense, steps 1-3 sparse (x2 for CFG)
        counter = CompileCounter()
        original = pipe.transformer
        pipe.transformer = torch.compile(original, fullgraph=True, backend=counter)
        first = generate(pipe)
        after_one = counter.frame_count
        second = generate(pipe)
        assert counter.frame_count == after_one  # the second generation reuses both phases' graphs
        torch.testing.assert_close(first, eager, rtol=0, atol=0)  # the warm-up step dense, the rest sparse
        torch.testing.assert_close(second, eager, rtol=0, atol=0)
        pipe.transformer = original
    finally:
        sv.remove(pipe)
        torch._dynamo.reset()
    assert counter.frame_count <= 4  # hook and forward, once per phase


def test_a_deep_copy_of_an_applied_model_compiles_with_its_own_processor():
    import copy

    torch._dynamo.reset()
    model, call = make("wan")
    proc = sv.apply(model, _plan(model, "sparse"))
    try:
        with torch.no_grad():
            eager = call(model)
        twin = copy.deepcopy(model)
        with pytest.raises(Exception, match="not bound to it yet"), torch.no_grad():  # bound outside a trace only
            call(torch.compile(twin, fullgraph=True, backend="aot_eager"))
        torch._dynamo.reset()
        with torch.no_grad():
            call(twin)  # its first forward binds the copy's own processor
            out = call(torch.compile(twin, fullgraph=True, backend="aot_eager"))
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        assert not proc._compiled  # the copy's compiled states are the copy's processor's
    finally:
        sv.remove(model)
        torch._dynamo.reset()


@pytest.mark.parametrize("family", FAMILIES)
def test_inductor_compiles_the_whole_model_with_a_sparse_plan_on_the_cpu(family):
    """Inductor (C++ on the CPU) around the block-sparse custom op: one graph, no recompile on a
    repeated call, the sparse op counted where it runs, and eager's output (inductor may reorder the
    float arithmetic around the op, so to rounding, not bit for bit)."""
    from sparse_vdit.testing.counting import count_sparse_forwards

    torch._dynamo.reset()
    model, call = make(family)
    with torch.no_grad():
        stock = call(model)
    sv.apply(model, _plan(model, "sparse"))
    try:
        with torch.no_grad(), count_sparse_forwards() as calls:
            eager = call(model)
            compiled = torch.compile(model, fullgraph=True, backend="inductor")
            with torch._dynamo.config.patch(error_on_recompile=True):
                first = call(compiled)
                before = calls[0]
                second = call(compiled)
        assert calls[0] > before, "the compiled model ran no block-sparse attention"
        torch.testing.assert_close(first, eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(second, first, rtol=0, atol=0)
        assert float((first - stock).norm() / stock.norm()) > 1e-3  # really sparse under inductor
    finally:
        sv.remove(model)
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["torch", "torch_masked", "triton"])
def test_an_order_rewritten_in_place_without_a_version_bump_is_not_read_from_a_cache(backend):
    """What inductor does to an order the graph computes (per-batch key orders under a key mask):
    it hands the op one buffer object for successive intermediates and writes into it from C++,
    which bumps no version. The backends' index tables then must not be cached by that identity:
    only orders marked immutable (``ops.order.freeze``: a layout's order, the eager per-batch key
    orders) are. Found by the inductor test on Mochi (B=2 with different prompt masks)."""
    from sparse_vdit.ops.order import frozen, key_order

    layout = sv.VideoLayout(2, 8, 8, tile=(1, 4, 4))
    mask = sv.masks.build([{"kind": "sliding_tile", "window": [1, 3, 3]}], layout)
    order = layout.token_order("cpu")
    N = layout.seq_len
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, N, 16, generator=g) for _ in range(3))
    valid_a, valid_b = torch.ones(N, dtype=torch.bool), torch.ones(N, dtype=torch.bool)
    valid_a[::3] = False
    valid_b[1::2] = False
    kv = key_order(order, valid_a)  # a computed order: not marked immutable
    assert frozen(order) and not frozen(kv)
    first = sv.ops.block_sparse_attention(q, k, v, mask, token_order=order, kv_token_order=kv, backend=backend)
    version = kv._version
    kv.numpy()[:] = key_order(order, valid_b).numpy()  # new values, same object, same version
    assert kv._version == version
    second = sv.ops.block_sparse_attention(q, k, v, mask, token_order=order, kv_token_order=kv, backend=backend)
    ref, _ = sv.ops.reference_attention(q.double(), k.double(), v.double(), mask, token_order=order,
                                        kv_token_order=kv)
    torch.testing.assert_close(second.double(), ref, rtol=1e-5, atol=1e-5)
    assert float((second - first).abs().max()) > 1e-3  # the key orders really differ


@pytest.mark.parametrize("family", ["hunyuan_video"])  # rotary and text rows (joint attention)
def test_inductor_compiles_the_fused_rotary_path_in_the_packed_key_order(family):
    """Backend ``triton`` (what ``auto`` runs on a GPU): k rotated into the packed key order by the rope
    op, whose order tables a compiled graph builds itself; under inductor, one graph, no recompile,
    eager's output, and really sparse."""
    torch._dynamo.reset()
    model, call = make(family)
    with torch.no_grad():
        stock = call(model, batch=2, grid=(2, 8, 8))
    sv.apply(model, _plan(model, "sparse"), backend="triton")
    try:
        with torch.no_grad():
            eager = call(model, batch=2, grid=(2, 8, 8))
            compiled = torch.compile(model, fullgraph=True, backend="inductor")
            with torch._dynamo.config.patch(error_on_recompile=True):
                first = call(compiled, batch=2, grid=(2, 8, 8))
                second = call(compiled, batch=2, grid=(2, 8, 8))
        torch.testing.assert_close(first, eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(second, first, rtol=0, atol=0)
        assert float((first - stock).norm() / stock.norm()) > 1e-3
    finally:
        sv.remove(model)
        torch._dynamo.reset()
