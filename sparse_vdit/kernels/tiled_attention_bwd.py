"""Triton block-sparse attention backward on contiguous tiles (FlashAttention-2 style).

Inputs are in tiled order, contiguous [B, H, L, D], like the tiled forward's. Two kernels:

- ``block_sparse_attention_bwd_dq_kernel``: one program per (query block, batch x head) walks the
  key blocks the mask lists for it and accumulates dQ = sum_j dS_ij K_j * scale, with
  P = exp(S - LSE) recomputed from the forward's LSE and dS = P * (dP - delta), dP = dO V^T,
  delta = rowsum(dO * O) (precomputed).
- ``block_sparse_attention_bwd_dkdv_kernel``: one program per (key block, batch x head) walks the
  query blocks that visit it (the transposed mask, built once per mask) and accumulates
  dV = sum_i P_ij^T dO_i and dK = sum_i dS_ij^T Q_i * scale.

Rows of padding or without any key carry LSE = +inf here (the caller's choice), so P = 0 there and
they contribute nothing; keys that are not keys (``kv_valid`` = 0) are masked on the blocks flagged
in ``kv_block_pad``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LOG2E, LOG2E_PY, STAGES, arch_pruner, autotune_configs, head_dim_block
from .tiled_attention import batch_stride


def _configs():
    return autotune_configs(stages=STAGES["bwd_dq"])


# The two kernels' prologues look alike (program ids, row offsets, loads of one side's tiles): they
# walk transposed lists of the same mask from opposite sides. (`duplicates` rows; justified.)
@triton.autotune(configs=_configs(), key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "ROWS"], cache_results=True,
                 prune_configs_by={"early_config_prune": arch_pruner("bwd_dq")})
@triton.jit
def block_sparse_attention_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq,
    kv_counts, kv_indices, kv_valid, kv_block_pad,
    sm_scale_log2, sm_scale,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_ik,
    stride_vb, stride_pb,
    H, L, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
):
    # A program takes ROWS (<= BLOCK_M) query rows: part of one mask query block, whose list it walks.
    i_r = tl.program_id(0)
    i_m = (i_r * ROWS) // BLOCK_M
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    o_bh = i_bh.to(tl.int64) * L
    o_m = i_r * ROWS + tl.arange(0, ROWS)  # [R] tiled positions
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    p_rows = (o_bh + o_m)[:, None] * HEAD_DIM + o_d[None, :]
    b_q = tl.load(q + p_rows, mask=m_d[None, :], other=0.0)  # [BM, BD]
    b_do = tl.load(do + p_rows, mask=m_d[None, :], other=0.0)
    b_lse2 = tl.load(lse + o_bh + o_m) * LOG2E  # [BM] log2 domain; +inf on rows that get no gradient
    b_delta = tl.load(delta + o_bh + o_m)  # [BM]
    p_cnt = kv_counts + i_b * stride_cb + i_h * stride_ch + i_m * stride_cm
    p_idx = kv_indices + i_b * stride_ib + i_h * stride_ih + i_m * stride_im
    b_dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for i_blk in range(0, tl.load(p_cnt)):
        i_kb = tl.load(p_idx + i_blk * stride_ik)
        o_kv = i_kb * BLOCK_N + o_n
        p_kv = (o_bh + o_kv)[:, None] * HEAD_DIM + o_d[None, :]
        b_k = tl.load(k + p_kv, mask=m_d[None, :], other=0.0)  # [BN, BD]
        b_v = tl.load(v + p_kv, mask=m_d[None, :], other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k)) * sm_scale_log2  # [BM, BN]
        if tl.load(kv_block_pad + i_b * stride_pb + i_kb) != 0:
            m_kv = tl.load(kv_valid + i_b * stride_vb + o_kv) != 0
            b_s = tl.where(m_kv[None, :], b_s, float("-inf"))
        b_p = tl.math.exp2(b_s - b_lse2[:, None])  # [BM, BN]
        b_dp = tl.dot(b_do, tl.trans(b_v))  # [BM, BN]
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
    tl.store(dq + p_rows, (b_dq * sm_scale).to(dq.dtype.element_ty), mask=m_d[None, :])


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "ROWS"], cache_results=True,
                 prune_configs_by={"early_config_prune": arch_pruner("bwd_dkdv")})
@triton.jit
def block_sparse_attention_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv,
    q_counts, q_indices, kv_valid,
    sm_scale_log2, sm_scale,
    stride_cb, stride_ch, stride_cn,
    stride_ib, stride_ih, stride_in, stride_ik,
    stride_vb,
    H, L, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
):
    # A program takes ROWS (<= BLOCK_N) key rows: part of one key block, whose column it walks.
    i_r = tl.program_id(0)
    i_n = (i_r * ROWS) // BLOCK_N
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    o_bh = i_bh.to(tl.int64) * L
    o_n = i_r * ROWS + tl.arange(0, ROWS)  # [R] tiled key positions
    CHUNK_M: tl.constexpr = BLOCK_M  # smaller chunks spilled more on sm_90a (compile table)
    o_m = tl.arange(0, CHUNK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    p_kv = (o_bh + o_n)[:, None] * HEAD_DIM + o_d[None, :]
    b_k = tl.load(k + p_kv, mask=m_d[None, :], other=0.0)  # [BN, BD]
    b_v = tl.load(v + p_kv, mask=m_d[None, :], other=0.0)
    m_kv = tl.load(kv_valid + i_b * stride_vb + o_n) != 0  # [BN]; a key order per batch element when strided
    p_cnt = q_counts + i_b * stride_cb + i_h * stride_ch + i_n * stride_cn
    p_idx = q_indices + i_b * stride_ib + i_h * stride_ih + i_n * stride_in
    b_dk = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for i_blk in range(0, tl.load(p_cnt)):
        i_qb = tl.load(p_idx + i_blk * stride_ik)
        # The query block in chunks of CHUNK_M rows: [BN, CHUNK_M] temporaries keep registers down.
        for i_c in tl.static_range(0, BLOCK_M // CHUNK_M):
            o_q = i_qb * BLOCK_M + i_c * CHUNK_M + o_m
            p_rows = (o_bh + o_q)[:, None] * HEAD_DIM + o_d[None, :]
            b_q = tl.load(q + p_rows, mask=m_d[None, :], other=0.0)  # [CM, BD]
            b_do = tl.load(do + p_rows, mask=m_d[None, :], other=0.0)
            b_lse2 = tl.load(lse + o_bh + o_q) * LOG2E
            b_delta = tl.load(delta + o_bh + o_q)
            b_st = tl.dot(b_k, tl.trans(b_q)) * sm_scale_log2  # [BN, CM] = S^T
            b_st = tl.where(m_kv[:, None], b_st, float("-inf"))
            b_pt = tl.math.exp2(b_st - b_lse2[None, :])  # [BN, CM] = P^T
            b_dv += tl.dot(b_pt.to(b_do.dtype), b_do)
            b_dpt = tl.dot(b_v, tl.trans(b_do))  # [BN, CM] = dP^T
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk += tl.dot(b_dst.to(b_q.dtype), b_q)
    tl.store(dk + p_kv, (b_dk * sm_scale).to(dk.dtype.element_ty), mask=m_d[None, :])
    tl.store(dv + p_kv, b_dv.to(dv.dtype.element_ty), mask=m_d[None, :])


def backward_rows(q_block: int, kv_block: int, block_d: int) -> tuple[int, int]:
    """Query rows per dq program and key rows per dk/dv program."""
    return min(q_block, 128 if block_d <= 64 else 64), min(kv_block, 64)


def block_sparse_attention_tiled_bwd(qt, kt, vt, dot, lse_t, delta_t, kv_counts, kv_indices, q_counts, q_indices,
                                     kv_valid, kv_block_pad, scale, q_block, kv_block):
    """Launch both backward kernels; inputs are prepared by ``sparse_vdit.ops``.

    qt, kt, vt, dot: contiguous [B, H, L, D] (tiled order); lse_t, delta_t: fp32 [B, H, L] (LSE = +inf
    on rows without gradient); kv_counts / kv_indices: the mask's rows [Bm, Hm, Mq(, K)];
    q_counts / q_indices: its columns [Bm, Hm, Mk(, K')] (the query blocks visiting each key block).
    Returns dq, dk, dv [B, H, L, D] in tiled order.
    """
    B, H, L, D = qt.shape
    dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
    block_d = head_dim_block(D)

    def bstride(t, dim):
        return t.stride(dim) if t.shape[dim] > 1 else 0

    # Rows per program, from the sm_90a compile table (64-row programs spill least at head_dim 128;
    # fewer rows lose wgmma). dK/dV still spills on sm_90a at head_dim 128 with 128-token key blocks.
    rows_q, rows_k = backward_rows(q_block, kv_block, block_d)
    block_sparse_attention_bwd_dq_kernel[(L // rows_q, B * H)](
        qt, kt, vt, dot, lse_t, delta_t, dq, kv_counts, kv_indices, kv_valid, kv_block_pad,
        scale * LOG2E_PY, scale,
        bstride(kv_counts, 0), bstride(kv_counts, 1), kv_counts.stride(2),
        bstride(kv_indices, 0), bstride(kv_indices, 1), kv_indices.stride(2), kv_indices.stride(3),
        batch_stride(kv_valid), batch_stride(kv_block_pad),
        H, L, D, BLOCK_M=q_block, BLOCK_N=kv_block, BLOCK_D=block_d, ROWS=rows_q,
        enable_fp_fusion=True,
    )
    block_sparse_attention_bwd_dkdv_kernel[(L // rows_k, B * H)](
        qt, kt, vt, dot, lse_t, delta_t, dk, dv, q_counts, q_indices, kv_valid,
        scale * LOG2E_PY, scale,
        bstride(q_counts, 0), bstride(q_counts, 1), q_counts.stride(2),
        bstride(q_indices, 0), bstride(q_indices, 1), q_indices.stride(2), q_indices.stride(3),
        batch_stride(kv_valid),
        H, L, D, BLOCK_M=q_block, BLOCK_N=kv_block, BLOCK_D=block_d, ROWS=rows_k,
        enable_fp_fusion=True,
    )
    return dq, dk, dv
