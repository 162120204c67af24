"""``sparse-vdit demo``: dense vs sparse attention on the embedded tiny Wan that learned a world of
moving shapes (weights shipped in the package; no download).

The demo calibrates a plan on training prompts, generates a held-out prompt ("a red circle moves up",
a combination the model never saw) dense and sparse, then prints per-layer density, timings, PSNR
and SSIM of the sparse video against the dense one, and saves the plan, the calibration report, a
mask picture and the frames side by side (dense, sparse, difference).
"""
from __future__ import annotations

import argparse

import pathlib
import time

import torch

from .common import HelpFormatter


def _save_frames(dense: torch.Tensor, sparse: torch.Tensor, path: pathlib.Path, title: str) -> None:
    """Rows dense / sparse / |difference| x 5 of ``[F, 3, H, W]`` videos in [0, 1], eight frames across."""
    from ..viz import figure

    idx = torch.linspace(0, dense.shape[0] - 1, 8).round().long().tolist()
    fig, axes = figure(3, len(idx), figsize=(1.45 * len(idx), 5.0), dpi=110)
    for j, f in enumerate(idx):
        d = dense[f].permute(1, 2, 0).clamp(0, 1).numpy()
        s = sparse[f].permute(1, 2, 0).clamp(0, 1).numpy()
        diff = (abs(d - s) * 5).clip(0, 1)
        for i, (img, label) in enumerate(((d, "dense"), (s, "sparse"), (diff, "|diff| x5"))):
            axes[i, j].imshow(img, interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(label)
        axes[0, j].set_title(f"frame {f}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="dense vs sparse on an embedded tiny Wan that learned moving shapes (no download)",
                       description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--out", default="demo_out", help="folder for the plan, report, mask picture and frames")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--prompt", default="a red circle moves up", help="what to generate (a held-out combination)")
    p.add_argument("--uniform", default=None, metavar="MASK",
                   help="skip calibration: one mask kind (e.g. sliding_tile, radial) on every layer")
    p.add_argument("--error-budget", type=float, default=0.2,
                   help="calibration's per-head error budget (the learned model keeps every head dense at 0.05)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.set_defaults(func=run)
    return p


def run(args, p) -> int:
    import sparse_vdit as sv
    from sparse_vdit.analysis.quality import psnr, ssim
    from sparse_vdit.testing import shapes

    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if not 0 < args.error_budget < 1:
        p.error(f"--error-budget must lie in (0, 1), got {args.error_budget}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here; use --device cpu")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # auto: the fastest exact backend for each shape, timed on first use (on the CPU the block-gather
    # path or dense attention under the token mask; on a GPU the Triton kernels or FlexAttention).
    backend = "auto"

    print(f"sparse_vdit {sv.__version__} demo on {device} ({dtype}): the tiny Wan trained on moving shapes")
    pipe = shapes.learned_wan_pipeline(dtype=dtype).to(device)
    kwargs = {**shapes.GENERATE_DEFAULTS, "num_inference_steps": args.steps}

    def generate(label):
        print(f"generating '{args.prompt}' ({label}, {args.steps} steps with CFG) ...", flush=True)
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            video = pipe(args.prompt, negative_prompt="", generator=gen, output_type="pt", **kwargs).frames[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return video.float().cpu(), time.perf_counter() - t0

    dense_video, dense_s = generate("dense")

    if args.uniform:
        plan = sv.uniform_plan(pipe.transformer, args.uniform, tile=(1, 4, 4), dense_steps=0.2)
    else:
        # Calibrate on training prompts, never the one generated: each head gets the sparsest candidate
        # whose output error stays within the budget, else stays dense.
        calib = [shapes.TRAIN_SCENES[0].prompt, shapes.TRAIN_SCENES[18].prompt]  # red circle left, blue square down
        print(f"calibrating on {calib} ...", flush=True)
        plan = sv.calibrate(pipe, prompts=calib, negative_prompt="", candidates=["sliding_tile", "radial", "spatial", "temporal"],
                            error_budget=args.error_budget, tile=(1, 4, 4), sample_steps=(0.25, 0.5, 0.75, 0.95),
                            backend=backend, seed=args.seed + 7, **kwargs)
        plan.dense_steps = 0.2  # the first 20% of steps dense, as the peers warm up
        report = sv.calibration.save_report(plan, out)
        print(f"calibrated in {plan.metrics['seconds']:.1f} s (report: {', '.join(map(str, report))})")
    plan_path = plan.save(out / "plan.json")
    proc = sv.apply(pipe, plan, backend=backend)
    sparse_video, sparse_s = generate("sparse")
    layout = proc.layout
    sv.remove(pipe)

    quality_psnr, quality_ssim = psnr(sparse_video, dense_video), ssim(sparse_video, dense_video)
    print(f"video: {tuple(dense_video.shape)} (frames, channels, h, w); latent layout: {layout.describe()}")
    print(plan.summary())
    print("per-layer attention density (fraction of key blocks visited, sparse steps):")
    for layer in range(plan.num_layers):
        m = proc.mask_for(layer, layout, "cpu")
        print(f"  layer {layer}: {m.density():.3f}  ({', '.join(sorted({sv.masks.spec_name(s) for s in plan.layer_specs(layer)}))})")
    print(f"time per generation ({args.steps} steps, CFG): dense {dense_s:.2f} s, sparse {sparse_s:.2f} s "
          f"(sparse backend: {backend or sv.ops.default_backend(device)}"
          f"{'; CPU timings say nothing about GPU speed' if device.type == 'cpu' else ''})")
    seen = shapes.describe(dense_video.permute(0, 2, 3, 1)), shapes.describe(sparse_video.permute(0, 2, 3, 1))
    print(f"what the frames show (colour, direction): dense {seen[0]}, sparse {seen[1]}")
    print(f"sparse vs dense video: PSNR {quality_psnr:.1f} dB, SSIM {quality_ssim:.4f}")
    masks_png = sv.viz.save_mask_png(proc.mask_for(0, layout, "cpu"), out / "mask_layer0.png",
                                     names=[sv.masks.spec_name(s) for s in plan.layer_specs(0)],
                                     title=f"layer 0 block masks, {layout.describe()}", layout=layout)
    frames_png = out / "frames_dense_vs_sparse.png"
    _save_frames(dense_video, sparse_video, frames_png,
                 f"'{args.prompt}' (held out): sparse vs dense, PSNR {quality_psnr:.1f} dB, SSIM {quality_ssim:.3f}")
    print(f"saved: {plan_path}, {masks_png}, {frames_png}")
    return 0
