"""How close a sparse video is to the dense one: PSNR and SSIM of decoded frames (what the peers
publish), and the relative error of latents."""
from __future__ import annotations

import math

import torch


def psnr(video: torch.Tensor, reference: torch.Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``video`` against ``reference`` (same shape, values in
    [0, peak]); inf when they are equal."""
    mse = float(((video.double() - reference.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(video: torch.Tensor, reference: torch.Tensor, peak: float = 1.0, window: int = 11) -> float:
    """Mean structural similarity (Wang et al. 2004: 11 x 11 Gaussian window, sigma 1.5, K1 0.01,
    K2 0.03, valid positions only) over frames and channels. ``video``, ``reference``: ``[F, C, H, W]``
    or ``[F, H, W, C]`` (channels last when the last axis is 3), values in [0, peak]."""
    a, b = video.double(), reference.double()
    if a.shape != b.shape:
        raise ValueError(f"video and reference must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() != 4:
        raise ValueError(f"videos must be [F, C, H, W] or [F, H, W, C], got {tuple(a.shape)}")
    if a.shape[-1] == 3 and a.shape[1] != 3:
        a, b = a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2)
    F, C, H, W = a.shape
    size = min(window, H, W)
    w = _gaussian_window(size).to(a.device)[None, None]
    x, y = a.reshape(F * C, 1, H, W), b.reshape(F * C, 1, H, W)

    def blur(t):
        return torch.nn.functional.conv2d(t, w)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """``||x - reference|| / ||reference||`` (Frobenius)."""
    return float((x.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))
