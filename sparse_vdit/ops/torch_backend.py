"""The torch backend (the CPU path): block-gather attention and block-level attention mass,
visiting only listed key blocks, with memory proportional to the visited pairs. Same contracts as
the Triton launchers in ``sparse_vdit.kernels``."""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .order import SnapshotCache, frozen, tiled_position


class _Gathered:
    """The tiled, block-gathered view of one call that the torch forward and backward share."""

    def __init__(self, q, k, v, kv_counts, kv_indices, token_order, kv_token_order, q_block, kv_block, num_q_blocks):
        B, H, N, D = q.shape
        self.shape = (B, H, N, D)
        self.compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.q_block, self.kv_block, self.num_q_blocks = q_block, kv_block, num_q_blocks
        L = self.L = num_q_blocks * q_block
        if token_order is None:
            order = torch.arange(L, device=q.device)
            order = torch.where(order < N, order, torch.full_like(order, -1))
        else:
            order = token_order.long()
        self.order = order
        self.valid_pos = order >= 0
        self.gather = order.clamp(min=0)
        self.kv_gather = self.gather if kv_token_order is None else kv_token_order.long().clamp(min=0)
        # Key blocks span the tiled sequence; without a token order they may reach past the query blocks.
        self.Lk = L if token_order is not None else max(L, -(-N // kv_block) * kv_block)
        self.qt = self.tiled(q, L, self.gather).view(B, H, num_q_blocks, q_block, D)
        self.kt = self.tiled(k, self.Lk, self.kv_gather)
        self.vt = self.tiled(v, self.Lk, self.kv_gather)
        key_order_valid = self.valid_pos if kv_token_order is None else kv_token_order >= 0
        self.key_valid = torch.nn.functional.pad(key_order_valid, (0, self.Lk - L))
        Bm, Hm = kv_counts.shape[:2]
        K = kv_indices.shape[-1]
        counts = kv_counts.long().expand(B if Bm == 1 else Bm, H if Hm == 1 else Hm, -1)
        idx = kv_indices.long().expand(B if Bm == 1 else Bm, H if Hm == 1 else Hm, -1, -1)
        slot_valid = torch.arange(K, device=q.device) < counts.unsqueeze(-1)  # [B, H, Mq, K]
        tok = (idx.unsqueeze(-1) * kv_block + torch.arange(kv_block, device=q.device))  # [B, H, Mq, K, bk]
        self.tok = tok.flatten(-2)  # [B, H, Mq, K*bk] tiled key positions per query block
        self.visible = slot_valid.repeat_interleave(kv_block, dim=-1) & self.key_valid[self.tok]

    def tiled(self, x, pad_len, idx):
        xt = x.to(self.compute)[:, :, idx]  # [B, H, L, D]
        if pad_len > self.L:
            xt = torch.nn.functional.pad(xt, (0, 0, 0, pad_len - self.L))
        return xt

    def head(self, h, scale):
        """For head ``h``: probabilities p [B, Mq, bq, K*bk] (0 on rows without keys), lse
        [B, Mq, bq], and the gathered keys and values [B, Mq, K*bk, D]. Memory is bounded by one head."""
        D = self.shape[3]
        tok_h = self.tok[:, h]  # [B, Mq, K*bk]
        idx = tok_h.unsqueeze(-1).expand(-1, -1, -1, D)
        kg = torch.gather(self.kt[:, h].unsqueeze(1).expand(-1, self.num_q_blocks, -1, -1), 2, idx)
        vg = torch.gather(self.vt[:, h].unsqueeze(1).expand(-1, self.num_q_blocks, -1, -1), 2, idx)
        s = torch.einsum("bmqd,bmkd->bmqk", self.qt[:, h], kg) * scale
        s = s.masked_fill(~self.visible[:, h].unsqueeze(2), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        empty = torch.isinf(lse)
        p = torch.exp(s - torch.where(empty, torch.zeros_like(lse), lse).unsqueeze(-1))
        return p, lse, kg, vg

    def to_model_order(self, xt, like, fill=0.0):
        """[B, H, L, ...] in tiled order -> [B, H, N, ...] in model order (positions without a token dropped)."""
        N = self.shape[2]
        pos = tiled_position(self.order, N)  # a select, not boolean indexing: no host sync
        out = xt.index_select(2, pos.clamp(min=0)).to(like)
        missing = (pos < 0).view(1, 1, N, *([1] * (xt.dim() - 3)))
        return out.masked_fill(missing, fill)


# The block-gather forward's index tables, per mask tensor (by identity): derived from the mask and
# the orders only, so built on a layout's first call and read by every later one.
_GATHER_PLANS = WeakIdKeyDictionary()
_SNAPSHOT_PLANS = SnapshotCache()  # the same plans for tensors that are not frozen (ops.order)
GATHER_CHUNK_BYTES = 1 << 25  # gathered keys (and as much for values) per fused attention call
# A chunk's rows visit at least this share of its longest row's key blocks: every row of a chunk is
# padded to that longest row, so rows of a sparse head never pay for a denser head's keys.
CHUNK_COUNT_RATIO = 0.75
# Query rows a gather serves at least: smaller query blocks are merged into tiles of this many rows
# (the union of their key blocks, each row masked to its own block's), so that a key block is gathered
# once for the tile, not once per query block, and the fused kernel gets longer query runs.
MERGED_ROWS = 64
MERGED_MASK_ELEMENTS = 1 << 27  # the merged tiles' row masks at most this many elements, else no merge


class _GatherPlan:
    """Everything one forward over (mask, orders, B, H, N) needs besides q, k and v: where each
    tiled position reads its token, which key blocks each (batch, head, query block) gathers as rows
    of ``[B * H * Mk, kv_block * D]``, the additive key mask of the gathered keys, and the way back."""

    def __init__(self, kv_counts, kv_indices, token_order, kv_token_order, q_block, kv_block, num_q_blocks, B, H, N):
        device = kv_indices.device
        L = num_q_blocks * q_block if token_order is None else token_order.numel()
        if token_order is None:
            order = torch.arange(L, device=device)
            order = torch.where(order < N, order, torch.full_like(order, -1))
        else:
            order = token_order.long()
        k_order = order if kv_token_order is None else kv_token_order.long()
        Mk = -(-max(L, N if token_order is None else L) // kv_block)
        Lk = Mk * kv_block
        if token_order is None and Lk > L:  # key blocks past the query blocks (raster order, ragged N)
            extra = torch.arange(L, Lk, device=device)
            k_order = torch.cat([k_order, torch.where(extra < N, extra, torch.full_like(extra, -1))])
        elif Lk > L:
            k_order = torch.nn.functional.pad(k_order, (0, Lk - L), value=-1)
        self.L, self.Lk, self.Mk = L, Lk, Mk
        self.kv_gather = k_order.clamp(min=0)
        key_valid = k_order >= 0  # [Lk]
        Bm, Hm, Mq = kv_counts.shape
        K = kv_indices.shape[-1]
        idx = kv_indices.long().clamp(0, Mk - 1).expand(B if Bm == 1 else Bm, H if Hm == 1 else Hm, Mq, K)
        slot_ok = (torch.arange(K, device=device) < kv_counts.long().unsqueeze(-1)).expand_as(idx)
        sub = None  # merged tiles: [B, H, Mt, K, m], which query block of a tile visits each listed key block
        m = MERGED_ROWS // q_block if q_block < MERGED_ROWS and MERGED_ROWS % q_block == 0 else 1
        if m > 1 and device.type == "cpu":
            merged = _merge_query_blocks(idx, slot_ok, Mq, Mk, m)
            if merged[0].shape[2] * B * H * m * q_block * merged[0].shape[-1] * kv_block <= MERGED_MASK_ELEMENTS:
                idx, slot_ok, sub = merged
        self.merge = 1 if sub is None else m
        self.rows = q_block * self.merge  # query rows per gathered row
        self.Mq = -(-num_q_blocks // self.merge)  # gathered rows per (batch, head)
        q_pos = order.clamp(min=0)[: num_q_blocks * q_block]
        self.q_gather = torch.nn.functional.pad(q_pos, (0, self.Mq * self.rows - q_pos.numel()))  # pad rows read token 0
        K = idx.shape[-1]
        base = (torch.arange(B, device=device).view(B, 1, 1, 1) * H + torch.arange(H, device=device).view(1, H, 1, 1))
        self.block_rows = (base * Mk + idx).reshape(-1)  # [B * H * Mq * K] rows of the [B*H*Mk, bk*D] view
        tok = idx.unsqueeze(-1) * kv_block + torch.arange(kv_block, device=device)  # [B, H, Mq, K, bk]
        keys = slot_ok.unsqueeze(-1) & key_valid[tok]  # [B, H, Mq, K, bk]
        R = B * H * self.Mq
        if sub is None:
            visible = keys.reshape(R, 1, 1, K * kv_block)
        else:  # each query row sees the listed key blocks of its own query block only (exact)
            rows_vis = sub.permute(0, 1, 2, 4, 3).repeat_interleave(q_block, dim=3)  # [B, H, Mt, rows, K]
            visible = (rows_vis.unsqueeze(-1) & keys.unsqueeze(3)).reshape(R, 1, self.rows, K * kv_block)
        self.visible = visible
        self.empty = ~visible.any(-1)  # [R, 1, rows or 1]: query rows that see no key
        self.pos = tiled_position(order, N)  # [N] tiled position of each model token, -1 where left out
        self.missing = self.pos < 0
        self.pos = self.pos.clamp(min=0)
        self.K, self.kv_block = K, kv_block
        # Rows (batch, head, query block) by visited-block count, most first, read back once per plan
        # (the plan's only sync): a chunk of rows gathers only as many key blocks as its longest row.
        self.row_counts = slot_ok.sum(-1).reshape(-1)
        self.row_order = torch.argsort(self.row_counts, descending=True, stable=True)
        self.sorted_counts = self.row_counts[self.row_order].tolist()
        self._chunks = {}

    def chunks(self, row_bytes: int, dtype):
        """(row indices, key slots K_c, block rows [r * K_c], additive key mask [r, 1, 1, K_c * bk] in
        ``dtype`` or None where all are visible, visibility) per chunk of at most ``GATHER_CHUNK_BYTES`` of gathered keys, where
        ``row_bytes`` is one key slot's bytes, and of rows visiting at least ``CHUNK_COUNT_RATIO`` x
        K_c key blocks; rows that visit nothing are left out."""
        key = (row_bytes, dtype, GATHER_CHUNK_BYTES, CHUNK_COUNT_RATIO)
        if key not in self._chunks:
            made, i, R = [], 0, len(self.sorted_counts)
            slots = self.block_rows.view(R, self.K)
            counts = self.sorted_counts
            while i < R and counts[i] > 0:
                k_c = counts[i]
                end = min(R, i + max(1, GATHER_CHUNK_BYTES // (k_c * row_bytes)))
                n = 1
                while i + n < end and counts[i + n] >= CHUNK_COUNT_RATIO * k_c:
                    n += 1
                rows = self.row_order[i:i + n]
                vis = self.visible.index_select(0, rows)[..., :k_c * self.kv_block]
                # No mask where every gathered key is visible (whole blocks inside the grid): the fused
                # kernel runs faster without one. One read-back per chunk, once per plan.
                add = None if bool(vis.all()) else torch.zeros(
                    vis.shape, dtype=dtype, device=vis.device).masked_fill(~vis, float("-inf"))
                made.append((rows, k_c, slots.index_select(0, rows)[:, :k_c].reshape(-1), add, vis))
                i += n
            self._chunks.clear()
            self._chunks[key] = made
        return self._chunks[key]


def _merge_query_blocks(idx, slot_ok, Mq: int, Mk: int, m: int):
    """The key-block lists of tiles of ``m`` consecutive query blocks (``mask.tile_lists``, as the
    tiled kernel's query tiles): (indices [B, H, Mt, Kt], slot validity, and which of the tile's query
    blocks visits each listed block [B, H, Mt, Kt, m])."""
    from .mask import tile_lists

    dense = torch.zeros(*idx.shape[:2], Mq, Mk + 1, dtype=torch.bool, device=idx.device)
    dense.scatter_(-1, torch.where(slot_ok, idx, torch.full_like(idx, Mk)), True)  # padding: the dropped column
    counts, indices, flags = tile_lists(dense[..., :Mk], m)
    ok = torch.arange(indices.shape[-1], device=idx.device) < counts.long().unsqueeze(-1)
    sub = ((flags.unsqueeze(-1) >> torch.arange(m, device=idx.device, dtype=torch.int32)) & 1).bool()
    return indices.long(), ok, sub


def _gather_plan(kv_counts, kv_indices, token_order, kv_token_order, q_block, kv_block, num_q_blocks, B, H, N):
    tensors = (kv_counts, kv_indices, token_order, kv_token_order)
    if not frozen(*tensors):  # e.g. inside a compiled graph: by value on the CPU, else built per call
        args = (*tensors, q_block, kv_block, num_q_blocks, B, H, N)
        if kv_indices.device.type != "cpu":
            return _GatherPlan(*args)
        plan = _SNAPSHOT_PLANS.get(args[4:], tensors)
        if plan is None:
            plan = _GatherPlan(*args)
            _SNAPSHOT_PLANS.put(args[4:], tensors, plan)
        return plan
    key = (B, H, N, q_block, kv_block, num_q_blocks, kv_counts.data_ptr(), kv_indices._version,
           None if token_order is None else token_order._version,
           None if kv_token_order is None else kv_token_order._version)
    # Per mask, one entry per (query order, key order) pair: with padded keys every batch element has
    # its own key order, so a forward alternates between B of them. An entry holds its orders, so
    # their identity cannot pass to new tensors while it lives.
    per_mask = _GATHER_PLANS.get(kv_indices)
    if per_mask is None:
        per_mask = _GATHER_PLANS[kv_indices] = []
    entry = next((e for e in per_mask if e[0] is token_order and e[1] is kv_token_order), None)
    if entry is not None and key in entry[2]:
        return entry[2][key]
    plan = _GatherPlan(kv_counts, kv_indices, token_order, kv_token_order, q_block, kv_block, num_q_blocks, B, H, N)
    if entry is None:
        if len(per_mask) >= 16:
            per_mask.pop(0)
        entry = (token_order, kv_token_order, {})
        per_mask.append(entry)
    if len(entry[2]) >= 8:
        entry[2].clear()
    entry[2][key] = plan
    return plan


def _attend(q, k, v, additive, visible, scale: float):
    """(o, lse) of query blocks ``q`` [R, 1, bq, D] over their gathered keys ``k``, ``v`` [R, 1, K*bk, D]
    (``visible`` bool / ``additive`` 0 or -inf [R, 1, 1, K*bk]): the fused CPU flash kernel on the
    CPU, the same algebra in einsums elsewhere."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=additive, scale=scale)
    s = torch.einsum("rhqd,rhkd->rhqk", q, k) * scale
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    return torch.einsum("rhqk,rhkd->rhqd", p, v), lse


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

    q, k and v are copied once each into tiled order; then, a chunk of query blocks at a time (ordered
    by how many key blocks they visit, so a chunk gathers as many as its longest row), the listed key
    blocks are gathered whole (a row select on a ``[B * H * Mk, kv_block * D]`` view) and the queries
    attend to them with the fused CPU attention kernel under the gathered keys' mask.
    Only listed key blocks are visited. Computes in fp32 (or float64 when given float64).
    """
    B, H, N, D = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    plan = _gather_plan(kv_counts, kv_indices, token_order, kv_token_order, q_block, kv_block, num_q_blocks, B, H, N)
    Mq, Mk, rows_per = plan.Mq, plan.Mk, plan.rows  # gathered rows (query blocks, or merged tiles of them)
    qt = q.to(compute).index_select(2, plan.q_gather).view(B * H * Mq, 1, rows_per, D)
    kt = k.to(compute).index_select(2, plan.kv_gather).view(B * H * Mk, kv_block * D)
    vt = v.to(compute).index_select(2, plan.kv_gather).view(B * H * Mk, kv_block * D)
    R = B * H * Mq
    out = torch.zeros(R, 1, rows_per, D, dtype=compute, device=q.device)  # rows that visit nothing stay 0
    lse = torch.zeros(R, 1, rows_per, dtype=torch.float32, device=q.device)
    chunks = plan.chunks(kv_block * D * qt.element_size(), compute)
    # One buffer each for the gathered keys and values, written in place chunk after chunk: fresh
    # allocations of this size cost more in page faults than the gather itself.
    size = max((rows.numel() * k_c for rows, k_c, *_ in chunks), default=0)
    kbuf = torch.empty(size, kv_block * D, dtype=compute, device=q.device)
    vbuf = torch.empty_like(kbuf)
    for rows, k_c, sel, additive, visible in chunks:  # rows by visited count, most first
        n = sel.numel()
        kg = torch.index_select(kt, 0, sel, out=kbuf[:n]).view(-1, 1, k_c * kv_block, D)
        vg = torch.index_select(vt, 0, sel, out=vbuf[:n]).view(-1, 1, k_c * kv_block, D)
        o_c, lse_c = _attend(qt.index_select(0, rows), kg, vg, additive, visible, scale)
        out.index_copy_(0, rows, o_c)
        lse.index_copy_(0, rows, lse_c.float())
    lse = lse.masked_fill(plan.empty, float("-inf"))  # the fused kernel leaves 0 there (and 0 output)
    o = out.view(B, H, Mq * rows_per, D).index_select(2, plan.pos).masked_fill(plan.missing[:, None], 0.0)
    lse = lse.view(B, H, Mq * rows_per).index_select(2, plan.pos).masked_fill(plan.missing, float("-inf"))
    return o.to(q.dtype), lse


def torch_block_sparse_attention_bwd(grad_o, grad_lse, q, k, v, kv_counts, kv_indices, token_order, kv_token_order,
                                     scale, q_block, kv_block, num_q_blocks):
    """(dq, dk, dv) of :func:`torch_block_sparse_attention` (FlashAttention's backward algebra on the
    visited blocks: dS = P * (dO V^T - rowsum(dO * O) + dLSE)), in the inputs' dtypes."""
    g = _Gathered(q, k, v, kv_counts, kv_indices, token_order, kv_token_order, q_block, kv_block, num_q_blocks)
    B, H, N, D = q.shape
    Mq = num_q_blocks
    do_t = g.tiled(grad_o, g.L, g.gather).view(B, H, Mq, q_block, D)
    dlse_t = grad_lse.to(g.compute)[:, :, g.gather].view(B, H, Mq, q_block)
    row_ok = g.valid_pos.view(Mq, q_block)
    dqt = torch.zeros(B, H, Mq, q_block, D, dtype=g.compute, device=q.device)
    dkt = torch.zeros(B, H, g.Lk, D, dtype=g.compute, device=q.device)
    dvt = torch.zeros_like(dkt)
    for h in range(H):
        p, _, kg, vg = g.head(h, scale)  # [B, Mq, bq, Kb], [B, Mq, Kb, D]
        do_h = do_t[:, h] * row_ok[..., None]  # padding rows carry no gradient
        o_h = torch.einsum("bmqk,bmkd->bmqd", p, vg)
        dp = torch.einsum("bmqd,bmkd->bmqk", do_h, vg)
        delta = (do_h * o_h).sum(-1, keepdim=True)
        ds = p * (dp - delta + (dlse_t[:, h] * row_ok).unsqueeze(-1))
        dqt[:, h] = torch.einsum("bmqk,bmkd->bmqd", ds, kg) * scale
        dk_g = torch.einsum("bmqk,bmqd->bmkd", ds, g.qt[:, h]) * scale  # [B, Mq, Kb, D]
        dv_g = torch.einsum("bmqk,bmqd->bmkd", p, do_h)
        tok_h = g.tok[:, h].reshape(B, -1)  # [B, Mq*Kb] tiled key positions
        dkt[:, h].scatter_add_(1, tok_h.unsqueeze(-1).expand(-1, -1, D), dk_g.reshape(B, -1, D))
        dvt[:, h].scatter_add_(1, tok_h.unsqueeze(-1).expand(-1, -1, D), dv_g.reshape(B, -1, D))
    dq = g.to_model_order(dqt.view(B, H, g.L, D), q.dtype)
    # Keys: tiled position -> model token through the key order; positions that are not keys carry 0.
    kv_ok = g.key_valid[:g.L]
    dk = torch.zeros(B, H, N, D, dtype=g.compute, device=q.device)
    dv = torch.zeros_like(dk)
    # Every tiled position adds into its token (0 where it is not a key, with a zero weight): no
    # boolean indexing, so no host sync.
    weight = kv_ok.to(g.compute)[None, None, :, None]
    dk.index_add_(2, g.kv_gather, dkt[:, :, :g.L] * weight)
    dv.index_add_(2, g.kv_gather, dvt[:, :, :g.L] * weight)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


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


# Token-level visibility of a mask over one (order, key order), per mask: built once, read per call.
_TOKEN_MASKS = WeakIdKeyDictionary()
_SNAPSHOT_MASKS = SnapshotCache()  # the same for tensors that are not frozen (ops.order), on the CPU


def _token_visibility(kv_counts, kv_indices, token_order, kv_token_order, q_block, kv_block, num_q_blocks, N):
    """(bool [Bm, Hm, N, N]: may model token i attend model token j (by the blocks of their tiled
    positions and the key order); bool [Bm, Hm, N, 1]: does token i see any key), cached per mask
    tensor and orders (when all of them are marked immutable: ``ops.order.freeze``)."""
    tensors = (kv_counts, kv_indices, token_order, kv_token_order)
    cacheable = frozen(*tensors)
    by_value = not cacheable and kv_indices.device.type == "cpu"
    if by_value:
        hit = _SNAPSHOT_MASKS.get((q_block, kv_block, num_q_blocks, N), tensors)
        if hit is not None:
            return hit
    versions = (None if token_order is None else token_order._version,
                None if kv_token_order is None else kv_token_order._version, N)
    cached = _TOKEN_MASKS.get(kv_indices)
    # The entry holds its orders (so their identity cannot pass to new tensors while it lives).
    if cacheable and cached is not None and cached[0] is token_order and cached[1] is kv_token_order and \
            cached[2] == versions:
        return cached[3], cached[4]
    device = kv_indices.device
    Bm, Hm, Mq = kv_counts.shape
    if token_order is None:
        q_pos = torch.arange(N, device=device)
        k_pos = q_pos
        key_ok = torch.ones(N, dtype=torch.bool, device=device)
    else:
        q_pos = tiled_position(token_order, N)
        k_order = token_order if kv_token_order is None else kv_token_order
        k_pos = tiled_position(k_order, N)
        key_ok = k_pos >= 0
    length = token_order.numel() if token_order is not None else max(N, num_q_blocks * q_block)
    Mk = -(-length // kv_block)
    valid = torch.arange(kv_indices.shape[-1], device=device) < kv_counts.unsqueeze(-1)
    blocks = torch.zeros(Bm, Hm, Mq, Mk + 1, dtype=torch.bool, device=device)
    blocks.scatter_(-1, torch.where(valid, kv_indices.long(), torch.full_like(kv_indices, Mk, dtype=torch.long)), True)
    qb = (q_pos.clamp(min=0) // q_block).clamp(max=Mq - 1)
    kb = k_pos.clamp(min=0) // kv_block
    vis = blocks[:, :, qb][:, :, :, kb] & key_ok & (q_pos >= 0)[:, None]
    rows = vis.any(-1, keepdim=True)  # [Bm, Hm, N, 1] queries that see at least one key
    if cacheable:
        _TOKEN_MASKS[kv_indices] = (token_order, kv_token_order, versions, vis, rows)
    elif by_value:
        _SNAPSHOT_MASKS.put((q_block, kv_block, num_q_blocks, N), tensors, (vis, rows))
    return vis, rows


def torch_masked_attention(q, k, v, kv_counts, kv_indices, token_order, kv_token_order, scale, q_block, kv_block,
                           num_q_blocks):
    """Exact block-sparse attention as dense attention under the mask's token-level visibility (fp32,
    one head at a time): the cost of dense attention plus an N x N boolean per mask, so for short
    sequences on the CPU (the demo, calibration and quality benchmarks of tiny models), where it is
    much faster than the block-gather path. Same contract as :func:`torch_block_sparse_attention`."""
    B, H, N, D = q.shape
    vis, _ = _token_visibility(kv_counts, kv_indices, token_order, kv_token_order, q_block, kv_block, num_q_blocks, N)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    for h in range(H):
        m = vis[:, h if vis.shape[1] > 1 else 0]  # [Bm, N, N]
        s = torch.einsum("bnd,bmd->bnm", q[:, h].to(compute), k[:, h].to(compute)) * scale
        s = s.masked_fill(~m, float("-inf"))
        lse_h = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isinf(lse_h), torch.zeros_like(lse_h), lse_h).unsqueeze(-1))
        o[:, h] = torch.einsum("bnm,bmd->bnd", p, v[:, h].to(compute)).to(q.dtype)
        lse[:, h] = lse_h.float()
    return o, lse


def torch_masked_sdpa(q, k, v, kv_counts, kv_indices, token_order, kv_token_order, scale, q_block, kv_block,
                      num_q_blocks):
    """The output of :func:`torch_masked_attention` (no LSE) through SDPA with the boolean token mask:
    fused, so as fast as dense attention on the CPU. Queries that see no key get zeros."""
    N = q.shape[2]
    vis, rows = _token_visibility(kv_counts, kv_indices, token_order, kv_token_order, q_block, kv_block,
                                  num_q_blocks, N)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=_additive(vis, q.dtype), scale=scale)
    return o.masked_fill(~rows, 0.0)


# Per cached token mask (by identity): its additive form (0 / -inf) in each dtype. SDPA turns a boolean
# mask into this itself on every call, an N x N pass per head that cost as much as the attention on
# the CPU (B=2, 4 heads, N=2,048, D=32, a random mask that shows half the keys: 134 ms with the boolean
# mask, 65 ms with the additive one, 51 ms dense).
_ADDITIVE = WeakIdKeyDictionary()


def _additive(vis: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    per_dtype = _ADDITIVE.setdefault(vis, {})
    if dtype not in per_dtype:
        per_dtype[dtype] = torch.zeros(vis.shape, dtype=dtype, device=vis.device).masked_fill_(~vis, float("-inf"))
    return per_dtype[dtype]
