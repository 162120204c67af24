"""Triton block-sparse attention forward.

One program computes one query block of one (batch, head) and walks only the key blocks the mask
lists for it, with an online softmax accumulated in fp32 (FlashAttention-2 style).

Optionally the kernel reads and writes tokens through a ``token_order`` table: position ``p`` of
the tiled sequence is token ``token_order[p]`` of the model's sequence, or padding when it is -1.
Keys may use their own table ``kv_token_order`` (same length, same blocks): a token marked -1 there
is not attended as a key (e.g. padded text tokens) while it is still computed as a query.
This fuses the spatiotemporal tiling permutation into the loads and stores, so q, k and v are never
copied into tiled order, and lets edge tiles that the grid does not fill be padded to whole blocks
whose padding keys are never attended.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (LOG2E_PY, arch_pruner, autotune_configs, head_dim_block, load_query_block,
                     online_softmax_finish, online_softmax_step, token_index)


# The autotune key holds head_dim and the block shape (Triton adds the tensor dtypes itself); never
# the sequence length, so a new resolution or frame count does not re-tune.
@triton.autotune(configs=autotune_configs(), key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "HAS_ORDER"],
                 prune_configs_by={"early_config_prune": arch_pruner("gather")}, cache_results=True)
@triton.jit
def block_sparse_attention_fwd_kernel(
    q, k, v, o, lse,
    kv_counts, kv_indices, token_order, kv_token_order,
    sm_scale_log2,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_ik,
    H, N, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_ORDER: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    # int64: batch x batch-stride passes 2**31 elements at HunyuanVideo / Wan-14B sizes from batch 7.
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N)  # [BN]
    b_q, i_q, m_q, o_d, m_d = load_query_block(q, token_order, i_b, i_h, i_m, stride_qb, stride_qh, stride_qn,
                                               stride_qd, N, HEAD_DIM, BLOCK_M, BLOCK_D, HAS_ORDER)

    p_k_bh = k + i_b * stride_kb + i_h * stride_kh
    p_v_bh = v + i_b * stride_vb + i_h * stride_vh
    p_cnt = kv_counts + i_b * stride_cb + i_h * stride_ch + i_m * stride_cm
    p_idx = kv_indices + i_b * stride_ib + i_h * stride_ih + i_m * stride_im
    n_blocks = tl.load(p_cnt)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 domain)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for i_blk in range(0, n_blocks):
        i_kb = tl.load(p_idx + i_blk * stride_ik)
        o_kv = i_kb * BLOCK_N + o_n  # [BN]
        i_kv, m_kv = token_index(kv_token_order, o_kv, N, HAS_ORDER)
        p_k = p_k_bh + i_kv[None, :] * stride_kn + o_d[:, None] * stride_kd
        b_kt = tl.load(p_k, mask=m_kv[None, :] & m_d[:, None], other=0.0)  # [BD, BN]
        b_s = tl.dot(b_q, b_kt) * sm_scale_log2  # [BM, BN] fp32 logits in log2 units
        b_s = tl.where(m_kv[None, :], b_s, float("-inf"))

        p_v = p_v_bh + i_kv[:, None] * stride_vn + o_d[None, :] * stride_vd
        b_v = tl.load(p_v, mask=m_kv[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
        b_m, b_l, b_acc = online_softmax_step(b_s, b_m, b_l, b_acc, b_v)

    b_o, b_lse = online_softmax_finish(b_m, b_l, b_acc)  # empty rows: zeros, LSE -inf
    p_o = o + i_b * stride_ob + i_h * stride_oh + i_q[:, None] * stride_on + o_d[None, :] * stride_od
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_q[:, None] & m_d[None, :])
    p_lse = lse + i_b * stride_lb + i_h * stride_lh + i_q * stride_ln
    tl.store(p_lse, b_lse, mask=m_q)


def block_sparse_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    token_order: torch.Tensor | None,
    kv_token_order: torch.Tensor | None,
    scale: float,
    q_block: int,
    kv_block: int,
    num_q_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Inputs are validated by ``sparse_vdit.ops``.

    q, k, v: [B, H, N, D] (any strides); kv_counts: int32 [Bm, Hm, Mq]; kv_indices: int32
    [Bm, Hm, Mq, K] with Bm in {1, B}, Hm in {1, H}; token_order: int32 [Mq * q_block] or None;
    kv_token_order: int32, same length, or None (= token_order).
    Returns o: [B, H, N, D] in q's dtype and lse: fp32 [B, H, N].
    """
    B, H, N, D = q.shape
    # Filled, not empty: tokens that the order leaves out are never stored by the kernel, and the
    # contract gives them zeros and LSE = -inf.
    o = torch.zeros((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, N), float("-inf"), dtype=torch.float32, device=q.device)
    # Broadcast dims of the mask get stride 0, so one mask serves every batch element / head.
    cb = kv_counts.stride(0) if kv_counts.shape[0] > 1 else 0
    ch = kv_counts.stride(1) if kv_counts.shape[1] > 1 else 0
    ib = kv_indices.stride(0) if kv_indices.shape[0] > 1 else 0
    ih = kv_indices.stride(1) if kv_indices.shape[1] > 1 else 0
    has_order = token_order is not None
    order_arg = token_order if has_order else kv_counts  # dummy pointer, never read
    kv_order_arg = kv_token_order if kv_token_order is not None else order_arg
    grid = (num_q_blocks, B * H)
    block_sparse_attention_fwd_kernel[grid](
        q, k, v, o, lse,
        kv_counts, kv_indices, order_arg, kv_order_arg,
        scale * LOG2E_PY,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *lse.stride(),
        cb, ch, kv_counts.stride(2),
        ib, ih, kv_indices.stride(2), kv_indices.stride(3),
        H, N, D,
        BLOCK_M=q_block, BLOCK_N=kv_block, BLOCK_D=head_dim_block(D),
        HAS_ORDER=has_order, enable_fp_fusion=True,
    )
    return o, lse
