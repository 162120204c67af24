"""Gradients through block_sparse_attention: against float64 autograd of the reference, gradcheck,
empty rows, broadcast masks, token orders, and a compiled forward + backward."""
import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.ops import BlockSparseMask, block_sparse_attention, reference_attention

from .conftest import DEVICE, requires_cuda
from .helpers import max_err, rand_qkv, random_blocks

# Every backend test runs with torch.empty poisoned (NaN): a row a backend fails to write shows.
pytestmark = pytest.mark.usefixtures("nan_empty")


def _grads(fn, q, k, v, g_o, g_lse):
    """d/d(q, k, v) of <o, g_o> + <finite lse, g_lse>."""
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    o, lse = fn(q, k, v)
    loss = (o.double() * g_o).sum() + (torch.where(torch.isfinite(lse), lse, 0).double() * g_lse).sum()
    return torch.autograd.grad(loss, (q, k, v))


def _check(backend, dtype, mask, B, H, N, D, **orders):
    q, k, v = rand_qkv(B, H, N, D, dtype, DEVICE)
    g_o = torch.randn(B, H, N, D, dtype=torch.float64, device=DEVICE)
    g_lse = torch.randn(B, H, N, dtype=torch.float64, device=DEVICE)
    ours = _grads(lambda a, b, c: block_sparse_attention(a, b, c, mask, return_lse=True, backend=backend, **orders),
                  q, k, v, g_o, g_lse)
    ref = _grads(lambda a, b, c: reference_attention(a, b, c, mask, **orders), q.double(), k.double(), v.double(),
                 g_o, g_lse)
    own = _grads(lambda a, b, c: reference_attention(a, b, c, mask, **orders), q, k, v, g_o, g_lse)
    floor = {torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    for name, a, r, t in zip("qkv", ours, ref, own):
        assert not torch.isnan(a).any(), f"d{name} has NaN"
        tol = max(2 * max_err(t, r), floor)  # twice torch's own same-dtype error, as for the forward
        assert max_err(a, r) <= tol, f"d{name} error {max_err(a, r):.3g} > {tol:.3g}"


@pytest.mark.parametrize("backend", ["triton", "triton_gather", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("density", [0.2, 0.6, 1.0])
def test_gradients_match_float64_reference(backend, dtype, density):
    B, H, N, D, block = 2, 2, 100, 32, 16  # ragged N; per batch and head masks
    M = -(-N // block)
    mask = BlockSparseMask.from_dense(random_blocks(B, H, M, M, density).to(DEVICE), block)
    _check(backend, dtype, mask, B, H, N, D)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradients_with_layout_orders_and_text_keys_left_out(backend):
    layout = sv.VideoLayout(3, 6, 7, tile=(1, 4, 4), text_len=9)
    mask = sv.masks.build(["radial", {"kind": "sliding_tile", "window": [1, 1, 1]}], layout, device=DEVICE)
    order = layout.token_order(DEVICE)
    key_valid = torch.ones(layout.seq_len, dtype=torch.bool, device=DEVICE)
    key_valid[-4:] = False  # padded text tokens: never keys, still queries
    kv_order = sv.ops.key_order(order, key_valid)
    _check(backend, torch.float32, mask, 1, 2, layout.seq_len, 32, token_order=order, kv_token_order=kv_order)


def test_empty_rows_and_broadcast_mask_give_zero_gradients_not_nan():
    blocks = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    blocks[0, 0, 2] = False  # query block 2 sees nothing
    mask = BlockSparseMask.from_dense(blocks, 16)  # broadcast over batch and heads
    q, k, v = rand_qkv(2, 3, 64, 16, torch.float32)
    q.requires_grad_(True)
    block_sparse_attention(q, k, v, mask, backend="torch").sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[:, :, 32:48] == 0).all()
    _check("torch", torch.float32, mask, 2, 3, 64, 16)


def test_gradcheck_float64():
    blocks = random_blocks(1, 2, 3, 3, 0.6)
    blocks[0, 1, 0] = False
    mask = BlockSparseMask.from_dense(blocks, 16)
    q, k, v = (x.requires_grad_(True) for x in rand_qkv(1, 2, 40, 8, torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: block_sparse_attention(a, b, c, mask, backend="torch"), (q, k, v))


def test_compiled_forward_and_backward_fullgraph():
    torch._dynamo.reset()
    mask = BlockSparseMask.from_dense(random_blocks(1, 2, 4, 4, 0.5), 16)
    q, k, v = (x.requires_grad_(True) for x in rand_qkv(1, 2, 64, 16, torch.float32))

    def loss(q, k, v):
        return (block_sparse_attention(q * 1.5, k, v, mask, backend="torch", check=False) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)


@requires_cuda
@pytest.mark.gpu
def test_gpu_bf16_gradients():
    N, H, D = 2048 + 33, 2, 64
    M = -(-N // 64)
    mask = BlockSparseMask.from_dense(random_blocks(1, H, M, M, 0.3).cuda(), 64)
    q, k, v = rand_qkv(1, H, N, D, torch.bfloat16, "cuda")
    g_o = torch.randn(1, H, N, D, dtype=torch.float64, device="cuda")
    g_lse = torch.zeros(1, H, N, dtype=torch.float64, device="cuda")
    ours = _grads(lambda a, b, c: block_sparse_attention(a, b, c, mask, return_lse=True), q, k, v, g_o, g_lse)
    ref = _grads(lambda a, b, c: reference_attention(a, b, c, mask), q.double(), k.double(), v.double(), g_o, g_lse)
    own = _grads(lambda a, b, c: reference_attention(a, b, c, mask), q, k, v, g_o, g_lse)
    for a, r, t in zip(ours, ref, own):
        assert max_err(a, r) <= max(2 * max_err(t, r), 5e-2)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradients_with_a_table_of_key_orders_one_per_batch_element(backend):
    layout = sv.VideoLayout(2, 6, 7, tile=(1, 4, 4), text_len=9)
    mask = sv.masks.build(["radial", {"kind": "sliding_tile", "window": [1, 1, 1]}], layout, device=DEVICE)
    order = layout.token_order(DEVICE)
    key_valid = torch.ones(2, layout.seq_len, dtype=torch.bool, device=DEVICE)
    key_valid[0, -4:] = False  # prompts of different lengths: padded text keys per batch element
    key_valid[1, -1:] = False
    key_valid[1, :20] = False
    table = sv.ops.key_order(order, key_valid)
    _check(backend, torch.float32, mask, 2, 2, layout.seq_len, 32, token_order=order, kv_token_order=table)
