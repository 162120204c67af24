"""An experiment of issue 19 (not the shipped world): does the tiny Wan learn to move content from one
key frame to the next at all? Two-key-frame clips, every sample anchored (one key frame at low
noise), object weight 9, trained with ``train_shapes`` on the training scenes of the given
directions only; then the probe: on six training videos per direction, one key frame at sigma 0.1
and the other at 0.95, how far the estimated object moved from the clean frame (truth: +2.5 px for
"right", -2.5 px for "left" where the noisy frame comes after the clean one; the opposite before it).

    python -m benchmarks.pilot_shift --directions left right --steps 1000 --out DIR   # 15 min on 2 cores
    python -m benchmarks.pilot_shift --directions right --steps 600 --out DIR        # no word to read
    python -m benchmarks.pilot_shift --directions right --scroll --steps 600 --out DIR  # the whole frame moves
    python -m benchmarks.pilot_shift --directions right --steps 600 --anchor-first 600 --out DIR  # anchor first
    python -m benchmarks.pilot_shift --directions right --steps 600 --init DIR --lr 5e-4 --out DIR2  # then either side
    python -m benchmarks.pilot_shift --directions left right --steps 400 --anchor-first 400 --init DIR \
        --lr 5e-4 --text-lr-scale 10 --out DIR3   # then the word decides the way
    python -m benchmarks.pilot_shift --probe-only --out DIR [--scroll]
    python -m benchmarks.pilot_shift --directions left right up down --steps 300 --gap --init DIR \
        --lr 3e-4 --text-lr-scale 10 --out DIR4   # the anchor's lead in noise shrinks to none
    python -m benchmarks.pilot_shift --directions left right up down --steps 250 --gap --frames 8 \
        --init DIR4 --lr 3e-4 --text-lr-scale 10 --out DIR5   # on whole videos

The README's "A model that learned to attend" reports these runs (experiments (f) and (g)): with the
anchor on either side of the noisy frame the move has no sign the model can see (RoPE scores time
apart from space, and no token knows its frame number), and the first three runs learned none; with
the anchor always first (``--anchor-first``) the move was learned in a few hundred steps; with two
directions the word was read only once its path trained faster (``--text-lr-scale 10``).
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


def _centre(frame: torch.Tensor) -> torch.Tensor:
    """(y, x) centroid of a frame's saturated (object) pixels; the background is gray."""
    # the background's stripes carry no saturation; noise a little
    sat = (frame.amax(0) - frame.amin(0) - 0.3).clamp(min=0)
    return shapes.centroid(sat)


def probe_uniform(weights: Path, directions=("right", "left", "down", "up"), sigmas=(0.95, 0.8)) -> dict:
    """Every key frame at one noise level (as the pipeline generates), on a *static* video (the object
    of a training video's first key frame in all eight): how far the estimated object travels from the
    first key frame to the last along the prompt's direction word, mean over six videos. A model that
    imposes the named motion moves it (the data's travel: 17.5 px); one that copies what each frame
    shows, 0."""
    model = shapes.learned_wan_pipeline(weights).transformer
    embeds = train_shapes.encode_prompts([f"a red circle moves {d}" for d in directions], shapes.MAX_TEXT_TOKENS,
                                         weights)
    result = {}
    for sigma in sigmas:
        moves = []
        for seed in range(6):
            g = torch.Generator().manual_seed(seed)
            x0 = shapes.batch([shapes.Scene("red", "circle", "right")], g)[:, :, :1].expand(-1, -1, shapes.FRAMES, -1, -1)
            xt = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g)
            with torch.no_grad():
                for i, word in enumerate(directions):
                    est = xt - sigma * model(xt, torch.tensor([sigma * 1000]), embeds[i:i + 1], return_dict=False)[0]
                    travel = _centre(est[0, :, -1]) - _centre(est[0, :, 0])
                    moves.append(float((travel * torch.tensor(shapes.DIRECTIONS[word])).sum()))
        result[f"sigma {sigma}"] = round(sum(moves) / len(moves), 2)
    return result


def probe(weights: Path, directions=("right", "left")) -> dict[str, dict[str, float]]:
    """How far (px) the estimated object in the noisy key frame moved from the clean one's object,
    projected on a direction word's vector, over six training videos of each direction: with the
    clean (anchor) key frame first ("after": the noisy frame follows it; truth +2.5 px when the word
    names the video's direction) and second ("before": truth -2.5 px). "own word": the prompt names
    the video's direction; "other words": the prompt names another direction (the move projected on
    that word's vector: +-2.5 there too if the word, not the video, decides the move)."""
    model = shapes.learned_wan_pipeline(weights).transformer
    prompts = {d: f"a red circle moves {d}" for d in directions}
    embeds = train_shapes.encode_prompts(list(prompts.values()), shapes.MAX_TEXT_TOKENS, weights)
    result = {}
    for side, levels, est_frame in (("after", [[0.1, 0.95]], 1), ("before", [[0.95, 0.1]], 0)):
        levels = torch.tensor(levels)
        s = levels.view(1, 1, 2, 1, 1)
        timestep = (levels * 1000).repeat_interleave((shapes.SIZE // 2) ** 2, dim=1)
        own, other = [], []
        for seed in range(6):
            for direction in directions:
                g = torch.Generator().manual_seed(seed)
                x0 = shapes.batch([shapes.Scene("red", "circle", direction)], g)[:, :, 3:5]
                xt = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
                clean = _centre(x0[0, :, 1 - est_frame])
                with torch.no_grad():
                    for i, word in enumerate(directions):
                        est = xt - s * model(xt, timestep, embeds[i:i + 1], return_dict=False)[0]
                        move = float(((_centre(est[0, :, est_frame]) - clean) * torch.tensor(shapes.DIRECTIONS[word])).sum())
                        (own if word == direction else other).append(move)
        result[side] = {"own word": round(sum(own) / len(own), 2),
                        **({"other words": round(sum(other) / len(other), 2)} if other else {})}
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--directions", nargs="+", default=["left", "right"], choices=sorted(shapes.DIRECTIONS))
    ap.add_argument("--scroll", action="store_true", help="the background moves with the object")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--probe-only", action="store_true")
    ap.add_argument("--anchor-first", type=int, default=0, metavar="STEPS",
                    help="the first STEPS steps put the anchor on the clip's first key frame")
    ap.add_argument("--init", type=Path, default=None, help="start from these weights")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--text-lr-scale", type=float, default=1.0,
                    help="the cross-attention's and text projection's learning rate, times this")
    ap.add_argument("--frames", type=int, default=2, help="key frames of a training clip")
    ap.add_argument("--gap", action="store_true",
                    help="the first key frame leads the others by a gap in noise (gap_levels), none for some")
    a = ap.parse_args(argv)
    if a.scroll:
        shapes.render = scrolling_render  # shapes.batch draws through it, in training and in the probe
    if a.gap:  # the anchored share (all of it here) at train_shapes.gap_levels
        real = train_shapes.noise_levels
        train_shapes.noise_levels = lambda *args, **kw: real(*args, **{**kw, "gap": True})
    if not a.probe_only:
        shapes.TRAIN_SCENES = tuple(sc for sc in shapes.TRAIN_SCENES if sc.direction in a.directions)
        train_shapes.train(steps=a.steps, lr=a.lr, seed=0, out=a.out, threads=2, anchor=1.0, short_steps=a.steps,
                           short_frames=a.frames, object_weight=9.0, anchor_first_steps=a.anchor_first, init=a.init,
                           text_lr_scale=a.text_lr_scale)
    print("estimated move from the clean key frame along the word's direction (truth for the video's own word: "
          "+2.5 px after it, -2.5 px before it):", probe(a.out, tuple(a.directions)))
    print("all key frames at one level, a static video: the estimate's travel along the word (the data's: "
          "17.5 px; copying: 0):", probe_uniform(a.out, tuple(a.directions)))


if __name__ == "__main__":
    main()
