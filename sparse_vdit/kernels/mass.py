"""Triton kernel for block-level attention mass (calibration and analysis statistics).

Given the natural-log LSE of each query under dense attention (from the forward kernel), one program
takes one query block of one (batch, head), walks every key block, and writes the attention
probability mass the block's queries give each key block: sum_i sum_j exp(q_i . k_j * scale - lse_i).
No score matrix is stored; the cost is one more pass of dense QK^T.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LOG2E, LOG2E_PY, STAGES, arch_pruner, autotune_configs, head_dim_block, load_query_block, token_index


# The pointer/stride parameters repeat the attention kernel's on purpose: Triton kernels take flat
# arguments; the shared prologue itself lives in common.load_query_block. (A `duplicates` row; justified.)
@triton.autotune(configs=autotune_configs(stages=STAGES["mass"]), key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "HAS_ORDER"],
                 prune_configs_by={"early_config_prune": arch_pruner("mass")}, cache_results=True)
@triton.jit
def block_attention_mass_kernel(
    q, k, lse, mass, token_order, kv_token_order,
    sm_scale_log2,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_lh, stride_ln,
    stride_mb, stride_mh, stride_mm, stride_mk,
    H, N, HEAD_DIM, NUM_KV_BLOCKS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_ORDER: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)  # int64 offsets: see the attention kernel
    i_h = (i_bh % H).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N)
    b_q, i_q, m_q, o_d, m_d = load_query_block(q, token_order, i_b, i_h, i_m, stride_qb, stride_qh, stride_qn,
                                               stride_qd, N, HEAD_DIM, BLOCK_M, BLOCK_D, HAS_ORDER)
    b_lse = tl.load(lse + i_b * stride_lb + i_h * stride_lh + i_q * stride_ln, mask=m_q, other=float("-inf"))
    # Rows without a valid query or without any key (lse = -inf) contribute nothing.
    m_row = m_q & (b_lse > float("-inf"))
    b_lse2 = tl.where(m_row, b_lse * LOG2E, 0.0)  # log2 domain
    p_k_bh = k + i_b * stride_kb + i_h * stride_kh
    p_mass = mass + i_b * stride_mb + i_h * stride_mh + i_m.to(tl.int64) * stride_mm
    for i_kb in range(0, NUM_KV_BLOCKS):
        o_kv = i_kb * BLOCK_N + o_n
        i_kv, m_kv = token_index(kv_token_order, o_kv, N, HAS_ORDER)
        p_k = p_k_bh + i_kv[None, :] * stride_kn + o_d[:, None] * stride_kd
        b_kt = tl.load(p_k, mask=m_kv[None, :] & m_d[:, None], other=0.0)  # [BD, BN]
        b_s = tl.dot(b_q, b_kt) * sm_scale_log2
        b_p = tl.math.exp2(b_s - b_lse2[:, None])
        b_p = tl.where(m_row[:, None] & m_kv[None, :], b_p, 0.0)
        tl.store(p_mass + i_kb * stride_mk, tl.sum(tl.sum(b_p, 1), 0))


def block_attention_mass_fwd(q, k, lse, token_order, kv_token_order, scale, q_block, kv_block, num_q_blocks,
                             num_kv_blocks):
    """Launch the mass kernel; inputs are validated by ``sparse_vdit.ops``.

    q, k: [B, H, N, D]; lse: fp32 [B, H, N]; token_order / kv_token_order: int32 [L] or None.
    Returns fp32 [B, H, Mq, Mk]: summed probability mass per (query block, key block).
    """
    B, H, N, D = q.shape
    mass = torch.empty((B, H, num_q_blocks, num_kv_blocks), dtype=torch.float32, device=q.device)
    has_order = token_order is not None
    order_arg = token_order if has_order else lse  # dummy pointer, never read
    kv_order_arg = kv_token_order if kv_token_order is not None else order_arg
    block_attention_mass_kernel[(num_q_blocks, B * H)](
        q, k, lse, mass, order_arg, kv_order_arg,
        scale * LOG2E_PY,
        *q.stride(), *k.stride(), *lse.stride(), *mass.stride(),
        H, N, D, num_kv_blocks,
        BLOCK_M=q_block, BLOCK_N=kv_block, BLOCK_D=head_dim_block(D),
        HAS_ORDER=has_order, enable_fp_fusion=True,
    )
    return mass
