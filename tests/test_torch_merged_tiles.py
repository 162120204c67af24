"""The CPU block-gather path merges small query blocks into 64-row tiles (one gather of the union of
their key blocks, each row masked to its own block's): exact against the float64 reference where the
tile's blocks visit different key blocks, some none, with ragged N, token orders and key orders."""
import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.ops import BlockSparseMask, block_sparse_attention
from sparse_vdit.ops.torch_backend import _gather_plan

from .helpers import check_against_reference, rand_qkv, random_blocks


@pytest.mark.parametrize("q_block,kv_block", [(16, 16), (32, 16), (16, 32)])
@pytest.mark.parametrize("N", [256, 203])
def test_merged_tiles_exact(q_block, kv_block, N):
    torch.manual_seed(0)
    B, H, D = 2, 3, 16
    Mq, Mk = -(-N // q_block), -(-N // kv_block)
    blocks = random_blocks(B, H, Mq, Mk, 0.3)
    blocks[:, :, 1] = False  # a query block with no key block, inside a tile whose others have some
    mask = BlockSparseMask.from_dense(blocks, (q_block, kv_block))
    q, k, v = rand_qkv(B, H, N, D, torch.float32)
    o, lse = block_sparse_attention(q, k, v, mask, backend="torch", return_lse=True)
    check_against_reference(o, lse, q, k, v, mask)
    plan = _gather_plan(mask.kv_counts, mask.kv_indices, None, None, q_block, kv_block, mask.num_q_blocks, B, H, N)
    assert plan.merge == 64 // q_block  # the merged path ran


def test_merged_tiles_with_orders_and_a_key_order():
    """A layout's tiled order (text after the video) and a key order that leaves out padded text keys."""
    torch.manual_seed(1)
    layout = sv.VideoLayout(2, 8, 12, tile=(1, 4, 4), text_len=7, text_position="after")
    mask = sv.masks.build([{"kind": "sliding_tile", "window": [1, 1, 3]}, {"kind": "spatial", "frames": 1}], layout)
    order = layout.token_order("cpu")
    N = layout.seq_len
    valid = torch.ones(N, dtype=torch.bool)
    valid[N - 3:] = False
    kv_order = sv.ops.key_order(order, valid)
    q, k, v = rand_qkv(1, 2, N, 16, torch.float32)
    o, lse = block_sparse_attention(q, k, v, mask, backend="torch", return_lse=True, token_order=order,
                                    kv_token_order=kv_order)
    check_against_reference(o, lse, q, k, v, mask, token_order=order, kv_token_order=kv_order)


def test_chunks_pad_no_row_past_its_share_and_skip_masks_where_all_is_visible():
    """Heads of very different densities in one call (a near-dense head beside sparse ones, as a
    calibrated layer has): every chunk's rows visit at least CHUNK_COUNT_RATIO of its longest row's
    key blocks, every row with keys is in exactly one chunk, a chunk carries no mask exactly where all
    its gathered keys are visible, and the result is exact."""
    from sparse_vdit.ops import torch_backend as tb

    torch.manual_seed(2)
    B, H, N, D, bq = 1, 4, 1024, 16, 64  # 64-row blocks: not merged, so band rows see whole blocks
    M = N // bq
    blocks = torch.zeros(B, H, M, M, dtype=torch.bool)
    blocks[:, 0] = torch.rand(M, M) < 0.9  # near dense
    for h, width in ((1, 1), (2, 2), (3, 4)):  # bands of different widths
        i = torch.arange(M)
        blocks[:, h] = (i[:, None] - i[None, :]).abs() <= width
    mask = BlockSparseMask.from_dense(blocks, (bq, bq))
    q, k, v = rand_qkv(B, H, N, D, torch.float32)
    o, lse = block_sparse_attention(q, k, v, mask, backend="torch", return_lse=True)
    check_against_reference(o, lse, q, k, v, mask)
    plan = _gather_plan(mask.kv_counts, mask.kv_indices, None, None, bq, bq, mask.num_q_blocks, B, H, N)
    chunks = plan.chunks(bq * D * 4, torch.float32)
    seen = torch.cat([rows for rows, *_ in chunks])
    assert sorted(seen.tolist()) == sorted(torch.nonzero(plan.row_counts > 0).flatten().tolist())
    assert len(chunks) > 2
    masked = 0
    for rows, k_c, sel, additive, visible in chunks:
        counts = plan.row_counts[rows]
        assert int(counts.max()) == k_c and bool((counts >= tb.CHUNK_COUNT_RATIO * k_c).all())
        assert (additive is None) == bool(visible.all())
        masked += additive is not None
    assert 0 < masked < len(chunks)
