"""The FlexAttention backend on the same block mask (a baseline, and a backend where it wins)."""
from __future__ import annotations

import warnings

import torch

from .mask import BlockSparseMask, block_lookup_mask_mod

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
    copies into tiled order (FlexAttention has no gather), which a benchmark counts against it."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex_fn = flex_fn or flex_attention
    B, H, N, D = q.shape
    if token_order is None:
        o, lse = _flex_call(flex_fn, q, k, v, mask.to_flex(N), scale)
        # FlexAttention leaves rows with no key as zeros and -inf LSE in recent torch; enforce the contract.
        lse = lse.float()
        o = o.masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0)
        return o, lse
    order = token_order.long()
    valid = order >= 0
    kv_order = order if kv_token_order is None else kv_token_order.long()
    key_ok = kv_order >= 0
    L = order.numel()

    def tile(x, order, valid):
        xt = x.new_zeros(B, H, L, D)
        xt[:, :, valid] = x[:, :, order[valid]]
        return xt

    # Padding keys must never be attended: fold them into the mask as blocks-with-holes via mask_mod.
    mask_mod = block_lookup_mask_mod(mask.to_dense(), mask.q_block, mask.kv_block, key_ok=key_ok)
    bm = create_block_mask(mask_mod, mask.batch if mask.batch > 1 else None, mask.heads if mask.heads > 1 else None,
                           L, L, device=q.device, BLOCK_SIZE=(mask.q_block, mask.kv_block))
    ot, lset = _flex_call(flex_fn, tile(q, order, valid), tile(k, kv_order, key_ok), tile(v, kv_order, key_ok), bm, scale)
    o = q.new_zeros(B, H, N, D)
    lse = torch.full((B, H, N), float("-inf"), dtype=torch.float32, device=q.device)
    o[:, :, order[valid]] = ot[:, :, valid]
    lse[:, :, order[valid]] = lset[:, :, valid].float()
    return o, lse
