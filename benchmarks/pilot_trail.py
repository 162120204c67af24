"""An experiment of issue 19 (not the shipped world): the shapes world with a fading trail behind the
moving object, so that its direction shows in every single frame, trained with ``train_shapes``.

    python -m benchmarks.pilot_trail --steps 600 --short-steps 600 --anchor 0.5 --object-weight 9 --out DIR
    python -m benchmarks.pilot_trail --probe --weights DIR --sensitivity --cross-attention   # motion_probe on it

The first command is the pilot the README reports (600 steps on 4-frame clips, about 20 minutes on
2 cores); the second runs ``benchmarks.motion_probe`` with the same world.
"""
from __future__ import annotations

import sys

import torch

from sparse_vdit.testing import shapes, train_shapes

TRAIL = ((2.0, 0.3), (1.0, 0.55), (0.0, 1.0))  # (key frames behind the object, opacity), drawn in this order


def render(scene: shapes.Scene, generator: torch.Generator) -> torch.Tensor:
    """As :func:`shapes.render` (the same draws from ``generator``), with two fainter, smaller copies of
    the object one and two key frames behind it."""
    d = shapes.draws(scene, generator)
    ys, xs = shapes.pixel_grid()
    video = (shapes.stripes(d, ys, xs) - 0.1).expand(3, shapes.FRAMES, shapes.SIZE, shapes.SIZE).clone()
    colour = torch.tensor(shapes.COLOURS[scene.colour]).view(3, 1, 1)
    for t in range(shapes.FRAMES):
        for back, alpha in TRAIL:
            c = shapes.cover(scene.shape, ys, xs, *d.centre(t - back), shapes.RADIUS * (1 - 0.2 * back)) * alpha
            video[:, t] = video[:, t] * (1 - c) + colour * c
    return video

def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    shapes.render = render  # the experiment's world, for training and probing alike
    if "--probe" in argv:
        from . import motion_probe

        argv.remove("--probe")
        motion_probe.main(argv)
    else:
        train_shapes.main(argv)


if __name__ == "__main__":
    main()
