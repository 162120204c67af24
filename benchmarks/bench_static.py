"""Static performance check (no GPU needed): compile the kernel configs each architecture keeps
(sm_80 .. sm_120) with launch-time argument specialization, and report registers, stack (spills),
shared memory, MMA kind, TMA and global-load counts.

These are compiler proxies, not speed. The table is committed as benchmarks/results/static_table.json;
tests/test_static.py and tests/test_first_contact.py fail when a shipped config spills there.

    python -m benchmarks.bench_static                     # all kernels, writes the JSON
    python -m benchmarks.bench_static --kernels tiled     # one kernel
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from . import common

KERNELS = ("tiled", "gather", "gather_ordered", "mass", "bwd_dq", "bwd_dkdv")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", default=",".join(KERNELS),
                   help="comma-separated among tiled (the triton backend), gather / gather_ordered (the "
                        "triton_gather backend without / with a token order), mass (calibration statistics), bwd_dq / bwd_dkdv (the backward)")
    p.add_argument("--archs", default="sm_80,sm_86,sm_89,sm_90a,sm_100a,sm_120", help="comma-separated targets")
    p.add_argument("--dtypes", default="bf16,fp16", help="comma-separated among bf16, fp16")
    p.add_argument("--json", default=str(common.RESULTS / "static_table.json"), help="where to write the table")


def main(argv=None):
    return common.cli_main(__doc__, add_arguments, run, argv)


def run(args, p):
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        p.error(f"unknown kernels {unknown}; valid: {list(KERNELS)}")
    # Kernels compile only outside Triton's interpreter: run the compile in a clean child process.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "sparse_vdit.ops.static", "--kernels", ",".join(kernels), "--archs", args.archs,
           "--dtypes", args.dtypes, "--json", args.json]
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"the static compile failed (exit {done.returncode}); its messages are above")
    rows = json.loads(done.stdout)
    bad = [r for r in rows if r["shipped"] and (r["stack_bytes"] > 0 or r["mma"] == "none")]
    print(f"{len(rows)} configs compiled for {args.archs}; shipped configs that spill or use no tensor cores: {len(bad)}")
    print(f"results: {args.json} (compiler proxies, not speed)")
    return args.json


if __name__ == "__main__":
    main()
