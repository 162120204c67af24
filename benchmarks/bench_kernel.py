"""Kernel microbenchmark: block-sparse attention against dense SDPA backends and FlexAttention.

Sweeps density at real video-DiT shapes and reports, per row: median ms, effective TFLOP/s over the
computed blocks, speedup over the fastest dense backend, fraction of the ideal speedup
(speedup x density), speedup over FlexAttention on the identical block mask, and the cost of reading
tokens through a tiling permutation (token_order) instead of in order.

Results are appended to benchmarks/results/ as JSON and CSV with the device name and versions, and
plotted. Uses only the public API of sparse_vdit.

    python -m benchmarks.bench_kernel                 # all shapes (a GPU is expected)
    python -m benchmarks.bench_kernel --quick         # small shapes, smoke run
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import statistics
import time

import torch

import sparse_vdit as sv

from . import common

RESULTS = common.RESULTS

SHAPES = {
    # name: (B, H, N, D) -- video tokens (+ text) after patchify, see shared/ENVIRONMENT.md
    "wan2.1-1.3b-480p": (1, 12, 32760, 128),
    "hunyuanvideo-720p": (1, 24, 118800, 128),
    "cogvideox-5b": (1, 48, 17776, 64),
}
QUICK_SHAPES = {"quick-4k": (1, 4, 4096, 128), "quick-2k-d64": (1, 8, 2048, 64)}
DENSITIES = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)


def bench(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=reps * 10, return_mode="median"))
    fn()
    times = []
    for _ in range(max(reps // 20, 3)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fixed_count_blocks(H: int, M: int, density: float, device) -> torch.Tensor:
    """Each query block visits exactly round(density * M) key blocks (its diagonal included), chosen at
    random per head: balanced rows, so the kernel and the baselines do comparable work per block."""
    per_row = max(1, round(density * M))
    scores = torch.rand(H, M, M, device=device)
    scores[:, torch.arange(M), torch.arange(M)] = 2.0  # the diagonal first
    keep = scores.topk(per_row, dim=-1).indices
    blocks = torch.zeros(H, M, M, dtype=torch.bool, device=device)
    blocks.scatter_(-1, keep, True)
    return blocks


def tile_order(N: int, block: int, device) -> torch.Tensor:
    """A tiling-like permutation: a random shuffle of whole 8-token rows, padded to whole blocks,
    standing in for the video layout's permutation (scattered 8-token runs, as 8-wide tiles give)."""
    L = -(-N // block) * block
    runs = torch.randperm(-(-N // 8), device=device)
    order = (runs[:, None] * 8 + torch.arange(8, device=device)).flatten()
    order = order[order < N]
    return torch.cat([order, order.new_full((L - N,), -1)]).to(torch.int32)


def dense_baselines(q, k, v, device, reps):
    out = {}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, be in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                         ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                with sdpa_kernel([be]):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)
                    out[name] = bench(lambda: _sdpa(q, k, v, be), device, reps)
            except RuntimeError as e:  # backend not available for this dtype / shape / build
                print(f"  {name}: unavailable ({str(e).splitlines()[0][:80]})")
        try:
            from flash_attn import flash_attn_func

            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            out["flash_attn"] = bench(lambda: flash_attn_func(qt, kt, vt), device, reps)
        except ImportError:
            pass
    else:
        out["sdpa_math"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device, reps)
    return out


def _sdpa(q, k, v, be):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([be]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def sweep(shapes: dict, densities, dtype, block: int, reps: int, with_flex: bool, backend: str | None):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    flex_compiled = None
    if with_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex_compiled = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
    for shape_name, (B, H, N, D) in shapes.items():
        print(f"== {shape_name}: B={B} H={H} N={N} D={D} {dtype}")
        q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
        dense = dense_baselines(q, k, v, device, reps)
        fastest_name, fastest_ms = min(dense.items(), key=lambda kv: kv[1])
        print("  dense: " + ", ".join(f"{n} {t:.3f} ms" for n, t in dense.items()))
        M = -(-N // block)
        order = tile_order(N, block, device)
        own_dense_ms = None
        for density in densities:
            blocks = fixed_count_blocks(H, M, density, device)
            mask = sv.BlockSparseMask.from_dense(blocks, block)
            real_density = mask.density()
            ms = bench(lambda: sv.block_sparse_attention(q, k, v, mask, backend=backend, check=False), device, reps)
            ms_perm = bench(lambda: sv.block_sparse_attention(q, k, v, mask, backend=backend, check=False,
                                                              token_order=order), device, reps)
            if own_dense_ms is None and density == 1.0:
                own_dense_ms = ms
            flex_ms = None
            if flex_compiled is not None:
                bm = mask.to_flex(N)
                try:
                    flex_compiled(q, k, v, block_mask=bm)
                    flex_ms = bench(lambda: flex_compiled(q, k, v, block_mask=bm), device, reps)
                except Exception as e:  # noqa: BLE001 - a baseline failing must not stop the sweep
                    print(f"  flex failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            visited = int(mask.kv_counts.sum()) * B
            flops = 4.0 * visited * block * block * D
            speedup = fastest_ms / ms
            row = {
                "shape": shape_name, "B": B, "H": H, "N": N, "D": D, "dtype": str(dtype).replace("torch.", ""),
                "block": block, "density": round(real_density, 4), "ms": round(ms, 4),
                "ms_token_order": round(ms_perm, 4),
                "permutation_overhead": round(ms_perm / ms - 1.0, 4),
                "tflops": round(flops / ms / 1e9, 2),
                "fastest_dense": fastest_name, "fastest_dense_ms": round(fastest_ms, 4),
                "speedup_vs_dense": round(speedup, 3),
                "fraction_of_ideal": round(speedup * real_density, 3),
                "speedup_vs_own_dense": round(own_dense_ms / ms, 3) if own_dense_ms else None,
                "own_fraction_of_ideal": round(own_dense_ms / ms * real_density, 3) if own_dense_ms else None,
                "flex_ms": round(flex_ms, 4) if flex_ms else None,
                "speedup_vs_flex": round(flex_ms / ms, 3) if flex_ms else None,
                **{f"dense_{n}_ms": round(t, 4) for n, t in dense.items()},
            }
            rows.append(row)
            print(f"  density {real_density:.3f}: {ms:.3f} ms ({row['tflops']} TFLOP/s), x{speedup:.2f} vs "
                  f"{fastest_name}, {row['fraction_of_ideal']:.2f} of ideal, flex {row['flex_ms']} ms, "
                  f"token_order +{100 * row['permutation_overhead']:.1f}%")
    return device, rows


def save(device, rows, tag: str) -> pathlib.Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = common.result_meta(device)
    name = meta["device"]
    base = RESULTS / f"kernel_{tag}_{common.device_slug(device)}"
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    with open(base.with_suffix(".csv"), "w", newline="") as f:
        fields = list(meta) + list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**meta, **r})
    plot(rows, base.with_suffix(".png"), name)
    print(f"results: {base}.json / .csv / .png")
    return base


def plot(rows, path, device: str):
    try:
        from sparse_vdit.viz import figure
    except ImportError:
        print("matplotlib not installed: no plot (pip install sparse_vdit[plot])")
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = figure(1, len(shapes), figsize=(5 * len(shapes), 4), dpi=110)
    for ax, s in zip(axes[0], shapes):
        rs = sorted((r for r in rows if r["shape"] == s), key=lambda r: r["density"])
        d = [r["density"] for r in rs]
        ax.plot(d, [r["speedup_vs_dense"] for r in rs], "o-", label="sparse_vdit vs fastest dense")
        if any(r["speedup_vs_flex"] for r in rs):
            ax.plot(d, [r["fastest_dense_ms"] / r["flex_ms"] if r["flex_ms"] else math.nan for r in rs],
                    "s--", label="FlexAttention vs fastest dense")
        ax.plot(d, [1.0 / x for x in d], ":", color="gray", label="ideal 1/density")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density")
        ax.set_ylabel("speedup")
        ax.set_title(s, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"block-sparse attention, {device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--shapes", nargs="*", help=f"subset of {list(SHAPES)}")
    p.add_argument("--densities", nargs="*", type=float, default=list(DENSITIES))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--backend", default=None, choices=list(sv.ops.BACKENDS))
    p.add_argument("--tag", default=None, help="name part of the result files")


def main(argv=None):
    return common.cli_main(__doc__, add_arguments, run, argv)


def run(args, p):
    shapes = common.pick(p, QUICK_SHAPES if args.quick else SHAPES, args.shapes, "shapes")
    if args.backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--backend triton: the Triton backend needs a CUDA device (this machine has none); "
                "use --backend torch, or set TRITON_INTERPRET=1 for a (slow) interpreter run")
    if not torch.cuda.is_available():
        print("No CUDA device: timings below are CPU timings of the torch backend, not kernel performance.")
    device, rows = sweep(shapes, args.densities, getattr(torch, args.dtype), args.block, args.reps,
                       not args.no_flex, args.backend)
    return save(device, rows, args.tag or ("quick" if args.quick else "sweep"))


if __name__ == "__main__":
    main()
