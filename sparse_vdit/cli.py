"""Command line: ``sparse-vdit demo | calibrate | inspect | bench``."""
from __future__ import annotations

import argparse
import pathlib
import sys


def _benchmarks_module(name: str):
    # The benchmarks live beside the package in a source checkout (they use only the public API).
    root = pathlib.Path(__file__).resolve().parent.parent
    if (root / "benchmarks" / f"{name}.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        import importlib

        return importlib.import_module(f"benchmarks.{name}")
    except ImportError as e:
        raise SystemExit(f"sparse-vdit bench needs a source checkout with benchmarks/{name}.py ({e})") from e


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="sparse-vdit", description="Sparse attention for video diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="dense vs sparse on an embedded tiny Wan model", add_help=False)
    sub.add_parser("inspect", help="summarize a plan JSON or show a mask", add_help=False)
    sub.add_parser("calibrate", help="choose per-head masks for a model", add_help=False)
    bench = sub.add_parser("bench", help="benchmarks: kernel | e2e | calibration", add_help=False)
    del bench
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        modules = {"kernel": "bench_kernel", "e2e": "bench_e2e", "calibration": "bench_calibration"}
        if not rest or rest[0] not in modules:
            parser.error(f"usage: sparse-vdit bench {{{','.join(modules)}}} [options]")
        module = modules[rest[0]]
        _benchmarks_module(module).main(rest[1:])
        return 0
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest) or 0
    if command == "inspect":
        from .inspect_cmd import main as inspect_main

        return inspect_main(rest) or 0
    if command == "calibrate":
        from .calibration.cli import main as calibrate_main

        return calibrate_main(rest) or 0
    parser.error(f"unknown command {command!r}; valid: demo, calibrate, inspect, bench")
    return 2


if __name__ == "__main__":
    sys.exit(main())
