"""Train the tiny Wan of :mod:`sparse_vdit.testing.shapes` on its synthetic world (seeded, CPU).

    python -m sparse_vdit.testing.train_shapes                  # the shipped weights: about 75 min on 2 quiet cores
    python -m sparse_vdit.testing.train_shapes --steps 200 --out /tmp/shapes   # a quick look

Rectified flow as Wan trains it: x_t = (1 - s) x_0 + s e, the transformer predicts e - x_0 at
timestep 1000 s, with s drawn uniformly then shifted as the pipeline's scheduler shifts it. Prompts
are encoded once by the frozen tiny text encoder, padded to ``shapes.MAX_TEXT_TOKENS`` (generate with
the same: ``shapes.GENERATE_DEFAULTS``); 10% of samples get the empty prompt, so classifier-free
guidance works. Prints the loss curve and writes it (``loss.json``) beside the weights.

``--frame-noise P`` (an experiment, off by default: the shipped weights were trained without it)
gives a share P of the samples one noise level per key frame instead of one per video, as
per-token timesteps (Wan 2.2's ``[B, seq_len]`` form): beside a cleaner frame, only the direction
word says where the object is in a noisier one. Tried at P = 0.5: by step 1,000 of 2,000 the
direction word still moved the denoiser's estimate by under 0.2 pixel, even with the first key
frame given clean (``python -m benchmarks.motion_probe --first-frame-sigma 0``), and the run was stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from . import shapes


def encode_prompts(prompts, max_sequence_length: int = shapes.MAX_TEXT_TOKENS) -> torch.Tensor:
    """``[len(prompts), max_sequence_length, text_dim]`` as ``WanPipeline.encode_prompt`` makes them."""
    from diffusers import WanPipeline

    tokenizer, encoder = shapes.shapes_text_encoder()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=None, vae=None, scheduler=None)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                       max_sequence_length=max_sequence_length, device=torch.device("cpu"))
    return embeds


def shifted_sigma(u: torch.Tensor, shift: float = shapes.SHIFT) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def noise_levels(batch_size: int, generator: torch.Generator, frame_noise: float = 0.0) -> torch.Tensor:
    """sigma per sample, ``[batch_size]`` (one shifted uniform draw per video; the shipped run), or with
    ``frame_noise`` > 0 per sample and key frame, ``[batch_size, FRAMES]``: for that share of the
    samples one draw per key frame."""
    if not frame_noise:
        return shifted_sigma(torch.rand(batch_size, generator=generator))
    per_video = shifted_sigma(torch.rand(batch_size, 1, generator=generator)).expand(batch_size, shapes.FRAMES)
    per_frame = shifted_sigma(torch.rand(batch_size, shapes.FRAMES, generator=generator))
    pick = torch.rand(batch_size, 1, generator=generator) < frame_noise
    return torch.where(pick, per_frame, per_video)


def train(steps: int = 2000, batch_size: int = 4, lr: float = 1e-3, seed: int = 0, out: Path | None = None,
          log_every: int = 50, threads: int | None = None, frame_noise: float = 0.0) -> list[tuple[int, float]]:
    from diffusers import WanTransformer3DModel

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**shapes.LEARNED_WAN_CONFIG).train()
    scenes = shapes.TRAIN_SCENES
    embeds = encode_prompts([sc.prompt for sc in scenes] + [""])
    empty = embeds[-1]
    embeds = embeds[:-1]
    params = sum(p.numel() for p in model.parameters())
    print(f"train_shapes: {params / 1e6:.2f} M parameters, {len(scenes)} training scenes "
          f"({len(shapes.HELD_OUT)} held out), {steps} steps of {batch_size}, seed {seed}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = min(200, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / max(warmup, 1)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))
    g = torch.Generator().manual_seed(seed)
    curve, window, t0 = [], [], time.time()
    for step in range(1, steps + 1):
        pick = torch.randint(len(scenes), (batch_size,), generator=g)
        x0 = shapes.batch([scenes[i] for i in pick.tolist()], g)
        text = embeds[pick].clone()
        drop = torch.rand(batch_size, generator=g) < 0.1
        text[drop] = empty
        sigma = noise_levels(batch_size, g, frame_noise)  # [B], or [B, F] with frame_noise
        noise = torch.randn(x0.shape, generator=g)
        s = sigma.view(batch_size, 1, -1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        timestep = sigma * 1000
        if sigma.dim() == 2:  # per token (patch (1, 2, 2): SIZE/2 x SIZE/2 tokens a key frame)
            timestep = timestep.repeat_interleave((shapes.SIZE // 2) ** 2, dim=1)
        pred = model(xt, timestep, text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if step % log_every == 0 or step == steps:
            mean = sum(window) / len(window)
            curve.append((step, mean))
            window = []
            el = time.time() - t0
            print(f"step {step:5d}/{steps}  loss {mean:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{el / 60:5.1f} min, {el / step:.2f} s/step", flush=True)
            if out is not None and (step % (log_every * 10) == 0 or step == steps):
                meta = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, done=step)
                if frame_noise:
                    meta["frame_noise"] = frame_noise
                save(model, out, curve, meta)
    return curve


def save(model, out: Path, curve, meta) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    model.train()
    (out / "loss.json").write_text(json.dumps({**meta, "curve": curve}, indent=0) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sparse_vdit.testing.train_shapes", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frame-noise", type=float, default=0.0,
                    help="share of samples with one noise level per key frame (an experiment; default 0, as shipped)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=shapes.WEIGHTS_DIR,
                    help="where the weights go (default: the package's shipped copy)")
    a = ap.parse_args(argv)
    train(a.steps, a.batch_size, a.lr, a.seed, a.out, threads=a.threads, frame_noise=a.frame_noise)
    print(f"train_shapes: weights written to {a.out}")


if __name__ == "__main__":
    main()
