"""``sparse-vdit inspect``: summarize a plan JSON, or show a mask spec on a video layout."""
from __future__ import annotations

import argparse

import json

from .common import HelpFormatter


def parse_ints(text: str, n: int, name: str, minimum: int = 1) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n or any(v < minimum for v in values):
        what = "positive integers" if minimum == 1 else f"integers >= {minimum}"
        raise argparse.ArgumentTypeError(f"{name} takes {n} {what} separated by commas, got {text!r}")
    return values


def add_layout_options(p: argparse.ArgumentParser) -> None:
    """--block and --order: tiles of several kernel blocks (STA's 6,8,8; 0,0,0 for raster order)."""
    p.add_argument("--block", type=int, default=None,
                   help="kernel block size when a tile spans several blocks (e.g. --tile 6,8,8 --block 64 for STA, "
                        "--tile 0,0,0 --block 64 for raster order); default: the tile is one block")
    p.add_argument("--order", choices=["fhw", "hwf"], default="fhw",
                   help="axis order: frame-major (fhw) or position-major (hwf, Sparse VideoGen's temporal heads)")


def parse_layout(args, p: argparse.ArgumentParser) -> dict:
    """``tile``, ``block``, ``order`` for VideoLayout from --tile/--block/--order; parser errors otherwise."""
    from ..masks import check_tile

    try:
        tile = parse_ints(args.tile, 3, "--tile", minimum=0)
        check_tile(tile, getattr(args, "block", None))
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e))
    return {"tile": tile, "block": getattr(args, "block", None), "order": getattr(args, "order", "fhw")}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help="summarize a plan JSON, or show a mask spec on a layout", description=__doc__,
                       formatter_class=HelpFormatter)
    p.add_argument("plan", nargs="?", help="a plan JSON to summarize")
    p.add_argument("--mask", help='a mask spec to show instead: a kind name or JSON, e.g. \'{"kind": "radial"}\'')
    p.add_argument("--grid", default=None,
                   help="latent grid frames,height,width (tokens after patchify); default: with a plan, the grid "
                        "it was calibrated on; with --mask, 21,30,52 (Wan2.1 480p)")
    p.add_argument("--tile", default="1,8,8", help="tile t,h,w (0: the whole axis)")
    add_layout_options(p)
    p.add_argument("--text", type=int, default=None,
                   help="text tokens in the sequence; default: the plan's calibration grid's, else 0")
    p.add_argument("--png", help="save a picture of the mask (or of the plan's first layer)")
    p.add_argument("--ulysses", type=int, default=None, metavar="P",
                   help="with a plan: the work each of P Ulysses ranks gets per layer (heads split in "
                        "contiguous chunks), and the imbalance max / mean")
    p.set_defaults(func=run)
    return p


def recorded_grid(plan) -> tuple[tuple[int, int, int], int] | None:
    """The latent grid and text length a calibrated plan records (``metrics["layout"]``), or None."""
    import re

    text = (plan.metrics or {}).get("layout") or ""
    m = re.match(r"grid (\d+)x(\d+)x(\d+) tokens", text)
    if not m:
        return None
    t = re.search(r", text (\d+) ", text)
    return tuple(int(x) for x in m.groups()), int(t.group(1)) if t else 0


def run(args, p) -> int:
    import sparse_vdit as sv

    if args.plan and args.mask:
        p.error("give a plan JSON or --mask SPEC, not both (inspect shows one of them)")
    if not args.plan and not args.mask:
        p.error("give a plan JSON or --mask SPEC")
    if args.ulysses is not None and (args.mask or args.ulysses < 1):
        p.error(f"--ulysses goes with a plan and must be >= 1, got {args.ulysses}" if not args.mask
                else "--ulysses goes with a plan, not with --mask")
    if args.text is not None and args.text < 0:
        p.error(f"--text must be >= 0, got {args.text}")
    plan = sv.SparsityPlan.load(args.plan) if args.plan else None
    grid_note = ""
    if args.grid is not None:
        try:
            grid = parse_ints(args.grid, 3, "--grid")
        except argparse.ArgumentTypeError as e:
            p.error(str(e))
        text_len = args.text or 0
    elif plan is not None:
        recorded = recorded_grid(plan)
        if recorded is None:
            p.error(f"{args.plan} records no calibration grid (a hand-written plan): give --grid F,H,W")
        grid, text_len = recorded
        text_len = args.text if args.text is not None else text_len
        grid_note = " (the grid the plan was calibrated on)"
    else:
        grid, text_len = (21, 30, 52), args.text or 0
        grid_note = " (the default grid: Wan2.1 480p latents)"
    options = parse_layout(args, p)
    if args.mask:
        try:
            spec = json.loads(args.mask) if args.mask.lstrip().startswith("{") else args.mask
        except json.JSONDecodeError as e:
            p.error(f"--mask is neither a kind name nor valid JSON: {e}")
        try:
            layout = sv.VideoLayout(*grid, **options, text_len=text_len)
            mask = sv.masks.build(spec, layout)
        except ValueError as e:
            p.error(str(e))
        print(layout.describe() + grid_note)
        print(f"{sv.masks.spec_name(spec)}: density {mask.density():.4f}")
        if layout.num_blocks <= 48:
            print(mask.to_string(max_blocks=48))
        if args.png:
            print("saved", sv.viz.save_mask_png(mask, args.png, names=[sv.masks.spec_name(spec)], layout=layout))
        return 0
    print(plan.summary())
    layout = sv.VideoLayout(*grid, **plan.layout_options(), text_len=text_len)
    print(f"on {layout.describe()}{grid_note}:")
    total = 0.0
    for layer in range(plan.num_layers):
        specs = plan.layer_specs(layer)
        dens = sv.masks.head_densities(specs, layout).tolist()
        total += sum(dens)
        dense_heads = sum(s["kind"] == "dense" for s in specs)
        print(f"  layer {layer:3d}: mean density {sum(dens) / len(dens):.3f}, dense heads {dense_heads}/{len(specs)}")
    if args.ulysses is not None:
        from sparse_vdit.integration.parallel import head_imbalance

        rows = head_imbalance(plan, layout, args.ulysses)
        print(f"Ulysses {args.ulysses}: visited key blocks per rank (sum of head densities), imbalance = max / mean")
        for row in rows:
            print(f"  layer {row['layer']:3d}: ranks {row['rank_load']}  imbalance {row['imbalance']:.2f}")
        worst = max(rows, key=lambda r: r["imbalance"])
        print(f"worst layer {worst['layer']}: imbalance {worst['imbalance']:.2f} (the slowest rank sets the pace)")
    avg = total / (plan.num_layers * plan.num_heads)
    print(f"average density {avg:.3f}; attention speedup at most {1 / avg:.2f}x on sparse steps (ideal 1/density)")
    dynamic = sum(s["kind"] != "dense" and sv.masks.is_dynamic(s) for row in plan.heads for s in row)
    if dynamic:
        print(f"{dynamic} dynamic heads: their key blocks are selected per call, so their density is the most they "
              "visit (pictures show their static part)")
    if args.png:
        names = [sv.masks.spec_name(s) for s in plan.layer_specs(0)]
        print("saved", sv.viz.save_mask_png(sv.masks.build(plan.layer_specs(0), layout), args.png, names=names,
                                            layout=layout))
    return 0
