"""Worker for the context-parallel tests: one process per rank (gloo on the CPU). Imported by
torch.multiprocessing in the spawned processes, so it lives in a module of its own."""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

SPARSE = {"kind": "sliding_tile", "window": [1, 1, 3]}


def _model_and_inputs(family):
    from sparse_vdit.testing import tiny_wan_transformer

    g = torch.Generator().manual_seed(0)
    if family == "wan":
        model = tiny_wan_transformer(num_layers=2, seed=0)
        x, e = torch.randn(1, 16, 2, 16, 16, generator=g), torch.randn(1, 10, 64, generator=g)

        def forward(m):
            with torch.no_grad():
                return m(x, torch.tensor([900]), e, return_dict=False)[0]
    else:
        from diffusers import LTXVideoTransformer3DModel

        torch.manual_seed(0)
        model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                           num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                                           num_layers=2, caption_channels=16).eval()
        f, h, w = 2, 8, 8
        x, e = torch.randn(1, f * h * w, 8, generator=g), torch.randn(1, 10, 16, generator=g)

        def forward(m):
            # No prompt mask: diffusers 0.42's own Ulysses attention (native backend) fails on LTX's
            # cross-attention mask ([1, 1, T] is not split per head), with or without sparse_vdit.
            with torch.no_grad():
                return m(x, e, torch.tensor([900]), None, num_frames=f, height=h, width=w,
                         rope_interpolation_scale=(1.0, 1.0, 1.0), return_dict=False)[0]
    return model, forward


def _leave():
    """Wait for every rank before tearing down. Rank 0 hosts the store: were it to leave first (ring
    mode has no collective after enable_parallelism), a rank still building its one-rank mesh group
    would find the store gone (DistNetworkError: Broken pipe)."""
    dist.barrier()
    dist.destroy_process_group()


def run(rank, world, port, family, mode, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    # diffusers picks the device as rank % accelerator count: a CPU has none; one stands in for it.
    torch.accelerator.device_count = lambda: 1
    import sparse_vdit as sv
    from diffusers import ContextParallelConfig

    result = {}
    try:
        model, forward = _model_and_inputs(family)
        plan = sv.uniform_plan(model, SPARSE, tile=(1, 4, 4)) if mode != "dense" else sv.dense_plan(model, tile=(1, 4, 4))
        result["stock_single"] = forward(model)
        sv.apply(model, plan, backend="torch")
        result["ours_single"] = forward(model)
        sv.remove(model)
        config = ContextParallelConfig(ring_degree=world) if mode == "ring" else ContextParallelConfig(ulysses_degree=world)
        model.enable_parallelism(config=config)
        if mode == "dense":
            result["stock_parallel"] = forward(model)
        sv.apply(model, plan, backend="torch")
        try:
            result["ours_parallel"] = forward(model)
        except ValueError as e:
            result["error"] = str(e)
    finally:
        # Plain tensors (diffusers' gathered outputs are async collective wrappers).
        plain = {k: torch.from_numpy(v.detach().cpu().numpy().copy()) if isinstance(v, torch.Tensor) else v
                 for k, v in result.items()}
        torch.save(plain, os.path.join(out_dir, f"rank{rank}.pt"))
        _leave()


def roundtrip(rank, world, port, out_dir):
    """sequence_to_heads / heads_to_sequence with heads that do not divide by the ranks (3 over 2)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    from sparse_vdit.integration.parallel import Ulysses, heads_to_sequence, sequence_to_heads

    try:
        x = torch.randn(2, 8, 3, 4, generator=torch.Generator().manual_seed(0))  # the same on every rank
        u = Ulysses(dist.group.WORLD, world, rank)
        mine = x.chunk(world, dim=1)[rank]
        heads = sequence_to_heads(mine, u)  # [2, 8, 2, 4]: padded to 4 heads, 2 per rank
        padded = torch.nn.functional.pad(x, (0, 0, 0, 1))
        ok = torch.equal(heads, padded[:, :, 2 * rank:2 * rank + 2]) and torch.equal(heads_to_sequence(heads, u, 3), mine)
    finally:
        torch.save({"ok": ok}, os.path.join(out_dir, f"rank{rank}.pt"))
        _leave()
