"""Pictures a person reads at a glance: block masks (and, for plans, heatmaps). matplotlib is
imported lazily (``pip install sparse_vdit[plot]``)."""
from __future__ import annotations

import math
import pathlib

import torch

from .ops import BlockSparseMask


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("pictures need matplotlib: pip install 'sparse_vdit[plot]'") from e
    return plt


def save_mask_png(
    mask: BlockSparseMask | torch.Tensor,
    path: str | pathlib.Path,
    heads: list[int] | None = None,
    batch: int = 0,
    title: str | None = None,
    names: list[str] | None = None,
) -> pathlib.Path:
    """Save one head's block mask, or a grid of heads, as a PNG (white = visited block).

    ``mask`` is a BlockSparseMask or a boolean block matrix [H, Mq, Mk] / [Mq, Mk]; ``names``
    optionally labels each head (e.g. the spec name).
    """
    if isinstance(mask, BlockSparseMask):
        dense = mask.to_dense()[batch].cpu()
    else:
        dense = mask.cpu()
        if dense.dim() == 2:
            dense = dense.unsqueeze(0)
    heads = list(range(dense.shape[0])) if heads is None else list(heads)
    bad = [h for h in heads if not 0 <= h < dense.shape[0]]
    if bad:
        raise ValueError(f"heads {bad} out of range: the mask has {dense.shape[0]} heads")
    plt = _plt()
    cols = min(len(heads), 4)
    rows = math.ceil(len(heads) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, h in zip(axes.flat, heads):
        d = dense[h].float()
        ax.imshow(d.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        label = names[h] if names and h < len(names) else f"head {h}"
        ax.set_title(f"{label}\ndensity {d.mean():.3f}", fontsize=8)
        ax.axis("on")
        ax.set_xlabel("key block", fontsize=7)
        ax.set_ylabel("query block", fontsize=7)
        ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
