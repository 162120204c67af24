"""``sparse-vdit edit``: attention-map transfer editing. Generates a source and a target prompt
together; in the chosen layers and denoising steps the target takes the source's self-attention
maps. Writes the source, the target on its own, the target with the source's attention, and the
difference the transfer made."""
from __future__ import annotations

import argparse

import pathlib

from .common import HelpFormatter


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("edit", help="attention-map transfer: the target generated with the source's attention maps",
                       description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local diffusers pipeline folder or a hub id (needs its weights)")
    src.add_argument("--tiny", action="store_true",
                     help="the embedded tiny Wan trained on moving shapes (32x32, 29 frames; CPU is fine)")
    p.add_argument("--source", help="the source prompt (--tiny: 'a red circle moves right')")
    p.add_argument("--target", help="the target prompt (--tiny: 'a blue square moves right')")
    p.add_argument("--layers", default="all", help="'all', 'none' or comma-separated plan layers that transfer")
    p.add_argument("--transfer-steps", default="all",
                   help="'all', 'none' or comma-separated denoising steps where attention transfers")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (the tiny model uses at most 20)")
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


def save_side_by_side(source, own, target, path: pathlib.Path, title: str) -> pathlib.Path:
    """Four frames of each video in rows: the source, the target with its own attention, the target
    with the source's attention, and |transferred - own| (scaled to its largest value, so the rows
    show where the transfer changed the target). Each video: [F, C, H, W] in [0, 1]."""
    import torch

    from ..viz import figure, wrap_title

    diff = (target - own).abs().mean(1, keepdim=True)
    scale = float(diff.max()) or 1.0
    rows = ((source, "source"), (own, "target, own attention"), (target, "target, source's attention"),
            (diff.expand_as(target) / scale, f"|difference| (max {scale:.2f})"))
    idx = torch.linspace(0, source.shape[0] - 1, 4).round().long().tolist()
    fig, axes = figure(len(rows), len(idx), figsize=(2.4 * len(idx), 2.3 * len(rows) + 0.6), dpi=80)
    for j, f in enumerate(idx):
        for i, (video, label) in enumerate(rows):
            axes[i, j].imshow(video[f].permute(1, 2, 0).clamp(0, 1).numpy(),
                              interpolation="nearest", cmap=None)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(label, fontsize=8)
        axes[0, j].set_title(f"frame {f}", fontsize=9)
    fig.suptitle(wrap_title(title, 2.4 * len(idx)), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def run(args, p) -> int:
    import torch

    import sparse_vdit as sv

    layers = _indices(args.layers, "--layers", p)
    transfer_steps = _indices(args.transfer_steps, "--transfer-steps", p)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    plan = sv.SparsityPlan.load(args.plan) if args.plan else None
    kw = dict(layers=layers, transfer_steps=transfer_steps, plan=plan, seed=args.seed, output_type="pt")
    if args.tiny:
        from sparse_vdit.testing import shapes

        source_prompt = args.source or "a red circle moves right"
        target_prompt = args.target or "a blue square moves right"
        pipe = shapes.learned_wan_pipeline()
        gen = {**shapes.GENERATE_DEFAULTS, "num_inference_steps": min(args.steps, 20)}
        title = f"tiny Wan (learned): source {source_prompt!r}, target {target_prompt!r}"
    else:
        if not args.source or not args.target:
            p.error("--model needs --source PROMPT and --target PROMPT")
        source_prompt, target_prompt = args.source, args.target
        pipe = sv.integration.load_pipeline(args.model)
        gen = dict(height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps)
        title = f"source {source_prompt!r}, target {target_prompt!r}"
    print(f"generating source and target with the source's attention ({gen['num_inference_steps']} steps), "
          "then the target on its own", flush=True)
    out = sv.edit.transfer(pipe, source_prompt, target_prompt, **gen, **kw)
    own = sv.edit.transfer(pipe, source_prompt, target_prompt, **gen, **{**kw, "layers": None})
    frames = out.frames
    source, target = frames[0].float().cpu(), frames[1].float().cpu()
    own_target = own.frames[1].float().cpu()
    path = save_side_by_side(source, own_target, target, pathlib.Path(args.out) / "edit_side_by_side.png",
                             f"{title} (layers {args.layers}, transfer steps {args.transfer_steps})")
    print(f"saved: {path}")
    return 0
