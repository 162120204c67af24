"""Pictures a person reads at a glance: block masks (and, for plans, heatmaps).

matplotlib is imported lazily (``pip install sparse_vdit[plot]``) and used through its object
interface only (``matplotlib.figure.Figure``): no pyplot, no ``matplotlib.use``, nothing changed in
the caller's process.
"""
from __future__ import annotations

import math
import pathlib
import textwrap

import torch

from .ops import BlockSparseMask


def figure(rows: int = 1, cols: int = 1, figsize: tuple[float, float] = (4, 3), dpi: int = 100):
    """(Figure, axes [rows, cols]) drawn off-screen; save with ``fig.savefig(path)``."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("pictures need matplotlib: pip install 'sparse_vdit[plot]'") from e
    fig = Figure(figsize=figsize, dpi=dpi)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def wrap_title(text: str, fig_width_in: float, fontsize: float = 9) -> str:
    """``text`` wrapped to the figure's width, so a long title is never cut off."""
    chars = max(20, int(fig_width_in * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars))


def _frame_starts(layout, num_blocks: int, most: int = 64) -> list[tuple[int, str]]:
    """(block index, colour): where each latent frame's blocks start (frame-major layouts whose tiles
    hold one frame or a few) and where the text blocks start, for drawing; [] when the mask's blocks
    are not this layout's."""
    if layout.num_blocks != num_blocks or layout.order != "fhw":
        return []
    first = layout.frame_range_of_blocks()[:, 0]
    starts = [i for i in range(1, first.numel()) if first[i] != first[i - 1]]
    out = [(i, "tab:red") for i in starts] if len(starts) <= most else []
    if layout.num_text_blocks:
        out.append((layout.num_video_blocks, "tab:blue"))  # text blocks follow the video blocks
    return out


def save_mask_png(
    mask: BlockSparseMask | torch.Tensor,
    path: str | pathlib.Path,
    heads: list[int] | None = None,
    batch: int = 0,
    title: str | None = None,
    names: list[str] | None = None,
    dpi: int = 100,
    layout=None,
) -> pathlib.Path:
    """Save one head's block mask, or a grid of heads, as a PNG (white = visited key block).

    ``mask`` is a BlockSparseMask or a boolean block matrix [H, Mq, Mk] / [Mq, Mk]; ``names``
    optionally labels each head (e.g. the spec name). Each head is drawn with at least one pixel per
    block, so no block is averaged away and equal heads look equal, however large the mask. With
    the mask's ``layout`` (frame-major), thin lines mark where each latent frame's blocks start and
    where the text blocks begin.
    """
    from matplotlib.patches import Patch

    if isinstance(mask, BlockSparseMask):
        if not 0 <= batch < mask.batch:
            raise ValueError(f"batch {batch} out of range: the mask has batch dimension {mask.batch}")
        dense = mask.to_dense()[batch].cpu()
    elif isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() in (2, 3):
        dense = mask.cpu() if mask.dim() == 3 else mask.cpu().unsqueeze(0)
    else:
        raise TypeError("mask must be a BlockSparseMask or a bool block matrix [H, Mq, Mk] / [Mq, Mk], got "
                        f"{type(mask).__name__}{' ' + str(mask.dtype) if isinstance(mask, torch.Tensor) else ''}")
    heads = list(range(dense.shape[0])) if heads is None else list(heads)
    bad = [h for h in heads if not 0 <= h < dense.shape[0]]
    if bad:
        raise ValueError(f"heads {bad} out of range: the mask has {dense.shape[0]} heads")
    Mq, Mk = dense.shape[1:]
    panel = max(4.8, 1.15 * max(Mq, Mk) / dpi + 0.8)  # inches: >= 1 pixel per block plus room for labels
    bounds = _frame_starts(layout, Mq) if layout is not None else []
    cols = min(len(heads), 4 if panel <= 4 else 2)
    rows = math.ceil(len(heads) / cols)
    fig, axes = figure(rows, cols, figsize=(panel * cols, panel * rows + 0.9), dpi=dpi)
    for ax in axes.flat:
        ax.axis("off")
    for ax, h in zip(axes.flat, heads):
        d = dense[h].float()
        ax.imshow(d.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
        for b, colour in bounds:
            ax.axhline(b - 0.5, color=colour, lw=0.5, alpha=0.8)
            ax.axvline(b - 0.5, color=colour, lw=0.5, alpha=0.8)
        label = names[h] if names and h < len(names) else f"head {h}"
        ax.set_title(f"{label}\ndensity {d.mean():.3f} ({Mq}x{Mk} blocks)", fontsize=8)
        ax.axis("on")
        ax.set_xlabel("key block", fontsize=7)
        ax.set_ylabel("query block", fontsize=7)
        ax.tick_params(labelsize=6)
    legend = [Patch(facecolor="white", edgecolor="black", label="visited key block"),
              Patch(facecolor="black", edgecolor="black", label="skipped")]
    if bounds:
        legend.append(Patch(facecolor="tab:red", label="frame starts"))
        if any(c == "tab:blue" for _, c in bounds):
            legend.append(Patch(facecolor="tab:blue", label="text blocks"))
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=7, frameon=False)
    top = 1.0
    if title:
        wrapped = wrap_title(title, panel * cols)
        fig.suptitle(wrapped, fontsize=9)
        top = 1.0 - (0.25 + 0.16 * wrapped.count("\n")) / (panel * rows + 0.9)
    fig.tight_layout(rect=(0, 0.4 / (panel * rows + 0.9), 1, top), h_pad=2.5)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
