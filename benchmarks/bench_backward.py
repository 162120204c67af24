"""Backward benchmark (GPU): forward + backward of block-sparse attention against FlexAttention on the
same block mask and dense SDPA, at the Wan2.1-1.3B shape, over densities.

Reports median ms of fwd+bwd per backend, the speedup over dense SDPA and its fraction of the ideal
1/density. Target (issue): >= 80% of the ideal speedup at density 0.1-0.3. Not run on a CPU.

    python -m benchmarks.bench_backward                      # GPU
    python -m benchmarks.bench_backward --densities 0.2      # one density
"""
from __future__ import annotations

import argparse
import pathlib

import torch

import sparse_vdit as sv

from . import common
from .bench_kernel import bench, fixed_count_blocks

SHAPE = (1, 12, 32760, 128)  # Wan2.1-1.3B 480p x 81 frames


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--densities", nargs="*", type=float, default=[1.0, 0.3, 0.2, 0.1])
    p.add_argument("--block", type=int, default=64, help="mask block size")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention")
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/backward_<device>.json)")


def main(argv=None):
    return common.cli_main(__doc__, add_arguments, run, argv)


def run(args, p):
    if not torch.cuda.is_available():
        p.error("the backward benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    B, H, N, D = SHAPE
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16)

    def fwd_bwd(fn):
        def step():
            q.grad = k.grad = v.grad = None
            fn().backward(do)
        return step

    sdpa_ms = bench(fwd_bwd(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)), device, args.reps)
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    M = -(-N // args.block)
    for density in args.densities:
        mask = sv.BlockSparseMask.from_dense(fixed_count_blocks(H, M, density, device), args.block)
        ms = bench(fwd_bwd(lambda: sv.block_sparse_attention(q, k, v, mask, backend="triton", check=False)), device,
                   args.reps)
        flex_ms = None
        if flex is not None:
            bm = mask.to_flex(N)
            flex_ms = bench(fwd_bwd(lambda: flex(q, k, v, block_mask=bm)), device, args.reps)
        real = mask.density()
        row = {"shape": "wan2.1-1.3b-480p", "B": B, "H": H, "N": N, "D": D, "block": args.block,
               "density": round(real, 4), "fwd_bwd_ms": round(ms, 3), "sdpa_fwd_bwd_ms": round(sdpa_ms, 3),
               "flex_fwd_bwd_ms": round(flex_ms, 3) if flex_ms else None,
               "speedup_vs_sdpa": round(sdpa_ms / ms, 3), "fraction_of_ideal": round(sdpa_ms / ms * real, 3)}
        print(row)
        rows.append(row)
    out = pathlib.Path(args.out) if args.out else common.RESULTS / f"backward_{common.device_slug(device)}.json"
    return common.write_json(out, common.result_meta(device, dtype="bfloat16"), rows)


if __name__ == "__main__":
    main()
