"""Does the learned tiny Wan use its prompt's direction word? The denoiser's estimate of the clean
video (``x_t - sigma * prediction``) for one training video of "a red circle moves right", noised
at a few sigmas, under prompts that differ only in the direction word: the object's centroid (by
redness) in the first and last key frame, against the truth.

    python -m benchmarks.motion_probe                       # the shipped weights
    python -m benchmarks.motion_probe --weights DIR         # a checkpoint of train_shapes
    python -m benchmarks.motion_probe --first-frame-sigma 0 # the first key frame clean, the rest at each sigma

With ``--first-frame-sigma`` the first key frame is noised less than the others (per-token timesteps,
as ``train_shapes`` trains half of its samples): the clean frame shows where the object is, and only
the direction word says where it goes.
"""
from __future__ import annotations

import argparse

import torch

from sparse_vdit.testing import shapes, train_shapes

PROMPTS = ("a red circle moves right", "a red circle moves left", "a red circle moves down")


def centroids(video: torch.Tensor) -> list[tuple[float, float]]:
    """(y, x) of the red object in the first and last key frame of ``video`` [3, F, H, W] in [-1, 1]."""
    red = (video[0] - video[1]).clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(float(red.shape[1])), torch.arange(float(red.shape[2])), indexing="ij")
    return [(round(float((red[t] * ys).sum() / red[t].sum()), 1), round(float((red[t] * xs).sum() / red[t].sum()), 1))
            for t in (0, red.shape[0] - 1)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="weights folder (default: the shipped ones)")
    ap.add_argument("--sigmas", nargs="*", type=float, default=[0.95, 0.85, 0.7])
    ap.add_argument("--first-frame-sigma", type=float, default=None,
                    help="noise level of the first key frame (default: the same as the others)")
    args = ap.parse_args(argv)
    model = shapes.learned_wan_pipeline(args.weights).transformer
    embeds = train_shapes.encode_prompts(PROMPTS)
    g = torch.Generator().manual_seed(0)
    x0 = shapes.batch([shapes.Scene("red", "circle", "right")], g)
    noise = torch.randn(x0.shape, generator=g)
    print("truth (first, last key frame):", centroids(x0[0]))
    for sigma in args.sigmas:
        levels = torch.full((1, shapes.FRAMES), sigma)
        if args.first_frame_sigma is not None:
            levels[0, 0] = args.first_frame_sigma
        s = levels.view(1, 1, shapes.FRAMES, 1, 1)
        xt = (1 - s) * x0 + s * noise
        timestep = (levels * 1000).repeat_interleave((shapes.SIZE // 2) ** 2, dim=1)  # per token, patch (1, 2, 2)
        for i, prompt in enumerate(PROMPTS):
            with torch.no_grad():
                pred = model(xt, timestep, embeds[i:i + 1], return_dict=False)[0]
            print(f"sigma {sigma}: {prompt!r:30} estimate {centroids((xt - s * pred)[0])}")


if __name__ == "__main__":
    main()
