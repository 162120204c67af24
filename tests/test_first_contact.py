"""What a first run on an H100 would hit, checked on the CPU with tools this project did not write:
``torch.library.opcheck``, inductor's stride asserts on custom-op outputs, a poisoned ``torch.empty``,
a host-sync counter (a ``TorchDispatchMode``), Triton's interpreter at int32-overflowing offsets, and
Triton's own autotuner and compiler options. One test (or a few) per defect of the review."""
import pathlib
import re
import sys

import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.ops import BlockSparseMask, block_sparse_attention, sparse_attention
from sparse_vdit.ops.attention import (block_sparse_attention_bwd_op, block_sparse_attention_op, unsupported)

from .helpers import SyncCounter, check_against_reference, max_err, rand_qkv

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _mask(H=2, M=4, block=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(H, M, M, generator=g) < 0.5
    blocks[:, torch.arange(M), torch.arange(M)] = True
    return BlockSparseMask.from_dense(blocks, block)


# ---------------------------------------------------------------------------- 1. fakes and inductor
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_forward_and_backward_ops(backend):
    """torch.library's own checks (schema, fake tensors, autograd registration, AOT dispatch) on both
    custom ops, with q/k/v in diffusers' layout (transposed views)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    B, H, N, D = 1, 2, 200, 16
    q, k, v = (torch.randn(B, N, H, D, dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(3))
    mask = _mask(H)
    extra = (*mask.query_tiles(128), 128) if backend == "triton" else ()
    args = (q, k, v, mask.kv_counts, mask.kv_indices, None, None, 0.25, 64, 64, mask.num_q_blocks, backend, *extra)
    torch.library.opcheck(block_sparse_attention_op, args)
    o, lse = block_sparse_attention_op(*args)
    bargs = (torch.randn_like(o), torch.zeros_like(lse), q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(),
             mask.kv_counts, mask.kv_indices, None, None, 0.25, 64, 64, mask.num_q_blocks, backend)
    torch.library.opcheck(block_sparse_attention_bwd_op, bargs)



def test_opcheck_on_the_packed_key_order_with_a_key_mask_head_map_and_head_factor():
    """The same checks on the tiled kernel's own path: k and v in the packed key order of a grid its
    tiles cut (short key blocks), a per-batch key order (a key mask), a head map and per-head factors;
    the forward op and its backward op with ``kv_tiled``."""
    from sparse_vdit.ops import tiled_keys
    from sparse_vdit.ops.attention import tiled_kernel_rows
    from sparse_vdit.ops.model_layout import key_order_table

    layout = sv.VideoLayout(2, 6, 12, tile=(1, 8, 8), text_len=3, text_position="after")
    mask = sv.masks.build([{"kind": "sliding_tile", "window": [1, 3, 3]}], layout)
    order, N, B, H, D = layout.token_order("cpu"), layout.seq_len, 2, 2, 16
    key_valid = torch.ones(B, N, dtype=torch.bool)
    key_valid[0, N - 2:] = False
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, generator=g) for _ in range(3))
    kt, vt, _ = tiled_keys(q, k, v, mask, order, key_valid=key_valid)
    kv_order = key_order_table(order, key_valid)
    qh = q.transpose(1, 2).requires_grad_()
    kt, vt = kt.detach().requires_grad_(), vt.detach().requires_grad_()
    rows = tiled_kernel_rows(mask.q_block)
    head_map = torch.zeros(H, dtype=torch.int32)
    head_factor = torch.tensor([1.0, 0.8])
    args = (qh, kt, vt, mask.kv_counts, mask.kv_indices, order, kv_order, 0.25, mask.q_block, mask.kv_block,
            mask.num_q_blocks, "triton", *mask.query_tiles(rows), rows, head_map, head_factor, True)
    torch.library.opcheck(block_sparse_attention_op, args)
    o, lse = block_sparse_attention_op(*args)
    bargs = (torch.randn_like(o), torch.zeros_like(lse), qh.detach(), kt.detach(), vt.detach(), o.detach(),
             lse.detach(), mask.kv_counts, mask.kv_indices, order, kv_order, 0.25, mask.q_block, mask.kv_block,
             mask.num_q_blocks, "triton", True)
    torch.library.opcheck(block_sparse_attention_bwd_op, bargs)

def test_inductor_forward_and_backward_with_diffusers_layout():
    """Inductor asserts the sizes and strides of custom-op outputs against their fakes: the backward's
    fake once kept q's transposed strides while the op returned contiguous gradients."""
    torch._dynamo.reset()
    B, H, N, D = 1, 2, 256, 32
    q, k, v = (torch.randn(B, N, H, D, requires_grad=True) for _ in range(3))
    mask = _mask(H)

    def f(q, k, v):
        return block_sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                                      backend="torch", check=False)

    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    out = compiled(q, k, v)
    out.square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    f(q, k, v).square().sum().backward()
    for a, x in zip(grads, (q, k, v)):
        assert max_err(a, x.grad) < 1e-4


# ---------------------------------------------------------------------------- 2. host syncs
def _layout():
    return sv.VideoLayout(frames=2, height=8, width=16, tile=(1, 8, 8), text_len=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_steady_state_sparse_forward_makes_no_host_sync(backend):
    layout = _layout()
    mask = sv.masks.build({"kind": "sliding_tile", "window": [1, 1, 1]}, layout, heads=1)
    order = layout.token_order("cpu")
    N = layout.seq_len
    q, k, v = (torch.randn(2, N, 2, 32) for _ in range(3))
    key_valid = torch.ones(2, N, dtype=torch.bool)
    key_valid[1, -3:] = False
    for check in (False, True):
        sparse_attention(q, k, v, mask, order, key_valid=key_valid, backend=backend, check=check)  # first call
        with SyncCounter() as counter:
            sparse_attention(q, k, v, mask, order, key_valid=key_valid, backend=backend, check=check)
        assert counter.syncs == [], f"check={check}: {counter.syncs}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_steady_state_sparse_backward_makes_no_host_sync(backend):
    from torch._library.custom_ops import _maybe_get_opdef

    layout = _layout()
    mask = sv.masks.build({"kind": "sliding_tile", "window": [1, 1, 1]}, layout, heads=1)
    order = layout.token_order("cpu")
    q, k, v = (torch.randn(1, 2, layout.seq_len, 32) for _ in range(3))
    o, lse = block_sparse_attention(q, k, v, mask, token_order=order, backend=backend, return_lse=True)
    body = _maybe_get_opdef("sparse_vdit::block_sparse_attention_bwd")._init_fn
    args = (torch.randn_like(o), torch.zeros_like(lse), q, k, v, o, lse, mask.kv_counts, mask.kv_indices, order, None,
            32 ** -0.5, mask.q_block, mask.kv_block, mask.num_q_blocks, backend)
    body(*args)  # the first backward of a mask derives its column lists (one read-back)
    with SyncCounter() as counter:
        body(*args)
    assert counter.syncs == [], counter.syncs



def test_steady_state_fused_path_forward_and_backward_make_no_host_sync(monkeypatch):
    """k rotated into the packed key order (``tiled_keys``), attention on it (``kv_tiled``), and the
    backward through both, on a grid its tiles cut and with a key mask: after the first step, no
    read-back anywhere (the packed tables are cumsums and scatters, not boolean indexing). The
    forward is counted inside its ops' bodies; the backward with the forward op opaque and the
    backward op's body in its place."""
    from torch._library.custom_ops import _maybe_get_opdef

    import sparse_vdit.ops.attention as att
    from sparse_vdit.ops import rope, sparse_attention_tiled, tiled_keys

    layout = sv.VideoLayout(frames=2, height=6, width=12, tile=(1, 8, 8), text_len=0)
    mask = sv.masks.build({"kind": "sliding_tile", "window": [1, 3, 3]}, layout, heads=1)
    order, N = layout.token_order("cpu"), layout.seq_len
    q, k, v = (torch.randn(2, N, 2, 32, requires_grad=True) for _ in range(3))
    key_valid = torch.ones(2, N, dtype=torch.bool)
    key_valid[1, -3:] = False
    angles = torch.rand(1, N, 1, 16) * 6.28
    cos, sin = angles.cos(), angles.sin()

    def forward():
        kt, vt, _ = tiled_keys(q, k, v, mask, order, key_valid=key_valid, rotary=(cos, sin, 0))
        return sparse_attention_tiled(rope(q, cos, sin), kt, vt, mask, order, key_valid=key_valid)

    forward().square().sum().backward()  # the first step builds the order tables and the backward lists
    with torch.no_grad(), SyncCounter() as counter:
        forward()
    assert counter.syncs == [], f"forward: {counter.syncs}"
    monkeypatch.setattr(att, "block_sparse_attention_bwd_op",
                        _maybe_get_opdef("sparse_vdit::block_sparse_attention_bwd")._init_fn)
    for x in (q, k, v):
        x.grad = None
    loss = forward().square().sum()
    with SyncCounter(run_op_bodies=False) as counter:
        loss.backward()
    assert counter.ops["cumsum"] > 0, "the counter did not see inside the backward"
    assert counter.syncs == [], f"backward: {counter.syncs}"
    assert all(x.grad.abs().sum() > 0 for x in (q, k, v))

def test_density_is_read_back_once_per_mask():
    mask = _mask()
    first = mask.density()
    with SyncCounter() as counter:
        assert mask.density() == first
    assert counter.syncs == []


def test_sync_counter_sees_syncs():
    """The counter itself: it must flag what it is there to flag."""
    x = torch.randn(8)
    with SyncCounter() as counter:
        x[x > 0].sum().item()
    assert len(counter.syncs) >= 2
    with SyncCounter() as counter:  # a read-back that does not pass through the dispatcher on the CPU
        x.tolist()
        bool(x.any())
    assert [s.split(" ")[0] for s in counter.syncs] == ["tolist", "_local_scalar_dense"], counter.syncs


def test_gather_plans_of_every_batch_elements_key_order_are_kept():
    """With padded keys each batch element has its own key order, so one forward asks for B gather
    plans of one mask in turn: all must stay cached (a cache of one would rebuild, and read back, on
    every call)."""
    from sparse_vdit.ops import torch_backend

    layout = _layout()
    mask = sv.masks.build({"kind": "sliding_tile", "window": [1, 1, 1]}, layout, heads=1)
    order = layout.token_order("cpu")
    q, k, v = (torch.randn(3, layout.seq_len, 2, 32) for _ in range(3))
    key_valid = torch.ones(3, layout.seq_len, dtype=torch.bool)
    key_valid[1, -3:] = False
    key_valid[2, -5:] = False
    sparse_attention(q, k, v, mask, order, key_valid=key_valid, backend="torch")
    built = []
    real = torch_backend._GatherPlan.__init__
    try:
        torch_backend._GatherPlan.__init__ = lambda self, *a: (built.append(1), real(self, *a))[1]
        sparse_attention(q, k, v, mask, order, key_valid=key_valid, backend="torch")
    finally:
        torch_backend._GatherPlan.__init__ = real
    assert built == []


# ---------------------------------------------------------------------------- 3. version floors
def test_declared_floors_have_tensor_descriptors():
    """The tiled kernel imports triton.tools.tensor_descriptor (Triton >= 3.4, shipped with torch 2.8):
    the declared floors must not admit versions without it."""
    text = (ROOT / "pyproject.toml").read_text()
    torch_floor = re.search(r'"torch>=([\d.]+)"', text).group(1)
    triton_floor = re.search(r'"triton>=([\d.]+)', text).group(1)
    as_tuple = lambda s: tuple(int(p) for p in s.split("."))  # noqa: E731
    assert as_tuple(torch_floor) >= (2, 8), torch_floor
    assert as_tuple(triton_floor) >= (3, 4), triton_floor
    readme = (ROOT / "README.md").read_text()
    assert f"torch >= {torch_floor}" in readme and f"Triton >= {triton_floor}" in readme


def test_old_triton_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton.tools.tensor_descriptor", None)  # as on Triton < 3.4
    for name in [m for m in sys.modules if m.startswith("sparse_vdit.kernels")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r"Triton >= 3\.4"):
        import sparse_vdit.kernels  # noqa: F401


def test_auto_raises_a_broken_install_and_sticky_cuda_errors():
    from sparse_vdit.ops.auto import pick_backend

    def broken(name):
        raise ImportError("no tensor descriptors")

    with pytest.raises(ImportError):
        pick_backend(("test-broken",), ["triton", "flex"], broken)

    def sticky(name):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        pick_backend(("test-sticky",), ["triton", "flex"], sticky)

    def one_fails(name):
        if name == "triton":
            raise ValueError("cannot run this shape")
        return 1.0

    assert pick_backend(("test-one-fails",), ["triton", "flex"], one_fails) == "flex"


# ---------------------------------------------------------------------------- 4. flex
def test_flex_on_cuda_is_compiled():
    from sparse_vdit.ops.attention import _flex_fn

    assert _flex_fn(torch.device("cpu")) is None  # eager on the CPU (its intended use there)
    fn = _flex_fn(torch.device("cuda"))  # compiling is lazy: no GPU needed to see the choice
    assert fn is not None and fn is _flex_fn(torch.device("cuda"))


def test_flex_with_a_token_order_builds_no_full_mask_and_caches(monkeypatch):
    import torch.nn.attention.flex_attention as fa

    def refuse(*a, **k):
        raise AssertionError("create_block_mask evaluates the mask_mod over L x L")

    monkeypatch.setattr(fa, "create_block_mask", refuse)
    layout = sv.VideoLayout(frames=2, height=6, width=10, tile=(1, 4, 4), text_len=0)  # edge tiles padded
    mask = sv.masks.build({"kind": "sliding_tile", "window": [1, 1, 1]}, layout, heads=2, device="cpu")
    order = layout.token_order("cpu")
    q, k, v = rand_qkv(1, 2, layout.seq_len, 16, torch.float32)
    o, lse = block_sparse_attention(q, k, v, mask, token_order=order, backend="flex", return_lse=True)
    check_against_reference(o, lse, q, k, v, mask, token_order=order)
    from sparse_vdit.ops.flex import _BLOCK_MASKS

    first = _BLOCK_MASKS[mask][-1]
    block_sparse_attention(q, k, v, mask, token_order=order, backend="flex")
    assert _BLOCK_MASKS[mask][-1] is first


# ---------------------------------------------------------------------------- 5, 6, 8: what a backend cannot run
def test_tiled_kernel_grid_stops_at_the_last_tile_list(nan_empty):
    """64-row tiles (A100-class GPUs) over 128-token key blocks with an odd number of query blocks: the
    tiled length rounds up past the last tile, and the grid once launched a program without a list."""
    B, H, N, D = 1, 2, 300, 16  # 5 query blocks of 64, 3 key blocks of 128
    q, k, v = rand_qkv(B, H, N, D, torch.float32)
    blocks = torch.rand(H, 5, 3) < 0.6
    blocks[..., 0] = True
    mask = BlockSparseMask.from_dense(blocks, (64, 128))
    o, lse = block_sparse_attention_op(q, k, v, mask.kv_counts, mask.kv_indices, None, None, D ** -0.5, 64, 128,
                                       mask.num_q_blocks, "triton", *mask.query_tiles(64), 64)
    check_against_reference(o, lse, q, k, v, mask)


@pytest.mark.parametrize("dtype, head_dim, blocks, device, needle", [
    (torch.float16, 128, (64, 256), "cpu", "at most 128"),
    (torch.float16, 128, (128, 128), "sm_80", "at most 64 tokens on sm_80"),
    (torch.float16, 128, (64, 128), "sm_120", "99 KB of shared memory"),
    (torch.float16, 100, (64, 64), "cpu", "multiple of 8"),
    (torch.float32, 128, (64, 64), "cuda", "TF32"),
    (torch.float64, 64, (64, 64), "cpu", "torch backend only"),
    (torch.float16, 512, (64, 64), "cpu", "at most 256"),
])
def test_inputs_a_backend_cannot_run_are_refused_with_a_reason(dtype, head_dim, blocks, device, needle):
    arch = device if device.startswith("sm_") else None
    why = unsupported("triton", dtype, head_dim, *blocks, "cuda" if arch else device, arch)
    assert why is not None and needle in why


def test_explicit_triton_backend_refuses_blocks_that_do_not_fit():
    q, k, v = rand_qkv(1, 1, 512, 32, torch.float16)
    mask = BlockSparseMask.from_dense(torch.ones(1, 8, 2, dtype=torch.bool), (64, 256))
    with pytest.raises(ValueError, match="at most 128"):
        block_sparse_attention(q, k, v, mask, backend="triton")
    # The gather kernel and torch still run it, exactly.
    o, lse = block_sparse_attention(q, k, v, mask, backend="triton_gather", return_lse=True)
    check_against_reference(o, lse, q, k, v, mask)


def test_auto_leaves_out_backends_that_cannot_run(monkeypatch):
    import sparse_vdit.ops.attention as att
    import sparse_vdit.ops.auto as auto

    seen = {}

    def fake_pick(key, candidates, time_ms):
        seen["candidates"] = list(candidates)
        return "flex"

    monkeypatch.setattr(auto, "pick_backend", fake_pick)
    q = torch.randn(1, 1, 256, 128, dtype=torch.float32)
    q = type("CudaLike", (), {"device": torch.device("cuda"), "shape": q.shape, "dtype": q.dtype})()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    att._auto(q, None, None, _mask(1), 0.1, None, None, False)
    assert "triton" not in seen["candidates"] and "triton_gather" not in seen["candidates"]
    assert "flex" in seen["candidates"]


# ---------------------------------------------------------------------------- 7. uninitialised rows
@pytest.mark.parametrize("backend", ["triton", "triton_gather", "torch", "torch_masked", "flex"])
def test_tokens_the_order_leaves_out_give_zeros_and_neg_inf(nan_empty, backend):
    B, H, N, D = 1, 2, 200, 16
    q, k, v = rand_qkv(B, H, N, D, torch.float32)
    order = torch.arange(256, dtype=torch.int32)
    order[150:] = -1  # tokens 150..199 are in no tile
    mask = BlockSparseMask.from_dense(torch.ones(H, 4, 4, dtype=torch.bool), 64)
    o, lse = block_sparse_attention(q, k, v, mask, token_order=order, backend=backend, return_lse=True)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert (o[:, :, 150:] == 0).all() and torch.isneginf(lse[:, :, 150:]).all()
    # The tokens in the order attend among themselves: the reference over just those.
    part = [x[:, :, :150] for x in (q, k, v)]
    check_against_reference(o[:, :, :150], lse[:, :, :150], *part, mask, token_order=order)


# ---------------------------------------------------------------------------- 8. int32 offsets
@pytest.mark.parametrize("kernel", ["gather", "mass"])
def test_batch_offsets_past_int32(kernel):
    """Batch 2 starts 2**31 elements into q and k (a [B, H, N, D] batch stride of 2**30, as at
    HunyuanVideo 720p from batch 7): int32 offsets wrap there. The storage is virtual: only the
    pages the kernel reads are touched."""
    B, H, N, D = 3, 1, 64, 16
    stride_b = 1 << 30
    try:
        storage = torch.empty(stride_b * (B - 1) + H * N * D, dtype=torch.float16)
    except RuntimeError:
        pytest.skip("cannot reserve 4 GiB of virtual memory here")
    qs, ks = storage, torch.empty_like(storage)
    small = rand_qkv(B, H, N, D, torch.float16)
    views = []
    for src, dst in zip(small[:2], (qs, ks)):
        view = dst.as_strided((B, H, N, D), (stride_b, N * D, D, 1))
        view.copy_(src)
        views.append(view)
    q, k = views
    v = small[2]
    mask = BlockSparseMask.from_dense(torch.ones(1, 1, 1, dtype=torch.bool), 64)
    if kernel == "gather":
        o, lse = block_sparse_attention(q, k, v, mask, backend="triton_gather", return_lse=True)
        check_against_reference(o, lse, q, k, v, mask)
    else:
        got = sv.ops.block_attention_mass(q, k, 64, backend="triton")
        want = sv.ops.block_attention_mass(q.contiguous(), k.contiguous(), 64, backend="torch")
        assert max_err(got, want) < 1e-3


# ---------------------------------------------------------------------------- 10, 13: autotune and compiler options
def _kernels():
    from sparse_vdit.kernels.attention import block_sparse_attention_fwd_kernel
    from sparse_vdit.kernels.mass import block_attention_mass_kernel
    from sparse_vdit.kernels.tiled_attention import block_sparse_attention_tiled_fwd_kernel
    from sparse_vdit.kernels.tiled_attention_bwd import (block_sparse_attention_bwd_dkdv_kernel,
                                                         block_sparse_attention_bwd_dq_kernel)

    return (block_sparse_attention_tiled_fwd_kernel, block_sparse_attention_fwd_kernel, block_attention_mass_kernel,
            block_sparse_attention_bwd_dq_kernel, block_sparse_attention_bwd_dkdv_kernel)


_AUTOTUNE_PROBE = """
import json
from triton.runtime.autotuner import Autotuner
from tests.test_first_contact import _kernels
print(json.dumps([[k.fn.__name__, isinstance(k, Autotuner), bool(k.cache_results), list(k.keys),
                   len(k.configs)] for k in _kernels()]))
"""


def test_autotune_results_persist_and_the_tiled_key_names_the_dtype():
    """Read from a process without the interpreter (which switches disk caching off): importing the
    kernels needs no GPU."""
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _AUTOTUNE_PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    for name, is_autotuner, cached, keys, n_configs in rows:
        assert is_autotuner and n_configs > 1, name
        assert cached, f"{name}: tuning is redone in every process"
    # Triton adds the dtypes of arguments that have one; tensor descriptors have none.
    assert "DTYPE" in rows[0][3]


def test_launchers_set_fp_fusion_explicitly():
    """Triton 3.9 warns that its FP-fusion default flips in 3.10; the exp2 softmax wants FMA contraction,
    so every attention launch says so (and the static compile compiles what launches); the rotary pass
    says False (it rounds as torch's fp32 rotation)."""
    kernels_dir = ROOT / "sparse_vdit" / "kernels"
    for path in kernels_dir.glob("*.py"):
        text = path.read_text()
        launches = len(re.findall(r"_kernel\[", text))
        wanted = "enable_fp_fusion=False" if path.name == "rope.py" else "enable_fp_fusion=True"
        assert text.count(wanted) == launches, path.name
    assert '"enable_fp_fusion": True' in (ROOT / "sparse_vdit" / "ops" / "static.py").read_text()


def test_arch_pruning_keeps_only_configs_the_static_table_passes():
    """Every config the pruning keeps on an architecture has a row in the committed table, and no kept
    shipped config spills or overflows shared memory there."""
    import json

    from sparse_vdit.kernels.common import arch_configs
    from sparse_vdit.ops import static

    table = json.loads((ROOT / "benchmarks" / "results" / "static_table.json").read_text())
    rows = {(r["arch"], r["kernel"], r["config"]): r for r in table["rows"]}
    assert {r["arch"] for r in table["rows"]} >= {"sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120"}
    for arch in static.TARGETS:
        for kernel in static.SHIPPED:
            for head_dim in static.HEAD_DIMS:
                for block in static.MASK_BLOCKS:
                    if not static.runs_on(kernel, arch, head_dim, block):
                        continue  # refused there with a reason (test above), so never launched
                    row_count = static.kernel_rows(kernel, arch, head_dim, block)
                    kept = arch_configs(kernel, arch, row_count, block, head_dim)
                    assert kept, (arch, kernel, head_dim, block)
                    for c in kept:
                        config = (f"bf16 D{head_dim} block{block} rows{row_count} warps{c.num_warps} "
                                  f"stages{c.num_stages}")
                        row = rows.get((arch, kernel, config))
                        assert row is not None, f"no static row for {arch} {kernel} {config}"
                        assert row["stack_bytes"] == 0, f"{arch} {kernel} {config} spills"
                        assert row["smem_bytes"] <= static.SMEM_LIMIT[arch], f"{arch} {kernel} {config} smem"
