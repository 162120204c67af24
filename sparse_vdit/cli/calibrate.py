"""``sparse-vdit calibrate``: calibrate a plan for a diffusers pipeline and write it with a report."""
from __future__ import annotations

import argparse
import pathlib

from .common import HelpFormatter, add_model_source, check_fraction, checked_tile_and_steps, read_prompts
from .inspect import add_layout_options


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("calibrate", help="choose per-head masks for a model and write the plan with a report",
                       description=__doc__, formatter_class=HelpFormatter)
    add_model_source(p, "an embedded tiny model (no download): shapes (the tiny Wan trained on moving shapes, "
                          "its attention learned: calibrates on two of its training prompts), or one with random "
                          "weights: wan (a whole pipeline with planted local attention; the default), "
                          "hunyuan_video, cogvideox, ltx_video or mochi (a transformer fed random latents)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--prompts", help="with --model: a text file, one prompt per line")
    text.add_argument("--prompt-embeds", metavar="FILE.pt",
                      help="with --model: torch.save'd prompt embeddings instead of text: a tensor [P, tokens, width] "
                           "or a list of [1, tokens, width], or a dict with 'prompt_embeds' and optionally "
                           "'negative_prompt_embeds' [1, tokens, width] (for a pipeline without a text encoder)")
    p.add_argument("--out", default="plan.json", help="the plan file to write")
    p.add_argument("--report", default=None, help="folder for the report pictures (default: beside --out)")
    p.add_argument("--height", type=int, default=480, help="video height in pixels (with --model)")
    p.add_argument("--width", type=int, default=832, help="video width in pixels (with --model)")
    p.add_argument("--frames", type=int, default=81, help="video frames (with --model)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (the tiny models use at most 8)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the pipeline's own)")
    p.add_argument("--candidates", default="sliding_tile,radial,spatial,temporal",
                   help="comma-separated mask kinds to try per head (dense is always the fallback); 'dynamic' "
                        "selects key blocks per call from q and k, its selection counted in its cost")
    p.add_argument("--temperatures", default="",
                   help="comma-separated softmax temperatures to try besides 1 (e.g. 1.1,1.25): a head keeps one "
                        "only where it lowers the error of its chosen mask")
    p.add_argument("--ladders", action="store_true",
                   help="search each candidate kind's ladder of parameters (window sizes, radial bands, ...) "
                        "instead of its default alone")
    p.add_argument("--error-budget", type=float, default=0.05,
                   help="largest relative output error per head, in (0, 1)")
    p.add_argument("--target-density", type=float, default=None,
                   help="spend this fraction of dense attention, in (0, 1], where it lowers the heads' summed "
                        "error most, instead of the cheapest mask within --error-budget per head (masks over "
                        "the budget still stay out: pass a loose one, e.g. 0.5)")
    p.add_argument("--tile", default="1,8,8", help="tile t,h,w in latent tokens (volume a power of two >= 16 "
                   "unless --block is given; 0: the whole axis)")
    add_layout_options(p)
    p.add_argument("--checkpoint", default=None, help="partial results file, to stop and resume")
    p.add_argument("--global-budget", type=float, default=None,
                   help="bound on the end-to-end output error, checked on the last prompt (held out)")
    p.set_defaults(func=run)
    return p


def _load_embeds(path: pathlib.Path):
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user error
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"--prompt-embeds {path}: not a torch.save file of tensors ({type(e).__name__}: {first[:120]})") from None
    negative = None
    if isinstance(data, dict):
        if "prompt_embeds" not in data:
            raise ValueError(f"--prompt-embeds {path}: a dict needs the key 'prompt_embeds' (got {sorted(data)})")
        data, negative = data["prompt_embeds"], data.get("negative_prompt_embeds")
    if isinstance(data, torch.Tensor) and data.dim() == 3:
        data = [x.unsqueeze(0) for x in data]
    if not isinstance(data, (list, tuple)) or not data:
        raise ValueError(f"--prompt-embeds {path}: expected a tensor [P, tokens, width] or a list of [1, tokens, width]")
    return list(data), negative


def run(args, p) -> int:
    import torch

    import sparse_vdit as sv

    tile = checked_tile_and_steps(args, p)
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    try:
        for c in candidates:
            sv.masks.normalize_spec(c)
    except ValueError as e:
        p.error(str(e))
    try:
        temperatures = tuple(float(t) for t in args.temperatures.split(",") if t.strip())
    except ValueError:
        p.error(f"--temperatures must be comma-separated numbers, got {args.temperatures!r}")
    check_fraction(p, "--error-budget", args.error_budget)
    if args.target_density is not None and not 0 < args.target_density <= 1:
        p.error(f"--target-density must lie in (0, 1], got {args.target_density}")
    if args.global_budget is not None and not args.global_budget > 0:
        p.error(f"--global-budget must be > 0, got {args.global_budget}")
    if args.tiny and (args.prompts or args.prompt_embeds):
        p.error("--prompts / --prompt-embeds go with --model (the tiny models make their own inputs)")
    if args.tiny == "shapes":
        from sparse_vdit.testing import shapes

        target = pipe = shapes.learned_wan_pipeline()
        steps = min(args.steps, 20)
        prompts = [shapes.TRAIN_SCENES[0].prompt, shapes.TRAIN_SCENES[18].prompt]
        if args.global_budget:
            prompts.append(shapes.TRAIN_SCENES[9].prompt)
        gen = {k: v for k, v in shapes.GENERATE_DEFAULTS.items() if k != "num_inference_steps"}
        kw = dict(prompts=prompts, negative_prompt="", **gen)
        tile = (1, 4, 4) if args.tile == "1,8,8" else tile
        print(f"calibrating the learned tiny Wan on {prompts}, {steps} steps", flush=True)
    elif args.tiny and args.tiny != "wan":
        from sparse_vdit.testing import FAMILIES, runner

        if args.tiny not in FAMILIES:
            p.error(f"--tiny {args.tiny!r}: valid are {['shapes', 'wan', *[f for f in FAMILIES if f != 'wan']]}")
        steps = min(args.steps, 4)
        target, run = runner(args.tiny, steps)

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
        for name in ("height", "width", "frames"):
            if getattr(args, name) < 1:
                p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
        if args.prompts:
            kw = dict(prompts=read_prompts(args.prompts, p))
        elif args.prompt_embeds:
            path = pathlib.Path(args.prompt_embeds)
            if not path.is_file():
                p.error(f"--prompt-embeds {path}: no such file")
            embeds, negative = _load_embeds(path)
            kw = dict(prompt_embeds=embeds, negative_prompt_embeds=negative)
        else:
            p.error("--model needs --prompts FILE or --prompt-embeds FILE.pt")
        target = pipe = sv.integration.load_pipeline(args.model)
        pipe.set_progress_bar_config(disable=True)
        kw.update(height=args.height, width=args.width, num_frames=args.frames)
        if args.guidance_scale is not None:
            kw["guidance_scale"] = args.guidance_scale
        steps = args.steps
    plan = sv.calibrate(target, num_inference_steps=steps, candidates=candidates, ladders=args.ladders,
                        error_budget=args.error_budget, target_density=args.target_density,
                        temperatures=temperatures, tile=tile, block=args.block, order=args.order, checkpoint=args.checkpoint, global_budget=args.global_budget, **kw)
    out = plan.save(args.out)
    report = pathlib.Path(args.report) if args.report else out.parent / (out.stem + "_report")
    paths = sv.calibration.save_report(plan, report)
    print(plan.summary())
    for line in plan.metrics.get("dense_reasons", []):
        print("  " + line)
    print(f"calibrated in {plan.metrics['seconds']} s; expected attention cost {plan.metrics['expected_attention_cost']:.3f} "
          "of dense")
    print(f"saved: {out}, {', '.join(map(str, paths))}")
    return 0
