"""Does the learned tiny Wan use its prompt's direction word? The denoiser's estimate of the clean
video (``x_t - sigma * prediction``) for one training video of "a red circle moves right", noised
at a few sigmas, under prompts that differ only in the direction word: the object's centroid (by
redness) in the first and last key frame, against the truth.

    python -m benchmarks.motion_probe                       # the shipped weights
    python -m benchmarks.motion_probe --weights DIR         # a checkpoint of train_shapes
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
    args = ap.parse_args(argv)
    model = shapes.learned_wan_pipeline(args.weights).transformer
    embeds = train_shapes.encode_prompts(PROMPTS)
    g = torch.Generator().manual_seed(0)
    x0 = shapes.batch([shapes.Scene("red", "circle", "right")], g)
    noise = torch.randn(x0.shape, generator=g)
    print("truth (first, last key frame):", centroids(x0[0]))
    for sigma in args.sigmas:
        xt = (1 - sigma) * x0 + sigma * noise
        for i, prompt in enumerate(PROMPTS):
            with torch.no_grad():
                pred = model(xt, torch.tensor([sigma * 1000.0]), embeds[i:i + 1], return_dict=False)[0]
            print(f"sigma {sigma}: {prompt!r:30} estimate {centroids((xt - sigma * pred)[0])}")


if __name__ == "__main__":
    main()
