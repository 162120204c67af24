"""Attention-map transfer on the learned tiny Wan: does the edited video keep the source's layout and
motion and take the target's colour? A sweep over the layers and denoising steps that transfer.

For each seed, ``sv.edit.transfer`` generates the source ("a red circle moves right") and the target
("a blue circle moves right") together from the same noise. The target's object is tracked
(``shapes.track``) and compared with the source's, per frame: centroid distance (pixels) and IoU of
the object masks. The target's colour is read back (``shapes.describe``). The row without transfer
(layers: none) is the baseline the same noise gives by itself: the transfer has to beat it.

    python -m benchmarks.bench_edit                   # writes benchmarks/results/edit_<device>.json
    python -m benchmarks.bench_edit --seeds 1         # a quick look
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import torch

import sparse_vdit as sv
from sparse_vdit.testing import shapes

from . import common

SOURCE, TARGET = "a red circle moves right", "a blue circle moves right"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default=SOURCE)
    p.add_argument("--target", default=TARGET)
    p.add_argument("--seeds", type=int, default=3, help="seeds (each one source/target pair)")
    p.add_argument("--steps", type=int, default=shapes.GENERATE_DEFAULTS["num_inference_steps"],
                   help="denoising steps")
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/edit_<device>.json)")


def main(argv=None):
    return common.cli_main(__doc__, add_arguments, run, argv)


def sweep(num_layers: int, steps: int) -> list[tuple[str, object, object]]:
    """(name, layers, transfer_steps) of every configuration tried, the baseline first."""
    half, quarter = max(1, steps // 2), max(1, steps // 4)
    layer_sets = {"all": "all", "first half": list(range(num_layers // 2)),
                  "second half": list(range(num_layers // 2, num_layers))}
    step_sets = {f"first {quarter}": list(range(quarter)), f"first {half}": list(range(half)), "all": "all"}
    rows = [("none", None, None)]
    for ln, layers in layer_sets.items():
        for sn, st in step_sets.items():
            rows.append((f"layers {ln}, steps {sn}", layers, st))
    return rows


def compare(source: torch.Tensor, target: torch.Tensor) -> dict:
    """Track agreement of two videos [F, H, W, 3] in [0, 1], and the colours they show."""
    cs, _ = shapes.track(source)
    ct, _ = shapes.track(target)
    ok = ~(torch.isnan(cs[:, 0]) | torch.isnan(ct[:, 0]))
    dist = float((cs[ok] - ct[ok]).norm(dim=-1).mean()) if ok.any() else float("nan")
    ious = []
    for fs, ft in zip(source.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2)):
        a, b = shapes.object_pixels(fs), shapes.object_pixels(ft)
        union = int((a | b).sum())
        if union:
            ious.append(int((a & b).sum()) / union)
    return {"centroid_px": dist, "iou": statistics.mean(ious) if ious else float("nan"),
            "source_seen": shapes.describe(source), "target_seen": shapes.describe(target)}


def run(args, p):
    device = torch.device("cpu")
    pipe = shapes.learned_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**shapes.GENERATE_DEFAULTS, "num_inference_steps": args.steps}
    num_layers = pipe.transformer.config.num_layers
    target_colour = args.target.split()[1]
    rows = []
    for name, layers, steps in sweep(num_layers, args.steps):
        per_seed, t0 = [], time.perf_counter()
        for seed in range(args.seeds):
            out = sv.edit.transfer(pipe, args.source, args.target, layers=layers, transfer_steps=steps, seed=seed,
                                   negative_prompt="", output_type="pt", **kwargs)
            src, tgt = (out.frames[i].permute(0, 2, 3, 1).float() for i in (0, 1))
            per_seed.append(compare(src, tgt))
        row = {"transfer": name, "layers": layers, "transfer_steps": steps, "seeds": args.seeds,
               "centroid_px": round(statistics.mean(r["centroid_px"] for r in per_seed), 2),
               "iou": round(statistics.mean(r["iou"] for r in per_seed), 3),
               "target_colour_right": sum(r["target_seen"][0] == target_colour for r in per_seed),
               "target_direction": [r["target_seen"][1] for r in per_seed],
               "source_seen": [list(r["source_seen"]) for r in per_seed],
               "seconds": round(time.perf_counter() - t0, 1)}
        print({k: row[k] for k in ("transfer", "centroid_px", "iou", "target_colour_right", "target_direction")},
              flush=True)
        rows.append(row)
    out = pathlib.Path(args.out) if args.out else common.RESULTS / f"edit_{common.device_slug(device)}.json"
    meta = common.result_meta(device, source=args.source, target=args.target, steps=args.steps,
                              note="centroid_px / iou: target's object track against the source's, mean over frames "
                                   "and seeds; the 'none' row is the same noise without transfer")
    return common.write_json(out, meta, rows)


if __name__ == "__main__":
    main()
