"""``sparse-vdit calibrate``: calibrate a plan for a diffusers pipeline and write it with a report."""
from __future__ import annotations

import argparse
import pathlib


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("calibrate", help="choose per-head masks for a model and write the plan with a report",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local diffusers pipeline folder or a hub id (needs its weights)")
    src.add_argument("--tiny", nargs="?", const="wan", metavar="FAMILY",
                     help="an embedded tiny model with random weights (no download): wan (a whole pipeline with "
                          "planted local attention; the default), hunyuan_video, cogvideox, ltx_video or mochi "
                          "(a transformer fed random latents)")
    p.add_argument("--prompts", help="a text file, one prompt per line (with --model)")
    p.add_argument("--out", default="plan.json")
    p.add_argument("--report", default=None, help="folder for report pictures (default: beside --out)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--candidates", default="sliding_tile,radial,spatial,temporal")
    p.add_argument("--error-budget", type=float, default=0.05)
    p.add_argument("--tile", default="1,8,8")
    p.add_argument("--checkpoint", default=None, help="partial results file, to stop and resume")
    p.add_argument("--global-budget", type=float, default=None,
                   help="bound on the end-to-end output error, checked on the last prompt (held out)")
    p.set_defaults(func=run)
    return p


def run(args, p) -> int:
    import torch

    import sparse_vdit as sv

    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    tile = tuple(int(x) for x in args.tile.split(","))
    if args.tiny and args.tiny != "wan":
        from sparse_vdit.testing import FAMILIES, make

        if args.tiny not in FAMILIES:
            p.error(f"--tiny {args.tiny!r}: valid families are {list(FAMILIES)}")
        target, call = make(args.tiny)
        steps = min(args.steps, 4)
        timesteps = torch.linspace(999, 50, steps).tolist()

        def run(model, i):
            with torch.no_grad():
                for t in timesteps:
                    out = call(model, batch=1, t=t, seed=i)
            return out

        n = 3 if args.global_budget else 2
        kw = dict(run=run, num_prompts=n - (1 if args.global_budget else 0))
        tile = (1, 4, 4) if args.tile == "1,8,8" else tile
    elif args.tiny:
        from sparse_vdit.testing import tiny_wan_pipeline

        target = pipe = tiny_wan_pipeline()
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(0)
        embeds = [torch.randn(1, 16, 64, generator=g) for _ in range(3 if args.global_budget else 2)]
        kw = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.randn(1, 16, 64, generator=g), height=256,
                  width=256, num_frames=29, guidance_scale=5.0)
        steps = min(args.steps, 8)
        tile = (1, 4, 4) if args.tile == "1,8,8" else tile
    else:
        if not args.prompts:
            p.error("--model needs --prompts FILE")
        prompts = [line.strip() for line in pathlib.Path(args.prompts).read_text().splitlines() if line.strip()]
        target = pipe = sv.integration.load_pipeline(args.model)
        pipe.set_progress_bar_config(disable=True)
        kw = dict(prompts=prompts, height=args.height, width=args.width, num_frames=args.frames)
        steps = args.steps
    plan = sv.calibrate(target, num_inference_steps=steps, candidates=candidates, error_budget=args.error_budget,
                        tile=tile, checkpoint=args.checkpoint, global_budget=args.global_budget, **kw)
    out = plan.save(args.out)
    report = pathlib.Path(args.report) if args.report else out.parent / (out.stem + "_report")
    paths = sv.calibration.save_report(plan, report)
    print(plan.summary())
    print(f"calibrated in {plan.metrics['seconds']} s; expected attention cost {plan.metrics['expected_attention_cost']:.3f} "
          "of dense")
    print(f"saved: {out}, {', '.join(map(str, paths))}")
    return 0
