"""The attention seam at the model's layout ``[B, N, H, D]`` (what diffusers processors hold after
their projections): the processor's default strategy, calibration and analysis all call these, so
none of them reaches into another layer's privates.

``key_valid`` (bool ``[B, N]``, model order) marks keys that may be attended (False for padded text
tokens): each batch element then gets a key order of its own that leaves the others out (no
data-dependent branch, so it compiles).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .attention import _gather_keys, block_sparse_attention, tiled_key_order
from .mask import BlockSparseMask
from .mass import block_attention_mass
from .order import freeze, key_order, table_rows
from .rotary import rope


def _per_batch(fn: Callable, token_order: torch.Tensor, key_valid: torch.Tensor | None, *tensors: torch.Tensor):
    """``fn(*tensors_in_bhnd, kv_token_order)`` over the whole batch, or ``fn(*element_tensors,
    kv_token_order, b)`` once per batch element ``b`` with that element's key order when ``key_valid``
    is given; results concatenated along batch. (The attention mass's path; attention itself takes
    the [B, L] table in one call.)"""
    heads_first = [x.transpose(1, 2) for x in tensors]  # views, no copies
    if key_valid is None:
        return fn(*heads_first, None)
    orders = _key_orders(token_order, key_valid)
    outs = [fn(*(x[b:b + 1] for x in heads_first), orders[b], b) for b in range(tensors[0].shape[0])]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# Per key mask tensor (by identity; the transformer's forward hands every layer the same one): the
# per-batch key orders, derived once per forward instead of once per layer.
_KEY_ORDERS = WeakIdKeyDictionary()


def _key_orders(token_order: torch.Tensor, key_valid: torch.Tensor) -> list[torch.Tensor]:
    """The rows of :func:`key_order_table`, each frozen (the batch elements of a per-element loop)."""
    return table_rows(key_order_table(token_order, key_valid))


def key_order_table(token_order: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """int32 ``[B, L]``: each batch element's key order (``token_order`` with the keys ``key_valid``
    rules out set to -1), derived once per key-mask tensor and frozen."""
    if torch.compiler.is_compiling():
        return key_order(token_order, key_valid)
    return _entry(token_order, key_valid)[2]


def _entry(token_order, key_valid) -> tuple:
    entry = _KEY_ORDERS.get(key_valid)
    if entry is None or entry[0] is not token_order or entry[1] != (key_valid._version, token_order._version):
        # The entry holds the order it was derived for, so that identity cannot pass to a new tensor.
        entry = (token_order, (key_valid._version, token_order._version), freeze(key_order(token_order, key_valid)))
        _KEY_ORDERS[key_valid] = entry
    return entry


def sparse_attention(q, k, v, mask: BlockSparseMask, token_order: torch.Tensor, *, key_valid=None, backend=None,
                     scale=None, check: bool = False, head_map=None, head_factor=None) -> torch.Tensor:
    """Block-sparse attention on ``[B, N, H, D]`` tensors in model order; output ``[B, N, H, D]``.
    ``token_order`` is the mask's layout order (``VideoLayout.token_order``)."""
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # views, no copies
    # Under a key mask every batch element has a key order of its own: a [B, L] table, one call.
    kv_order = None if key_valid is None else key_order_table(token_order, key_valid)
    return block_sparse_attention(qh, kh, vh, mask, token_order=token_order, kv_token_order=kv_order,
                                  backend=backend, scale=scale, check=check, head_map=head_map,
                                  head_factor=head_factor).transpose(1, 2)


def tiled_keys(q, k, v, mask: BlockSparseMask, token_order: torch.Tensor, *, key_valid=None, rotary=None):
    """``(kt, vt, valid)``: k and v of ``[B, N, H, D]`` model-order tensors written once in the packed
    key order the tiled kernel reads (``[B, H, N, D]``: :func:`sparse_vdit.ops.attention.tiled_key_order`),
    k rotated on the way when ``rotary`` = ``(cos, sin, start)`` is given (:func:`sparse_vdit.ops.rope`:
    one pass instead of a rotation and a copy); ``valid`` bool ``[B or 1, N]``, the positions that hold a key. For
    :func:`sparse_attention_tiled`, and for dense attention over the same keys (key order does not
    change attention: ``dense_attention(q, kt.transpose(1, 2), vt.transpose(1, 2), key_valid=valid)``)."""
    kv_order = None if key_valid is None else key_order_table(token_order, key_valid)
    order = tiled_key_order(q.transpose(1, 2), mask, token_order, kv_order)
    gather = order.clamp(min=0) if order.dim() == 1 else order.clamp(min=0).long()  # past the keys: token 0 (never read)
    kt = rope(k, *rotary, order=order) if rotary is not None else _gather_keys(k.transpose(1, 2), gather)
    vt = _gather_keys(v.transpose(1, 2), gather)
    valid = order >= 0
    return kt, vt, valid if valid.dim() == 2 else valid[None]


def sparse_attention_tiled(q, kt, vt, mask: BlockSparseMask, token_order: torch.Tensor, *, key_valid=None,
                           scale=None, check: bool = False, head_map=None, head_factor=None) -> torch.Tensor:
    """:func:`sparse_attention` with k and v already in the packed key order (from :func:`tiled_keys`): the
    tiled Triton kernel only; q ``[B, N, H, D]`` in model order, output ``[B, N, H, D]``."""
    kv_order = None if key_valid is None else key_order_table(token_order, key_valid)
    return block_sparse_attention(q.transpose(1, 2), kt, vt, mask, token_order=token_order, kv_token_order=kv_order,
                                  backend="triton", scale=scale, check=check, head_map=head_map,
                                  head_factor=head_factor, kv_tiled=True).transpose(1, 2)


def dense_attention(q, k, v, *, key_valid=None, scale=None) -> torch.Tensor:
    """Dense attention (SDPA: flash / cuDNN / efficient on CUDA) on ``[B, N, H, D]``."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    attn_mask = None if key_valid is None else key_valid[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, scale=scale).transpose(1, 2)


@torch.no_grad()
def attention_mass(q, k, block_size: int, token_order: torch.Tensor, *, key_valid=None, backend=None) -> torch.Tensor:
    """fp32 ``[B, H, Mq, Mk]``: mean dense-attention probability mass each query block gives each key
    block of the tiled sequence (rows sum to 1). q, k: ``[B, N, H, D]`` in model order."""
    def run(qh, kh, kv_order, b=None):
        return block_attention_mass(qh, kh, block_size, token_order=token_order, kv_token_order=kv_order,
                                    backend=backend)

    return _per_batch(run, token_order, key_valid, q, k)
