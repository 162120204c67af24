"""Train a LoRA on a tiny Wan transformer through sparse attention (CPU, no download).

The transformer is the demo's tiny Wan (random weights, local attention planted in its first layers);
a sparse plan (sliding-tile windows, the last layer dense) is applied with ``sv.apply`` and the
transformer is trained in train mode with gradient checkpointing: a peft LoRA on the attention
projections learns the flow-matching velocity of a small fixed set of synthetic latent videos
(smooth random fields), so the loss falls as the adapter fits them. Gradients flow through the
block-sparse attention (its exact backward).

    python examples/lora_sparse.py                 # the long form: 300 steps, prints the loss curve
    python examples/lora_sparse.py --steps 5       # the short form CI runs

Afterwards ``sv.calibrate`` can be run again on the trained model to see whether heads got sparser.
"""
from __future__ import annotations

import argparse
import time

import torch


def synthetic_latents(n: int, frames: int, size: int, seed: int) -> torch.Tensor:
    """[n, 16, frames, size, size] smooth random fields: low-frequency noise upsampled, so neighbouring
    tokens are alike, as in real latent video."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 16, frames, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(frames, size, size), mode="trilinear", align_corners=False)


def main(argv=None) -> list[float]:
    import sparse_vdit as sv
    from peft import LoraConfig, get_peft_model
    from sparse_vdit.testing import tiny_wan_transformer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")

    torch.manual_seed(args.seed)
    model = tiny_wan_transformer(num_layers=4, seed=args.seed)
    plan = sv.uniform_plan(model, {"kind": "sliding_tile", "window": [3, 3, 3]}, dense_layers=[-1], tile=(1, 4, 4))
    model.enable_gradient_checkpointing()
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["to_q", "to_k", "to_v"]))
    transformer = model.base_model.model
    sv.apply(transformer, plan)
    model.train()
    data = synthetic_latents(4, frames=4, size=32, seed=args.seed + 1)  # 4 x 16 x 16 tokens per frame
    text = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(args.seed + 2))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr)
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    print(f"LoRA rank {args.rank}: {trainable} trainable parameters; plan: {plan.summary().splitlines()[2].strip()}")
    g = torch.Generator().manual_seed(args.seed + 3)
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        i = torch.randint(0, data.shape[0], (2,), generator=g)
        x0, e = data[i], text[i]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.rand(2, generator=g)
        xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise  # flow matching
        pred = transformer(xt, t * 1000, e).sample
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            recent = sum(losses[-10:]) / len(losses[-10:])
            print(f"step {step:4d}  loss {loss.item():.4f}  (mean of last 10: {recent:.4f})")
    sv.remove(transformer)
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s; first-10 mean {sum(losses[:10]) / len(losses[:10]):.4f}, "
          f"last-10 mean {sum(losses[-10:]) / len(losses[-10:]):.4f}")
    return losses


if __name__ == "__main__":
    main()
