"""Train the tiny Wan of :mod:`sparse_vdit.testing.shapes` on its synthetic world (seeded, CPU).

    python -m sparse_vdit.testing.train_shapes --curriculum --object-weight 9   # the shipped weights: 70 min on 2 cores
    python -m sparse_vdit.testing.train_shapes --steps 200 --out /tmp/shapes   # a quick look

Rectified flow as Wan trains it: x_t = (1 - s) x_0 + s e, the transformer predicts e - x_0 at
timestep 1000 s, with s drawn uniformly then shifted as the pipeline's scheduler shifts it. Prompts
are encoded once by the frozen tiny text encoder, padded to ``shapes.MAX_TEXT_TOKENS`` (generate with
the same: ``shapes.GENERATE_DEFAULTS``); 10% of samples get the empty prompt, so classifier-free
guidance works. Prints the loss curve and writes it (``loss.json``) beside the weights.

The shipped run is ``--curriculum --object-weight 9`` (below); without ``--curriculum`` the defaults
are the first run (2,000 steps, every key frame at one level), whose videos show the named colour but
no motion. The other options are the experiments that led to the curriculum (the README's section on
the learned model has the numbers):

- ``--frame-noise P`` gives a share P of the samples one noise level per key frame instead of one per
  video, as per-token timesteps (Wan 2.2's ``[B, seq_len]`` form). Tried at 0.5: by step 1,000 the
  direction word still moved the denoiser's estimate by under 0.2 pixel.
- ``--anchor P`` gives a share P of the samples one low-noise anchor key frame and the others near pure
  noise, so that only the direction word says where the object is in them; ``--short-steps S`` trains
  the first S steps on clips of ``--short-frames`` key frames, more of them a step (cheaper steps).
- ``--object-weight W`` weights the object's pixels 1 + W in the loss (the object is a few percent of
  a frame).
  Tried: anchor 0.5 with the first 1,600 of 2,400 steps on 4-frame clips (stopped at step 1,100),
  then the same with W = 9 and 1,400 of 2,000 steps (stopped at step 600). On their checkpoints at
  steps 1,000 and 600, swapping the direction word changed the prediction by 2-3 % of what swapping
  the colour word changes, as on the shipped weights. ``python -m benchmarks.motion_probe
  --sensitivity --cross-attention`` shows where it goes: on the shipped weights the video tokens give
  the ten padding tokens 75-99 % of their cross-attention (a sink), the colour token up to 16 % and
  the direction token at most 2 %; on the second run's checkpoint the direction token at most 9 %,
  the colour token up to 60 %.
- ``--text-tokens T`` pads prompts to T tokens (fewer padding keys). Tried at 7 (one padding key) with
  the second run's recipe for 600 steps on 4-frame clips: the one padding key still takes most of
  the cross-attention, and the direction swap changed the prediction by 2.7-3.0 against 54-94.
- ``--train-text`` trains the text encoder with the transformer (saved in ``text_encoder/`` beside it;
  :func:`shapes.learned_wan_pipeline` loads it). Tried with 2-frame clips (``--short-frames 2``),
  anchor 0.5 and W = 4, stopped at step 1,600: the direction swap changed the prediction by 1.9
  against the colour swap's 64, and with one key frame clean the next one's estimate stayed where
  the clean frame had the object, for every direction word.
- ``--heads`` / ``--head-dim`` change the transformer's width (not tried for long).
- ``--curriculum`` trains in the phases of :data:`CURRICULUM` (see there; each phase sets its own text
  path scale, 10 for the phases that read the word): ``python -m sparse_vdit.testing.train_shapes
  --curriculum --object-weight 9 --out DIR``, each phase's end saved in ``DIR/phase<k>`` (2,600 steps,
  70 minutes on a 2-core AVX2 host). The shipped weights: on the six held-out prompts the generated
  object has the named colour and moves the named way in 6 of 6 (3.1-6.4 px, the data's 17.5). Its
  first five phases alone (1,700 steps) read the word beside a clean key frame (+2.41 px along the
  named direction, truth 2.5) but generated a static object (direction 0 of 13); the last two, the
  first key frame ahead of the rest by a gap in noise, carry the move over to generation.
- ``--text-lr-scale F`` multiplies the learning rate of the cross-attention and the text projection
  by F (the direction word changes the video tokens' residual stream by 1-2 % of its norm). At 10,
  continuing from a checkpoint that shifts right (``benchmarks.pilot_shift``), left and right with the
  anchor first: in 400 steps the word decided the move (2.46 px along it, truth 2.5); at 1 the same
  run fell back to a blob that ignores the word (0.22 px).
"""
from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch

from . import shapes


def encode_prompts(prompts, max_sequence_length: int = shapes.MAX_TEXT_TOKENS, weights=None) -> torch.Tensor:
    """``[len(prompts), max_sequence_length, text_dim]`` as ``WanPipeline.encode_prompt`` makes them
    (with the text encoder of the ``weights`` folder, default the shipped one)."""
    from diffusers import WanPipeline

    tokenizer, encoder = shapes.shapes_text_encoder(weights)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=None, vae=None, scheduler=None)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                       max_sequence_length=max_sequence_length, device=torch.device("cpu"))
    return embeds


class Phase(NamedTuple):
    """One phase of a curriculum (:func:`train`'s ``phases``): ``steps`` steps on clips of ``frames``
    key frames, a share ``anchored`` of them with one low-noise anchor key frame (the clip's first where
    ``anchor_first``), on the training scenes of ``directions`` (None: all), with a learning-rate
    schedule of its own (warm-up, then cosine) peaking at ``lr`` (None: ``train``'s ``lr``), the
    cross-attention's and text projection's at ``text_lr_scale`` times that. With ``gap`` the
    anchored share's first key frame leads the others by a gap in noise instead of being clean
    (:func:`gap_levels`)."""

    steps: int
    frames: int
    anchored: float
    anchor_first: bool = False
    directions: tuple[str, ...] | None = None
    lr: float | None = None
    text_lr_scale: float = 1.0
    gap: bool = False


# The motion curriculum (``--curriculum``). Wan's RoPE scores time, height and width apart and no token
# knows its own frame number, so with the anchor on either side of a noisy frame a shift to learn has no
# sign (the move after the anchor is minus the move before it): the model blends both, a saddle it does
# not leave (a pilot from the word-reading checkpoint, the anchor on either side: 0.01 px at steps 200
# and 400). With the anchor first, the shift from it has one sign and is learned; with one direction
# (no word to read) in 400 steps. A second direction needs the word to choose the shift: learned in 400
# more steps with the text path's learning rate 10x (``--text-lr-scale 10``), not without. The README's
# experiments (g)-(j) have the numbers. So the anchor stays first throughout: a model that places each
# frame's object from the frame before it is all that generation needs (the first frame's place is
# free). After the two phases that worked: all four directions, then clips of 4 and 8 key frames, part
# anchored and part at one noise level for every frame. Up to there the word chooses the move beside a
# clean frame, but not at one noise level, where each frame copies what it shows, so generated objects
# stand still (the README's (i)). The last two phases bridge that: the first key frame leads the others
# by a gap in noise that shrinks to none (:func:`gap_levels`), on two key frames and then on whole videos.
CURRICULUM = (
    Phase(400, 2, 1.0, True, ("right",)),
    Phase(400, 2, 1.0, True, ("left", "right"), lr=5e-4, text_lr_scale=10.0),
    Phase(300, 2, 1.0, True, None, lr=5e-4, text_lr_scale=10.0),
    Phase(400, 4, 0.5, True, None, lr=5e-4, text_lr_scale=10.0),
    Phase(200, 8, 0.25, True, None, lr=3e-4, text_lr_scale=10.0),
    Phase(300, 2, 1.0, True, None, lr=3e-4, text_lr_scale=10.0, gap=True),
    Phase(600, 8, 1.0, True, None, lr=3e-4, text_lr_scale=10.0, gap=True),
)


def lr_factor(i: int, total: int) -> float:
    """The learning rate's factor at (0-based) step ``i`` of ``total``: a warm-up over min(200, total /
    10) steps, then a cosine down to 0.1."""
    warmup = min(200, total // 10)
    return min(1.0, (i + 1) / max(warmup, 1)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))


def phase_lr_factor(phases, lr: float, text: bool = False):
    """``i -> factor`` over ``phases`` (:class:`Phase`): each phase restarts :func:`lr_factor` over its own
    steps, scaled to its peak ``lr`` (relative to ``lr``); with ``text``, the text path's factor (times
    the phase's ``text_lr_scale``)."""
    phases = [Phase(*p) for p in phases]
    bounds = list(itertools.accumulate(p.steps for p in phases))

    def factor(i: int) -> float:  # step i + 1 is in phase k
        k = min(bisect.bisect_left(bounds, i + 1), len(phases) - 1)
        scale = phases[k].text_lr_scale if text else 1.0
        return lr_factor(i - (bounds[k] - phases[k].steps), phases[k].steps) * (phases[k].lr or lr) / lr * scale
    return factor


def shifted_sigma(u: torch.Tensor, shift: float = shapes.SHIFT) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def gap_levels(batch_size: int, frames: int, generator: torch.Generator) -> torch.Tensor:
    """sigma per sample and key frame, ``[batch_size, frames]``, where the first key frame leads the
    others by a gap in noise, not by a clean frame: it at u in [0.2, 0.95], the others at u + g (at most
    1), g uniform in [0, 0.5], so that some clips are at one level for every frame, as the pipeline
    generates them."""
    low = 0.2 + 0.75 * torch.rand(batch_size, 1, generator=generator)
    gap = 0.5 * torch.rand(batch_size, 1, generator=generator)
    return (low + gap * (torch.arange(frames) > 0)).clamp(max=1.0)


def noise_levels(batch_size: int, frames: int, generator: torch.Generator, frame_noise: float = 0.0,
                 anchor: float = 0.0, anchor_first: bool = False, gap: bool = False) -> torch.Tensor:
    """sigma per sample and key frame, ``[batch_size, frames]``.

    By default one shifted uniform draw per video, the same for all its frames. With ``anchor`` > 0,
    that share of the samples has one *anchor* key frame at a low level (uniform in [0, 0.5]) and every
    other key frame at a high one (uniform in [0.85, 1]): the anchor shows where the object is, and only
    the direction word says where it is in the other frames, so the prompt's direction carries most of
    the loss there. With ``frame_noise`` > 0 (an earlier experiment) that share gets one independent
    draw per key frame. With ``anchor_first`` the anchor is always the clip's first key frame (a
    curriculum: the move from it has one sign, so where the anchor is tells which way to shift).
    With ``gap``, the ``anchor`` share's levels are :func:`gap_levels` instead (the first key frame
    ahead by a gap in noise; every sample where ``anchor`` is 1)."""
    if gap:
        lead = gap_levels(batch_size, frames, generator)
        if anchor >= 1:
            return lead
        pick = torch.rand(batch_size, 1, generator=generator) < anchor
        return torch.where(pick, lead, shifted_sigma(torch.rand(batch_size, 1, generator=generator)).expand(-1, frames))
    levels = shifted_sigma(torch.rand(batch_size, 1, generator=generator)).expand(batch_size, frames).clone()
    if frame_noise:
        per_frame = shifted_sigma(torch.rand(batch_size, frames, generator=generator))
        pick = torch.rand(batch_size, 1, generator=generator) < frame_noise
        levels = torch.where(pick, per_frame, levels)
    if anchor:
        high = 0.85 + 0.15 * torch.rand(batch_size, frames, generator=generator)
        which = torch.randint(frames, (batch_size,), generator=generator)
        if anchor_first:
            which = torch.zeros_like(which)
        high[torch.arange(batch_size), which] = 0.5 * torch.rand(batch_size, generator=generator)
        pick = torch.rand(batch_size, 1, generator=generator) < anchor
        levels = torch.where(pick, high, levels)
    return levels


def clips(videos: torch.Tensor, frames: int, generator: torch.Generator) -> torch.Tensor:
    """A random window of ``frames`` consecutive key frames of each video ``[B, 3, F, H, W]``."""
    if frames >= videos.shape[2]:
        return videos
    start = torch.randint(videos.shape[2] - frames + 1, (videos.shape[0],), generator=generator)
    return torch.stack([v[:, s:s + frames] for v, s in zip(videos, start.tolist())])


def weighted_loss(pred: torch.Tensor, target: torch.Tensor, x0: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Mean squared error with the object's pixels weighted ``1 + object_weight`` (normalised by the
    mean weight, so the scale stays that of the plain MSE). The object is a few percent of a frame and
    the striped background most of the loss; where the object is in each frame (so, its motion) is what
    the prompt decides. Object pixels are the saturated ones (the background is gray)."""
    if not object_weight:
        return torch.nn.functional.mse_loss(pred, target)
    saturation = x0.amax(1, keepdim=True) - x0.amin(1, keepdim=True)  # [B, 1, F, H, W], 0 on the background
    w = 1 + object_weight * (saturation / 1.5).clamp(0, 1)
    return ((pred - target) ** 2 * w).mean() / w.mean()


def train(steps: int = 2000, batch_size: int = 4, lr: float = 1e-3, seed: int = 0, out: Path | None = None,
          log_every: int = 50, threads: int | None = None, frame_noise: float = 0.0, anchor: float = 0.0,
          short_steps: int = 0, short_frames: int = 4, object_weight: float = 0.0,
          text_tokens: int = shapes.MAX_TEXT_TOKENS, config: dict | None = None,
          train_text: bool = False, anchor_first_steps: int = 0, init: Path | None = None,
          phases: tuple | None = None, text_lr_scale: float = 1.0) -> list[tuple[int, float]]:
    """``short_steps`` of the ``steps`` train on clips of ``short_frames`` key frames, ``FRAMES //
    short_frames`` times as many of them a step (the same number of tokens, a cheaper step: attention
    is quadratic in them); the rest on whole videos. Motion is relative (RoPE positions), so what a
    short clip teaches holds for a long one. The first ``anchor_first_steps`` put the anchor on the
    clip's first key frame. ``init``: start from these saved weights (a later stage of a curriculum).
    ``phases`` (:class:`Phase`, e.g. :data:`CURRICULUM`) replace all of that, one after another,
    ``steps`` their sum, each with a learning-rate schedule of its own.
    ``text_lr_scale`` multiplies the learning rate of the cross-attention and the text projection."""
    if phases is not None:
        phases = [Phase(*p) for p in phases]
        steps = sum(p.steps for p in phases)
        bounds = list(itertools.accumulate(p.steps for p in phases))
    from diffusers import WanTransformer3DModel

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if init is not None:
        model = WanTransformer3DModel.from_pretrained(init).train()
    else:
        model = WanTransformer3DModel(**{**shapes.LEARNED_WAN_CONFIG, **(config or {})}).train()
    scenes = shapes.TRAIN_SCENES
    prompts = [sc.prompt for sc in scenes] + [""]
    encoder = None
    if train_text:  # the text encoder trains with the transformer, from the frozen one's weights
        tokenizer, encoder = shapes.shapes_text_encoder(Path("/nonexistent"))
        encoder.train()
        tok = tokenizer(prompts, padding="max_length", max_length=text_tokens, truncation=True,
                        add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, keep = tok.input_ids, tok.attention_mask
    else:
        embeds = encode_prompts(prompts, text_tokens, weights=Path("/nonexistent"))
        empty = embeds[-1]
        embeds = embeds[:-1]
    params = sum(p.numel() for p in model.parameters())
    print(f"train_shapes: {params / 1e6:.2f} M parameters, {len(scenes)} training scenes "
          f"({len(shapes.HELD_OUT)} held out), {steps} steps "
          + (f"in phases {[tuple(p) for p in phases]} (steps, clip key frames, anchored share, anchor first, "
             "directions, peak lr), " if phases else
             f"({short_steps} of them on {short_frames}-frame clips), anchor share {anchor}, ")
          + f"{batch_size} videos a step, object weight {object_weight}, seed {seed}",
          flush=True)
    params = list(model.parameters()) + (list(encoder.parameters()) if encoder is not None else [])
    groups = params
    split = text_lr_scale != 1.0 or (phases is not None and any(p.text_lr_scale != 1.0 for p in phases))
    if split:  # the prompt's path into the video tokens (cross-attention, text projection) faster
        text_path = {id(p) for name, p in model.named_parameters()
                     if ".attn2." in name or name.startswith("condition_embedder.text_embedder.")}
        groups = [{"params": [p for p in params if id(p) not in text_path]},
                  {"params": [p for p in params if id(p) in text_path],
                   "lr": lr if phases is not None else lr * text_lr_scale}]  # phases: their scales
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    if phases is not None:  # the phases' text scales replace ``text_lr_scale``
        factors = [phase_lr_factor(phases, lr)] + ([phase_lr_factor(phases, lr, text=True)] if split else [])
    else:
        factors = [lambda i: lr_factor(i, steps)] * len(opt.param_groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factors)
    g = torch.Generator().manual_seed(seed)
    everything = torch.arange(len(scenes))
    curve, window, t0 = [], [], time.time()
    for step in range(1, steps + 1):
        frames = short_frames if step <= short_steps else shapes.FRAMES
        share, first, gap = anchor, step <= anchor_first_steps, False
        pool = everything
        if phases is not None:
            phase = phases[bisect.bisect_left(bounds, step)]
            frames, share, first, gap = phase.frames, phase.anchored, phase.anchor_first, phase.gap
            if phase.directions:
                pool = torch.tensor([i for i, sc in enumerate(scenes) if sc.direction in phase.directions])
        n = batch_size * max(1, shapes.FRAMES // frames)
        pick = pool[torch.randint(len(pool), (n,), generator=g)]
        x0 = clips(shapes.batch([scenes[i] for i in pick.tolist()], g), frames, g)
        drop = torch.rand(n, generator=g) < 0.1
        if encoder is not None:
            which = torch.where(drop, torch.full_like(pick, len(scenes)), pick)
            # as WanPipeline encodes: the encoder's states at the prompt's tokens, zeros after them
            text = encoder(ids[which], keep[which]).last_hidden_state * keep[which, :, None]
        else:
            text = embeds[pick].clone()
            text[drop] = empty
        sigma = noise_levels(n, frames, g, frame_noise, share, anchor_first=first, gap=gap)  # [n, frames]
        noise = torch.randn(x0.shape, generator=g)
        s = sigma.view(n, 1, frames, 1, 1)
        xt = (1 - s) * x0 + s * noise
        # One timestep a video where its frames share a level; per token (Wan 2.2's [B, seq_len] form,
        # SIZE/2 x SIZE/2 tokens a key frame at patch (1, 2, 2)) where a batch has frames that differ.
        uniform = bool((sigma == sigma[:, :1]).all())
        timestep = sigma[:, 0] * 1000 if uniform else (sigma * 1000).repeat_interleave((shapes.SIZE // 2) ** 2, dim=1)
        pred = model(xt, timestep, text, return_dict=False)[0]
        loss = weighted_loss(pred, noise - x0, x0, object_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if phases is not None and out is not None and step in bounds[:-1]:  # each phase's end, to probe
            k = bounds.index(step) + 1
            save(model, Path(out) / f"phase{k}", [], {"done": step, "phases": [p._asdict() for p in phases[:k]]},
                 encoder)
        if step % log_every == 0 or step == steps:
            mean = sum(window) / len(window)
            curve.append((step, mean))
            window = []
            el = time.time() - t0
            print(f"step {step:5d}/{steps}  loss {mean:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{el / 60:5.1f} min, {el / step:.2f} s/step", flush=True)
            if out is not None and (step % (log_every * 4) == 0 or step == steps):
                meta = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, done=step, anchor=anchor,
                            short_steps=short_steps, short_frames=short_frames, object_weight=object_weight)
                if text_tokens != shapes.MAX_TEXT_TOKENS:
                    meta["text_tokens"] = text_tokens
                if frame_noise:
                    meta["frame_noise"] = frame_noise
                if config:
                    meta["config"] = config
                if encoder is not None:
                    meta["train_text"] = True
                if anchor_first_steps:
                    meta["anchor_first_steps"] = anchor_first_steps
                if init is not None:
                    meta["init"] = str(init)
                if phases is not None:
                    meta["phases"] = [p._asdict() for p in phases]
                if text_lr_scale != 1.0:
                    meta["text_lr_scale"] = text_lr_scale
                save(model, out, curve, meta, encoder)
    return curve


def save(model, out: Path, curve, meta, encoder=None) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    model.train()
    if encoder is not None:
        encoder.save_pretrained(out / "text_encoder")
    (out / "loss.json").write_text(json.dumps({**meta, "curve": curve}, indent=0) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sparse_vdit.testing.train_shapes", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frame-noise", type=float, default=0.0,
                    help="share of samples with one noise level per key frame (an experiment; default 0, as shipped)")
    ap.add_argument("--anchor", type=float, default=0.0,
                    help="share of samples with one low-noise anchor key frame and the others near pure noise "
                         "(an experiment; default 0, as shipped)")
    ap.add_argument("--short-steps", type=int, default=0, help="steps on short clips, first (an experiment; default 0)")
    ap.add_argument("--object-weight", type=float, default=0.0,
                    help="extra loss weight of the object's pixels (an experiment; default 0, plain MSE, as shipped)")
    ap.add_argument("--text-tokens", type=int, default=shapes.MAX_TEXT_TOKENS,
                    help="text tokens a prompt is padded to (an experiment: fewer padding keys to sink "
                         f"cross-attention into; default {shapes.MAX_TEXT_TOKENS}, as shipped; prompts have at most 6)")
    ap.add_argument("--heads", type=int, default=None,
                    help=f"attention heads (an experiment; default {shapes.LEARNED_WAN_CONFIG['num_attention_heads']}, as shipped)")
    ap.add_argument("--head-dim", type=int, default=None,
                    help=f"head dimension (an experiment; default {shapes.LEARNED_WAN_CONFIG['attention_head_dim']}, "
                         "as shipped: RoPE gives each spatial axis 2 * (head_dim // 6) of it)")
    ap.add_argument("--train-text", action="store_true",
                    help="train the text encoder with the transformer (an experiment; default frozen, as shipped)")
    ap.add_argument("--short-frames", type=int, default=4, help="key frames of a short clip")
    ap.add_argument("--curriculum", action="store_true",
                    help="the motion curriculum (CURRICULUM; replaces --steps, --anchor and --short-*): "
                         "anchored 2-frame clips of one direction with the anchor first, then two, then the "
                         "anchor on either side, all four directions, 4- and 8-frame clips")
    ap.add_argument("--text-lr-scale", type=float, default=1.0,
                    help="learning rate of the cross-attention and text projection, times this (an experiment)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=shapes.WEIGHTS_DIR,
                    help="where the weights go (default: the package's shipped copy)")
    a = ap.parse_args(argv)
    train(a.steps, a.batch_size, a.lr, a.seed, a.out, threads=a.threads, frame_noise=a.frame_noise,
          anchor=a.anchor, short_steps=a.short_steps, short_frames=a.short_frames,
          object_weight=a.object_weight, text_tokens=a.text_tokens,
          config={k: v for k, v in (("num_attention_heads", a.heads), ("attention_head_dim", a.head_dim)) if v},
          train_text=a.train_text, phases=CURRICULUM if a.curriculum else None, text_lr_scale=a.text_lr_scale)
    print(f"train_shapes: weights written to {a.out}")


if __name__ == "__main__":
    main()
