"""Mask memory and build time for a calibrated-like plan at HunyuanVideo 720p x 129 frames: 60 layers x
24 heads, each head one of a few sparse specs (or dense), as a per-head calibration leaves them.

Reports the bytes the processor's masks hold for one layout (the block indices, and the tiled
kernel's query-tile lists the Triton backend derives from them) and the time to build both. Layers
share one mask per distinct spec (``SparseAttnProcessor.head_groups``). The issue's target:
<= 64 MiB and <= 2 s. CPU runs measure the same memory (it does not depend on the device).

    python -m benchmarks.bench_masks            # CPU or GPU
"""
from __future__ import annotations

import argparse
import pathlib
import random
import time

import torch

import sparse_vdit as sv

from . import common

SPECS = [{"kind": "sliding_tile", "window": [3, 3, 3]}, {"kind": "sliding_tile", "window": [1, 3, 3]},
         {"kind": "radial", "dense_frames": 1}, {"kind": "spatial", "frames": 1}, {"kind": "temporal", "radius": 1},
         {"kind": "dense"}]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=60)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--grid", default="33,45,80", help="latent tokens frames,height,width")
    p.add_argument("--text", type=int, default=256, help="text tokens in the sequence")
    p.add_argument("--tile", default="1,8,8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/masks_<device>.json)")


def main(argv=None):
    return common.cli_main(__doc__, add_arguments, run, argv)


def run(args, p):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = random.Random(args.seed)
    heads = [[rng.choice(SPECS) for _ in range(args.heads)] for _ in range(args.layers)]
    tile = tuple(int(x) for x in args.tile.split(","))
    plan = sv.SparsityPlan(heads=heads, tile=tile)
    grid = tuple(int(x) for x in args.grid.split(","))
    layout = sv.VideoLayout(*grid, tile=tile, text_len=args.text, text_position="after")
    proc = sv.SparseAttnProcessor(plan)
    t0 = time.perf_counter()
    for layer in range(plan.num_layers):
        if plan.layer_is_dense(layer):
            continue
        groups = proc.head_groups(layer, layout, device)  # what a sparse forward of the layer uses
        for g in groups:
            if g.mask is not None:  # the tiled Triton kernel's query-tile lists, built once per mask
                g.mask.query_tiles(sv.ops.attention.tiled_kernel_rows(g.mask.q_block))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    index_bytes = proc.cached_mask_bytes(layout, device)
    tile_bytes = proc.cached_mask_bytes(layout, device, tile_rows=sv.ops.attention.tiled_kernel_rows(layout.block_size)) - index_bytes
    distinct = len({sv.masks.spec_name(s) for row in heads for s in row})
    row = {"layers": args.layers, "heads": args.heads, "layout": layout.describe(), "distinct_specs": distinct,
           "index_mib": round(index_bytes / 2**20, 1), "query_tile_mib": round(tile_bytes / 2**20, 1),
           "build_s": round(seconds, 2), "target": "<= 64 MiB, <= 2 s"}
    print(row)
    out = pathlib.Path(args.out) if args.out else common.RESULTS / f"masks_{common.device_slug(device)}.json"
    return common.write_json(out, common.result_meta(device), [row])


if __name__ == "__main__":
    main()
