"""What every benchmark shares: the device's name and the metadata written beside each result."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import pathlib

import torch

from sparse_vdit.cli.common import HelpFormatter

import sparse_vdit as sv

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    return sv.ops.device_name(device)


def result_meta(device: torch.device, **extra) -> dict:
    """Device, versions and date: recorded with every result row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency on Linux
        triton_version = None
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "sparse_vdit": sv.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra}


def device_slug(device: torch.device) -> str:
    return "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")


def write_json(path: pathlib.Path, meta: dict, rows: list[dict]) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"results: {path}")
    return path


def cli_main(doc: str, add_arguments, run, argv=None):
    """``python -m benchmarks.X``: the same options as ``sparse-vdit bench X``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=HelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv), p)


def pick(parser, table: dict, names, what: str) -> dict:
    """The entries of ``table`` that ``names`` choose (all when none), or a parser error naming the valid ones."""
    if not names:
        return table
    unknown = sorted(set(names) - set(table))
    if unknown:
        parser.error(f"unknown {what} {unknown}; valid: {list(table)}")
    return {k: table[k] for k in names}


def build_model(cls_name: str, config: dict, device: torch.device, dtype: torch.dtype):
    """A diffusers transformer with random weights, built directly in ``dtype`` on ``device`` (a 14B
    model in fp32 would not fit)."""
    import diffusers

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return getattr(diffusers, cls_name)(**config).eval()
    finally:
        torch.set_default_dtype(prev)
