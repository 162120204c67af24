"""Quality at equal density, on a model whose attention was learned: the tiny Wan of the shapes world
(``sparse_vdit.testing.shapes``, weights shipped). Held-out prompts (combinations never seen in training
nor in calibration) are generated with fixed seeds, dense and sparse; reported per plan: PSNR and SSIM
of the decoded video against dense, the relative error of the final latents, and the plan's attention
density over the whole generation (dense steps and dense layers count 1).

Plans: every rung of the ladder of each uniform family (the peers' ``sta``, ``radial_attn``,
``svg_spatial``, ``svg_temporal``, and our own, ``dynamic`` included), and calibrated plans at several
error budgets, with and without ladders; with ``--option-budgets``, calibration from static candidates
only against calibration that may also choose the dynamic family and a per-head temperature. All plans share the dense warm-up (``--dense-steps``) and the layout (``--tile``).
On the CPU the sparse runs use the exact ``torch_masked`` backend (``--backend``).

    python -m benchmarks.bench_quality                    # writes benchmarks/results/quality_<device>.json and .png
    python -m benchmarks.bench_quality --families sta --budgets 0.05 --no-ladder-calibration   # a quick look
    python -m benchmarks.bench_quality --families dynamic sliding_tile radial --budgets --ladder-budgets \
        --option-budgets 0.1 0.2 0.3 0.4 --backend torch --json benchmarks/results/quality_dynamic_cpu--x86-64.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

import sparse_vdit as sv
from sparse_vdit.analysis.quality import psnr, relative_error, ssim
from sparse_vdit.testing import shapes

from . import common

FAMILIES = ("sta", "radial_attn", "svg_spatial", "svg_temporal", "sliding_tile", "radial", "spatial", "temporal",
            "dynamic")
DEFAULT_FAMILIES = ("sta", "radial_attn", "svg_spatial", "svg_temporal", "sliding_tile", "radial")
CALIBRATION_CANDIDATES = ("sliding_tile", "radial", "spatial", "temporal")
PEER_FAMILIES = ("sta", "radial_attn", "svg_spatial", "svg_temporal")
# what calibration may choose besides the static families' ladders: (the dynamic family, temperatures)
OPTION_SETS = {"static": (False, False), "dynamic": (True, False), "temperature": (False, True),
               "dynamic + temperature": (True, True)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--families", nargs="*", default=list(DEFAULT_FAMILIES),
                   help=f"uniform families to sweep over their ladders, among {', '.join(FAMILIES)}")
    p.add_argument("--budgets", nargs="*", type=float, default=[0.05, 0.1, 0.2, 0.3],
                   help="calibration error budgets")
    p.add_argument("--ladder-budgets", nargs="*", type=float, default=[0.1, 0.2],
                   help="error budgets of the calibrations with ladders")
    p.add_argument("--no-ladder-calibration", action="store_true", help="calibrate without ladders only")
    p.add_argument("--option-budgets", nargs="*", type=float, default=[],
                   help="error budgets at which to compare calibration with static candidates only (with ladders) "
                        "against calibration that may also choose the dynamic family and a temperature; each is "
                        "measured once and decided at every budget")
    p.add_argument("--temperatures", nargs="*", type=float, default=[1.1, 1.25],
                   help="temperatures the calibrations of --option-budgets with temperature try besides 1")
    p.add_argument("--option-sets", nargs="*", default=["static", "dynamic + temperature"], choices=list(OPTION_SETS),
                   help="what the calibrations of --option-budgets may choose (static: every static family's ladder)")
    p.add_argument("--merge", default=None, help="keep the rows of this earlier result file (same held-out set)")
    p.add_argument("--max-rungs", type=int, default=None, help="at most this many rungs of each ladder (sparsest first)")
    p.add_argument("--calibration-prompts", type=int, default=2, help="training prompts to calibrate on")
    p.add_argument("--target-densities", nargs="*", type=float, default=[],
                   help="also calibrate (with ladders) to each of these attention densities: the least summed "
                        "squared per-head error at that density (calibrate(target_density=...), error budget "
                        "--target-error-budget)")
    p.add_argument("--target-error-budget", type=float, default=0.5,
                   help="with --target-densities: the per-head error no chosen mask may exceed")
    p.add_argument("--target-measurements", default=None,
                   help="with --target-densities: a calibration checkpoint to keep (or reuse) the measurements "
                        "in, for the same candidates (default: a temporary file)")
    p.add_argument("--calibration-candidates", nargs="+", default=list(CALIBRATION_CANDIDATES),
                   help=f"the families calibration chooses from, among {', '.join(FAMILIES)} (default: our own, "
                        f"{', '.join(CALIBRATION_CANDIDATES)}); rows name any other set")
    p.add_argument("--seeds", type=int, default=1, help="seeds per held-out prompt")
    p.add_argument("--steps", type=int, default=shapes.GENERATE_DEFAULTS["num_inference_steps"], help="denoising steps")
    p.add_argument("--dense-steps", type=float, default=0.2, help="dense warm-up (fraction of steps), every plan")
    p.add_argument("--tile", default="1,4,4", help="the layout's tile (t,h,w)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help="sparse backend (default: auto on CUDA, the exact torch_masked "
                   "on the CPU; torch, the CPU block gather, is exact too and faster for per-call dynamic masks)")
    p.add_argument("--json", default=None, help="output (default: benchmarks/results/quality_<device>.json)")


def main(argv=None):
    return common.cli_main(__doc__, add_arguments, run, argv)


def label_of(candidates) -> str:
    """How a calibrated row names a candidate set other than the default (our own families)."""
    if list(candidates) == list(CALIBRATION_CANDIDATES):
        return ""
    if set(CALIBRATION_CANDIDATES) <= set(candidates):
        return " from ours + " + ", ".join(c for c in candidates if c not in CALIBRATION_CANDIDATES)
    return " from " + ", ".join(candidates)


def plan_density(plan: sv.SparsityPlan, layout: sv.VideoLayout, num_steps: int) -> float:
    """Fraction of dense attention's block pairs a generation computes under ``plan`` (a dynamic head
    counts the most it visits, ``masks.dynamic_max_density``: exact for specs without ``mass``)."""
    per_layer = [1.0 if plan.layer_is_dense(i) else float(sv.masks.head_densities(plan.layer_specs(i), layout).mean())
                 for i in range(plan.num_layers)]
    dense = plan.dense_step_count(num_steps) / num_steps
    return dense + (1 - dense) * statistics.fmean(per_layer)


class Runner:
    """Generates the held-out prompts with fixed seeds; dense once, then once per plan."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.pipe = shapes.learned_wan_pipeline(dtype=self.dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.scenes = [sc for sc in shapes.HELD_OUT for _ in range(args.seeds)]
        self.kwargs = {**shapes.GENERATE_DEFAULTS, "num_inference_steps": args.steps}
        self.backend = args.backend or (None if self.device.type == "cuda" else "torch_masked")
        self.dense_latents = self.latents()
        self.dense_video = self.decode(self.dense_latents)

    def latents(self) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(self.scenes))]
        with torch.no_grad():
            return self.pipe([sc.prompt for sc in self.scenes], negative_prompt="", generator=gens, output_type="latent",
                             **self.kwargs).frames.float().cpu()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        video = self.pipe.vae.decode(latents).sample  # [B, 3, F, H, W] in [-1, 1]
        return ((video + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W]

    def measure(self, plan: sv.SparsityPlan) -> dict:
        sv.apply(self.pipe, plan, backend=self.backend)
        t0 = time.perf_counter()
        lat = self.latents()
        seconds = time.perf_counter() - t0
        sv.remove(self.pipe)
        video = self.decode(lat)
        p = [psnr(v, d) for v, d in zip(video, self.dense_video)]
        s = [ssim(v, d) for v, d in zip(video, self.dense_video)]
        right = sum(shapes.describe(v.permute(0, 2, 3, 1)) == (sc.colour, sc.direction)
                    for v, sc in zip(video, self.scenes))
        return {"psnr_db": statistics.fmean(min(x, 99.0) for x in p), "psnr_min_db": min(min(x, 99.0) for x in p),
                "ssim": statistics.fmean(s), "latent_rel_err": relative_error(lat, self.dense_latents),
                "prompt_followed": right / len(self.scenes), "generate_s": seconds}


def run(args, p):
    tile = tuple(int(x) for x in args.tile.split(","))
    if len(tile) != 3:
        p.error(f"--tile must be t,h,w, got {args.tile}")
    unknown = sorted((set(args.families) | set(args.calibration_candidates)) - set(FAMILIES))
    if unknown:
        p.error(f"unknown families {unknown} (--families, --calibration-candidates); valid: {list(FAMILIES)}")
    runner = Runner(args)
    transformer = runner.pipe.transformer
    layout = sv.VideoLayout(frames=shapes.FRAMES, height=shapes.SIZE // 2, width=shapes.SIZE // 2, tile=tile, text_len=0)
    dense_right = sum(shapes.describe(v.permute(0, 2, 3, 1)) == (sc.colour, sc.direction)
                      for v, sc in zip(runner.dense_video, runner.scenes)) / len(runner.scenes)
    print(f"dense: {len(runner.scenes)} held-out videos; prompt followed in {dense_right:.0%}", flush=True)
    rows = []

    def record(kind, name, plan, extra=None):
        t0 = time.perf_counter()
        row = {"kind": kind, "name": name, "density": plan_density(plan, layout, args.steps), **(extra or {}),
               **runner.measure(plan)}
        rows.append(row)
        print(f"[{len(rows)}] {kind:11s} {name:28s} density {row['density']:.3f}  PSNR {row['psnr_db']:5.1f} dB  "
              f"SSIM {row['ssim']:.3f}  latent err {row['latent_rel_err']:.3f}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)

    for family in args.families:
        for spec in sv.masks.ladder(family)[:args.max_rungs]:
            plan = sv.uniform_plan(transformer, spec, dense_steps=args.dense_steps, tile=tile)
            record("uniform", sv.masks.spec_name(spec), plan, {"family": family})
    # Training prompts spread over colours and directions (never a held-out one).
    step = max(1, len(shapes.TRAIN_SCENES) // args.calibration_prompts)
    calib_prompts = [sc.prompt for sc in shapes.TRAIN_SCENES[step // 2::step]][:args.calibration_prompts]
    def calibrated(**options):
        """A plan calibrated on ``calib_prompts`` (``options`` to ``sv.calibrate``) with every plan's
        warm-up, its seconds, and the row fields every calibration shares."""
        t0 = time.perf_counter()
        plan = sv.calibrate(runner.pipe, prompts=calib_prompts, negative_prompt="", tile=tile,
                            sample_steps=(0.25, 0.5, 0.75, 0.95), backend=runner.backend, progress=False,
                            **options, **runner.kwargs)
        seconds = time.perf_counter() - t0
        plan.dense_steps = args.dense_steps  # the same warm-up as every uniform plan
        specs = [sv.masks.normalize_spec(x) for i in range(plan.num_layers) for x in plan.layer_specs(i)]
        return plan, {"calibration_s": seconds, "dense_heads": sum(s["kind"] == "dense" for s in specs),
                      "heads": len(specs), "candidates": list(options["candidates"])}, specs

    label = label_of(args.calibration_candidates)
    for ladders in ([False] if args.no_ladder_calibration else [False, True]):
        for budget in (args.ladder_budgets if ladders else args.budgets):
            plan, common_fields, _ = calibrated(candidates=list(args.calibration_candidates), ladders=ladders,
                                                error_budget=budget)
            record("calibrated", f"budget {budget}{' +ladders' if ladders else ''}{label}", plan,
                   {"budget": budget, "ladders": ladders, **common_fields})
    # One measurement for every target, as compare_options does for its budgets: the first calibration's
    # checkpoint holds every record, so the later ones only decide (their calibration_s is that).
    with tempfile.TemporaryDirectory() as tmp:
        measured = args.target_measurements or f"{tmp}/measurements.json"
        for target in args.target_densities:
            plan, common_fields, _ = calibrated(candidates=list(args.calibration_candidates), ladders=True,
                                                error_budget=args.target_error_budget, target_density=target,
                                                dense_steps=args.dense_steps, checkpoint=measured)
            record("calibrated", f"density {target} +ladders{label}", plan,
                   {"target_density": target, "budget": args.target_error_budget, "ladders": True, **common_fields})
    if args.option_budgets:
        compare_options(args, calibrated, record)
    device = runner.device
    meta = common.result_meta(device, held_out=[sc.prompt for sc in runner.scenes], steps=args.steps,
                              dense_steps=args.dense_steps, tile=list(tile), dense_prompt_followed=dense_right,
                              calibration_prompts=calib_prompts, backend=runner.backend or "auto")
    path = args.json or common.RESULTS / f"quality_{common.device_slug(device)}.json"
    if args.merge:
        earlier = json.loads(open(args.merge).read())
        if earlier["meta"]["held_out"] != meta["held_out"] or earlier["meta"]["steps"] != meta["steps"]:
            p.error(f"--merge {args.merge}: another held-out set or step count")
        rows = earlier["rows"] + rows
        meta["merged_from"] = earlier["meta"]
    common.write_json(path, meta, rows)
    png = plot(rows, str(path).rsplit(".", 1)[0] + ".png", meta)
    print(f"picture: {png}")
    return path


def compare_options(args, calibrated, record) -> None:
    """Calibration with static candidates only (every family's ladder) against the same plus the
    dynamic family's ladder and ``--temperatures``, each measured once (a checkpoint), decided at
    every budget of ``--option-budgets``; rows say how many of the static plan's dense heads the
    other runs sparse. ``calibrated``: :func:`run`'s calibration with the shared settings."""
    options = [(name, [*CALIBRATION_CANDIDATES, *(["dynamic"] if OPTION_SETS[name][0] else [])],
                tuple(args.temperatures) if OPTION_SETS[name][1] else ()) for name in args.option_sets]
    with tempfile.TemporaryDirectory() as tmp:
        static_dense: dict[float, set] = {}
        for name, candidates, temperatures in options:
            ckpt = f"{tmp}/{name.replace(' ', '').replace('+', '_')}.json"
            for budget in args.option_budgets:
                # the first budget measures; the others only decide
                plan, common_fields, flat = calibrated(candidates=candidates, ladders=True, temperatures=temperatures,
                                                       error_budget=budget, checkpoint=ckpt)
                specs = [(i, h, flat[i * plan.num_heads + h]) for i in range(plan.num_layers)
                         for h in range(plan.num_heads)]
                dense = {(i, h) for i, h, s in specs if s["kind"] == "dense"}
                extra = {"budget": budget, "ladders": True, "options": name, **common_fields,
                         "dynamic_heads": sum(s["kind"] == "dynamic" for _, _, s in specs),
                         "temperature_heads": sum("temperature" in s for _, _, s in specs),
                         "temperatures": list(temperatures)}
                if name == "static":
                    static_dense[budget] = dense
                elif budget in static_dense:
                    was = static_dense[budget]
                    extra["static_dense_heads_now_sparse"] = f"{len(was - dense)}/{len(was)}"
                record("calibrated", f"budget {budget} {name}", plan, extra)


def series_of(row) -> str:
    """The curve a calibrated row belongs to in the picture."""
    options = row.get("options")
    if options is None:
        name = "calibrated + ladders" if row["ladders"] else "calibrated"
    else:
        name = "calibrated, static + ladders" if options == "static" else f"calibrated, + {options}"
    if set(row.get("candidates") or ()) & set(PEER_FAMILIES):
        name += ", ours + peers' families"
    if row.get("target_density") is not None:
        name += ", to a density"
    return name


def plot(rows, path, meta):
    from sparse_vdit.viz import figure

    fig, axes = figure(1, 2, figsize=(14, 4.4), dpi=110)
    axes = axes[0]
    # Plans that end up dense everywhere equal the dense video (PSNR infinite): left out of the picture.
    rows = [r for r in rows if r["latent_rel_err"] > 0]
    for ax, key, label in ((axes[0], "psnr_db", "PSNR vs dense (dB)"), (axes[1], "ssim", "SSIM vs dense")):
        for fam in sorted({r["family"] for r in rows if r["kind"] == "uniform"}):
            pts = sorted((r["density"], r[key]) for r in rows if r.get("family") == fam)
            ax.plot(*zip(*pts), marker="o", ms=3.5, lw=1.2, label=fam)
        styles = {"calibrated": "k-s", "calibrated + ladders": "r-D", "calibrated, static + ladders": "k-s",
                  "calibrated, + dynamic": "c-^", "calibrated, + temperature": "y-v",
                  "calibrated, + dynamic + temperature": "m-D"}
        extra_styles = iter(["b-P", "g-*", "-X", "-h", "-p", "-d"])
        series: dict[str, list] = {}
        for r in rows:
            if r["kind"] == "calibrated":
                series.setdefault(series_of(r), []).append((r["density"], r[key]))
        for name, pts in series.items():
            style = styles.get(name) or styles.setdefault(name, next(extra_styles, "-o"))
            ax.plot(*zip(*sorted(pts)), style, ms=5 if "*" not in style else 8, lw=2, label=name)
        ax.set_xlabel("attention density over the generation (1 = dense)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the plots: over none of the points
    fig.suptitle(f"learned tiny Wan, {len(meta['held_out'])} held-out prompts, {meta['steps']} steps "
                 f"(first {meta['dense_steps']:.0%} dense), {meta['device']}; plans equal to dense not drawn", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight", metadata={"Description": f"device: {meta['device']}; torch {meta['torch']}"})
    return path


if __name__ == "__main__":
    main()
