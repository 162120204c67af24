"""Command line: ``sparse-vdit demo | calibrate | analyze | edit | inspect | bench``, one module per subcommand, each
with ``add_parser(sub)`` and ``run(args, parser)``.

A mistake a user can make (a bad value, a missing file, a plan that does not fit) ends in one
message and exit code 2, never a traceback; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import pathlib
import sys

from . import analyze, calibrate, demo, edit, inspect
from .common import HelpFormatter, first_sentence

BENCHMARKS = {"kernel": "bench_kernel", "e2e": "bench_e2e", "calibration": "bench_calibration",
              "static": "bench_static", "backward": "bench_backward", "masks": "bench_masks",
              "peers": "bench_peers", "quality": "bench_quality", "overhead": "bench_overhead", "edit": "bench_edit"}


def benchmarks_module(name: str):
    """A module of ``benchmarks/`` (beside the package in a source checkout; it uses only the public API)."""
    root = pathlib.Path(__file__).resolve().parents[2]
    if (root / "benchmarks" / f"{name}.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ImportError as e:
        raise SystemExit(f"sparse-vdit bench needs a source checkout with benchmarks/{name}.py ({e})") from e


def _common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What every subcommand takes: --debug (after the subcommand too), and its own parser for errors."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    p.set_defaults(cli_parser=p)
    return p


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: kernel | e2e | calibration | static | backward | masks | peers | quality | overhead | edit "
                       "(source checkout)",
                       description="Benchmarks; results go to benchmarks/results/ with the device name.")
    kinds = p.add_subparsers(dest="bench", metavar="{" + ",".join(BENCHMARKS) + "}", required=True)
    for kind, module_name in BENCHMARKS.items():
        try:
            module = benchmarks_module(module_name)
        except SystemExit:
            module = None
        doc = (module.__doc__ or "").split("\n\n")[0] if module else f"needs benchmarks/{module_name}.py"
        bp = kinds.add_parser(kind, help=first_sentence(doc) or kind, description=doc,
                              formatter_class=HelpFormatter)
        _common(bp)
        if module is not None:
            module.add_arguments(bp)
            bp.set_defaults(func=lambda args, parser, m=module: m.run(args, parser) and 0)
        else:
            bp.set_defaults(func=lambda args, parser, n=module_name: parser.error(
                f"needs a source checkout with benchmarks/{n}.py"))


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="sparse-vdit", description="Sparse attention for video diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"sparse_vdit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="{demo,calibrate,analyze,edit,inspect,bench}", required=True)
    for module in (demo, calibrate, analyze, edit, inspect):
        _common(module.add_parser(sub))
    _add_bench(sub)
    return parser


# Loggers of optional packages that diffusers imports when they are installed, and whose import-time
# warnings say nothing about what a command here does (none uses them): torchao, if its C++
# extensions were built for another torch, logs each it cannot load; diffusers logs that some
# torchao tensor types moved; torch's pytree logs deprecations of how torchao registers enums.
# (torchao is a test dependency: the compatibility table's quantized-weights row.)
QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def _quiet_optional_imports() -> None:
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    _quiet_optional_imports()
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    sub = args.cli_parser  # the subcommand's parser, so its error messages name it
    try:
        return args.func(args, sub) or 0
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            RuntimeError, ImportError, OSError) as e:
        if args.debug:
            raise
        lines = str(e).strip().splitlines() or [""]
        more = " ..." if len(lines) > 1 else ""
        sub.error(f"{type(e).__name__}: {lines[0]}{more}  (--debug shows the traceback)")
    return 2


if __name__ == "__main__":
    sys.exit(main())
