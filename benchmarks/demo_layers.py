"""The demo's attention calls on the CPU, layer by layer: a plan (the demo writes one to
``demo_out/plan.json``) at the demo's size (B=1 per CFG branch, 4 heads, N=2,048, D=32, tiles 1x4x4),
each layer's head groups as the processor makes them, timed per backend against dense SDPA
(median of 7, fp32).

    python -m benchmarks.demo_layers --plan demo_out/plan.json
"""
from __future__ import annotations

import argparse
import pathlib

import torch

import sparse_vdit as sv

from . import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", required=True, help="a plan of the learned tiny Wan (the demo's plan.json)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/demo_layers_<device>.json)")


def run(args, p):
    from sparse_vdit.integration.processor import grouped_attention
    from sparse_vdit.ops.auto import cpu_time_ms

    plan = sv.SparsityPlan.load(args.plan)
    layout = sv.VideoLayout(8, 16, 16, tile=(1, 4, 4))
    order = layout.token_order("cpu")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, 4, 32, generator=g) for _ in range(3))
    heads_first = [x.transpose(1, 2) for x in (q, k, v)]
    dense = cpu_time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(*heads_first), args.reps)
    rows = [{"backend": "dense_sdpa", "ms": round(dense, 1)}]
    print(rows[0], flush=True)
    with torch.no_grad():
        for backend in ("torch", "torch_masked", "auto"):
            proc = sv.SparseAttnProcessor(plan, backend=backend)
            for layer in range(plan.num_layers):
                groups = proc.head_groups(layer, layout, "cpu")
                ms = cpu_time_ms(lambda: grouped_attention(q, k, v, groups, order, None, backend, None), args.reps)
                row = {"backend": backend, "layer": layer, "ms": round(ms, 1), "vs_dense": round(dense / ms, 2),
                       "groups": len(groups), "density": round(proc.mask_for(layer, layout, "cpu").density(), 3),
                       "specs": sorted({sv.masks.spec_name(s) for s in plan.layer_specs(layer)})}
                rows.append(row)
                print(row, flush=True)
    device = torch.device("cpu")
    out = pathlib.Path(args.out) if args.out else common.RESULTS / f"demo_layers_{common.device_slug(device)}.json"
    return common.write_json(out, common.result_meta(device, threads=torch.get_num_threads(), plan=str(args.plan)), rows)


def main(argv=None):
    return common.cli_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
