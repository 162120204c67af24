"""sparse_vdit combined with what diffusers users do to a model: copies and save/load (issue 18).

A deep copy of an applied transformer runs its own plan, with its own processor and state; the
original is untouched by the copy's forwards and by taking sparse attention off the copy. A model
saved and loaded again is the stock model (a plan is not part of the weights): re-apply it.
"""
import contextlib
import copy

import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.integration.processor import _PROC, _pre_hook
from sparse_vdit.testing import FAMILIES, make

SPARSE = {"kind": "sliding_tile", "window": [1, 1, 1]}


def _run(call, model, **kw):
    with torch.no_grad():
        return call(model, **kw)


def _procs(model):
    return {id(m.processor): m.processor for _, m in sv.integration.adapter_for(model).processor_modules(model)}


def _hooks(model):
    return [h for h in model._forward_pre_hooks.values() if h is _pre_hook]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model, call = make(request.param)
    return request.param, model, call


@pytest.mark.parametrize("when", ["before the first forward", "after a forward"])
def test_deepcopy_runs_its_own_plan_independently(family, when):
    name, model, call = family
    stock = _run(call, model)
    layers, _ = sv.integration.attention_shape(model)
    plan = sv.uniform_plan(model, SPARSE, tile=(1, 4, 4))
    proc = sv.apply(model, plan)
    try:
        sparse = _run(call, model)
        assert ((sparse - stock).norm() / stock.norm()) > 1e-3  # the plan really changes the output
        if when == "before the first forward":
            sv.remove(model)
            proc = sv.apply(model, plan)
        before = dict(proc.binding(model).stats)
        layout = proc.binding(model).layout
        twin = copy.deepcopy(model)
        (twin_proc,) = _procs(twin).values()
        assert twin_proc is not proc and isinstance(twin_proc, sv.SparseAttnProcessor)
        assert len(_hooks(twin)) == 1 and len(_hooks(model)) == 1

        out = _run(call, twin)
        torch.testing.assert_close(out, sparse, rtol=0, atol=1e-6)  # sparse, as the original (not dense)
        assert twin_proc.binding(twin).stats["sparse"] == layers
        assert proc.binding(model).stats == before  # the copy's forward moved nothing of the original
        _run(call, twin, grid=(3, 6, 10))
        assert proc.binding(model).layout == layout
        with pytest.raises(ValueError, match="not bound"):
            proc.binding(twin)

        sv.remove(twin)  # off the copy only
        assert not _hooks(twin) and _PROC not in twin.__dict__
        torch.testing.assert_close(_run(call, twin), stock, rtol=0, atol=1e-6)
        torch.testing.assert_close(_run(call, model), sparse, rtol=0, atol=1e-6)
        assert proc.binding(model).stats["sparse"] == before["sparse"] + layers
    finally:
        sv.remove(model)
    assert not _hooks(model) and _PROC not in model.__dict__


def test_save_and_load_gives_the_stock_model(tmp_path):
    model, call = make("wan")
    stock = _run(call, model)
    plan = sv.uniform_plan(model, SPARSE, tile=(1, 4, 4))
    sv.apply(model, plan)
    try:
        sparse = _run(call, model)
        model.save_pretrained(tmp_path / "m")
        loaded = type(model).from_pretrained(tmp_path / "m")
        assert not any(isinstance(p, sv.SparseAttnProcessor) for p in _procs(loaded).values())
        assert not _hooks(loaded) and _PROC not in loaded.__dict__
        torch.testing.assert_close(_run(call, loaded), stock, rtol=0, atol=1e-6)
        sv.apply(loaded, plan)  # re-applied, it runs the plan, on its own
        torch.testing.assert_close(_run(call, loaded), sparse, rtol=0, atol=1e-6)
        torch.testing.assert_close(_run(call, model), sparse, rtol=0, atol=1e-6)
    finally:
        sv.remove(model)


def test_a_processor_replaced_by_hand_keeps_one_hook():
    """set_attn_processor with a new processor over an applied one: one hook, the new one serves."""
    model, call = make("wan")
    first = sv.apply(model, sv.dense_plan(model, tile=(1, 4, 4)))
    second = sv.SparseAttnProcessor(sv.uniform_plan(model, SPARSE, tile=(1, 4, 4)))
    model.set_attn_processor(second)
    try:
        _run(call, model)  # binds the new one (this forward dense), the next follows its plan
        _run(call, model)
        assert len(_hooks(model)) == 1
        assert second.binding(model).stats["sparse"] > 0
        assert first.binding(model).stats["sparse"] == 0
    finally:
        sv.remove(model)


# ---------------------------------------------------------------------------- the user's attention backend
@contextlib.contextmanager
def backend_calls(*names):
    """Record (backend, query heads, query tokens) of every call diffusers' dispatch makes to ``names``."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    calls, saved = [], {}
    for name in names:
        key = AttentionBackendName(name)
        fn = saved[key] = _AttentionBackendRegistry._backends[key]

        def spy(*args, _name=name, _fn=fn, **kwargs):
            q = kwargs["query"]
            calls.append((_name, q.shape[2], q.shape[1]))
            return _fn(*args, **kwargs)
        _AttentionBackendRegistry._backends[key] = spy
    try:
        yield calls
    finally:
        _AttentionBackendRegistry._backends.update(saved)


def _mixed_plan(model, dense_steps=0):
    """Head 0 of every layer dense, the others sparse."""
    plan = sv.uniform_plan(model, SPARSE, tile=(1, 4, 4), dense_steps=dense_steps)
    for row in plan.heads:
        row[0] = {"kind": "dense"}
    return plan


@pytest.fixture
def reset_backend():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.mark.parametrize("name", ["wan", "hunyuan_video", "ltx_video"])
def test_user_backend_reaches_dense_heads_text_rows_and_warm_up(name, reset_backend):
    model, call = make(name)
    layers, heads = sv.integration.attention_shape(model)
    ref = _run(call, model)
    proc = sv.apply(model, _mixed_plan(model))
    try:
        plain = _run(call, model)
        model.set_attention_backend("_native_math")  # after apply
        assert proc._attention_backend.value == "_native_math"
        dispatching = [s for s in proc.binding(model).slots if hasattr(s.stock, "_attention_backend")]
        assert len(dispatching) >= layers
        assert all(s.stock._attention_backend.value == "_native_math" for s in dispatching)
        with backend_calls("_native_math", "native") as calls:
            out = _run(call, model)
        dense_heads = [c for c in calls if c[:2] == ("_native_math", 1)]
        assert len(dense_heads) >= layers, calls  # head 0 of every sparse layer, through the user's backend
        assert not [c for c in calls if c[0] == "native"], calls
        if proc.binding(model).layout.text_len and name == "hunyuan_video":  # joint attention: text query rows
            assert any(c[:2] == ("_native_math", heads) for c in calls), calls
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)

        model.reset_attention_backend()
        assert proc._attention_backend is None
        assert all(s.stock._attention_backend is None for s in dispatching)
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
        active = _AttentionBackendRegistry._active_backend.value  # set_attention_backend made it the active one
        _AttentionBackendRegistry.set_active_backend("native")
        with backend_calls("_native_math", "native") as calls:
            _run(call, model)
        assert active == "_native_math"
        assert calls and {c[0] for c in calls} == {"native"}, calls  # diffusers' active backend, as stock
    finally:
        sv.remove(model)
    torch.testing.assert_close(_run(call, model), ref, rtol=0, atol=0)

    model.set_attention_backend("_native_math")  # before apply: the stock processors carry it
    proc = sv.apply(model, _mixed_plan(model, dense_steps=1))
    try:
        assert proc._attention_backend.value == "_native_math"
        with backend_calls("_native_math", "native") as calls:
            _run(call, model)  # step 0: a warm-up step, every layer dense, through the stock processors
        assert len([c for c in calls if c[:2] == ("_native_math", heads)]) >= layers, calls
        assert not [c for c in calls if c[0] == "native"]
    finally:
        sv.remove(model)
        model.reset_attention_backend()


def test_two_models_keep_their_own_backends(reset_backend):
    """Two transformers in one process (Wan 2.2's two, or two pipelines), each with its backend:
    the second set_attention_backend changes diffusers' active backend, not the first model's."""
    a, call = make("wan")
    b, _ = make("wan")
    sv.apply(a, _mixed_plan(a, dense_steps=1))
    sv.apply(b, _mixed_plan(b, dense_steps=1))
    try:
        a.set_attention_backend("_native_math")
        b.set_attention_backend("native")
        for model, own in ((a, "_native_math"), (b, "native")):
            for _ in range(2):  # a warm-up (dense) step, then a sparse one with dense heads
                with backend_calls("_native_math", "native") as calls:
                    _run(call, model)
                assert calls and {c[0] for c in calls} == {own}, (own, calls)
    finally:
        sv.remove(a)
        sv.remove(b)
        a.reset_attention_backend()
        b.reset_attention_backend()
