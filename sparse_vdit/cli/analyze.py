"""``sparse-vdit analyze``: the paper's findings (structure, sparsity, sinks, temperature) measured
on a model, written as analysis.json and pictures."""
from __future__ import annotations

import argparse

from .common import HelpFormatter, add_model_source, check_fraction, checked_tile_and_steps, read_prompts


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("analyze", help="measure structure, sparsity, sinks and temperature; write a report",
                       description=__doc__, formatter_class=HelpFormatter)
    add_model_source(p, "an embedded tiny model (no download): wan (the planted pipeline, default), learned "
                          "(the Wan trained on moving shapes), hunyuan_video, cogvideox, ltx_video or mochi")
    p.add_argument("--prompts", help="with --model: a text file, one prompt per line (two or more for similarity)")
    p.add_argument("--out", default="analysis", help="folder for analysis.json and the pictures")
    p.add_argument("--height", type=int, default=480, help="video height in pixels (with --model)")
    p.add_argument("--width", type=int, default=832, help="video width in pixels (with --model)")
    p.add_argument("--frames", type=int, default=81, help="video frames (with --model)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (the tiny models use at most 8)")
    p.add_argument("--tile", default="1,8,8", help="tile t,h,w in latent tokens")
    p.add_argument("--budget", type=float, default=0.05, help="error budget that marks unprunable layers")
    p.set_defaults(func=run)
    return p


def run(args, p) -> int:
    import torch

    import sparse_vdit as sv

    tile = checked_tile_and_steps(args, p)
    check_fraction(p, "--budget", args.budget)
    if args.tiny and args.prompts:
        p.error("--prompts goes with --model (the tiny models make their own inputs)")
    common = dict(out=args.out, budget=args.budget)
    if args.tiny and args.tiny not in ("wan", "learned"):
        from sparse_vdit.testing import FAMILIES, runner

        if args.tiny not in FAMILIES:
            p.error(f"--tiny {args.tiny!r}: valid families are {list(FAMILIES)}")
        steps = min(args.steps, 4)
        target, run_one = runner(args.tiny, steps)

        tile = (1, 4, 4) if args.tile == "1,8,8" else tile
        report = sv.analyze(target, run=run_one, num_prompts=2, num_inference_steps=steps, tile=tile, **common)
    elif args.tiny == "learned":
        from sparse_vdit.testing import shapes

        pipe = shapes.learned_wan_pipeline()
        pipe.set_progress_bar_config(disable=True)
        # Four training combinations that differ in colour, shape and direction: cross-prompt similarity
        # compares scenes that differ in everything a prompt says.
        scenes = [shapes.Scene("red", "circle", "left"), shapes.Scene("green", "square", "right"),
                  shapes.Scene("blue", "circle", "up"), shapes.Scene("yellow", "square", "down")]
        assert all(sc in shapes.TRAIN_SCENES for sc in scenes)
        prompts = [sc.prompt for sc in scenes]
        report = sv.analyze(pipe, prompts=prompts, negative_prompt="",
                            **{**shapes.GENERATE_DEFAULTS, "num_inference_steps": min(args.steps, 20)},
                            tile=(1, 4, 4) if args.tile == "1,8,8" else tile, **common)
    elif args.tiny:
        from sparse_vdit.testing import tiny_wan_pipeline

        pipe = tiny_wan_pipeline()
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(0)
        embeds = [torch.randn(1, 16, 64, generator=g) for _ in range(2)]
        report = sv.analyze(pipe, prompt_embeds=embeds, negative_prompt_embeds=torch.randn(1, 16, 64, generator=g),
                            height=256, width=256, num_frames=29, guidance_scale=5.0,
                            num_inference_steps=min(args.steps, 8), tile=(1, 4, 4) if args.tile == "1,8,8" else tile,
                            **common)
    else:
        if not args.prompts:
            p.error("--model needs --prompts FILE")
        prompts = read_prompts(args.prompts, p)
        pipe = sv.integration.load_pipeline(args.model)
        pipe.set_progress_bar_config(disable=True)
        report = sv.analyze(pipe, prompts=prompts, height=args.height, width=args.width, num_frames=args.frames,
                            num_inference_steps=args.steps, tile=tile, **common)
    for entry in report["layers"]:
        if not entry.get("measured"):
            continue
        sim = entry["cross_prompt_similarity"]
        print(f"layer {entry['layer']:3d}: cross-prompt similarity {sim if sim is None else round(sim, 3)}, "
              f"pruning error at {report['prune_fraction']:.0%} of key blocks "
              f"{entry['pruning_curve'][str(min(report['fractions'], key=lambda f: abs(f - report['prune_fraction'])))]:.3f}"
              f"{' (cannot be pruned)' if entry['cannot_be_pruned'] else ''}, top-1% key share "
              f"{entry['top1pct_share']:.3f}")
    print("saved:", ", ".join(report["files"]))
    return 0
