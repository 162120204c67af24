"""Calibration report pictures: a layer x head heatmap of chosen density and error, and a sink map."""
from __future__ import annotations

import json
import pathlib

import torch

from ..plan import SparsityPlan


def save_report(plan: SparsityPlan, folder: str | pathlib.Path) -> list[pathlib.Path]:
    """Write ``heatmap.png`` (chosen density and error per layer x head), ``sinks.png`` (how often
    each latent frame was detected as a sink, per layer) and ``measurements.json`` (every record
    behind the decisions) into ``folder``; returns the paths."""
    from ..viz import _plt

    per_head = plan.metrics.get("per_head")
    if not per_head:
        raise ValueError("this plan has no calibration measurements (metrics['per_head'])")
    plt = _plt()
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    density = torch.tensor([[h["density"] for h in row] for row in per_head])
    error = torch.tensor([[h["error"] for h in row] for row in per_head])
    fig, axes = plt.subplots(1, 2, figsize=(4 + 0.35 * density.shape[1] * 2, 2 + 0.3 * density.shape[0]), squeeze=False)
    for ax, data, title, cmap, vmax in ((axes[0, 0], density, "chosen density (1 = dense)", "viridis", 1.0),
                                        (axes[0, 1], error, f"error of the choice (budget {plan.metrics.get('error_budget')})",
                                         "magma", max(float(error.max()), 1e-6))):
        im = ax.imshow(data.numpy(), cmap=cmap, vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"calibration: {plan.model.get('class', '')}, dense steps {plan.dense_steps}", fontsize=9)
    fig.tight_layout()
    heat = folder / "heatmap.png"
    fig.savefig(heat, dpi=100)
    plt.close(fig)

    records = plan.metrics.get("records", [])
    frames = max((f for r in records for hs in r["sink_frames"] for f in hs), default=-1) + 1
    sinks = torch.zeros(plan.num_layers, max(frames, 1))
    for r in records:
        for hs in r["sink_frames"]:
            for f in hs:
                sinks[r["layer"], f] += 1
    fig, ax = plt.subplots(figsize=(4 + 0.3 * sinks.shape[1], 2 + 0.3 * sinks.shape[0]))
    im = ax.imshow(sinks.numpy(), cmap="Reds", aspect="auto", interpolation="nearest")
    ax.set_xlabel("latent frame")
    ax.set_ylabel("layer")
    ax.set_title("sink map: heads x samples that found the frame a sink", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    sink_path = folder / "sinks.png"
    fig.savefig(sink_path, dpi=100)
    plt.close(fig)
    measurements = folder / "measurements.json"
    measurements.write_text(json.dumps({"metrics": {k: v for k, v in plan.metrics.items() if k != "records"},
                                        "records": records}))
    return [heat, sink_path, measurements]
