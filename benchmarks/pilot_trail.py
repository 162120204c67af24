"""An experiment of issue 19 (not the shipped world): the shapes world with a fading trail behind the
moving object, so that its direction shows in every single frame, trained with ``train_shapes``.

    python -m benchmarks.pilot_trail --steps 600 --short-steps 600 --anchor 0.5 --object-weight 9 --out DIR
    python -m benchmarks.pilot_trail --probe --weights DIR --sensitivity --cross-attention   # motion_probe on it

The first command is the pilot the README reports (600 steps on 4-frame clips, about 20 minutes on
2 cores); the second runs ``benchmarks.motion_probe`` with the same world.
"""
from __future__ import annotations

import math
import sys

import torch

from sparse_vdit.testing import shapes, train_shapes

TRAIL = ((2.0, 0.3), (1.0, 0.55), (0.0, 1.0))  # (key frames behind the object, opacity), drawn in this order


def render(scene: shapes.Scene, generator: torch.Generator) -> torch.Tensor:
    """As :func:`shapes.render` (the same draws from ``generator``), with two fainter, smaller copies of
    the object one and two key frames behind it."""
    u = torch.rand(6, generator=generator)
    dy, dx = shapes.DIRECTIONS[scene.direction]
    size, frames, radius = shapes.SIZE, shapes.FRAMES, shapes.RADIUS
    travel = shapes.SPEED * (frames - 1)
    margin = radius + 1.0
    lo_y, hi_y = margin + travel * max(-dy, 0), size - margin - travel * max(dy, 0)
    lo_x, hi_x = margin + travel * max(-dx, 0), size - margin - travel * max(dx, 0)
    y0, x0 = lo_y + (hi_y - lo_y) * float(u[0]), lo_x + (hi_x - lo_x) * float(u[1])
    speed = shapes.SPEED * (0.9 + 0.2 * float(u[2]))
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    angle, period, phase = math.pi * float(u[3]), 6.0 + 6.0 * float(u[4]), 2 * math.pi * float(u[5])
    stripes = 0.12 * torch.sin((xs * math.cos(angle) + ys * math.sin(angle)) * 2 * math.pi / period + phase)
    video = (stripes - 0.1).expand(3, frames, size, size).clone()
    colour = torch.tensor(shapes.COLOURS[scene.colour]).view(3, 1, 1)
    for t in range(frames):
        for back, alpha in TRAIL:
            cy, cx = y0 + dy * speed * (t - back), x0 + dx * speed * (t - back)
            r = radius * (1 - 0.2 * back)
            if scene.shape == "circle":
                d = torch.sqrt((ys - cy) ** 2 + (xs - cx) ** 2) - r
            else:
                d = torch.maximum((ys - cy).abs(), (xs - cx).abs()) - r * 0.9
            cover = (0.5 - d).clamp(0, 1) * alpha
            video[:, t] = video[:, t] * (1 - cover) + colour * cover
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
