"""Multi-GPU benchmark (not run here: written for a machine with several GPUs): one denoising step of a
real-size Wan transformer (random weights) under diffusers' Ulysses context parallelism, dense vs a
sparse plan, on every rank; rank 0 writes the result with the device name.

    torchrun --nproc-per-node 4 -m benchmarks.bench_cp --model wan2.1-14b-720p
    torchrun --nproc-per-node 2 -m benchmarks.bench_cp --model wan2.1-1.3b-480p --mask radial

Each rank holds 1/P of the tokens; sparse attention all-to-alls to all tokens of H/P heads, applies
those heads' masks and all-to-alls back (sparse_vdit.integration.parallel).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib

import torch
import torch.distributed as dist

import sparse_vdit as sv

from . import common
from .bench_e2e import MODELS, _inputs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="wan2.1-14b-720p", choices=[m for m in MODELS if m.startswith("wan")])
    p.add_argument("--mask", default="radial", help="mask spec (name or JSON) on every layer but the last")
    p.add_argument("--tile", default="1,8,8")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        p.error("run under torchrun: torchrun --nproc-per-node P -m benchmarks.bench_cp ...")
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    device, dtype = torch.device("cuda"), torch.bfloat16
    cls_name, cfg, latent, text, text_dim = MODELS[args.model]
    from diffusers import ContextParallelConfig

    model = common.build_model(cls_name, cfg, device, dtype)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    torch.manual_seed(0)  # the same inputs on every rank
    inputs = _inputs(cls_name, latent, text, text_dim, device, dtype)
    mask = json.loads(args.mask) if args.mask.lstrip().startswith("{") else args.mask
    plan = sv.uniform_plan(model, mask, dense_layers=[-1], tile=tuple(int(x) for x in args.tile.split(",")))

    def step_ms():
        times = []
        for _ in range(args.reps + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            dist.barrier()
            start.record()
            with torch.no_grad():
                model(**inputs, return_dict=False)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times[1:])[len(times[1:]) // 2]

    dense = step_ms()
    sv.apply(model, plan)
    sparse = step_ms()
    sv.remove(model)
    if rank == 0:
        row = {"model": args.model, "ulysses_degree": world, "mask": sv.masks.spec_name(mask),
               "dense_step_ms": round(dense, 2), "sparse_step_ms": round(sparse, 2), "speedup": round(dense / sparse, 3)}
        print(row)
        out = pathlib.Path(args.out) if args.out else common.RESULTS / f"cp_{world}x_{common.device_slug(device)}.json"
        common.write_json(out, common.result_meta(device, dtype="bfloat16", world_size=world), [row])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
