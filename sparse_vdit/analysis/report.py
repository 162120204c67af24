"""The analysis report: ``analysis.json`` and one picture per finding."""
from __future__ import annotations

import json
import pathlib

import torch


def _save(fig, folder: pathlib.Path, name: str, paths: list) -> None:
    fig.tight_layout()
    paths.append(folder / name)
    fig.savefig(paths[-1])


def save_analysis(report: dict, folder) -> list[pathlib.Path]:
    """Write ``analysis.json``, ``structure.png``, ``sparsity.png``, ``sinks.png`` and
    ``temperature.png`` into ``folder``; returns the paths."""
    from ..viz import figure, wrap_title

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = [entry for entry in report["layers"] if entry.get("measured")]
    if not layers:
        raise ValueError("the analysis measured no layer (give more steps or sample steps inside the schedule)")
    ids = [entry["layer"] for entry in layers]
    paths = []

    # Structure: cross-prompt similarity per layer, and the distance profile of two layers.
    sim = [entry["cross_prompt_similarity"] for entry in layers]
    fig, axes = figure(1, 3, figsize=(13, 3.8))
    ax = axes[0, 0]
    if all(s is not None for s in sim):
        ax.bar(ids, sim, color="tab:blue")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("cosine similarity across prompts")
    else:
        ax.text(0.5, 0.5, "one prompt: no cross-prompt similarity\n(give two or more prompts)", ha="center",
                va="center", transform=ax.transAxes, fontsize=9)
    ax.set_xlabel("layer")
    ax.set_title("structure: are attention maps alike across prompts?", fontsize=9)
    for ax, entry in zip(axes[0, 1:], (layers[0], layers[-1])):
        profile = torch.tensor(entry["profile_mean"]).mean(0)  # [Gt, Gs] over heads
        im = ax.imshow(profile.clamp(min=1e-6).log10().numpy(), cmap="viridis", aspect="auto", origin="lower")
        ax.set_xlabel("spatial distance (tiles)")
        ax.set_ylabel("frame distance (tiles)")
        ax.set_title(f"layer {entry['layer']}: attention mass by distance (log10)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(wrap_title(f"{report['model']}: {report.get('layout') or ''}", 13), fontsize=9)
    _save(fig, folder, "structure.png", paths)

    # Sparsity: pruning sensitivity per layer, coloured by depth; layers that cannot be pruned solid,
    # the others dashed.
    import matplotlib as mpl

    fracs = report["fractions"]
    fig, axes = figure(1, 1, figsize=(6.5, 4.2))
    ax = axes[0, 0]
    cmap = mpl.colormaps["viridis"]
    depth = max(len(layers) - 1, 1)
    for i, entry in enumerate(layers):
        curve = [entry["pruning_curve"][str(f)] for f in fracs]
        bad = entry["cannot_be_pruned"]
        ax.plot(fracs, curve, "o-" if bad else "o--", color=cmap(0.9 * i / depth), alpha=0.9 if bad else 0.6,
                ms=4, label=f"layer {entry['layer']}" + (" (cannot be pruned)" if bad else "")
                if len(layers) <= 12 else None)
    ax.axhline(report["budget"], color="gray", ls=":", label=f"budget {report['budget']}")
    ax.axvline(report["prune_fraction"], color="gray", ls="--", lw=0.8)
    ax.set_xlabel("kept fraction of key blocks (top-k by attention mass)")
    ax.set_ylabel("relative output error (mean over heads)")
    ax.set_yscale("log")
    ax.set_title("sparsity: pruning sensitivity per layer (solid: cannot be pruned within the budget)", fontsize=9)
    if len(layers) > 12:  # a legend entry per layer would cover the plot: a depth colour bar instead
        sm = mpl.cm.ScalarMappable(cmap=cmap, norm=mpl.colors.Normalize(0, depth / 0.9))
        fig.colorbar(sm, ax=ax, fraction=0.046, label="layer")
    ax.legend(fontsize=6, ncol=2)
    _save(fig, folder, "sparsity.png", paths)

    # Sinks: share of attention on the top 1% of key blocks, and on the first text token.
    fig, axes = figure(1, 1, figsize=(6.5, 3.8))
    ax = axes[0, 0]
    share = [entry["top1pct_share"] for entry in layers]
    first = [entry["first_text_token_share"] for entry in layers]
    has_text = any(f is not None for f in first)
    width = 0.4 if has_text else 0.7
    ax.bar([i - (0.2 if has_text else 0.0) for i in ids], share, width=width, color="tab:purple",
           label="top 1% of key blocks")
    if has_text:
        ax.bar([i + 0.2 for i in ids], [f or 0.0 for f in first], width=width, color="tab:orange",
               label="first text token alone")
    uniform = report.get("uniform_top1pct_share")
    if uniform:
        ax.axhline(uniform, color="gray", ls=":", label=f"uniform attention ({uniform:.3f})")
    top = max(share + [f or 0.0 for f in first] + [uniform or 0.0])
    ax.set_ylim(0, min(1.0, max(0.05, 1.3 * top)))
    ax.set_xticks(ids)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of all attention")
    ax.legend(fontsize=7)
    title = "sinks: how much attention a few keys take"
    if not has_text:
        title += " (no text tokens in this self-attention)"
    ax.set_title(title, fontsize=9)
    _save(fig, folder, "sinks.png", paths)

    # Temperature: error of the fixed mask against dense attention as the logit temperature changes.
    temps = report["temperatures"]
    fig, axes = figure(1, 1, figsize=(6.5, 4.0))
    ax = axes[0, 0]
    for entry in layers:
        ax.plot(temps, [entry["temperature_error"][str(t)] for t in temps], "o-", alpha=0.7,
                label=f"layer {entry['layer']}")
    ax.axhline(report["budget"], color="gray", ls=":", label=f"budget {report['budget']}")
    ax.set_xlabel("logit temperature T (logits / T; 1 = the model's own)")
    ax.set_ylabel("error of the fixed mask vs dense (mean over heads)")
    ax.set_yscale("log")
    spec = report["fixed_mask"]
    ax.set_title(wrap_title(f"temperature: error of {spec['kind']} {spec.get('window', '')} as T changes", 6.5),
                 fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    _save(fig, folder, "temperature.png", paths)

    paths.append(folder / "analysis.json")
    paths[-1].write_text(json.dumps({k: v for k, v in report.items() if k != "files"}, indent=1))
    return paths
