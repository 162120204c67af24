"""Training through sparse attention: train mode with gradient checkpointing, the LoRA example in
its short form, and the paper's sink-retraining result in small."""
import copy
import pathlib
import runpy

import torch

import sparse_vdit as sv
from sparse_vdit.testing import plant_local_attention, planted_sink_transformer, tiny_wan_transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _grads(model, x, t, e):
    model.zero_grad()
    model(x, t, e).sample.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_train_mode_with_gradient_checkpointing_gives_the_same_gradients():
    m = tiny_wan_transformer(num_layers=2)
    plant_local_attention(m, [0])
    g = torch.Generator().manual_seed(0)
    x, e, t = torch.randn(1, 16, 3, 16, 16, generator=g), torch.randn(1, 8, 64, generator=g), torch.tensor([500.0])
    proc = sv.apply(m, sv.uniform_plan(m, "radial", tile=(1, 4, 4)))
    m.train()
    plain = _grads(m, x, t, e)
    m.enable_gradient_checkpointing()
    checkpointed = _grads(m, x, t, e)
    stats = proc.binding().stats
    sv.remove(m)
    assert stats["sparse"] == 4  # both forwards took the sparse path in both layers
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        assert torch.isfinite(plain[name]).all(), name
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5), name


def test_lora_example_short_form_runs_and_learns():
    main = runpy.run_path(str(ROOT / "examples" / "lora_sparse.py"))["main"]
    losses = main(["--steps", "6", "--lr", "3e-3"])
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


def test_sink_retraining_makes_the_sink_layer_sparsifiable():
    """Layer 1 attends locally plus to a first-frame sink: a sink-free local mask fails there.
    Fine-tuning that block through the sink-free mask (matching the dense model's output) lowers the
    mask's own output error against dense attention: the paper's sink retraining, in small."""
    m, x, e = planted_sink_transformer(num_layers=2, sink_layer=1)
    teacher = copy.deepcopy(m).eval()

    def inputs(i):
        gi = torch.Generator().manual_seed(100 + i)
        return x + 0.05 * torch.randn(x.shape, generator=gi), torch.tensor([float(torch.randint(100, 999, (1,), generator=gi))])

    def mask_error(model):
        def run(mm, i):
            with torch.no_grad():
                xi, ti = inputs(i)
                return mm(xi, ti, e).sample

        plan = sv.calibrate(model, run=run, num_prompts=2, num_inference_steps=1, candidates=["sliding_tile"],
                            tile=(1, 4, 4), sample_steps=(0.0,), progress=False)
        return max(h["worst_error_by_option"]["sliding_tile(3,3,3)"] for h in plan.metrics["per_head"][1])

    before = mask_error(m)
    sink_free = sv.SparsityPlan(heads=[[{"kind": "dense"}] * 4, [{"kind": "sliding_tile"}] * 4], tile=(1, 4, 4),
                                model=sv.dense_plan(m).model)
    block = list(m.blocks[1].attn1.parameters())
    for p in m.parameters():
        p.requires_grad_(False)
    for p in block:
        p.requires_grad_(True)
    opt = torch.optim.Adam(block, lr=1e-3)
    sv.apply(m, sink_free)
    m.train()
    losses = []
    for step in range(30):
        xi, ti = inputs(step % 8)
        with torch.no_grad():
            target = teacher(xi, ti, e).sample
        loss = torch.nn.functional.mse_loss(m(xi, ti, e).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    sv.remove(m)
    m.eval()
    after = mask_error(m)
    assert before > 0.5  # the sink makes the local mask fail ...
    assert after < 0.9 * before, (before, after)  # ... and retraining through it makes it fail less
    assert losses[-1] < losses[0]
