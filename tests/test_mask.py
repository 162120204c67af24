"""BlockSparseMask conversions, FlexAttention agreement and the errors a user can hit."""
import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from sparse_vdit.ops import BlockSparseMask, block_sparse_attention, reference_attention

from .helpers import max_err, rand_qkv, random_blocks


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 3, 4, 4), (1, 1, 1, 9)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_dense_round_trip_and_density(shape, density):
    blocks = torch.rand(shape) < density
    mask = BlockSparseMask.from_dense(blocks, 64)
    full = blocks if blocks.dim() == 4 else blocks.unsqueeze(0)
    assert torch.equal(mask.to_dense(), full)
    assert mask.density() == pytest.approx(full.float().mean().item())
    assert torch.allclose(mask.head_density(), full.double().mean(dim=(0, 2, 3)))
    assert mask.shape == tuple(full.shape)
    again = BlockSparseMask.from_indices(mask.kv_counts, mask.kv_indices, 64, mask.num_kv_blocks)
    assert torch.equal(again.to_dense(), full)


def test_indices_sorted_and_counts():
    blocks = torch.tensor([[[0, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]]], dtype=torch.bool)
    mask = BlockSparseMask.from_dense(blocks, (32, 64))
    assert mask.kv_counts.tolist() == [[[2, 4, 0]]]
    assert mask.kv_indices[0, 0, 0, :2].tolist() == [1, 3]
    assert mask.kv_indices[0, 0, 1].tolist() == [0, 1, 2, 3]
    assert (mask.q_block, mask.kv_block) == (32, 64)


def test_to_flex_same_blocks_and_output():
    B, H, N, D, block = 2, 2, 200, 64, 32  # tail block partial
    mask = BlockSparseMask.from_dense(random_blocks(B, H, 7, 7, 0.4), block)
    bm = mask.to_flex(N)
    assert torch.equal(bm.to_dense().bool(), mask.to_dense())
    q, k, v = rand_qkv(B, H, N, D, torch.float64)
    o_flex = flex_attention(q, k, v, block_mask=bm)
    ref, lse = reference_attention(q, k, v, mask)
    rows = ~torch.isinf(lse)
    assert max_err(o_flex[rows], ref[rows]) < 1e-10


def test_repr_and_to_string():
    mask = BlockSparseMask.from_dense(torch.eye(3, dtype=torch.bool).unsqueeze(0), 64)
    assert "density=0.3333" in repr(mask) and "q_blocks=3" in repr(mask)
    assert mask.to_string().splitlines()[1:] == ["#..", ".#.", "..#"]


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "blocks,block_size,match",
    [
        (torch.ones(4, 4, dtype=torch.bool), 64, r"\[H, Mq, Mk\]"),
        (torch.ones(1, 1, 1, 4, 4, dtype=torch.bool), 64, r"\[H, Mq, Mk\]"),
        (torch.ones(1, 4, 4), 64, "bool"),
        (torch.ones(1, 4, 4, dtype=torch.bool), 48, "power of two"),
        (torch.ones(1, 4, 4, dtype=torch.bool), (64, 64, 64), "pair"),
        (torch.ones(1, 0, 4, dtype=torch.bool), 64, "empty"),
    ],
)
def test_from_dense_errors(blocks, block_size, match):
    with pytest.raises(ValueError, match=match):
        BlockSparseMask.from_dense(blocks, block_size)


def test_from_indices_out_of_range():
    counts = torch.tensor([[[1, 2]]], dtype=torch.int32)
    idx = torch.tensor([[[[0, 0], [1, 5]]]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"kv_indices must lie in \[0, 3\].*5"):
        BlockSparseMask.from_indices(counts, idx, 64, num_kv_blocks=4)
    with pytest.raises(ValueError, match="kv_counts must lie"):
        BlockSparseMask.from_indices(counts * 3, idx, 64, num_kv_blocks=4)


def _inputs(N=128, H=2, B=1, D=64, dtype=torch.float32):
    return rand_qkv(B, H, N, D, dtype)


def test_call_errors():
    q, k, v = _inputs()
    mask = BlockSparseMask.from_dense(torch.ones(2, 2, 2, dtype=torch.bool), 64)
    with pytest.raises(ValueError, match=r"needs 3 x 3"):
        block_sparse_attention(*_inputs(N=129), mask)
    with pytest.raises(ValueError, match="heads"):
        block_sparse_attention(*_inputs(H=3), mask)
    with pytest.raises(ValueError, match="batch"):
        block_sparse_attention(*_inputs(B=3), BlockSparseMask.from_dense(torch.ones(2, 2, 2, 2, dtype=torch.bool), 64))
    with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
        block_sparse_attention(q[0], k[0], v[0], mask)
    with pytest.raises(ValueError, match="same shape"):
        block_sparse_attention(q, k[:, :, :64], v, mask)
    with pytest.raises(TypeError, match="dtype"):
        block_sparse_attention(q.int(), k.int(), v.int(), mask)
    with pytest.raises(TypeError, match="share a dtype"):
        block_sparse_attention(q, k.half(), v, mask)
    with pytest.raises(ValueError, match="backend must be one of"):
        block_sparse_attention(q, k, v, mask, backend="cuda")
    with pytest.raises(TypeError, match="BlockSparseMask"):
        block_sparse_attention(q, k, v, torch.ones(2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="head_dim 512"):
        block_sparse_attention(*_inputs(D=512), mask, backend="triton")


def test_token_order_errors():
    q, k, v = _inputs(N=100)
    mask = BlockSparseMask.from_dense(torch.ones(2, 2, 2, dtype=torch.bool), 64)
    good = torch.cat([torch.arange(100), torch.full((28,), -1)]).to(torch.int32)
    block_sparse_attention(q, k, v, mask, token_order=good)  # fine
    with pytest.raises(TypeError, match="int32"):
        block_sparse_attention(q, k, v, mask, token_order=good.long())
    with pytest.raises(ValueError, match="multiple of the block"):
        block_sparse_attention(q, k, v, mask, token_order=good[:100])
    bad = good.clone()
    bad[0] = 100
    with pytest.raises(ValueError, match=r"\[-1, 99\]"):
        block_sparse_attention(q, k, v, mask, token_order=bad)
