"""The peer table: each peer family's recall and density against the peer's mask, at the Wan2.1 480p
(21x30x52) and HunyuanVideo 720p (33x45x80) latent grids and at the peers' own script shapes. Exact
token-pair counts, no timing: any machine gives the same numbers.

    sparse-vdit bench peers --peer-src DIR   # the peers' own code: writes benchmarks/results/peers_src.json
    sparse-vdit bench peers                  # our transcriptions only: writes benchmarks/results/peers.json

With ``--peer-src``, DIR holds checkouts of the peers (any of them), named as on GitHub:

    DIR/radial-attention   mit-han-lab/radial-attention (radial_attn/attn_mask.py)
    DIR/Sparse-VideoGen    svg-project/Sparse-VideoGen (svg/models/{wan,hyvideo}/utils.py, wan/placement.py)
    DIR/FastVideo          hao-ai-lab/FastVideo at 908c43ca or earlier (fastvideo-kernel/tests/support_flex_sta.py;
                           STA is gone from its HEAD), a sparse checkout of that one file is enough

Each peer's mask function is imported from there and run on the CPU (its CUDA-only imports stubbed,
``benchmarks/peer_src.py``); its token pairs are counted exactly against our mask on the aligned
layout, and against our own transcription of the peer (``sparse_vdit.masks.peers``). Each row
records the checkout's commit. The slowest rows evaluate a ``mask_mod`` on every token pair (the
committed run took 27 minutes on a 2-core CPU; ``--only`` picks rows).
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
    p.add_argument("--out", default=None,
                   help="result file (default: benchmarks/results/peers_src.json with --peer-src, else peers.json)")
    p.add_argument("--peer-src", default=None, metavar="DIR",
                   help="a directory of the peers' checkouts: run their own mask code (see the module doc)")
    p.add_argument("--only", default=None, help="run only the --peer-src rows whose peer or shape contains this")


def main(argv=None):
    return common.cli_main(__doc__, add_arguments, run, argv)


def describe(layout: sv.VideoLayout) -> str:
    order = "" if layout.order == "fhw" else f" {layout.order}"
    tile = "raster" if layout.tile == (0, 0, 0) else "x".join(map(str, layout.tile))
    return f"{tile}{order}/{layout.block_size}"


def run(args, p):
    if args.peer_src:
        return run_peer_src(args, p)
    rows = []
    for grid_name, grid in GRIDS.items():
        for kind in peers.PEERS:
            over = ({"variant": "hunyuan"} if kind in ("radial_attn", "svg_spatial", "svg_temporal")
                    and grid_name.startswith("hunyuan") else {})
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


# ---------------------------------------------------------------------------- the peers' own code
README_WAN, README_HY = (21, 30, 52), (33, 45, 80)


def src_cases():
    """(peer repo, shape label, grid, our spec, how to call the peer's code)."""
    out = []
    for label, grid, variant, decay, block in (
            ("README Wan2.1 480p", README_WAN, "wan", 1.0, 128),
            ("README HunyuanVideo 720p", README_HY, "hunyuan", 1.0, 128),
            ("Radial wan_t2v_inference.sh (768x1280x69)", (18, 48, 80), "wan", 0.2, 128),
            ("Radial wan_22_t2v_inference.sh (768x1280x77), 64-token processor", (20, 48, 80), "wan", 0.8, 64),
            ("Radial wan_22_t2v_inference.sh (768x1280x77), 128-token processor", (20, 48, 80), "wan", 0.8, 128),
            ("Radial hunyuan_t2v_inference.sh (768x1280x117)", (30, 48, 80), "hunyuan", 0.95, 128)):
        spec = {"kind": "radial_attn", "variant": variant, "decay_factor": decay, "block": block}
        out.append(("radial_attn", label, grid, spec, ("radial", variant, decay, block)))
    for label, grid, variant, sparsity in (
            ("README Wan2.1 480p (SVG Wan scripts' sparsity 0.3)", README_WAN, "wan", 0.3),
            ("SVG wan_t2v_720p_svg.sh (720x1280x81)", (21, 45, 80), "wan", 0.3),
            ("README HunyuanVideo 720p = SVG hyvideo_t2v_720p_svg.sh (sparsity 0.25)", README_HY, "hunyuan", 0.25)):
        for kind in ("svg_spatial", "svg_temporal"):
            spec = {"kind": kind, "variant": variant, "sparsity": sparsity}
            out.append(("svg", label, grid, spec, ("svg_attend", variant, sparsity, kind == "svg_temporal")))
    for label, grid, variant in (
            ("README Wan2.1 480p", README_WAN, "wan"),
            ("HunyuanVideo 480p (720x480x129; the largest the N x N build fits here)", (33, 30, 45), "hunyuan")):
        for kind in ("svg_spatial", "svg_temporal"):
            spec = {"kind": kind, "variant": variant, "mask": "select"}
            out.append(("svg", label, grid, spec, ("svg_select", variant, kind == "svg_temporal")))
    for label, grid, windows in (
            ("FastVideo canvas 18x48x80", (18, 48, 80), ([3, 3, 3], [1, 3, 5], [3, 5, 7])),
            ("FastVideo canvas 30x48x80", (30, 48, 80), ([3, 3, 3],)),
            ("FastVideo canvas 36x48x48", (36, 48, 48), ([3, 3, 3], [5, 3, 3])),
            ("README Wan2.1 480p (canvas padded to whole tiles)", README_WAN, ([3, 3, 3],)),
            ("README HunyuanVideo 720p (canvas padded to whole tiles)", README_HY, ([3, 3, 3],))):
        for window in windows:
            spec = {"kind": "sta", "window": window, "tile": [6, 8, 8]}
            out.append(("sta", label, grid, spec, ("sta", window, [6, 8, 8])))
    return out


def run_peer_src(args, p):
    import time

    from .peer_src import PeerSource

    src = PeerSource(args.peer_src)
    missing = [peer for peer in ("radial_attn", "svg", "sta") if not src.has(peer)]
    if len(missing) == 3:
        p.error(f"--peer-src {args.peer_src} holds none of the peers' checkouts (radial-attention, "
                f"Sparse-VideoGen, FastVideo)")
    rows = []
    for peer, label, grid, spec, call in src_cases():
        if peer in missing or (args.only and args.only not in f"{peer} {spec['kind']} {label}"):
            continue
        spec = normalize_spec(spec)
        layout = sv.masks.spec_layout(spec, peers.aligned_layout(spec["kind"], *grid, spec))
        t0 = time.perf_counter()
        joint = getattr(src, call[0])(layout, *call[1:])
        seconds = time.perf_counter() - t0
        ours = sv.masks.video_blocks(spec, layout)
        stats = peers.compare_counts(ours, layout, joint)
        mine = peers.compare(ours, layout, sv.masks.FAMILIES[spec["kind"]].peer(spec, layout))
        row = {"peer": sv.masks.spec_name(spec), "spec": spec, "shape": label, "grid": "x".join(map(str, grid)),
               "peer_code": f"{peer_src_repo(peer)}@{src.commit(peer)[:10]}", "peer_file": peer_src_file(call[0]),
               "layout": describe(layout), **{k: round(v, 6) for k, v in stats.items()},
               "density_ratio": round(stats["density"] / stats["peer_density"], 4) if stats["peer_density"] else None,
               "transcription_density": round(mine["peer_density"], 6),
               "transcription_equal": abs(mine["peer_density"] - stats["peer_density"]) < 1e-12
               and abs(mine["recall"] - stats["recall"]) < 1e-12,
               "seconds": round(seconds, 1)}
        rows.append(row)
        print(f"{row['peer']:<34} {row['grid']:<9} peer {row['peer_density']:.4f}  recall {row['recall']:.4f}  "
              f"ratio {row['density_ratio']}  transcription {'=' if row['transcription_equal'] else '!='}  "
              f"({seconds:.0f} s)  {label}", flush=True)
    for peer in missing:
        print(f"skipped {peer}: no {src.checkout(peer)}")
    print()
    print(markdown_src(rows))
    out = pathlib.Path(args.out) if args.out else common.RESULTS / "peers_src.json"
    meta = {**common.result_meta(torch.device("cpu")),
            "what": "the peers' own mask code run on the CPU (CUDA-only imports stubbed); exact token-pair counts "
                    "against our mask on the aligned layout (no timing; device independent)",
            "peer_commits": {peer: src.commit(peer) for peer in ("radial_attn", "svg", "sta") if peer not in missing}}
    return common.write_json(out, meta, rows)


def markdown_src(rows: list[dict]) -> str:
    """The README's table from ``run_peer_src`` rows."""
    lines = ["| peer code run (commit) | family spec | shape | grid | peer density | recall | density ratio | "
             "transcription |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["density_ratio"] is None else f"{r['density_ratio']:.4f}"
        lines.append(f"| `{r['peer_file'].split(':')[-1]}` ({r['peer_code'].split('/')[-1]}) | `{r['peer']}` | "
                     f"{r['shape']} | {r['grid']} | {r['peer_density']:.4f} | {r['recall']:.4f} | {ratio} | "
                     f"{'equal' if r['transcription_equal'] else 'DIFFERS'} |")
    return "\n".join(lines)


def peer_src_repo(peer: str) -> str:
    return {"radial_attn": "mit-han-lab/radial-attention", "svg": "svg-project/Sparse-VideoGen",
            "sta": "hao-ai-lab/FastVideo"}[peer]


def peer_src_file(call: str) -> str:
    return {"radial": "radial_attn/attn_mask.py:gen_log_mask_shrinked",
            "svg_attend": "svg/models/{wan,hyvideo}/utils.py:generate_temporal_head_mask_mod + sparsity_to_width",
            "svg_select": "svg/models/{wan,hyvideo}/utils.py:get_attention_mask",
            "sta": "fastvideo-kernel/tests/support_flex_sta.py:generate_sta_mask"}[call]


if __name__ == "__main__":
    main()
