"""PSNR and SSIM against definitions written out here (loops over windows, no convolution)."""
import math

import torch

from sparse_vdit.analysis.quality import psnr, relative_error, ssim


def _ssim_by_loops(a, b, size=11, sigma=1.5, peak=1.0):
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    w = g[:, None] * g[None, :]
    w = w / w.sum()
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    vals = []
    for f in range(a.shape[0]):
        for c in range(a.shape[1]):
            for i in range(a.shape[2] - size + 1):
                for j in range(a.shape[3] - size + 1):
                    p, q = a[f, c, i:i + size, j:j + size], b[f, c, i:i + size, j:j + size]
                    mp, mq = (w * p).sum(), (w * q).sum()
                    vp, vq = (w * (p - mp) ** 2).sum(), (w * (q - mq) ** 2).sum()
                    cov = (w * (p - mp) * (q - mq)).sum()
                    vals.append(((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2)))
    return float(torch.stack(vals).mean())


def test_ssim_matches_the_definition_and_its_invariants():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 15, 14, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert abs(ssim(a, b) - _ssim_by_loops(a, b)) < 1e-9
    assert abs(ssim(a, a) - 1.0) < 1e-12
    assert abs(ssim(a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)) - ssim(a, b)) < 1e-12  # channels last


def test_psnr_and_relative_error():
    a = torch.zeros(4, 4, dtype=torch.float64)
    b = torch.full((4, 4), 0.1, dtype=torch.float64)
    assert abs(psnr(b, a) - 20.0) < 1e-9  # mse 0.01 -> 20 dB
    assert psnr(a, a) == math.inf
    assert abs(relative_error(b * 1.5, b) - 0.5) < 1e-12
