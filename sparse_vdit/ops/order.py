"""Token orders: the tiled sequence's position -> model token tables that every backend reads."""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary


# Tensors that the index-table caches of the backends may key by identity: marked immutable by the
# code that made them (a layout's token order, the per-batch key orders of one key mask, a mask's
# block lists), with their version then. Identity alone is not enough: a compiled graph (inductor)
# reuses one buffer object for successive intermediates and writes into it without bumping its
# version, so a table cached for an order computed in the graph would be read for another one.
_FROZEN = WeakIdKeyDictionary()


def freeze(t: torch.Tensor | None) -> torch.Tensor | None:
    """Mark ``t`` as immutable for the caches (outside a trace only; inside one, nothing is marked,
    and tensors the graph computes are never cached by identity). Returns ``t``."""
    if t is not None and not torch.compiler.is_compiling():
        _FROZEN[t] = t._version
    return t


def frozen(*tensors: torch.Tensor | None) -> bool:
    """Whether every tensor given is None or marked by :func:`freeze` and unchanged since."""
    return all(t is None or _FROZEN.get(t) == t._version for t in tensors)


class SnapshotCache:
    """A few values keyed by the *contents* of tensors that are not frozen (a compiled graph's
    constants arrive as objects of its own, its intermediates in reused buffers): each entry keeps
    copies of the tensors it was built from, and a lookup compares them with ``torch.equal``. That
    reads every tensor, so the backends use it on the CPU only (elsewhere they rebuild)."""

    def __init__(self, size: int = 8):
        self.size, self.entries = size, []

    @staticmethod
    def _same(a, b) -> bool:
        if a is None or b is None:
            return a is b
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)

    def get(self, key, tensors):
        for i, (k, snaps, value) in enumerate(self.entries):
            if k == key and all(self._same(s, t) for s, t in zip(snaps, tensors)):
                self.entries.insert(0, self.entries.pop(i))
                return value
        return None

    def put(self, key, tensors, value) -> None:
        self.entries.insert(0, (key, tuple(None if t is None else t.clone() for t in tensors), value))
        del self.entries[self.size:]


def tiled_position(order: torch.Tensor, seq_len: int) -> torch.Tensor:
    """int64 ``[seq_len]``: the tiled position of each model token (the inverse of ``order``), -1
    where the order leaves a token out; ``[B, seq_len]`` for a ``[B, L]`` table of orders."""
    order = order.long()
    # Positions that hold no token scatter into a spare slot that is dropped: no boolean indexing,
    # so no host sync (a steady-state sparse call makes none).
    slot = torch.where(order >= 0, order, torch.full_like(order, seq_len))
    where = torch.full((*order.shape[:-1], seq_len + 1), -1, dtype=torch.long, device=order.device)
    where.scatter_(-1, slot, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return where[..., :seq_len]


def key_order(order: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """``order`` with the tokens that ``key_valid`` (bool [N], model order) rules out set to -1; with
    ``key_valid`` [B, N], the ``[B, L]`` table of every batch element's key order (one op, no loop)."""
    keys = torch.where((order >= 0) & key_valid[..., order.clamp(min=0).long()], order, torch.full_like(order, -1))
    if torch.compiler.is_compiling():  # the validation cache is eager-only (the custom op checks nothing traced)
        return keys
    facts = _VALID_ORDERS.get(order)
    if facts is not None and facts[0] == order._version:
        # Within the parent's range by construction: checking it would be a read-back per call.
        _VALID_ORDERS[keys] = (keys._version, -1, facts[2], None, facts[4])
    return keys


_TABLE_ROWS = WeakIdKeyDictionary()


def table_rows(table: torch.Tensor) -> list[torch.Tensor]:
    """The rows of a ``[B, L]`` table of orders, as the same row objects for as long as the table is
    frozen and unchanged (so the caches keyed by identity hit), frozen and validated as the table is."""
    if torch.compiler.is_compiling() or not frozen(table):
        return list(table.unbind(0))
    entry = _TABLE_ROWS.get(table)
    if entry is None or entry[0] != table._version:
        rows = [freeze(r) for r in table.unbind(0)]
        facts = _VALID_ORDERS.get(table)
        if facts is not None and facts[0] == table._version:
            for r in rows:  # within the table's range: checking them would be a read-back each
                _VALID_ORDERS[r] = (r._version, facts[1], facts[2], None, facts[4])
        entry = _TABLE_ROWS[table] = (table._version, rows)
    return entry[1]


# Orders already validated, per tensor (by identity) and version: (version, min, max, digest, most
# positions holding a token in one row). A steady-state call with the layout's cached order makes no
# host sync for its checks.
_VALID_ORDERS = WeakIdKeyDictionary()


def order_facts(order: torch.Tensor, digest: bool = False) -> tuple[int, int, int, tuple[int, int] | None]:
    """(min, max, most positions holding a token in one row, digest or None) of ``order``, read back
    in one sync once per order tensor and version (the digest only when asked for)."""
    cached = _VALID_ORDERS.get(order)
    if cached is None or cached[0] != order._version:
        lo, hi, most = torch.stack([order.min().long(), order.max().long(),
                                    (order >= 0).sum(-1).max().long()]).tolist()
        cached = (order._version, lo, hi, order_digest(order) if digest else None, most)
    elif digest and cached[3] is None:
        cached = (*cached[:3], order_digest(order), cached[4])
    _VALID_ORDERS[order] = cached
    return cached[1], cached[2], cached[4], cached[3]


def packed_keys(order: torch.Tensor, length: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed key layout of a padded key order (int32 ``[L]`` or ``[B, L]``, -1 where no key):
    ``(packed, starts)``. ``packed`` int32 ``[.., length]`` holds the order's keys with the -1
    positions squeezed out, in order (then -1 to ``length``); ``starts`` int32 ``[.., L // block + 1]``
    is where each block of ``block`` positions begins in it, so block ``j`` is
    ``packed[starts[j]:starts[j + 1]]``. k and v copied along ``packed`` carry no padding rows; the
    tiled kernel reads each key block at its start and masks what lies past its end. ``length``
    (the sequence length) bounds the keys of a row: an order holds each token at most once."""
    valid = order >= 0
    packed = _squeeze(order.to(torch.int32), valid, length, -1)
    counts = valid.view(*order.shape[:-1], -1, block).sum(-1, dtype=torch.int32)
    starts = torch.nn.functional.pad(counts.cumsum(-1, dtype=torch.int32), (1, 0))
    return packed, starts


def packed_source(order: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, source)`` int64 of :func:`packed_keys`'s layout: ``index [.., L]``, the packed index
    of each position of ``order`` (-1 where it holds no key), and ``source [.., length]``, the
    position of ``order`` each packed index came from (-1 past the keys)."""
    valid = order >= 0
    index = torch.where(valid, valid.long().cumsum(-1) - 1, torch.full_like(order, -1, dtype=torch.long))
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return index, _squeeze(positions, valid, length, -1)


def _squeeze(values: torch.Tensor, keep: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    """``values [.., L]`` where ``keep``, moved to the front of ``[.., length]`` in order (``fill``
    after); one scatter into a spare slot, no boolean indexing, so no host sync."""
    dest = keep.long().cumsum(-1) - 1
    slot = torch.where(keep & (dest < length), dest, torch.full_like(dest, length))
    out = torch.full((*values.shape[:-1], length + 1), fill, dtype=values.dtype, device=values.device)
    out.scatter_(-1, slot, values)
    return out[..., :length]


def order_digest(order: torch.Tensor | None) -> tuple[int, int] | None:
    """A cheap fingerprint of a token order, (length, position-weighted checksum): a mask built for
    one layout records it, and the attention entry compares it with the order it is given."""
    if order is None:
        return None
    o = order.long()
    weights = torch.arange(1, o.numel() + 1, device=o.device) % 65521
    return int(o.numel()), int(((o + 2) * weights).sum())
