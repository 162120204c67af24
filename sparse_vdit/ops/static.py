"""Static performance check without a GPU: compile each kernel config ahead of time for every NVIDIA
architecture video users run, and read what the compiler made of it: registers, stack (spills),
shared memory, the tensor-core instruction kind, TMA copies and plain global loads.

These are proxies, not speed: they catch register spills, lost tensor cores and gathers that rule
out TMA before any GPU run. Triton's compiler and the ptxas / cuobjdump that ship in the triton
wheel run on a CPU. Run with TRITON_INTERPRET unset (``python -m sparse_vdit.ops.static``): under
the interpreter the kernels are not compilable functions.

What runs is what is compiled here: each argument gets the specialization Triton gives it at launch
(``tt.divisibility=16`` on 16-byte-aligned pointers and on integers divisible by 16, integers equal
to 1 folded into constants), for the argument values of a representative launch (Wan2.1-1.3B at
480p: 12 heads, 32,760 tokens, q/k/v as diffusers hands them over). Without those attributes a
compile overstates registers and spills.

Before sm_90 there is no TMA: a tensor-descriptor load there lowers to ordinary global loads
(``ld.global``, counted), and the MMA is ``mma.sync`` rather than ``wgmma`` (sm_90a) or ``tcgen05``
(sm_100a).
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

# arch name -> (backend, compute capability, warp size); sm_86 stands for the RTX 30 series / A10 / A40.
TARGETS = {"sm_80": ("cuda", 80, 32), "sm_86": ("cuda", 86, 32), "sm_89": ("cuda", 89, 32),
           "sm_90a": ("cuda", 90, 32), "sm_100a": ("cuda", 100, 32), "sm_120": ("cuda", 120, 32)}
GPUS = {"sm_80": "A100", "sm_86": "RTX 3090 / A10 / A40", "sm_89": "RTX 4090 / L40S", "sm_90a": "H100 / H200",
        "sm_100a": "B200", "sm_120": "RTX 5090"}
# Shared memory a block may use (bytes): the opt-in maximum per architecture.
SMEM_LIMIT = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90a": 232448, "sm_100a": 232448,
              "sm_120": 101376}
DTYPES = ("bf16", "fp16")
HEAD_DIMS = (64, 128)
MASK_BLOCKS = (64, 128)
ALL_KERNELS = ("tiled", "gather", "gather_ordered", "mass", "bwd_dq", "bwd_dkdv")
# Shipped: the tiled forward (the ``triton`` backend) and the mass kernel (calibration statistics),
# held to "no spill" on every architecture. The backward kernels (training) are a first version: dK/dV
# still spills at head_dim 128 with 128-token blocks on sm_90a, so they are listed, not yet held to it.
# The gather kernel (``triton_gather``) is kept for comparison only.
SHIPPED = ("tiled", "mass")

# The representative launch (see the module doc): Wan2.1-1.3B 480p, diffusers layout [B, N, H, D].
REP_B, REP_H, REP_N = 1, 12, 32760
REP_L = 32768  # the tiled length (whole 128-token tiles)
REP_K = 37  # width of a mask's index rows (any number: it is not a multiple of 16)


@dataclass
class StaticRow:
    arch: str
    kernel: str
    config: str
    regs: int
    stack_bytes: int
    smem_bytes: int
    mma: str
    mma_count: int
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
        raise ValueError(f"unknown kernel {name!r}; valid: {', '.join(ALL_KERNELS)}")
    return k


def _int_values(name: str, head_dim: int, block: int) -> dict[str, int]:
    """Integer argument values of the representative launch of kernel ``name``."""
    H, N, D, L = REP_H, REP_N, head_dim, REP_L
    Mq = Mk = L // block
    # q, k, v as diffusers hands them over ([B, N, H, D] seen as [B, H, N, D]); o / lse contiguous.
    qkv = {"b": N * H * D, "h": D, "n": H * D, "d": 1}
    vals = {"H": H, "N": N, "L": L, "HEAD_DIM": D, "NUM_KV_BLOCKS": Mk,
            # one broadcast mask (batch and head strides 0), contiguous rows
            "stride_cb": 0, "stride_ch": 0, "stride_cm": 1,
            "stride_ib": 0, "stride_ih": 0, "stride_im": REP_K, "stride_ik": 1,
            "stride_cn": 1, "stride_in": REP_K + 4,  # the backward's column lists (dK/dV)
            "stride_vb": 0, "stride_pb": 0, "stride_sb": 0,  # one key order for the batch (no key mask)
            "LK": N,  # the packed key order: one row per token
            "stride_ob": H * N * D, "stride_oh": N * D, "stride_on": D, "stride_od": 1,
            "stride_lb": H * N, "stride_lh": N, "stride_ln": 1,
            "stride_mb": H * Mq * Mk, "stride_mh": Mq * Mk, "stride_mm": Mk, "stride_mk": 1}
    for t in "qkv":
        for axis, v in qkv.items():
            vals[f"stride_{t}{axis}"] = v
    if name == "tiled":  # it writes o in the model's layout, [B, N, H, D]
        vals.update({f"stride_o{axis}": v for axis, v in qkv.items()})
    return vals


def _signature(name: str, fn, dtype: str, head_dim: int, block: int, tile_rows: int, rows: int):
    """(signature, constexprs, attrs) as Triton's launcher would specialize them."""
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    ints = _int_values(name, head_dim, block)
    sig, consts, attrs = {}, {}, {}
    divisible = [["tt.divisibility", 16]]
    for i, n in enumerate(fn.arg_names):
        if name == "tiled" and n in ("k", "v"):
            sig[n] = f"tensordesc<{dtype}[{block}, {block_d}]>"
        elif n in ("q", "k", "v", "o", "do", "dq", "dk", "dv"):
            sig[n], attrs[(i,)] = f"*{dtype}", divisible
        elif n in ("lse", "mass", "delta", "head_factor"):
            sig[n], attrs[(i,)] = "*fp32", divisible
        elif n in ("kv_valid", "kv_block_pad"):
            sig[n], attrs[(i,)] = "*i8", divisible
        elif n in ("kv_counts", "kv_indices", "token_order", "kv_token_order", "q_order", "tile_counts", "tile_indices",
                   "tile_flags", "q_counts", "q_indices", "head_map", "kv_start"):
            sig[n], attrs[(i,)] = "*i32", divisible
        elif n in ("sm_scale_log2", "sm_scale"):
            sig[n] = "fp32"
        elif n in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "HAS_ORDER", "Q_BLOCK", "ROWS", "DTYPE", "HAS_MAP", "HAS_FACTOR"):
            sig[n] = "constexpr"
            consts[(i,)] = {"BLOCK_M": tile_rows, "BLOCK_N": block, "BLOCK_D": block_d, "Q_BLOCK": block,
                            "HAS_ORDER": name in ("gather_ordered", "mass"), "ROWS": rows, "HAS_MAP": False, "HAS_FACTOR": False,
                            "DTYPE": {"bf16": "bfloat16", "fp16": "float16"}[dtype]}[n]
        else:
            value = ints[n]
            if value == 1:  # Triton folds integer arguments equal to 1 into constants
                sig[n], consts[(i,)] = "constexpr", 1
            else:
                sig[n] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = divisible
    return sig, consts, attrs


def kernel_rows(name: str, arch: str, head_dim: int, block: int) -> int:
    """Query rows per program (key rows for dK/dV) that the launchers pick on ``arch``."""
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    if name == "tiled":
        from .attention import tiled_kernel_rows

        return tiled_kernel_rows(block, arch)
    if name.startswith("bwd"):
        from ..kernels.tiled_attention_bwd import backward_rows

        return backward_rows(block, block, block_d)[0 if name == "bwd_dq" else 1]
    return block


def _mma_kind(ptx: str) -> tuple[str, int]:
    for kind, pattern in (("wgmma", r"wgmma\.mma_async"), ("tcgen05", r"tcgen05\.mma"), ("mma.sync", r"\bmma\.sync")):
        n = len(re.findall(pattern, ptx))
        if n:
            return kind, n
    return "none", 0


def compile_row(arch: str, name: str, dtype: str, head_dim: int, block: int, num_warps: int, num_stages: int,
                shipped: bool) -> StaticRow:
    """Compile one config for ``arch`` and read its resource use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(name).fn
    rows = kernel_rows(name, arch, head_dim, block)
    tile_rows = rows if name == "tiled" else block
    sig, consts, attrs = _signature(name, fn, dtype, head_dim, block, tile_rows, rows)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget(*TARGETS[arch]),
                              options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        cubin = pathlib.Path(d) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    mma, mma_count = _mma_kind(ptx)
    config = f"{dtype} D{head_dim} block{block} rows{rows} warps{num_warps} stages{num_stages}"
    return StaticRow(arch, name, config, regs, stack, int(compiled.metadata.shared), mma, mma_count,
                     len(re.findall(r"cp\.async\.bulk\.tensor", ptx)), len(re.findall(r"ld\.global", ptx)), shipped)


def shipped_configs(kernels=ALL_KERNELS, archs=tuple(TARGETS), dtypes=DTYPES):
    """(arch, kernel, dtype, head_dim, block, warps, stages, shipped) for every autotune config each
    kernel keeps on each architecture (the configs its pruning leaves, as at launch)."""
    from ..kernels.common import arch_configs

    for arch in archs:
        for name in kernels:
            for dtype in dtypes:
                for head_dim in HEAD_DIMS:
                    for block in MASK_BLOCKS:
                        rows = kernel_rows(name, arch, head_dim, block)
                        shipped = name in SHIPPED and runs_on(name, arch, head_dim, block)
                        for cfg in arch_configs(name, arch, rows, block, max(16, 1 << (head_dim - 1).bit_length())):
                            yield (arch, name, dtype, head_dim, block, cfg.num_warps, cfg.num_stages, shipped)


def runs_on(kernel: str, arch: str, head_dim: int, block: int) -> bool:
    """Whether the ops layer runs ``kernel`` at these blocks on ``arch`` (it refuses, or routes
    elsewhere, the tiled kernel's blocks that spill there)."""
    if kernel != "tiled":
        return True
    import torch

    from .attention import unsupported

    return unsupported("triton", torch.bfloat16, head_dim, block, block, "cuda", arch) is None


def run(kernels=ALL_KERNELS, json_path: str | None = None, progress: bool = True, archs=tuple(TARGETS),
        dtypes=DTYPES) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the static check compiles kernels: run it with TRITON_INTERPRET unset")
    rows = []
    configs = list(shipped_configs(kernels, archs, dtypes))
    for i, c in enumerate(configs):
        row = asdict(compile_row(*c))
        rows.append(row)
        if progress:
            print(f"[{i + 1}/{len(configs)}] {row['arch']:7s} {row['kernel']:14s} {row['config']:42s} "
                  f"regs {row['regs']:3d} stack {row['stack_bytes']:4d} smem {row['smem_bytes']:6d} "
                  f"{row['mma']:8s} {row['mma_count']:3d} tma {row['tma']:3d} ld.global {row['ld_global']:4d}",
                  file=sys.stderr, flush=True)
    if json_path:
        pathlib.Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        import platform

        import triton

        meta = {"targets": {a: GPUS[a] for a in archs},
                "device": f"cpu ({platform.machine()}), compile only: no GPU ran",
                "triton": triton.__version__, "note": "compiler proxies, not speed; launch-time specialization "
                "of a Wan2.1-1.3B 480p call (divisibility attributes included)"}
        pathlib.Path(json_path).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default=",".join(ALL_KERNELS))
    p.add_argument("--archs", default=",".join(TARGETS))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    out = run(tuple(a.kernels.split(",")), a.json, archs=tuple(a.archs.split(",")), dtypes=tuple(a.dtypes.split(",")))
    print(json.dumps(out))
