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
    from ..viz import figure, wrap_title

    per_head = plan.metrics.get("per_head")
    if not per_head:
        raise ValueError("this plan has no calibration measurements (metrics['per_head']): save_report needs a plan "
                         "from sparse_vdit.calibrate")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    density = torch.tensor([[h["density"] for h in row] for row in per_head])
    error = torch.tensor([[h["error"] for h in row] for row in per_head])
    width = 4 + 0.35 * density.shape[1] * 2
    fig, axes = figure(1, 2, figsize=(width, 2.4 + 0.3 * density.shape[0]))
    budget = plan.metrics.get("error_budget")
    # the error scale runs to the budget (a dense head's error is 0), so equal colours mean equal errors
    err_max = max(float(error.max()), float(budget) if budget else 0.0) or 1.0
    for ax, data, title, cmap, vmax in ((axes[0, 0], density, "chosen density (1 = dense)", "viridis", 1.0),
                                        (axes[0, 1], error, f"error of the choice (budget {budget}; dense: 0)",
                                         "magma", err_max)):
        im = ax.imshow(data.numpy(), cmap=cmap, vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(data.shape[1]))
        ax.set_yticks(range(data.shape[0]))
        ax.tick_params(labelsize=7)
        ax.set_title(wrap_title(title, width / 2), fontsize=9)
        bar = fig.colorbar(im, ax=ax, fraction=0.046)
        bar.formatter.set_useOffset(False)  # no "1e-6" offset text over the panel title
        bar.formatter.set_scientific(False)
        bar.update_ticks()
    fig.suptitle(wrap_title(f"calibration: {plan.model.get('class', '')}, dense steps {plan.dense_steps}", width), fontsize=9)
    fig.tight_layout()
    heat = folder / "heatmap.png"
    fig.savefig(heat)

    records = plan.metrics.get("records", [])
    frames = max((f for r in records for hs in r["sink_frames"] for f in hs), default=-1) + 1
    sinks = torch.zeros(plan.num_layers, max(frames, 1))
    for r in records:
        for hs in r["sink_frames"]:
            for f in hs:
                sinks[r["layer"], f] += 1
    width = 4.5 + 0.3 * sinks.shape[1]
    fig, axes = figure(1, 1, figsize=(width, 2.4 + 0.3 * sinks.shape[0]))
    ax = axes[0, 0]
    if frames == 0:
        # Nothing to colour: say so, rather than draw a uniform map that reads as "sinks everywhere".
        ax.axis("off")
        ax.text(0.5, 0.5, f"no sink found\n(in {len(records)} measured layer calls)", ha="center", va="center",
                fontsize=11, transform=ax.transAxes)
    else:
        im = ax.imshow(sinks.numpy(), cmap="Reds", vmin=0, aspect="auto", interpolation="nearest")
        ax.set_xlabel("latent frame")
        ax.set_ylabel("layer")
        ax.set_xticks(range(sinks.shape[1]))
        ax.set_yticks(range(sinks.shape[0]))
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, label="heads x samples")
    ax.set_title(wrap_title("sink map: how often a frame's keys took >= sink_factor x their share of attention "
                            "(heads x sampled calls)", width), fontsize=9)
    fig.tight_layout()
    sink_path = folder / "sinks.png"
    fig.savefig(sink_path)
    measurements = folder / "measurements.json"
    measurements.write_text(json.dumps({"metrics": {k: v for k, v in plan.metrics.items() if k != "records"},
                                        "records": records}))
    return [heat, sink_path, measurements]
