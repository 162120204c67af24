"""End-to-end benchmark: one denoising step of a real-size transformer (random weights, no download),
dense vs sparse, and a whole schedule with the plan's dense warm-up.

Reports per model: step time dense and sparse (median), the speedup per sparse step, the speedup
over a schedule of ``--steps`` steps with ``--warmup`` of them dense, attention's share of the
dense step (timed separately at the same shapes), the processor's overhead over the bare kernel,
and peak memory. Results go to benchmarks/results/ with the device name. Uses only the public API.

    python -m benchmarks.bench_e2e                       # GPU, all models
    python -m benchmarks.bench_e2e --models wan2.1-1.3b  # one model
    python -m benchmarks.bench_e2e --tiny                # tiny config, smoke run (CPU ok)
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch

import sparse_vdit as sv

from . import common

RESULTS = common.RESULTS

MODELS = {
    # name: (diffusers class, config, latent input shape [C, F, H, W], text tokens, text dim)
    "wan2.1-1.3b-480p": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6), (16, 21, 60, 104), 512, 4096),
    "wan2.1-14b-720p": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6), (16, 21, 90, 160), 512, 4096),
    "hunyuanvideo-720p": ("HunyuanVideoTransformer3DModel", dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, patch_size=2, patch_size_t=1, text_embed_dim=4096,
        pooled_projection_dim=768, rope_axes_dim=(16, 56, 56)), (16, 33, 90, 160), 256, 4096),
}
TINY = {"tiny-wan": ("WanTransformer3DModel", dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=64, freq_dim=64, ffn_dim=256, num_layers=2, cross_attn_norm=True), (16, 4, 32, 32), 16, 64)}


def _inputs(cls_name, latent, text, text_dim, device, dtype):
    C, F, H, W = latent
    x = torch.randn(1, C, F, H, W, device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)
    e = torch.randn(1, text, text_dim, device=device, dtype=dtype)
    if cls_name == "HunyuanVideoTransformer3DModel":
        return dict(hidden_states=x, timestep=t, encoder_hidden_states=e,
                    encoder_attention_mask=torch.ones(1, text, device=device, dtype=torch.bool),
                    pooled_projections=torch.randn(1, 768, device=device, dtype=dtype),
                    guidance=torch.tensor([6000.0], device=device))
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=e)


def _time(fn, device, reps):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_model(name, spec, mask_spec, tile, dense_layers, steps, warmup, reps, device, dtype):
    cls_name, cfg, latent, text, text_dim = spec
    model = common.build_model(cls_name, cfg, device, dtype)
    inputs = _inputs(cls_name, latent, text, text_dim, device, dtype)
    run = torch.no_grad()(lambda: model(**inputs, return_dict=False))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dense_ms = _time(run, device, reps)
    dense_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None

    plan = sv.uniform_plan(model, mask_spec, tile=tile, dense_layers=dense_layers, dense_steps=0)
    proc = sv.apply(model, plan)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sparse_ms = _time(run, device, reps)
    sparse_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    layout = proc.layout
    masks = [proc.mask_for(i, layout, device) for i in range(plan.num_layers)]
    density = sum(m.density() for m in masks) / len(masks)

    # Attention alone at the same shapes: dense SDPA vs the bare kernel, and the processor's extra cost.
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    N = layout.seq_len
    q, k, v = (torch.randn(1, heads, N, head_dim, device=device, dtype=dtype) for _ in range(3))
    sdpa_ms = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device, reps)
    order = layout.token_order(device)
    sparse_masks = [m for i, m in enumerate(masks) if not plan.layer_is_dense(i)]
    kernel_ms = statistics.mean(
        _time(lambda m=m: sv.block_sparse_attention(q, k, v, m, token_order=order, check=False), device, reps)
        for m in sparse_masks[:3]) if sparse_masks else sdpa_ms
    sv.remove(model)
    n_attn = plan.num_layers
    n_dense_layers = len(plan.dense_layers)
    attn_share = n_attn * sdpa_ms / dense_ms
    # What the step would cost if only attention changed: the rest of the step is dense_ms - n*sdpa.
    expected_sparse = dense_ms - n_attn * sdpa_ms + n_dense_layers * sdpa_ms + (n_attn - n_dense_layers) * kernel_ms
    schedule_dense = steps * dense_ms
    n_warm = round(warmup * steps)
    schedule_sparse = n_warm * dense_ms + (steps - n_warm) * sparse_ms
    row = {
        "model": name, "class": cls_name, "tokens": N, "layout": layout.describe(), "mask": sv.masks.spec_name(mask_spec),
        "dense_layers": plan.dense_layers, "avg_density": round(density, 4),
        "dense_step_ms": round(dense_ms, 2), "sparse_step_ms": round(sparse_ms, 2),
        "speedup_step": round(dense_ms / sparse_ms, 3),
        "schedule_steps": steps, "schedule_dense_warmup": n_warm,
        "speedup_schedule": round(schedule_dense / schedule_sparse, 3),
        "attention_share_dense": round(attn_share, 3),
        "sdpa_ms_per_layer": round(sdpa_ms, 3), "kernel_ms_per_layer": round(kernel_ms, 3),
        "processor_overhead": round(sparse_ms / expected_sparse - 1.0, 4),
        "peak_mem_dense_gb": round(dense_peak / 2**30, 2) if dense_peak else None,
        "peak_mem_sparse_gb": round(sparse_peak / 2**30, 2) if sparse_peak else None,
    }
    print(json.dumps(row))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="*", help=f"subset of {list(MODELS)}")
    p.add_argument("--tiny", action="store_true", help="a tiny Wan config (smoke run, CPU ok)")
    p.add_argument("--mask", default='{"kind": "radial", "dense_frames": 1}', help="mask spec (name or JSON)")
    p.add_argument("--tile", default="1,8,8")
    p.add_argument("--dense-layers", default="-1", help="comma-separated plan layers kept dense ('' for none)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of the schedule run dense")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/e2e_<device>.json)")


def main(argv=None):
    return common.cli_main(__doc__, add_arguments, run, argv)


def run(args, p):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = common.pick(p, TINY if args.tiny else MODELS, args.models, "models")
    if device.type != "cuda" and not args.tiny:
        p.error("real-size models need a CUDA GPU; use --tiny for a smoke run")
    mask = json.loads(args.mask) if args.mask.lstrip().startswith("{") else args.mask
    tile = tuple(int(x) for x in args.tile.split(","))
    dense_layers = [int(x) for x in args.dense_layers.split(",") if x.strip()]
    rows = [bench_model(n, s, mask, tile if not args.tiny else (1, 4, 4), dense_layers, args.steps, args.warmup,
                        args.reps, device, dtype) for n, s in models.items()]
    meta = common.result_meta(device, dtype=str(dtype).replace("torch.", ""))
    out = pathlib.Path(args.out) if args.out else RESULTS / f"e2e_{common.device_slug(device)}.json"
    return common.write_json(out, meta, rows)


if __name__ == "__main__":
    main()
