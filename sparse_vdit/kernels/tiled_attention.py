"""Triton block-sparse attention forward on contiguous tiles (the Hopper form).

k and v arrive already permuted into the packed key order ([B, H, LK, D], contiguous): the keys of
the tiled order's key blocks one after another, with no padding rows (a tile at the grid's edge is
short); ``kv_start`` says where each key block begins. The launcher's caller gathers them once per
call, since every program reads many of their tiles. Every K/V tile is then a contiguous
[BLOCK_N, D] slab read at its block's start through a tensor descriptor (TMA on Hopper; no
per-element address math, no gather registers); the rows of a short block past its end (the next
block's keys, or zeros past the tensor) are masked. q and the output stay
in model order: each program reads its query rows once, and stores O and the LSE once, through the
padded query order (pointer loads and stores; sm_90 has no TMA scatter), so neither q nor o is
ever copied into or out of tiled order. The query tile has ``BLOCK_M`` rows independent of the mask's query block: a
128-row tile spans ``BLOCK_M // q_block`` mask query blocks, walks the union of their key blocks,
and a per-entry bit field says which of its sub-blocks visit each key block (rows of the others
are masked to -inf on that block only, so the result is exact).

Masking is per block and only where needed: short key blocks (fewer than ``BLOCK_N`` keys, flagged
in ``kv_block_pad``; the row mask is loaded from ``kv_valid``) and
sub-block row masks (entries whose bit field is not full); interior blocks take neither.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError as e:  # Triton < 3.4 (torch < 2.8)
    raise ImportError(f"sparse_vdit's Triton kernels need Triton >= 3.4 (tensor descriptors; torch >= 2.8 ships it), "
                      f"found triton {triton.__version__}: upgrade torch/triton, or use backend='torch'") from e

from .common import (LOG2E_PY, arch_pruner, autotune_configs, head_dim_block, load_query_block,
                     online_softmax_finish, online_softmax_step)


# Its opening (program ids, list pointers, the softmax state) mirrors the gather kernel's: the two are
# alternative forms of one forward, kept side by side for comparison. (A `duplicates` row; justified.)
# The key names the dtype: q/k/v arrive as tensor descriptors, whose dtype Triton's autotuner does not
# add to the key itself (fp16 and bf16 would share one tuning). Results persist across processes.
@triton.autotune(configs=autotune_configs(), key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "Q_BLOCK", "DTYPE"],
                 prune_configs_by={"early_config_prune": arch_pruner("tiled")}, cache_results=True)
@triton.jit
def block_sparse_attention_tiled_fwd_kernel(
    q, k, v, o, lse, q_order,
    tile_counts, tile_indices, tile_flags, kv_start, kv_valid, kv_block_pad, head_map, head_factor,
    sm_scale_log2,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_ik,
    stride_sb, stride_vb, stride_pb,
    H, N, LK, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, Q_BLOCK: tl.constexpr,
    DTYPE: tl.constexpr, HAS_MAP: tl.constexpr, HAS_FACTOR: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    i_p = i_h  # the mask row of this head: its own, or with a head map its pattern's
    if HAS_MAP:
        i_p = tl.load(head_map + i_h)
    if HAS_FACTOR:  # this head's softmax scale factor (1 / its temperature)
        sm_scale_log2 = sm_scale_log2 * tl.load(head_factor + i_h)
    FULL: tl.constexpr = (1 << (BLOCK_M // Q_BLOCK)) - 1
    o_row = i_bh * LK  # k and v are [B * H * LK, D] row blocks in the packed key order
    # q in model order through the padded query order: padding rows read zeros and are never stored.
    i_b64, i_h64 = i_b.to(tl.int64), i_h.to(tl.int64)
    b_q, i_q, m_q, o_d, m_d = load_query_block(q, q_order, i_b64, i_h64, i_m, stride_qb, stride_qh, stride_qn,
                                               stride_qd, N, HEAD_DIM, BLOCK_M, BLOCK_D, True)
    i_sub = tl.arange(0, BLOCK_M) // Q_BLOCK  # [BM] mask query sub-block of each row
    o_n = tl.arange(0, BLOCK_N)

    p_cnt = tile_counts + i_b * stride_cb + i_p * stride_ch + i_m * stride_cm
    p_idx = tile_indices + i_b * stride_ib + i_p * stride_ih + i_m * stride_im
    p_flg = tile_flags + i_b * stride_ib + i_p * stride_ih + i_m * stride_im
    n_blocks = tl.load(p_cnt)
    p_start = kv_start + i_b * stride_sb  # a key order per batch element (stride 0: one for all)
    p_valid = kv_valid + i_b * stride_vb
    p_pad = kv_block_pad + i_b * stride_pb

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 domain)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i_blk in range(0, n_blocks):
        i_kb = tl.load(p_idx + i_blk * stride_ik)
        flags = tl.load(p_flg + i_blk * stride_ik)
        k_lo = tl.load(p_start + i_kb)  # where this key block begins in the packed k and v
        b_k = k.load([o_row + k_lo, 0])  # [BN, BD]
        b_s = tl.dot(b_q, tl.trans(b_k)) * sm_scale_log2  # [BM, BN] fp32 logits in log2 units
        if tl.load(p_pad + i_kb) != 0:  # a short block: the rows past its end are not its keys
            # (a loaded row mask: comparing o_n with the block's length here costs 30-60 registers more)
            m_kv = tl.load(p_valid + i_kb * BLOCK_N + o_n) != 0  # [BN]
            b_s = tl.where(m_kv[None, :], b_s, float("-inf"))
        if flags != FULL:
            m_row = ((flags >> i_sub) & 1) != 0  # [BM] rows whose sub-block visits this key block
            b_s = tl.where(m_row[:, None], b_s, float("-inf"))
        b_v = v.load([o_row + k_lo, 0])  # [BN, BD]
        b_m, b_l, b_acc = online_softmax_step(b_s, b_m, b_l, b_acc, b_v)

    b_o, b_lse = online_softmax_finish(b_m, b_l, b_acc)  # empty rows: zeros, LSE -inf
    i_q64 = i_q.to(tl.int64)
    p_o = o + i_b64 * stride_ob + i_h64 * stride_oh + i_q64[:, None] * stride_on + o_d[None, :] * stride_od
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_q[:, None] & m_d[None, :])
    tl.store(lse + i_b64 * stride_lb + i_h64 * stride_lh + i_q64 * stride_ln, b_lse, mask=m_q)


def batch_stride(t: torch.Tensor) -> int:
    """The batch stride of a per-key table: 0 for one table shared by the batch ([L], or [1, L])."""
    return t.stride(0) if t.dim() == 2 and t.shape[0] > 1 else 0


def block_sparse_attention_tiled_fwd(
    q: torch.Tensor,
    q_order: torch.Tensor,
    kt: torch.Tensor,
    vt: torch.Tensor,
    tile_counts: torch.Tensor,
    tile_indices: torch.Tensor,
    tile_flags: torch.Tensor,
    kv_start: torch.Tensor,
    kv_valid: torch.Tensor,
    kv_block_pad: torch.Tensor,
    scale: float,
    tile_rows: int,
    q_block: int,
    kv_block: int,
    head_map: torch.Tensor | None = None,
    head_factor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the tiled forward. Inputs are prepared and validated by ``sparse_vdit.ops``.

    q: [B, H, N, D] in model order (any strides); q_order: int32 [L], the padded query order (tiled
    position -> model token, -1 for padding). kt, vt: contiguous [B, H, LK, D] in the packed key
    order (``sparse_vdit.ops.order.packed_keys``); tile_counts int32 [Bm, Hm, Mt]; tile_indices /
    tile_flags int32 [Bm, Hm, Mt, K]
    (key blocks of each ``tile_rows``-row query tile, and the bit field of its ``q_block`` sub-blocks
    that visit each); kv_start: int32 [Mk + 1] or [B, Mk + 1] (per batch element when 2-D), where
    key block j begins in kt / vt (it ends where j + 1 begins; at most ``kv_block`` keys); kv_valid:
    int8 [Mk * kv_block] or [B, ...], row n of key block j's tile is one of its keys (n < its key
    count); kv_block_pad: int8 [Mk] or [B, Mk], set where a key block has fewer than ``kv_block``. head_map: optional int32 [H], the mask row (pattern) each head reads:
    a layer whose heads mix patterns runs in one launch over the patterns' shared lists. head_factor:
    optional fp32 [H], each head's factor on ``scale`` (heads at different softmax temperatures in one launch).
    Returns o [B, H, N, D] in q's dtype, laid out as [B, N, H, D] (the model's layout: its transpose
    is contiguous), and lse fp32 [B, H, N], both in model order. Tokens the order does not hold are
    not written (``torch.empty``: the caller fills them).
    """
    B, H, N, D = q.shape
    LK = kt.shape[2]
    o = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    cb = tile_counts.stride(0) if tile_counts.shape[0] > 1 else 0
    ch = tile_counts.stride(1) if tile_counts.shape[1] > 1 else 0
    ib = tile_indices.stride(0) if tile_indices.shape[0] > 1 else 0
    ih = tile_indices.stride(1) if tile_indices.shape[1] > 1 else 0
    # One program per query tile of the mask.
    grid = (tile_counts.shape[-1], B * H)
    block_d = head_dim_block(D)

    def desc(x, rows):
        return TensorDescriptor.from_tensor(x.view(B * H * LK, D), [rows, block_d])

    block_sparse_attention_tiled_fwd_kernel[grid](
        q, desc(kt, kv_block), desc(vt, kv_block), o, lse, q_order,
        tile_counts, tile_indices, tile_flags, kv_start, kv_valid, kv_block_pad,
        head_map if head_map is not None else tile_counts,  # (not read without a map)
        head_factor if head_factor is not None else lse,  # (not read without factors)
        scale * LOG2E_PY,
        *q.stride(), *o.stride(), *lse.stride(),
        cb, ch, tile_counts.stride(2),
        ib, ih, tile_indices.stride(2), tile_indices.stride(3),
        batch_stride(kv_start), batch_stride(kv_valid), batch_stride(kv_block_pad),
        H, N, LK, D,
        BLOCK_M=tile_rows, BLOCK_N=kv_block, BLOCK_D=block_d, Q_BLOCK=q_block, DTYPE=str(q.dtype).split(".")[-1],
        HAS_MAP=head_map is not None, HAS_FACTOR=head_factor is not None, enable_fp_fusion=True,  # the exp2 softmax relies on FMA contraction; Triton 3.10 flips the default
    )
    return o, lse
