"""An experiment of issue 19 (not the shipped world): does the tiny Wan learn to move content from one
key frame to the next at all? Two-key-frame clips, every sample anchored (one key frame at low
noise), object weight 9, trained with ``train_shapes`` on the training scenes of the given
directions only; then the probe: on six training videos per direction, one key frame at sigma 0.1
and the next at 0.95, how far the estimated object moved from the clean frame (truth: +2.5 px for
"right", -2.5 px for "left").

    python -m benchmarks.pilot_shift --directions left right --steps 1000 --out DIR   # 15 min on 2 cores
    python -m benchmarks.pilot_shift --directions right --steps 600 --out DIR        # no word to read
    python -m benchmarks.pilot_shift --directions right --scroll --steps 600 --out DIR  # the whole frame moves
    python -m benchmarks.pilot_shift --probe-only --out DIR [--scroll]

The README's "A model that learned to attend" reports these three runs (experiment (f)).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sparse_vdit.testing import shapes, train_shapes


def scrolling_render(scene: shapes.Scene, generator: torch.Generator) -> torch.Tensor:
    """As :func:`shapes.render` (the same draws), with the background stripes (amplitude 0.3) moving
    with the object: every pixel of a frame moves from one key frame to the next."""
    d = shapes.draws(scene, generator)
    ys, xs = shapes.pixel_grid()
    video = torch.empty(3, shapes.FRAMES, shapes.SIZE, shapes.SIZE)
    colour = torch.tensor(shapes.COLOURS[scene.colour]).view(3, 1, 1)
    for t in range(shapes.FRAMES):
        cy, cx = d.centre(t)
        sy, sx = cy - d.y0, cx - d.x0  # the stripes move as the object does
        frame = (shapes.stripes(d, ys - sy, xs - sx, amplitude=0.3) - 0.1).expand(3, shapes.SIZE, shapes.SIZE)
        c = shapes.cover(scene.shape, ys, xs, cy, cx)
        video[:, t] = frame * (1 - c) + colour * c
    return video

def _red_x(frame: torch.Tensor) -> float:
    red = (frame[0] - frame[1]).clamp(min=0)
    xs = torch.arange(float(red.shape[1])).expand_as(red)
    return float((red * xs).sum() / red.sum())


def probe(weights: Path) -> dict[str, float]:
    """Mean move (px, along x) of the estimated object in the noisy key frame from the clean one's
    object, per prompt, over six training videos of each of "right" and "left"."""
    model = shapes.learned_wan_pipeline(weights).transformer
    prompts = ("a red circle moves right", "a red circle moves left")
    embeds = train_shapes.encode_prompts(list(prompts), shapes.MAX_TEXT_TOKENS, weights)
    moves = {p: [] for p in prompts}
    levels = torch.tensor([[0.1, 0.95]])
    s = levels.view(1, 1, 2, 1, 1)
    timestep = (levels * 1000).repeat_interleave((shapes.SIZE // 2) ** 2, dim=1)
    for seed in range(6):
        for direction in ("right", "left"):
            g = torch.Generator().manual_seed(seed)
            x0 = shapes.batch([shapes.Scene("red", "circle", direction)], g)[:, :, 3:5]
            xt = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
            with torch.no_grad():
                for i, prompt in enumerate(prompts):
                    est = xt - s * model(xt, timestep, embeds[i:i + 1], return_dict=False)[0]
                    moves[prompt].append(_red_x(est[0, :, 1]) - _red_x(x0[0, :, 0]))
    return {p: round(sum(m) / len(m), 2) for p, m in moves.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--directions", nargs="+", default=["left", "right"], choices=sorted(shapes.DIRECTIONS))
    ap.add_argument("--scroll", action="store_true", help="the background moves with the object")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--probe-only", action="store_true")
    a = ap.parse_args(argv)
    if a.scroll:
        shapes.render = scrolling_render  # shapes.batch draws through it, in training and in the probe
    if not a.probe_only:
        shapes.TRAIN_SCENES = tuple(sc for sc in shapes.TRAIN_SCENES if sc.direction in a.directions)
        train_shapes.train(steps=a.steps, seed=0, out=a.out, threads=2, anchor=1.0, short_steps=a.steps,
                           short_frames=2, object_weight=9.0)
    print("estimated move from the clean key frame (truth: right +2.5 px, left -2.5 px):", probe(a.out))


if __name__ == "__main__":
    main()
