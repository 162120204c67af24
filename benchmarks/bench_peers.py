"""The peer table: for each peer family, its mask's density and our mask's recall and density at the
Wan2.1 480p (21x30x52) and HunyuanVideo 720p (33x45x80) latent grids, on the layout that aligns with
the peer and on the default (1, 8, 8) tiles. Exact token-pair counts, no timing: any machine gives the
same numbers.

    python -m benchmarks.bench_peers            # writes benchmarks/results/peers.json, prints a table
"""
from __future__ import annotations

import argparse
import pathlib

import torch

import sparse_vdit as sv
from sparse_vdit.masks import normalize_spec, peers

from . import common

GRIDS = {"wan2.1 480p": (21, 30, 52), "hunyuan 720p": (33, 45, 80)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/peers.json)")


def main(argv=None):
    return common.cli_main(__doc__, add_arguments, run, argv)


def describe(layout: sv.VideoLayout) -> str:
    order = "" if layout.order == "fhw" else f" {layout.order}"
    tile = "raster" if layout.tile == (0, 0, 0) else "x".join(map(str, layout.tile))
    return f"{tile}{order}/{layout.block_size}"


def run(args, p):
    rows = []
    for grid_name, grid in GRIDS.items():
        for kind in peers.PEERS:
            over = {"variant": "hunyuan"} if kind == "radial_attn" and grid_name.startswith("hunyuan") else {}
            spec = normalize_spec({"kind": kind, **over})
            peer = sv.masks.FAMILIES[kind].peer(spec, sv.VideoLayout(*grid))
            for which, layout in (("aligned", peers.aligned_layout(kind, *grid, spec)), ("tiles", sv.VideoLayout(*grid))):
                stats = peers.compare(sv.masks.video_blocks(spec, layout), layout, peer)
                rows.append({"grid": grid_name, "peer": sv.masks.spec_name(spec), "layout": which,
                             "layout_desc": describe(layout), **{k: round(v, 5) for k, v in stats.items()},
                             "density_ratio": round(stats["density"] / stats["peer_density"], 4)})
    print("| peer | grid | peer density | layout | recall | density | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['peer']} | {r['grid']} | {r['peer_density']:.4f} | {r['layout_desc']} | {r['recall']:.4f} | "
              f"{r['density']:.4f} | {r['density_ratio']:.3f} |")
    out = pathlib.Path(args.out) if args.out else common.RESULTS / "peers.json"
    meta = {**common.result_meta(torch.device("cpu")), "what": "exact token-pair counts (no timing; device independent)"}
    return common.write_json(out, meta, rows)


if __name__ == "__main__":
    main()
