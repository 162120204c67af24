"""Static performance check without a GPU: compile each shipped kernel config ahead of time for
Hopper (sm_90a) and read what the compiler made of it: registers, stack (spills), shared memory,
wgmma (tensor-core) instructions, TMA copies and plain global loads.

These are proxies, not speed: they catch register spills, lost tensor cores and gathers that rule
out TMA before any GPU run. Triton's compiler and the ptxas / cuobjdump that ship in the triton
wheel run on a CPU. Run with TRITON_INTERPRET unset (``python -m sparse_vdit.ops.static``):
under the interpreter the kernels are not compilable functions.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

TARGET = ("cuda", 90, 32)
DTYPES = ("bf16", "fp16")
HEAD_DIMS = (64, 128)
MASK_BLOCKS = (64, 128)
ALL_KERNELS = ("tiled", "gather", "gather_ordered", "mass", "bwd_dq", "bwd_dkdv")
# The backward kernels are correct (tests) but a first version: they still spill at head_dim 128, so
# the table lists them as not yet meeting the shipped bar (no spills), which tests hold the others to.
SHIPPED = ("tiled", "mass")  # kernel blocks that the shipped tiles give: (1, 8, 8) / (2, 4, 8) -> 64, (2, 8, 8) -> 128


@dataclass
class StaticRow:
    kernel: str
    config: str
    regs: int
    stack_bytes: int
    smem_bytes: int
    wgmma: int
    tma: int
    ld_global: int
    shipped: bool


def _kernel(name: str):
    if name == "tiled":
        from ..kernels.tiled_attention import block_sparse_attention_tiled_fwd_kernel as k
    elif name.startswith("gather"):
        from ..kernels.attention import block_sparse_attention_fwd_kernel as k
    elif name == "mass":
        from ..kernels.mass import block_attention_mass_kernel as k
    elif name == "bwd_dq":
        from ..kernels.tiled_attention_bwd import block_sparse_attention_bwd_dq_kernel as k
    elif name == "bwd_dkdv":
        from ..kernels.tiled_attention_bwd import block_sparse_attention_bwd_dkdv_kernel as k
    else:
        raise ValueError(f"unknown kernel {name!r}; valid: tiled, gather, gather_ordered, mass, bwd_dq, bwd_dkdv")
    return k


def backward_rows(q_block, kv_block, block_d):
    from ..kernels.tiled_attention_bwd import backward_rows as rows

    return rows(q_block, kv_block, block_d)


def _signature(name: str, fn, dtype: str, head_dim: int, block: int, tile_rows: int) -> tuple[dict, dict]:
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    sig, consts = {}, {}
    for i, n in enumerate(fn.arg_names):
        if name == "tiled" and n in ("q", "o"):
            sig[n] = f"tensordesc<{dtype}[{tile_rows}, {block_d}]>"
        elif name == "tiled" and n in ("k", "v"):
            sig[n] = f"tensordesc<{dtype}[{block}, {block_d}]>"
        elif n in ("q", "k", "v", "o", "do", "dq", "dk", "dv"):
            sig[n] = f"*{dtype}"
        elif n in ("lse", "mass", "delta"):
            sig[n] = "*fp32"
        elif n in ("kv_valid", "kv_block_pad"):
            sig[n] = "*i8"
        elif n in ("kv_counts", "kv_indices", "token_order", "kv_token_order", "tile_counts", "tile_indices",
                   "tile_flags", "q_counts", "q_indices"):
            sig[n] = "*i32"
        elif n in ("sm_scale_log2", "sm_scale"):
            sig[n] = "fp32"
        elif n in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "HAS_ORDER", "Q_BLOCK", "ROWS"):
            sig[n] = "constexpr"
            rows = backward_rows(block, block, block_d)[0 if name == "bwd_dq" else 1]  # as the launcher picks
            consts[(i,)] = {"BLOCK_M": tile_rows, "BLOCK_N": block, "BLOCK_D": block_d, "Q_BLOCK": block,
                            "HAS_ORDER": name in ("gather_ordered", "mass"), "ROWS": rows}[n]
        elif n.endswith("_qd") or n.endswith("_kd") or n.endswith("_vd") or n.endswith("_od"):
            sig[n] = "constexpr"  # unit strides of the last dim, as Triton specializes them at run time
            consts[(i,)] = 1
        else:
            sig[n] = "i32"
    return sig, consts


def compile_row(name: str, dtype: str, head_dim: int, block: int, num_warps: int, num_stages: int,
                shipped: bool) -> StaticRow:
    """Compile one config for sm_90a and read its resource use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(name).fn
    tile_rows = 128 if (name == "tiled" and block <= 128 and 128 % block == 0) else block
    sig, consts = _signature(name, fn, dtype, head_dim, block, tile_rows)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget(*TARGET),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        cubin = pathlib.Path(d) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    if name.startswith("bwd"):
        tile_rows = backward_rows(block, block, max(16, 1 << (head_dim - 1).bit_length()))[0 if name == "bwd_dq" else 1]
    config = f"{dtype} D{head_dim} block{block} rows{tile_rows} warps{num_warps} stages{num_stages}"
    return StaticRow(name, config, regs, stack, int(compiled.metadata.shared),
                     len(re.findall(r"wgmma\.mma_async", ptx)), len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
                     len(re.findall(r"ld\.global", ptx)), shipped)


def shipped_configs(kernels=ALL_KERNELS):
    """(kernel, dtype, head_dim, block, warps, stages, shipped) for every autotune config of each
    kernel. Shipped: the tiled kernel (the ``triton`` backend) and the mass kernel (calibration and
    analysis statistics). The gather kernel (``triton_gather``, in both its forms) is kept beside them
    for comparison only: ``auto`` may pick it where a GPU measures it faster; some of its configs
    spill, which this table shows."""
    from ..kernels.common import autotune_configs, tile_configs

    for name in kernels:
        stages = {"mass": (2, 3), "bwd_dq": (1, 2), "bwd_dkdv": (1, 2)}.get(name, (2, 3, 4))
        for dtype in DTYPES:
            for head_dim in HEAD_DIMS:
                for block in MASK_BLOCKS:
                    configs = autotune_configs(stages=stages, interpret=False)
                    if name.startswith("bwd"):
                        configs = [c for c in configs if c.num_warps == 8]
                    rows = 128 if (name == "tiled" and 128 % block == 0) else block
                    if name in ("tiled", "mass"):  # the kernels that prune their autotune space
                        configs = tile_configs(configs, rows, block, max(16, 1 << (head_dim - 1).bit_length()))
                    for cfg in configs:
                        yield (name, dtype, head_dim, block, cfg.num_warps, cfg.num_stages, name in SHIPPED)


def run(kernels=ALL_KERNELS, json_path: str | None = None,
        progress: bool = True) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the static check compiles kernels: run it with TRITON_INTERPRET unset")
    rows = []
    configs = list(shipped_configs(kernels))
    for i, c in enumerate(configs):
        row = asdict(compile_row(*c))
        rows.append(row)
        if progress:
            print(f"[{i + 1}/{len(configs)}] {row['kernel']:15s} {row['config']:45s} regs {row['regs']:3d} "
                  f"stack {row['stack_bytes']:4d} smem {row['smem_bytes']:6d} wgmma {row['wgmma']:3d} "
                  f"tma {row['tma']:3d} ld.global {row['ld_global']:4d}", file=sys.stderr, flush=True)
    if json_path:
        pathlib.Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        import platform

        import triton

        meta = {"target": "sm_90a", "device": f"cpu ({platform.machine()}), compile only: no GPU ran",
                "triton": triton.__version__, "note": "compiler proxies, not speed"}
        pathlib.Path(json_path).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default=",".join(ALL_KERNELS))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    out = run(tuple(a.kernels.split(",")), a.json)
    print(json.dumps(out))
