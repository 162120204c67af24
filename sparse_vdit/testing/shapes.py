"""A synthetic video world and a tiny Wan that learned it, so quality can be judged on learned attention.

The world: one shape (circle or square) in one of four colours moves in one of four directions over a
gray, faintly striped background; its prompt says so ("a red circle moves left"). Videos are made in
code from a seed, so training, tests and benchmarks need no data set.

Latents are the frames themselves (RGB in [-1, 1] at 32 x 32, 8 key frames), not the output of a
trained VAE: a VAE trained here would add its own error to every sparse-vs-dense comparison and
minutes of training, and a learned latent would hide from a person looking at it what the
transformer did. :class:`FrameVAE` is the fixed autoencoder that makes this a whole ``WanPipeline``:
its latent is key frames at a quarter of the frame rate (Wan's VAE compresses time 4x too, so the
pipeline's frame arithmetic is the real one: 29 frames <-> 8 latent frames), and decoding
interpolates linearly between them. With patch size (1, 2, 2) the transformer sees 8 x 16 x 16 =
2,048 video tokens, 32 blocks of 64.

:func:`learned_wan_pipeline` loads the weights shipped in the package (trained by
``python -m sparse_vdit.testing.train_shapes --curriculum --object-weight 9``); :func:`describe` reads colour and direction back
from frames, to check that a video shows what its prompt says.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch

COLOURS = {  # RGB in [-1, 1]
    "red": (0.85, -0.8, -0.8),
    "green": (-0.8, 0.7, -0.8),
    "blue": (-0.7, -0.4, 0.9),
    "yellow": (0.9, 0.8, -0.8),
}
SHAPES = ("circle", "square")
DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}  # (dy, dx)
FRAMES, SIZE = 8, 32  # latent (key) frames, pixels per side
VIDEO_FRAMES = 4 * (FRAMES - 1) + 1  # what the pipeline decodes to (29)
SPEED = 2.5  # pixels per key frame
RADIUS = 5.0
WEIGHTS_DIR = Path(__file__).with_name("weights") / "learned_wan"
SHIFT = 3.0  # the scheduler's sigma shift, in training and in the pipeline
# Text tokens the model was trained with (prompts have at most 7 with </s>). Padding keys are all alike, so
# their share of cross-attention grows with their number: generate with this, not the pipeline's 512.
MAX_TEXT_TOKENS = 16

LEARNED_WAN_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=3, out_channels=3,
    text_dim=64, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True, rope_max_seq_len=1024,
)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    direction: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} moves {self.direction}"


ALL_SCENES = tuple(Scene(c, s, d) for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS))
# Held out of training (and of calibration): every colour, shape and direction is still seen in
# training, only these combinations are not.
HELD_OUT = tuple(sc for i, sc in enumerate(ALL_SCENES) if i % 5 == 2)
TRAIN_SCENES = tuple(sc for sc in ALL_SCENES if sc not in HELD_OUT)


@dataclass(frozen=True)
class Draws:
    """What one video of a scene draws from its generator: the start position, the speed, and the
    background stripes' angle, period and phase; (dy, dx) is the direction."""

    y0: float
    x0: float
    dy: float
    dx: float
    speed: float
    angle: float
    period: float
    phase: float

    def centre(self, t: float) -> tuple[float, float]:
        """The object's centre at key frame ``t``."""
        return self.y0 + self.dy * self.speed * t, self.x0 + self.dx * self.speed * t


def draws(scene: Scene, generator: torch.Generator) -> Draws:
    """The random part of one video of ``scene`` (six uniforms from ``generator``): the start so that
    the whole path stays inside the frame, a speed jitter of +-10 %, the stripes."""
    u = torch.rand(6, generator=generator)
    dy, dx = DIRECTIONS[scene.direction]
    travel = SPEED * (FRAMES - 1)
    margin = RADIUS + 1.0
    lo_y, hi_y = (margin + travel * max(-dy, 0), SIZE - margin - travel * max(dy, 0))
    lo_x, hi_x = (margin + travel * max(-dx, 0), SIZE - margin - travel * max(dx, 0))
    return Draws(lo_y + (hi_y - lo_y) * float(u[0]), lo_x + (hi_x - lo_x) * float(u[1]), dy, dx,
                 SPEED * (0.9 + 0.2 * float(u[2])), math.pi * float(u[3]), 6.0 + 6.0 * float(u[4]),
                 2 * math.pi * float(u[5]))


def pixel_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """(ys, xs) ``[SIZE, SIZE]``: pixel centres."""
    return torch.meshgrid(torch.arange(SIZE, dtype=torch.float32) + 0.5,
                          torch.arange(SIZE, dtype=torch.float32) + 0.5, indexing="ij")


def stripes(d: Draws, ys: torch.Tensor, xs: torch.Tensor, amplitude: float = 0.12) -> torch.Tensor:
    """The background's stripes ``[SIZE, SIZE]`` at pixel coordinates (ys, xs)."""
    return amplitude * torch.sin((xs * math.cos(d.angle) + ys * math.sin(d.angle)) * 2 * math.pi / d.period + d.phase)


def cover(shape: str, ys: torch.Tensor, xs: torch.Tensor, cy: float, cx: float, radius: float = RADIUS) -> torch.Tensor:
    """How much of each pixel the object (``shape`` at centre (cy, cx)) covers, in [0, 1]: an
    anti-aliased edge one pixel wide."""
    if shape == "circle":
        d = torch.sqrt((ys - cy) ** 2 + (xs - cx) ** 2) - radius
    else:
        d = torch.maximum((ys - cy).abs(), (xs - cx).abs()) - radius * 0.9
    return (0.5 - d).clamp(0, 1)


def render(scene: Scene, generator: torch.Generator) -> torch.Tensor:
    """One video of ``scene``: float32 ``[3, FRAMES, SIZE, SIZE]`` in [-1, 1]. The start position,
    the background stripes and a small speed jitter come from ``generator`` (:func:`draws`)."""
    d = draws(scene, generator)
    ys, xs = pixel_grid()
    video = (stripes(d, ys, xs) - 0.1).expand(3, FRAMES, SIZE, SIZE).clone()
    colour = torch.tensor(COLOURS[scene.colour]).view(3, 1, 1)
    for t in range(FRAMES):
        c = cover(scene.shape, ys, xs, *d.centre(t))
        video[:, t] = video[:, t] * (1 - c) + colour * c
    return video


def batch(scenes, generator: torch.Generator) -> torch.Tensor:
    """``[len(scenes), 3, FRAMES, SIZE, SIZE]``."""
    return torch.stack([render(sc, generator) for sc in scenes])


# ---------------------------------------------------------------------------- the fixed "VAE"
def frame_vae():
    """The fixed autoencoder of this world (see the module doc), built lazily so that importing
    :mod:`sparse_vdit.testing` does not import diffusers."""
    return _frame_vae_class()()


_FRAME_VAE = None


def _frame_vae_class():
    global _FRAME_VAE
    if _FRAME_VAE is not None:
        return _FRAME_VAE
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.modeling_utils import ModelMixin

    class FrameVAE(ModelMixin, ConfigMixin):
        """Latent = key frames (every 4th frame, RGB in [-1, 1]); decode = linear interpolation in time.
        No weights: a one-element buffer gives the pipeline a dtype and a device to read."""

        @register_to_config
        def __init__(self, z_dim: int = 3, scale_factor_temporal: int = 4, scale_factor_spatial: int = 1,
                     latents_mean=(0.0, 0.0, 0.0), latents_std=(1.0, 1.0, 1.0)):
            super().__init__()
            self.register_buffer("_anchor", torch.zeros(1), persistent=False)

        def encode(self, video: torch.Tensor):
            """``[B, 3, 4k + 1, H, W]`` -> key frames ``[B, 3, k + 1, H, W]``."""
            return video[:, :, ::self.config.scale_factor_temporal]

        def decode(self, z: torch.Tensor, return_dict: bool = True):
            s = self.config.scale_factor_temporal
            B, C, F, H, W = z.shape
            t = torch.arange(s * (F - 1) + 1, device=z.device, dtype=z.dtype) / s
            lo = t.floor().long().clamp(max=F - 1)
            hi = (lo + 1).clamp(max=F - 1)
            w = (t - lo.to(t.dtype)).view(1, 1, -1, 1, 1)
            video = (z[:, :, lo] * (1 - w) + z[:, :, hi] * w).clamp(-1, 1)
            return DecoderOutput(sample=video) if return_dict else (video,)

    _FRAME_VAE = FrameVAE
    return FrameVAE


# ---------------------------------------------------------------------------- the pipeline
def shapes_text_encoder(weights: str | Path | None = None):
    """The tokenizer and text encoder the learned model was trained with: the encoder trained with it
    where the weights folder holds one (``text_encoder/``, ``train_shapes --train-text``), else the
    frozen random one (seed 7)."""
    from .text import tiny_text_encoder, tiny_tokenizer

    path = (Path(weights) if weights is not None else WEIGHTS_DIR) / "text_encoder"
    if (path / "config.json").exists():
        from transformers import UMT5EncoderModel

        return tiny_tokenizer(), UMT5EncoderModel.from_pretrained(path).eval()
    return tiny_tokenizer(), tiny_text_encoder(LEARNED_WAN_CONFIG["text_dim"], seed=7)


def learned_wan_pipeline(weights: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """A whole ``WanPipeline`` over the tiny Wan trained on this world (weights shipped in the package).

    Call it as a Wan pipeline at this world's size::

        pipe = learned_wan_pipeline()
        video = pipe("a red circle moves left", height=32, width=32, num_frames=29,
                     num_inference_steps=20, guidance_scale=4.0, max_sequence_length=16).frames[0]
        # -> [29, 32, 32, 3] in [0, 1]; GENERATE_DEFAULTS holds these arguments
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    path = Path(weights) if weights is not None else WEIGHTS_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no learned weights at {path}: train them with "
                                "`python -m sparse_vdit.testing.train_shapes --out {path}`")
    transformer = WanTransformer3DModel.from_pretrained(path, torch_dtype=dtype).eval()
    tokenizer, encoder = shapes_text_encoder(path)
    return WanPipeline(tokenizer=tokenizer, text_encoder=encoder.to(dtype), transformer=transformer,
                       vae=frame_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT))


GENERATE_DEFAULTS = dict(height=SIZE, width=SIZE, num_frames=VIDEO_FRAMES, num_inference_steps=20,
                         guidance_scale=4.0, max_sequence_length=MAX_TEXT_TOKENS)


# ---------------------------------------------------------------------------- reading frames back
def object_pixels(frame: torch.Tensor, threshold: float = 0.35) -> torch.Tensor:
    """bool ``[H, W]``: the saturated pixels of one RGB frame ``[3, H, W]`` in [0, 1] (the background is gray)."""
    return (frame.max(0).values - frame.min(0).values) > threshold


def track(video: torch.Tensor):
    """Per frame of ``video`` (``[F, H, W, 3]`` or ``[F, 3, H, W]``, values in [0, 1]): the object's
    centroid ``(y, x)`` (NaN where no object pixel is found) and the mean colour of its pixels."""
    v = torch.as_tensor(video, dtype=torch.float32)
    if v.shape[-1] == 3:
        v = v.permute(0, 3, 1, 2)
    centroids, colours = [], []
    for frame in v:
        m = object_pixels(frame)
        if int(m.sum()) < 4:
            centroids.append(torch.full((2,), float("nan")))
            colours.append(torch.full((3,), float("nan")))
            continue
        centroids.append(centroid(m))
        colours.append(frame[:, m].mean(1))
    return torch.stack(centroids), torch.stack(colours)


def centroid(weight: torch.Tensor) -> torch.Tensor:
    """``(y, x)`` of a non-negative weight map ``[H, W]``, pixel ``(i, j)`` at ``(i, j)``; a bool map
    gives its pixels' mean position (exactly: integer sums), a soft one (an estimate's saturation,
    say) its weighted mean. NaN where the map weighs nothing."""
    w = weight.to(torch.float32)
    ys = torch.arange(w.shape[0], dtype=torch.float32)[:, None]
    xs = torch.arange(w.shape[1], dtype=torch.float32)[None, :]
    return torch.stack([(w * ys).sum(), (w * xs).sum()]) / w.sum()


def travel(centroids: torch.Tensor) -> torch.Tensor | None:
    """The object's move ``(dy, dx)`` from the first frame it is found in to the last (``centroids``
    from :func:`track`), or None where it is found in fewer than two frames."""
    idx = (~torch.isnan(centroids[:, 0])).nonzero().flatten()
    return centroids[idx[-1]] - centroids[idx[0]] if len(idx) >= 2 else None


def describe(video: torch.Tensor) -> tuple[str | None, str | None]:
    """(colour, direction) that the frames show, or None where they show none: the colour nearest the
    object's mean colour, and the axis and sign of its centroid's travel from first to last frame."""
    centroids, colours = track(video)
    ok = ~torch.isnan(centroids[:, 0])
    if int(ok.sum()) < max(2, len(ok) // 2):
        return None, None
    mean = colours[ok].mean(0) * 2 - 1  # back to [-1, 1]
    colour = min(COLOURS, key=lambda c: float(((torch.tensor(COLOURS[c]) - mean) ** 2).sum()))
    dy, dx = travel(centroids).tolist()
    if max(abs(dy), abs(dx)) < 3.0:
        return colour, None
    direction = ("down" if dy > 0 else "up") if abs(dy) > abs(dx) else ("right" if dx > 0 else "left")
    return colour, direction


def video_tensor(frames) -> torch.Tensor:
    """The pipeline's ``frames[i]`` (numpy ``[F, H, W, 3]``) as a float tensor."""
    return torch.as_tensor(frames, dtype=torch.float32)
