"""The rotary pass (``sparse_vdit.kernels.rope``) compiled ahead of time for NVIDIA targets on the CPU:
registers, stack (spills) and 128-bit loads/stores, with the divisibility attributes Triton adds at
launch (HunyuanVideo 720p strides, bf16). Proxies, not speed.

    env -u TRITON_INTERPRET python -m benchmarks.static_rope
"""
from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import tempfile

import torch

from . import common


def compile_row(arch: str, head_dim: int, tiled: bool) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparse_vdit.kernels.rope import rope_kernel
    from sparse_vdit.ops.static import TARGETS

    D, H, N, L = head_dim, 24, 119_056, 119_808  # HunyuanVideo 720p tokens (+ text), its tiled length
    ints = dict(stride_xb=N * H * D, stride_xn=H * D, stride_xh=D, stride_xd=1, stride_ob=H * L * D, stride_oh=L * D,
                stride_op=D, stride_od=1, stride_cb=0, stride_cn=D // 2, stride_ch=0, stride_cd=1, stride_rb=0, H=H,
                P=L, START=0, NR=N - 256, HALF=D // 2)
    if not tiled:  # the output in model order [B, N, H, D]
        ints.update(stride_ob=N * H * D, stride_oh=D, stride_op=H * D, P=N)
    sig, consts, attrs = {}, {}, {}
    div = [["tt.divisibility", 16]]
    for i, n in enumerate(rope_kernel.arg_names):
        if n in ("x", "out"):
            sig[n], attrs[(i,)] = "*bf16", div
        elif n in ("cos", "sin"):
            sig[n], attrs[(i,)] = "*fp32", div
        elif n == "order":
            sig[n], attrs[(i,)] = "*i32", div
        elif n in ("BLOCK_P", "BLOCK_J", "HAS_ORDER"):
            sig[n], consts[(i,)] = "constexpr", {"BLOCK_P": 64, "BLOCK_J": D // 2, "HAS_ORDER": tiled}[n]
        elif ints[n] == 1:  # Triton folds integer arguments equal to 1 into constants
            sig[n], consts[(i,)] = "constexpr", 1
        else:
            sig[n] = "i32"
            if ints[n] % 16 == 0:
                attrs[(i,)] = div
    compiled = triton.compile(ASTSource(fn=rope_kernel, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget(*TARGETS[arch]),
                              options={"num_warps": 4, "num_stages": 1, "enable_fp_fusion": False})
    with tempfile.TemporaryDirectory() as d:
        cubin = pathlib.Path(d) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    ptx = compiled.asm["ptx"]
    row = {"arch": arch, "head_dim": D, "output": "tiled" if tiled else "model", "dtype": "bf16",
           "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
           "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
           "ld_global": len(re.findall(r"ld\.global", ptx)),
           "ld_global_v4": len(re.findall(r"ld\.global(\.\w+)*\.v4", ptx)),
           "st_global": len(re.findall(r"st\.global", ptx)),
           "st_global_v4": len(re.findall(r"st\.global(\.\w+)*\.v4", ptx))}
    print(row, flush=True)
    return row


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/static_rope.json)")


def run(args, p):
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("static_rope compiles kernels: run it with TRITON_INTERPRET unset")
    rows = [compile_row(arch, D, tiled) for arch in ("sm_80", "sm_90a", "sm_100a") for D in (64, 128)
            for tiled in (False, True)]
    out = pathlib.Path(args.out) if args.out else common.RESULTS / "static_rope.json"
    meta = common.result_meta(torch.device("cpu"), note="compiled on the CPU for each target; nothing ran on a GPU")
    return common.write_json(out, meta, rows)


def main(argv=None):
    return common.cli_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
