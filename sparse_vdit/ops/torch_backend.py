"""The torch backend (the CPU path): block-gather attention and block-level attention mass,
visiting only listed key blocks, with memory proportional to the visited pairs. Same contracts as
the Triton launchers in ``sparse_vdit.kernels``."""
from __future__ import annotations

import torch


# Same parameters as the Triton launcher (kernels.block_sparse_attention_fwd) and the custom op
# (ops.attention.block_sparse_attention_op), on purpose: the op dispatches to either backend with one
# call, and torch.library needs the parameters spelled out. (A `duplicates` row; justified.)
def torch_block_sparse_attention(
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
    """Block-gather attention in torch (the CPU backend); same contract as the Triton launcher.

    Computes in fp32 (or float64 when given float64) and visits only listed key blocks.
    """
    B, H, N, D = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    L = num_q_blocks * q_block
    if token_order is None:
        order = torch.arange(L, device=q.device)
        order = torch.where(order < N, order, torch.full_like(order, -1))
    else:
        order = token_order.long()
    valid_pos = order >= 0
    gather = order.clamp(min=0)

    kv_gather = gather if kv_token_order is None else kv_token_order.long().clamp(min=0)

    def tiled(x, pad_len, idx):
        xt = x.to(compute)[:, :, idx]  # [B, H, L, D]
        if pad_len > L:
            xt = torch.nn.functional.pad(xt, (0, 0, 0, pad_len - L))
        return xt

    # Key blocks span the tiled sequence; without a token order they may reach past the query blocks.
    Lk = L if token_order is not None else max(L, -(-N // kv_block) * kv_block)
    qt = tiled(q, L, gather).view(B, H, num_q_blocks, q_block, D)
    kt = tiled(k, Lk, kv_gather)
    vt = tiled(v, Lk, kv_gather)
    key_order_valid = valid_pos if kv_token_order is None else kv_token_order >= 0
    key_valid = torch.nn.functional.pad(key_order_valid, (0, Lk - L))

    Bm, Hm = kv_counts.shape[:2]
    K = kv_indices.shape[-1]
    counts = kv_counts.long().expand(B if Bm == 1 else Bm, H if Hm == 1 else Hm, -1)
    idx = kv_indices.long().expand(B if Bm == 1 else Bm, H if Hm == 1 else Hm, -1, -1)
    slot_valid = torch.arange(K, device=q.device) < counts.unsqueeze(-1)  # [B, H, Mq, K]
    tok = (idx.unsqueeze(-1) * kv_block + torch.arange(kv_block, device=q.device))  # [B, H, Mq, K, bk]
    tok = tok.flatten(-2)  # [B, H, Mq, K*bk]
    visible = slot_valid.repeat_interleave(kv_block, dim=-1) & key_valid[tok]

    out = torch.empty(B, H, num_q_blocks, q_block, D, dtype=compute, device=q.device)
    lse = torch.empty(B, H, num_q_blocks, q_block, dtype=compute, device=q.device)
    # Loop over heads to bound memory at [B, Mq, bq, K*bk].
    for h in range(H):
        tok_h = tok[:, h]  # [B, Mq, K*bk]
        kg = torch.gather(kt[:, h].unsqueeze(1).expand(-1, num_q_blocks, -1, -1), 2,
                          tok_h.unsqueeze(-1).expand(-1, -1, -1, D))
        vg = torch.gather(vt[:, h].unsqueeze(1).expand(-1, num_q_blocks, -1, -1), 2,
                          tok_h.unsqueeze(-1).expand(-1, -1, -1, D))
        s = torch.einsum("bmqd,bmkd->bmqk", qt[:, h], kg) * scale
        s = s.masked_fill(~visible[:, h].unsqueeze(2), float("-inf"))
        lse_h = torch.logsumexp(s, dim=-1)
        empty = torch.isinf(lse_h)
        p = torch.exp(s - torch.where(empty, torch.zeros_like(lse_h), lse_h).unsqueeze(-1))
        out[:, h] = torch.einsum("bmqk,bmkd->bmqd", p, vg).masked_fill(empty.unsqueeze(-1), 0.0)
        lse[:, h] = lse_h

    out = out.view(B, H, L, D)
    lse = lse.view(B, H, L)
    o = q.new_zeros(B, H, N, D)
    lse_out = torch.full((B, H, N), float("-inf"), dtype=torch.float32, device=q.device)
    o[:, :, order[valid_pos]] = out[:, :, valid_pos].to(q.dtype)
    lse_out[:, :, order[valid_pos]] = lse[:, :, valid_pos].to(torch.float32)
    return o, lse_out


def torch_block_attention_mass(q, k, lse, token_order, kv_token_order, scale, q_block, kv_block, Mq, Mk, chunk_bytes=1 << 28):
    """Summed dense-attention probability mass per (query block, key block), fp32 [B, H, Mq, Mk],
    in query chunks of about ``chunk_bytes`` of scores; same contract as the Triton mass launcher."""
    B, H, N, D = q.shape
    Lq, Lk = Mq * q_block, Mk * kv_block

    def positions(order, length):
        if order is None:
            idx = torch.arange(length, device=q.device)
            return idx.clamp(max=N - 1), idx < N
        return order.long().clamp(min=0), order >= 0

    q_idx, q_ok = positions(token_order, Lq)
    k_idx, k_ok = positions(kv_token_order if kv_token_order is not None else token_order, Lk)
    sums = torch.zeros(B, H, Mq, Mk, dtype=torch.float64, device=q.device)
    chunk = max(q_block, (chunk_bytes // max(1, H * Lk * 4)) // q_block * q_block)
    for b in range(B):
        kt = k[b][:, k_idx].float()  # [H, Lk, D]
        lse_t = lse[b][:, q_idx]  # [H, Lq]
        for c0 in range(0, Lq, chunk):
            c1 = min(Lq, c0 + chunk)
            qt = q[b][:, q_idx[c0:c1]].float()
            s = torch.einsum("hcd,hld->hcl", qt, kt) * scale
            row_lse = lse_t[:, c0:c1]
            ok = q_ok[c0:c1][None, :, None] & k_ok[None, None, :] & torch.isfinite(row_lse)[..., None]
            p = torch.where(ok, torch.exp(s - torch.where(torch.isfinite(row_lse), row_lse, 0)[..., None]), 0.0)
            per = p.view(H, (c1 - c0) // q_block, q_block, Mk, kv_block).sum(dim=(2, 4))
            sums[b, :, c0 // q_block:c1 // q_block] += per.double()
    return sums.float()
