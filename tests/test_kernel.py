"""Block-sparse attention (Triton under the interpreter on CPU, and the torch backend) against the
float64 reference."""
import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.ops import BlockSparseMask, block_sparse_attention

from .conftest import DEVICE, requires_cuda
from .helpers import check_against_reference, rand_qkv, random_blocks, tiled_launches

# Every backend test runs with torch.empty poisoned (NaN): a row a backend fails to write shows.
pytestmark = pytest.mark.usefixtures("nan_empty")

# Under the interpreter bf16 dot products are broken (see ENVIRONMENT.md): fp16/fp32 on the CPU.
CPU_DTYPES = [torch.float16, torch.float32]
BACKENDS = ["triton", "triton_gather", "torch", "torch_masked"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.02, 0.1, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_random_masks_match_reference(nan_empty, backend, density, head_dim, dtype):
    B, H, N, block = 2, 3, 231, 32  # N is not a multiple of the block: the tail block is partial
    q, k, v = rand_qkv(B, H, N, head_dim, dtype, DEVICE)
    M = -(-N // block)
    blocks = random_blocks(B, H, M, M, density)  # a different mask per batch element and head
    mask = BlockSparseMask.from_dense(blocks.to(DEVICE), block)
    o, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
    assert o.shape == q.shape and o.dtype == dtype and lse.dtype == torch.float32
    check_against_reference(o, lse, q, k, v, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_give_zeros_and_neg_inf_lse(nan_empty, backend):
    B, H, N, D, block = 1, 2, 128, 64, 32
    q, k, v = rand_qkv(B, H, N, D, torch.float32)
    blocks = torch.ones(H, 4, 4, dtype=torch.bool)
    blocks[0, 1] = False  # head 0, query block 1 visits nothing
    blocks[1] = False  # head 1 visits nothing at all
    mask = BlockSparseMask.from_dense(blocks, block)
    o, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert (o[0, 0, 32:64] == 0).all() and torch.isneginf(lse[0, 0, 32:64]).all()
    assert (o[0, 1] == 0).all() and torch.isneginf(lse[0, 1]).all()
    check_against_reference(o, lse, q, k, v, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_mask_strided_inputs_and_scale(nan_empty, backend):
    B, H, N, D, block = 2, 4, 150, 64, 32
    q, k, v = rand_qkv(B, H, N, D, torch.float16, layout="bnhd")
    assert not q.is_contiguous()
    blocks = random_blocks(1, 1, 5, 5, 0.5)  # one mask for every batch element and head
    blocks[..., 0] = True
    mask = BlockSparseMask.from_dense(blocks, block)
    o, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend, scale=0.3)
    check_against_reference(o, lse, q, k, v, mask, scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [(32, 16), (16, 64)])
def test_rectangular_blocks(nan_empty, backend, block_size):
    B, H, N, D = 1, 2, 100, 64
    q, k, v = rand_qkv(B, H, N, D, torch.float32)
    Mq, Mk = -(-N // block_size[0]), -(-N // block_size[1])
    mask = BlockSparseMask.from_dense(random_blocks(1, H, Mq, Mk, 0.5), block_size)
    o, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
    check_against_reference(o, lse, q, k, v, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [32, 80])
def test_other_head_dims(nan_empty, backend, head_dim):
    q, k, v = rand_qkv(1, 2, 96, head_dim, torch.float32)
    mask = BlockSparseMask.from_dense(random_blocks(1, 2, 3, 3, 0.6), 32)
    o, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
    check_against_reference(o, lse, q, k, v, mask)


@pytest.mark.parametrize("backend", BACKENDS + ["flex"])
def test_token_order_with_padding(nan_empty, backend):
    """Tokens reach the kernel through a permutation with padding slots (-1): the output stays in
    model order and padding keys are never attended."""
    B, H, N, D, block = 2, 2, 90, 64, 32
    q, k, v = rand_qkv(B, H, N, D, torch.float32)
    L = 128  # 4 blocks of 32 positions for 90 tokens: 38 padding slots
    slots = torch.randperm(L)[:N]
    order = torch.full((L,), -1, dtype=torch.int32)
    order[slots] = torch.randperm(N).to(torch.int32)
    blocks = random_blocks(1, H, 4, 4, 0.6)
    blocks[..., torch.arange(4), torch.arange(4)] = True
    mask = BlockSparseMask.from_dense(blocks, block)
    o, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend, token_order=order)
    check_against_reference(o, lse, q, k, v, mask, token_order=order)


@pytest.mark.parametrize("backend", BACKENDS + ["flex"])
def test_kv_token_order_excludes_keys_only(nan_empty, backend):
    """Tokens left out of kv_token_order are never keys but are still computed as queries (padded text)."""
    B, H, N, D, block = 1, 2, 80, 64, 32
    q, k, v = rand_qkv(B, H, N, D, torch.float32)
    order = torch.cat([torch.arange(N), torch.full((96 - N,), -1)]).to(torch.int32)
    kv_order = order.clone()
    kv_order[70:80] = -1  # the last 10 tokens are not keys
    mask = BlockSparseMask.from_dense(random_blocks(1, H, 3, 3, 0.7) | torch.eye(3, dtype=torch.bool), block)
    o, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend, token_order=order,
                                    kv_token_order=kv_order)
    check_against_reference(o, lse, q, k, v, mask, token_order=order, kv_token_order=kv_order)
    # the excluded keys really do not matter: change them and nothing moves
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 70:], v2[:, :, 70:] = 100.0, -100.0
    o2 = block_sparse_attention(q, k2, v2, mask, backend=backend, token_order=order, kv_token_order=kv_order)
    assert torch.allclose(o, o2, atol=1e-5)


def test_flex_agrees_on_same_mask():
    B, H, N, D, block = 2, 2, 200, 64, 32
    q, k, v = rand_qkv(B, H, N, D, torch.float32)
    mask = BlockSparseMask.from_dense(random_blocks(B, H, 7, 7, 0.4), block)
    o_flex, lse_flex = block_sparse_attention(q, k, v, mask, return_lse=True, backend="flex")
    o_tri = block_sparse_attention(q, k, v, mask, backend="triton")
    check_against_reference(o_flex, lse_flex, q, k, v, mask)
    assert torch.allclose(o_flex, o_tri, atol=1e-4)


def test_default_backend_by_device():
    assert sv.ops.default_backend(torch.device("cpu")) == "torch"
    assert sv.ops.default_backend(torch.device("cuda")) == "auto"  # the fastest exact backend, measured


def test_auto_backend_is_exact_and_picks_the_fastest_that_runs(nan_empty):
    from sparse_vdit.ops import auto

    q, k, v = rand_qkv(1, 2, 100, 32, torch.float32, DEVICE)
    mask = BlockSparseMask.from_dense(random_blocks(1, 2, 4, 4, 0.5).to(DEVICE), 32)
    o, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend="auto")
    check_against_reference(o, lse, q, k, v, mask)
    calls = []

    def fake_ms(name):
        calls.append(name)
        if name == "flex":
            raise RuntimeError("cannot run here")
        return {"triton": 2.0, "triton_gather": 1.0}[name]

    key = ("test-key",)
    assert auto.pick_backend(key, ["triton", "triton_gather", "flex"], fake_ms) == "triton_gather"
    assert auto.pick_backend(key, ["triton", "triton_gather", "flex"], fake_ms) == "triton_gather"
    assert calls == ["triton", "triton_gather", "flex"]  # measured once, then cached
    with pytest.raises(RuntimeError, match="no candidate ran"):
        auto.pick_backend(("other",), ["flex"], fake_ms)


# ---------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    q, k, v = rand_qkv(1, 2, 64, 64, torch.float32)
    mask = BlockSparseMask.from_dense(random_blocks(1, 2, 2, 2, 0.7), 32)

    def f(q, k, v):
        return block_sparse_attention(q * 2.0, k, v, mask, backend=backend, check=False) + 1.0

    # fullgraph=True raises on any graph break; aot_eager also runs the fake implementation.
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    assert torch.allclose(out, f(q, k, v), atol=1e-5)


# ---------------------------------------------------------------------------- GPU only
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("N,H,D", [(4096 + 77, 4, 128), (8192, 2, 64)])
def test_gpu_bf16_real_sizes(N, H, D):
    q, k, v = rand_qkv(1, H, N, D, torch.bfloat16, "cuda")
    M = -(-N // 64)
    mask = BlockSparseMask.from_dense(random_blocks(1, H, M, M, 0.2).cuda(), 64)
    o, lse = block_sparse_attention(q, k, v, mask, return_lse=True)
    check_against_reference(o, lse, q, k, v, mask)


@requires_cuda
@pytest.mark.gpu
def test_gpu_compile_inductor():
    torch._dynamo.reset()
    q, k, v = rand_qkv(1, 4, 2048, 128, torch.bfloat16, "cuda")
    mask = BlockSparseMask.from_dense(random_blocks(1, 4, 32, 32, 0.3).cuda(), 64)
    compiled = torch.compile(lambda q, k, v: block_sparse_attention(q, k, v, mask, check=False), fullgraph=True)
    assert torch.allclose(compiled(q, k, v), block_sparse_attention(q, k, v, mask), atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_table_of_key_orders_one_per_batch_element_matches_reference(nan_empty, backend):
    """kv_token_order [B, L]: each batch element leaves out its own keys (padded prompts of different
    lengths); the tiled kernel reads it with a batch stride in one launch, the others per element."""
    layout = sv.VideoLayout(2, 8, 8, tile=(1, 4, 4), text_len=12)
    B, H, D, N = 3, 2, 32, layout.seq_len
    q, k, v = rand_qkv(B, H, N, D, torch.float32)
    order = layout.token_order()
    key_valid = torch.ones(B, N, dtype=torch.bool)
    key_valid[0, -7:] = False
    key_valid[2, -2:] = False
    key_valid[2, :40] = False  # a video stretch too, so a key block inside the grid is padded
    table = sv.ops.key_order(order, key_valid)
    assert table.shape == (B, order.numel())
    mask = sv.masks.build(["radial", {"kind": "sliding_tile", "window": [1, 1, 1]}], layout)
    with tiled_launches() as launches:
        o, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend, token_order=order,
                                        kv_token_order=table)
    check_against_reference(o, lse, q, k, v, mask, token_order=order, kv_token_order=table)
    if backend == "triton":
        assert len(launches) == 1
    for b in range(B):  # the same as each element with its own 1-D key order
        ob = block_sparse_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask, backend=backend, token_order=order,
                                    kv_token_order=table[b].clone())
        torch.testing.assert_close(o[b:b + 1], ob, rtol=1e-5, atol=1e-5)
