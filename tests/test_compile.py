"""torch.compile over transformer blocks with the sparse processor: no graph break, and no
recompilation across layers and steps beyond one graph for dense and one for sparse attention."""
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import sparse_vdit as sv
from sparse_vdit.testing import tiny_wan_transformer

from .conftest import requires_cuda


def _compiled_run(device, dtype, backend, attention_backend=None, cold=False):
    """Eager and block-compiled outputs over four steps; ``cold``: compile before any eager forward
    (so nothing a sparse call derives from its masks was computed outside the compiled graph)."""
    torch._dynamo.reset()
    m = tiny_wan_transformer(num_layers=3).to(device, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 16, 16, generator=g).to(device, dtype)
    e = torch.randn(1, 10, 64, generator=g).to(device, dtype)
    plan = sv.uniform_plan(m, "radial", tile=(1, 4, 4), dense_layers=[-1], dense_steps=1)
    steps = (900, 800, 700, 600)
    with torch.no_grad():
        if not cold:
            sv.apply(m, plan, backend=attention_backend)
            eager = [m(x, torch.tensor([t], device=device), e).sample for t in steps]
            sv.remove(m)
        sv.apply(m, plan, backend=attention_backend)
        counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
        blocks = list(m.blocks)
        for i, block in enumerate(blocks):
            m.blocks[i] = torch.compile(block, fullgraph=True, backend=counter)  # fullgraph: a break raises
        compiled = [m(x, torch.tensor([t], device=device), e).sample for t in steps]
        if cold:
            sv.remove(m)
            for i, block in enumerate(blocks):
                m.blocks[i] = block
            sv.apply(m, plan, backend=attention_backend)
            eager = [m(x, torch.tensor([t], device=device), e).sample for t in steps]
    sv.remove(m)
    return eager, compiled, counter.frame_count


def test_cold_compile_with_the_triton_backend_does_not_recompile():
    """The tiled kernel's query-tile lists are derived when the processor builds a mask, not inside
    the first compiled call (where deriving them broke the graph, or recompiled it once its cache changed)."""
    eager, compiled, frames = _compiled_run("cpu", torch.float32, "aot_eager", attention_backend="triton", cold=True)
    assert frames == 2
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, atol=1e-4)


def test_compile_blocks_cpu():
    eager, compiled, frames = _compiled_run("cpu", torch.float32, "aot_eager")
    # step 0 is dense (warm-up) and layer 2 is always dense: one graph; sparse layers: one more graph
    assert frames == 2
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(eager[0], eager[1])  # the steps really differ


@requires_cuda
@pytest.mark.gpu
def test_compile_blocks_gpu_inductor():
    eager, compiled, frames = _compiled_run("cuda", torch.bfloat16, "inductor")
    assert frames == 2
    for a, b in zip(eager, compiled):
        assert torch.allclose(a.float(), b.float(), atol=5e-2, rtol=5e-2)


def test_calibrate_apply_remove_apply_on_30_compiled_blocks_stays_within_the_recompile_limit():
    """Calibration runs the user's compiled blocks eagerly (it measures through Python), so calibrate
    -> apply -> remove -> apply -> another plan costs one graph per attention kind (dense, sparse,
    stock) however many blocks the model has, not one per block or per strategy."""
    torch._dynamo.reset()
    m = tiny_wan_transformer(num_layers=30)  # Wan2.1-1.3B's block count, tiny widths
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 16, 16, generator=g)
    e = torch.randn(1, 10, 64, generator=g)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    m.compile_repeated_blocks(fullgraph=True, backend=counter)
    steps = (900, 600)

    def run(target, i):
        return [target(x, torch.tensor([t]), e).sample for t in steps]

    with torch.no_grad():
        plan = sv.calibrate(m, run=run, num_prompts=1, num_inference_steps=len(steps), tile=(1, 4, 4),
                            candidates=["sliding_tile"], error_budget=0.5, sample_steps=(0.9,), progress=False)
        assert counter.frame_count == 0  # measured eagerly
        assert any(s["kind"] != "dense" for layer in range(plan.num_layers) for s in plan.layer_specs(layer))
        plan.dense_steps = 1  # the first step dense: both graphs run
        sv.apply(m, plan)
        first = run(m, 0)
        sv.remove(m)
        run(m, 0)
        sv.apply(m, plan)
        again = run(m, 0)
        sv.apply(m, sv.uniform_plan(m, "radial", tile=(1, 4, 4)))
        run(m, 0)
    sv.remove(m)
    assert counter.frame_count <= 3, f"{counter.frame_count} graphs for 30 blocks"
    for a, b in zip(first, again):
        assert torch.equal(a, b)
