"""Rotary position embedding in one pass, written where attention wants it.

The video DiTs of diffusers rotate q and k (interleaved pairs ``(x[2i], x[2i + 1])``) right before
attention, then the tiled attention path copies k (and v) into tiled order. This kernel does both
at once: it reads x in the model's ``[B, N, H, D]`` layout (any strides), rotates each pair in fp32
by its token's angle, and writes the result once, either in model order (q: the attention kernel
reads q through the query order itself) or ``[B, H, L, D]`` along a token order (k, along the packed
key order: the layout the attention kernel reads its key tiles from), zeros where the order holds -1.
Tokens outside the rotated range (text tokens beside the video) are copied unrotated.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rope_kernel(
    x, out, cos, sin, order,
    stride_xb, stride_xn, stride_xh, stride_xd,
    stride_ob, stride_oh, stride_op, stride_od,
    stride_cb, stride_cn, stride_ch, stride_cd,
    stride_rb,
    H, P, START, NR, HALF,
    BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, HAS_ORDER: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BP] output positions
    m_p = o_p < P
    if HAS_ORDER:  # tiled position -> model token (-1: padding, written as zeros)
        tok = tl.load(order + i_b * stride_rb + o_p, mask=m_p, other=-1)
    else:
        tok = o_p
    m_t = m_p & (tok >= 0)
    tok64 = tl.where(m_t, tok, 0).to(tl.int64)
    o_j = tl.arange(0, BLOCK_J)  # [BJ] pair index
    m_j = o_j < HALF
    # Whole rows (contiguous, vectorised loads), split into the pairs' two halves in registers.
    o_d = tl.arange(0, 2 * BLOCK_J)
    m_d = o_d < 2 * HALF
    p_x = x + i_b * stride_xb + i_h * stride_xh + tok64[:, None] * stride_xn + o_d[None, :] * stride_xd
    b_x = tl.load(p_x, mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    x1, x2 = tl.split(tl.reshape(b_x, [BLOCK_P, BLOCK_J, 2]))
    r = tok64 - START  # row of the angle tables; outside [0, NR): not rotated
    m_r = m_t & (r >= 0) & (r < NR)
    p_c = i_b * stride_cb + i_h * stride_ch + tl.where(m_r, r, 0)[:, None] * stride_cn + o_j[None, :] * stride_cd
    mr = m_r[:, None] & m_j[None, :]
    c = tl.load(cos + p_c, mask=mr, other=1.0)
    s = tl.load(sin + p_c, mask=mr, other=0.0)
    y1 = x1 * c - x2 * s
    y2 = x1 * s + x2 * c
    b_y = tl.reshape(tl.join(y1, y2), [BLOCK_P, 2 * BLOCK_J])
    o_p64 = o_p.to(tl.int64)
    p_o = out + i_b * stride_ob + i_h * stride_oh + o_p64[:, None] * stride_op + o_d[None, :] * stride_od
    tl.store(p_o, b_y.to(out.dtype.element_ty), mask=m_p[:, None] & m_d[None, :])


def _table_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, token, head, pair) strides of an angle table ``[Bc, Nr, Hc, D // 2]``; 0 where Bc or Hc is 1."""
    return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1), t.stride(2) if t.shape[2] > 1 else 0, t.stride(3))


def rope_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
             order: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the rotary pass. Inputs are prepared and validated by ``sparse_vdit.ops``.

    x: [B, N, H, D] (any strides). cos, sin: fp32 [Bc, Nr, Hc, D // 2] angle tables of pairs (Bc in
    (1, B), Hc in (1, H); any strides, the same for both), for tokens ``start .. start + Nr - 1``.
    order: None -> returns [B, N, H, D] contiguous in model order; int32 [L] or [B, L] (tiled
    position -> token, -1 padding) -> returns [B, H, L, D] contiguous in tiled order.
    """
    B, N, H, D = x.shape
    if order is None:
        P = N
        out = torch.empty((B, N, H, D), dtype=x.dtype, device=x.device)
        so = (out.stride(0), out.stride(2), out.stride(1), out.stride(3))
        rb = 0
    else:
        P = order.shape[-1]
        out = torch.empty((B, H, P, D), dtype=x.dtype, device=x.device)
        so = out.stride()
        rb = order.stride(0) if order.dim() == 2 and order.shape[0] > 1 else 0
    block_p = 64
    grid = (triton.cdiv(P, block_p), B * H)
    rope_kernel[grid](
        x, out, cos, sin, order if order is not None else cos,  # (not read without an order)
        *x.stride(), *so, *_table_strides(cos), rb,
        H, P, start, cos.shape[1], D // 2,
        BLOCK_P=block_p, BLOCK_J=triton.next_power_of_2(max(D // 2, 1)), HAS_ORDER=order is not None,
        num_warps=4, enable_fp_fusion=False,  # no FMA contraction: x1 * c - x2 * s rounds as torch's fp32 rotation does
    )
    return out
