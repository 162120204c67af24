"""``sparse-vdit demo``: dense vs sparse attention on an embedded tiny Wan pipeline (no download).

The transformer has random weights with local attention planted in its first layers (its last layer
stays global, as late layers often are); the demo runs the same generation dense and sparse, then
prints per-layer density, timings and the PSNR of the sparse video against the dense one, and
saves the plan, a mask picture and a side-by-side of frames.
"""
from __future__ import annotations

import argparse
import pathlib
import time

import torch


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def _save_frames(dense: torch.Tensor, sparse: torch.Tensor, path: pathlib.Path, psnr: float) -> None:
    from ..viz import figure

    idx = torch.linspace(0, dense.shape[0] - 1, 4).round().long().tolist()
    fig, axes = figure(3, len(idx), figsize=(2.6 * len(idx), 8), dpi=90)
    for j, f in enumerate(idx):
        d = dense[f].permute(1, 2, 0).clamp(0, 1).numpy()
        s = sparse[f].permute(1, 2, 0).clamp(0, 1).numpy()
        diff = (abs(d - s) * 10).clip(0, 1)
        for i, (img, label) in enumerate(((d, "dense"), (s, "sparse"), (diff, "|diff| x10"))):
            axes[i, j].imshow(img)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(label)
        axes[0, j].set_title(f"frame {f}", fontsize=9)
    fig.suptitle(f"tiny Wan (random weights, planted local attention): sparse vs dense, PSNR {psnr:.1f} dB", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="dense vs sparse on an embedded tiny Wan model (no download)",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="demo_out", help="folder for the plan, mask picture and frames")
    p.add_argument("--steps", type=int, default=10, help="denoising steps")
    p.add_argument("--uniform", default=None, metavar="MASK",
                   help="skip calibration: one mask kind (e.g. sliding_tile, radial) on every layer but the last")
    p.add_argument("--error-budget", type=float, default=0.05, help="calibration's per-head error budget")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, prompts and noise")
    p.set_defaults(func=run)
    return p


def run(args, p) -> int:
    import sparse_vdit as sv
    from sparse_vdit.testing import tiny_wan_pipeline

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

    print(f"sparse_vdit {sv.__version__} demo on {device} ({dtype})")
    pipe = tiny_wan_pipeline(seed=args.seed).to(device)
    if dtype != torch.float32:
        pipe.transformer.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(args.seed + 2)
    prompt = torch.randn(1, 16, 64, generator=g).to(device, dtype)
    negative = torch.randn(1, 16, 64, generator=g).to(device, dtype)
    height = width = 256  # latent 32x32 -> 16x16 tokens per frame after 2x2 patchify
    num_frames = 29  # 8 latent frames

    def generate():
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            video = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=height, width=width,
                         num_frames=num_frames, num_inference_steps=args.steps, guidance_scale=5.0,
                         generator=gen, output_type="pt").frames[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return video.float().cpu(), time.perf_counter() - t0

    generate()  # warm-up (first-call allocations, kernel compilation on GPU)
    dense_video, dense_s = generate()

    if args.uniform:
        plan = sv.uniform_plan(pipe.transformer, args.uniform, tile=(1, 4, 4), dense_steps=0.2, dense_layers=[-1])
    else:
        # Calibrate on a prompt other than the one generated below: each head gets the sparsest
        # candidate whose output error stays within the budget, else stays dense.
        calib_prompt = torch.randn(1, 16, 64, generator=g).to(device, dtype)
        plan = sv.calibrate(pipe, prompt_embeds=[calib_prompt], negative_prompt_embeds=negative, height=height,
                            width=width, num_frames=num_frames, num_inference_steps=args.steps, guidance_scale=5.0,
                            candidates=["sliding_tile", "radial", "temporal"], error_budget=args.error_budget,
                            tile=(1, 4, 4), sample_steps=(0.0, 0.5, 0.9), seed=args.seed + 7)
        report = sv.calibration.save_report(plan, out)
        print(f"calibrated in {plan.metrics['seconds']:.1f} s (report: {', '.join(map(str, report))})")
    plan_path = plan.save(out / "plan.json")
    proc = sv.apply(pipe, plan)
    generate()
    sparse_video, sparse_s = generate()
    layout = proc.layout
    sv.remove(pipe)

    psnr = _psnr(sparse_video, dense_video)
    print(f"video: {tuple(dense_video.shape)} (frames, channels, h, w); latent layout: {layout.describe()}")
    print(plan.summary())
    print("per-layer attention density (fraction of key blocks visited):")
    for layer in range(plan.num_layers):
        m = proc.mask_for(layer, layout, "cpu")
        print(f"  layer {layer}: {m.density():.3f}  ({', '.join(sorted({sv.masks.spec_name(s) for s in plan.layer_specs(layer)}))})")
    backend = proc.backend or sv.ops.default_backend(device)
    print(f"time per generation ({args.steps} steps, CFG): dense {dense_s:.2f} s, sparse {sparse_s:.2f} s "
          f"(attention backend: {backend}{'; CPU timings say nothing about GPU speed' if device.type == 'cpu' else ''})")
    print(f"PSNR of sparse vs dense video: {psnr:.1f} dB")
    masks_png = sv.viz.save_mask_png(proc.mask_for(0, layout, "cpu"), out / "mask_layer0.png",
                                     names=[sv.masks.spec_name(s) for s in plan.layer_specs(0)],
                                     title=f"layer 0 block masks, {layout.describe()}")
    frames_png = out / "frames_dense_vs_sparse.png"
    _save_frames(dense_video, sparse_video, frames_png, psnr)
    print(f"saved: {plan_path}, {masks_png}, {frames_png}")
    return 0
