"""Calibration cost: calibrate a real-size transformer with random weights (no download) on random
latents, as `sv.calibrate` would run on a pipeline, and record the wall time.

Issue target: <= 10 minutes for Wan2.1-1.3B at 480p x 81 frames with 4 prompts on one H100.

    python -m benchmarks.bench_calibration                  # GPU: Wan2.1-1.3B-size, 4 prompts, 50 steps
    python -m benchmarks.bench_calibration --tiny           # smoke run (CPU ok)
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

import sparse_vdit as sv

from . import common
from .bench_e2e import MODELS, TINY, _inputs

RESULTS = common.RESULTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="wan2.1-1.3b-480p", help=f"one of {list(MODELS)}")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--no-cfg", dest="cfg", action="store_false", help="one transformer call per step (default: two, as CFG)")
    p.add_argument("--candidates", default="sliding_tile,radial,spatial,temporal")
    p.add_argument("--tile", default="1,8,8")
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/calibration_<device>.json)")


def main(argv=None):
    return common.cli_main(__doc__, add_arguments, run, argv)


def run(args, p):
    if args.model not in MODELS:
        p.error(f"unknown model {args.model!r}; valid: {list(MODELS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        p.error("a real-size model needs a CUDA GPU; use --tiny for a smoke run")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name, (cls_name, cfg, latent, text, text_dim) = next(iter(TINY.items())) if args.tiny else (args.model, MODELS[args.model])
    model = common.build_model(cls_name, cfg, device, dtype)
    steps = min(args.steps, 4) if args.tiny else args.steps
    timesteps = torch.linspace(999, 1, steps).tolist()

    def run(m, i):
        torch.manual_seed(i)
        inputs = _inputs(cls_name, latent, text, text_dim, device, dtype)
        with torch.no_grad():
            for t in timesteps:
                inputs["timestep"] = torch.tensor([t], device=device)
                for _ in range(2 if args.cfg else 1):
                    out = m(**inputs, return_dict=False)[0]
        return out

    tile = (1, 4, 4) if args.tiny else tuple(int(x) for x in args.tile.split(","))
    t0 = time.perf_counter()
    plan = sv.calibrate(model, run=run, num_prompts=args.prompts if not args.tiny else 1, num_inference_steps=steps,
                        candidates=[c for c in args.candidates.split(",") if c], tile=tile)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    dense_t0 = time.perf_counter()
    run(model, 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    one_generation = time.perf_counter() - dense_t0
    row = {"model": name, "prompts": args.prompts if not args.tiny else 1, "steps": steps, "cfg": args.cfg,
           "sampled_steps": plan.metrics["sampled_steps"], "calibration_s": round(seconds, 1),
           "one_dense_generation_s": round(one_generation, 1), "layout": plan.metrics["layout"],
           "expected_attention_cost": round(plan.metrics["expected_attention_cost"], 4),
           "dense_layers": plan.dense_layers, "dense_steps": plan.dense_steps}
    print(json.dumps(row))
    out = pathlib.Path(args.out) if args.out else RESULTS / f"calibration_{common.device_slug(device)}.json"
    return common.write_json(out, common.result_meta(device), [row])


if __name__ == "__main__":
    main()
