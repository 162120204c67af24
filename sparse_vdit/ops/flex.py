"""The FlexAttention backend on the same block mask (a baseline, and a backend where it wins)."""
from __future__ import annotations

import warnings
import weakref

import torch

from .mask import BlockSparseMask, block_lookup_mask_mod, blocks_to_indices
from .order import tiled_position

# Eager FlexAttention warns that it is unfused; on the CPU that is the intended use. Filtered once,
# at import, for that one message only.
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


def _flex_call(flex_fn, q, k, v, block_mask, scale):
    """Call FlexAttention asking for the LSE in whichever way this torch version supports."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        return flex_fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)
    o, aux = flex_fn(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
    return o, aux.lse


def flex_block_sparse_attention(q, k, v, mask: BlockSparseMask, scale: float, token_order=None, kv_token_order=None,
                                flex_fn=None):
    """FlexAttention on ``mask``'s blocks; q, k, v: [B, H, N, D]. With a token order it permutes
    copies into tiled order (FlexAttention has no gather), which a benchmark counts against it.
    ``flex_fn``: the FlexAttention to call (compiled on CUDA: ``ops.attention`` passes it)."""
    from torch.nn.attention.flex_attention import flex_attention

    flex_fn = flex_fn or flex_attention
    B, H, N, D = q.shape
    if token_order is None:
        if ("flex", N) not in mask._derived:  # built once per mask and length
            mask._derived[("flex", N)] = mask.to_flex(N)
        o, lse = _flex_call(flex_fn, q, k, v, mask._derived[("flex", N)], scale)
        # FlexAttention leaves rows with no key as zeros and -inf LSE in recent torch; enforce the contract.
        lse = lse.float()
        o = o.masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0)
        return o, lse
    order = token_order.long()
    kv_order = order if kv_token_order is None else kv_token_order.long()
    L = order.numel()
    ot, lset = _flex_call(flex_fn, _tile(q, order), _tile(k, kv_order), _tile(v, kv_order),
                          _ordered_block_mask(mask, token_order, kv_token_order, L), scale)
    # Back to model order through each token's tiled position (a select: no boolean indexing, no sync).
    pos = tiled_position(order, N)
    missing = (pos < 0)[None, None, :]
    o = ot.index_select(2, pos.clamp(min=0)).masked_fill(missing[..., None], 0.0)
    lse = lset.float().index_select(2, pos.clamp(min=0)).masked_fill(missing, float("-inf"))
    return o, lse


def _tile(x, order):
    """x [B, H, N, D] in tiled order [B, H, L, D]; positions without a token hold zeros."""
    xt = x.index_select(2, order.clamp(min=0))
    return xt.masked_fill((order < 0)[None, None, :, None], 0.0)


# One FlexAttention BlockMask per (mask, order, key order), built from the mask's own block lists (no
# L x L evaluation of a mask_mod, which at HunyuanVideo 720p is out of memory): blocks that hold a
# padding or left-out key are partial (the mask_mod rules those keys out), the rest full.
_BLOCK_MASKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _ordered_block_mask(mask: BlockSparseMask, token_order, kv_token_order, L: int):
    from torch.nn.attention.flex_attention import BlockMask

    def same(entry):
        ref, version, kv_ref, kv_version, _ = entry
        return (ref() is token_order and version == token_order._version
                and (kv_token_order is None if kv_ref is None else
                     kv_ref() is kv_token_order and kv_version == kv_token_order._version))

    cached = _BLOCK_MASKS.get(mask)
    if cached is None or not same(cached):
        kv_order = token_order if kv_token_order is None else kv_token_order
        key_ok = kv_order >= 0
        dense = mask.to_dense()
        holes = (~key_ok.view(-1, mask.kv_block)).any(-1)  # [Mk] key blocks with a non-key position
        partial, full = dense & holes, dense & ~holes
        p_cnt, p_idx = blocks_to_indices(partial)
        f_cnt, f_idx = blocks_to_indices(full)
        mask_mod = block_lookup_mask_mod(dense, mask.q_block, mask.kv_block, key_ok=key_ok)
        block_mask = BlockMask.from_kv_blocks(p_cnt, p_idx, f_cnt, f_idx, BLOCK_SIZE=(mask.q_block, mask.kv_block),
                                              mask_mod=mask_mod, seq_lengths=(L, L))
        # One order per mask at a time (a mask belongs to one layout); the orders are held weakly.
        cached = (weakref.ref(token_order), token_order._version,
                  None if kv_token_order is None else weakref.ref(kv_token_order),
                  None if kv_token_order is None else kv_token_order._version, block_mask)
        _BLOCK_MASKS[mask] = cached
    return cached[-1]
