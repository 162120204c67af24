"""First contact with a GPU: the checks a first run on an H100/H200 needs before any speed figure, as one
command that writes every figure with the device name (``benchmarks/results/first_contact_<device>.json``).

    python -m benchmarks.first_contact            # all checks, a few minutes on one H100
    python -m benchmarks.first_contact --only mass,flex

Checks (each records what it measured, or why it could not run):
- ``odd_shapes``: the Triton backends against the float64 reference in bf16 and fp16 at ragged N,
  head_dim 64/128, 64- and 128-token blocks, token orders that leave tokens out; and the same under
  ``compute-sanitizer`` (memcheck) when it is on PATH.
- ``reduce_overhead``: the tiny Wan with a sparse plan under ``torch.compile(mode="reduce-overhead")``
  (CUDA graphs): graph count and agreement with eager.
- ``autotune``: the wall time of the first sparse call per kernel (autotuning included) and of the second.
- ``mass``: the Triton mass kernel against the torch path at a Wan-1.3B-like shape, with both timings.
- ``flex``: compiled FlexAttention through the ``flex`` backend with a token order at N = 32,760.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

import sparse_vdit as sv

from . import common

CHECKS = ("odd_shapes", "sanitizer", "reduce_overhead", "autotune", "mass", "flex")


def _ref_err(o, q, k, v, mask, order):
    ref, _ = sv.ops.reference_attention(q.double(), k.double(), v.double(), mask, token_order=order)
    return float((o.double() - ref).abs().max())


def odd_shapes(device) -> dict:
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for D in (64, 128):
            for block in (64, 128):
                for N, leave_out in ((1100, 0), (777, 40)):
                    g = torch.Generator(device="cpu").manual_seed(N + D)
                    q, k, v = (torch.randn(2, 3, N, D, generator=g).to(device, dtype) for _ in range(3))
                    L = -(-N // 128) * 128
                    order = torch.arange(L, dtype=torch.int32)
                    order[N - leave_out:] = -1
                    order = order.to(device)
                    M = L // block
                    blocks = torch.rand(2, 3, M, M, generator=g) < 0.4
                    mask = sv.BlockSparseMask.from_dense(blocks.to(device), block)
                    for backend in ("triton", "triton_gather"):
                        try:
                            o = sv.block_sparse_attention(q, k, v, mask, token_order=order, backend=backend)
                            err = _ref_err(o[:, :, :N - leave_out], q[:, :, :N - leave_out], k[:, :, :N - leave_out],
                                           v[:, :, :N - leave_out], mask, order)
                            rows.append(dict(dtype=str(dtype), D=D, block=block, N=N, left_out=leave_out,
                                             backend=backend, max_err=err, nan=bool(torch.isnan(o).any())))
                        except (ValueError, TypeError) as e:  # refused with a reason: recorded as such
                            rows.append(dict(dtype=str(dtype), D=D, block=block, N=N, backend=backend, refused=str(e)))
    return {"rows": rows}


def sanitizer(device) -> dict:
    tool = shutil.which("compute-sanitizer") or ("/usr/local/cuda/bin/compute-sanitizer"
                                                 if os.path.exists("/usr/local/cuda/bin/compute-sanitizer") else None)
    if tool is None:
        return {"skipped": "compute-sanitizer is not on this machine"}
    code = ("import torch, benchmarks.first_contact as f; r = f.odd_shapes(torch.device('cuda'));"
            "print('rows', len(r['rows']))")
    done = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "9", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=900)
    tail = (done.stdout + done.stderr)[-3000:]
    return {"exit": done.returncode, "errors_found": done.returncode == 9, "tail": tail}


def reduce_overhead(device) -> dict:
    import torch._dynamo.testing

    from sparse_vdit.testing import tiny_wan_transformer

    torch._dynamo.reset()
    m = tiny_wan_transformer(num_layers=3).to(device, torch.bfloat16)
    x = torch.randn(1, 16, 4, 32, 32, device=device, dtype=torch.bfloat16)
    e = torch.randn(1, 10, 64, device=device, dtype=torch.bfloat16)
    sv.apply(m, sv.uniform_plan(m, "radial", dense_layers=[-1], dense_steps=1))
    steps = (900, 800, 700, 600, 500)
    with torch.no_grad():
        eager = [m(x, torch.tensor([t], device=device), e).sample.float() for t in steps]
        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
        compiled = torch.compile(m, mode="reduce-overhead", fullgraph=True)
        got = [compiled(x, torch.tensor([t], device=device), e).sample.float() for t in steps]
    sv.remove(m)
    return {"max_err_vs_eager": max(float((a - b).abs().max()) for a, b in zip(eager, got)),
            "frames": counter.frame_count}


def autotune(device) -> dict:
    out = {}
    layout = sv.VideoLayout(frames=21, height=30, width=52, tile=(1, 8, 8), text_len=0)
    mask = sv.masks.build("radial", layout, heads=1, device=device)
    order = layout.token_order(device)
    q, k, v = (torch.randn(1, 12, layout.seq_len, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    for backend in ("triton", "triton_gather"):
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sv.block_sparse_attention(q, k, v, mask, token_order=order, backend=backend)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[backend] = {"first_call_s": times[0], "second_call_s": times[1]}
    return out


def mass(device) -> dict:
    layout = sv.VideoLayout(frames=9, height=30, width=52, tile=(1, 8, 8), text_len=0)
    order = layout.token_order(device)
    q, k = (torch.randn(1, 4, layout.seq_len, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    res = {}
    for backend in ("triton", "torch"):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m = sv.ops.block_attention_mass(q, k, 64, token_order=order, backend=backend)
        torch.cuda.synchronize()
        res[backend] = (m, time.perf_counter() - t0)
    return {"max_abs_diff": float((res["triton"][0] - res["torch"][0]).abs().max()),
            "triton_s": res["triton"][1], "torch_s": res["torch"][1], "seq_len": layout.seq_len}


def flex(device) -> dict:
    layout = sv.VideoLayout(frames=21, height=30, width=52, tile=(1, 8, 8), text_len=0)
    mask = sv.masks.build("radial", layout, heads=1, device=device)
    order = layout.token_order(device)
    q, k, v = (torch.randn(1, 12, layout.seq_len, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    o = sv.block_sparse_attention(q, k, v, mask, token_order=order, backend="flex")
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    o2 = sv.block_sparse_attention(q, k, v, mask, token_order=order, backend="flex")
    torch.cuda.synchronize()
    ref = sv.block_sparse_attention(q, k, v, mask, token_order=order, backend="triton")
    return {"first_call_s": first, "second_call_s": time.perf_counter() - t0, "seq_len": layout.seq_len,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
            "max_diff_vs_triton": float((o2.float() - ref.float()).abs().max()), "deterministic": bool(torch.equal(o, o2))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated among {', '.join(CHECKS)}")
    p.add_argument("--json", default=None, help="output file (default: benchmarks/results/first_contact_<device>.json)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("first contact needs a CUDA GPU")
    device = torch.device("cuda")
    results = {}
    for name in a.only.split(","):
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = globals()[name](device)
        except Exception as e:  # noqa: BLE001 - a failed check is a result to record, not the end of the run
            results[name] = {"failed": f"{type(e).__name__}: {e}"[:2000]}
        results[name]["wall_s"] = time.perf_counter() - t0
        print(json.dumps(results[name], default=str)[:1500], flush=True)
    path = a.json or common.RESULTS / f"first_contact_{common.device_slug(device)}.json"
    common.write_json(path, common.result_meta(device), [dict(check=k, **v) for k, v in results.items()])


if __name__ == "__main__":
    main()
