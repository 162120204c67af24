"""``sparse-vdit edit``: attention-map transfer editing. Generates a source and a target prompt
together; in the chosen layers and steps the target takes the source's self-attention maps. Writes
both videos' frames side by side."""
from __future__ import annotations

import argparse
import pathlib


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("edit", help="attention-map transfer: the target generated with the source's attention maps",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local diffusers pipeline folder or a hub id (needs its weights)")
    src.add_argument("--tiny", action="store_true", help="the embedded tiny Wan pipeline (random prompt embeddings)")
    p.add_argument("--source", help="the source prompt (with --model)")
    p.add_argument("--target", help="the target prompt (with --model)")
    p.add_argument("--layers", default="all", help="'all', 'none' or comma-separated plan layers that transfer")
    p.add_argument("--steps", default="all", help="'all', 'none' or comma-separated denoising steps that transfer")
    p.add_argument("--num-steps", type=int, default=50, help="denoising steps (the tiny model uses at most 10)")
    p.add_argument("--plan", help="a plan JSON to generate with (sparse attention; the same masks for both)")
    p.add_argument("--height", type=int, default=480, help="video height in pixels (with --model)")
    p.add_argument("--width", type=int, default=832, help="video width in pixels (with --model)")
    p.add_argument("--frames", type=int, default=81, help="video frames (with --model)")
    p.add_argument("--seed", type=int, default=0, help="the shared starting noise")
    p.add_argument("--out", default="edit_out", help="folder for the side-by-side picture")
    p.set_defaults(func=run)
    return p


def _indices(text: str, name: str, p):
    if text == "all":
        return "all"
    if text == "none":
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"{name} takes 'all', 'none' or comma-separated ints, got {text!r}")


def save_side_by_side(source, target, path: pathlib.Path, title: str) -> pathlib.Path:
    """Four frames of each video, source above target. source, target: [F, C, H, W] in [0, 1]."""
    import torch

    from ..viz import figure, wrap_title

    idx = torch.linspace(0, source.shape[0] - 1, 4).round().long().tolist()
    fig, axes = figure(2, len(idx), figsize=(2.6 * len(idx), 5.6), dpi=70)
    for j, f in enumerate(idx):
        for i, (video, label) in enumerate(((source, "source"), (target, "target (source's attention)"))):
            axes[i, j].imshow(video[f].permute(1, 2, 0).clamp(0, 1).numpy())
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(label, fontsize=8)
        axes[0, j].set_title(f"frame {f}", fontsize=9)
    fig.suptitle(wrap_title(title, 2.6 * len(idx)), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def run(args, p) -> int:
    import torch

    import sparse_vdit as sv

    layers, steps = _indices(args.layers, "--layers", p), _indices(args.steps, "--steps", p)
    if args.num_steps < 1:
        p.error(f"--num-steps must be >= 1, got {args.num_steps}")
    plan = sv.SparsityPlan.load(args.plan) if args.plan else None
    kw = dict(layers=layers, steps=steps, plan=plan, seed=args.seed, output_type="pt")
    if args.tiny:
        from sparse_vdit.testing import tiny_wan_pipeline

        if args.source or args.target:
            p.error("--source / --target go with --model (the tiny model uses random prompt embeddings)")
        pipe = tiny_wan_pipeline()
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(args.seed + 1)
        es, et, neg = (torch.randn(1, 16, 64, generator=g) for _ in range(3))
        out = sv.edit.transfer(pipe, source_embeds=es, target_embeds=et, negative_prompt_embeds=neg, height=256,
                               width=256, num_frames=29, num_inference_steps=min(args.num_steps, 10),
                               guidance_scale=5.0, **kw)
        title = "tiny Wan (random weights): target generated with the source's attention maps"
    else:
        if not args.source or not args.target:
            p.error("--model needs --source PROMPT and --target PROMPT")
        pipe = sv.integration.load_pipeline(args.model)
        out = sv.edit.transfer(pipe, args.source, args.target, height=args.height, width=args.width,
                               num_frames=args.frames, num_inference_steps=args.num_steps, **kw)
        title = f"source: {args.source!r} / target: {args.target!r} with the source's attention maps"
    frames = out.frames
    source, target = frames[0].float().cpu(), frames[1].float().cpu()
    path = save_side_by_side(source, target, pathlib.Path(args.out) / "edit_side_by_side.png",
                             f"{title} (layers {args.layers}, steps {args.steps})")
    print(f"saved: {path}")
    return 0
