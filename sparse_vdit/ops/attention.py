"""Public block-sparse attention: input checks, backend choice and the torch.library custom op."""
from __future__ import annotations

import math
import os

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .mask import BlockSparseMask
from .order import freeze, frozen, order_facts, packed_keys, packed_source, table_rows, tiled_position
from .torch_backend import (torch_block_sparse_attention, torch_block_sparse_attention_bwd, torch_masked_attention,
                            torch_masked_sdpa)

# triton: the tiled (Hopper-form) kernel, k/v gathered into tiled order once per call, q read and o
# written in model order by the kernel;
# triton_gather: the first kernel, which gathers rows inside its loads (kept for comparison);
# torch: block-gather in torch (the CPU path); torch_masked: dense attention under the mask's token-level
# visibility (exact; the fast CPU path for short sequences); flex: FlexAttention on the same blocks.
# auto: the fastest of the exact ones on this GPU, measured once per shape (see ops.auto).
BACKENDS = ("auto", "triton", "triton_gather", "torch", "torch_masked", "flex")
TRITON_BACKENDS = ("triton", "triton_gather")
TILE_ROWS = 128  # query rows per program of the tiled kernel, whatever the mask's query block
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def default_backend(device: torch.device) -> str:
    """``auto`` on CUDA (the fastest exact backend, measured); the torch block-gather path elsewhere
    (one function under eager and compiled forwards alike; ``auto`` on the CPU times it against the
    token-mask path). ``SPARSE_VDIT_BACKEND`` overrides."""
    env = os.environ.get("SPARSE_VDIT_BACKEND")
    if env:
        if env not in BACKENDS:
            raise ValueError(f"SPARSE_VDIT_BACKEND must be one of {BACKENDS}, got {env!r}")
        return env
    return "auto" if device.type == "cuda" else "torch"


# ---------------------------------------------------------------------------- custom op
@torch.library.custom_op("sparse_vdit::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
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
    backend: str,
    tile_counts: torch.Tensor | None = None,
    tile_indices: torch.Tensor | None = None,
    tile_flags: torch.Tensor | None = None,
    tile_rows: int = 0,
    head_map: torch.Tensor | None = None,
    head_factor: torch.Tensor | None = None,
    kv_tiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward as one opaque op for torch.compile: (o [B, H, N, D], lse fp32 [B, H, N]).
    The tiled backend also takes the mask's query-tile lists (``BlockSparseMask.query_tiles``), and
    optionally ``head_map`` (int32 [H]: the mask row each head reads), ``head_factor`` (fp32 [H]:
    each head's factor on ``scale``) and ``kv_tiled`` (k and v given already in the packed key
    order, ``[B, H, N, D]`` along :func:`tiled_key_order`); the tiled backend only."""
    if backend == "triton":
        o, lse = _tiled_triton(q, k, v, tile_counts, tile_indices, tile_flags, token_order, kv_token_order, scale,
                               tile_rows, q_block, kv_block, head_map, head_factor, kv_tiled)
    elif backend == "triton_gather":
        from ..kernels import block_sparse_attention_fwd

        o, lse = block_sparse_attention_fwd(q, k, v, kv_counts, kv_indices, token_order, kv_token_order, scale,
                                            q_block, kv_block, num_q_blocks)
    elif backend == "torch_masked":
        o, lse = torch_masked_attention(q, k, v, kv_counts, kv_indices, token_order, kv_token_order, scale,
                                        q_block, kv_block, num_q_blocks)
    else:
        o, lse = torch_block_sparse_attention(q, k, v, kv_counts, kv_indices, token_order, kv_token_order, scale,
                                              q_block, kv_block, num_q_blocks)
    # The fake's strides: the tiled kernel writes o in the model's [B, N, H, D] layout, the others [B, H, N, D].
    return (o if backend == "triton" else o.contiguous()), lse.contiguous()


def _tiled_triton(q, k, v, tile_counts, tile_indices, tile_flags, token_order, kv_token_order, scale, tile_rows,
                  q_block, kv_block, head_map=None, head_factor=None, kv_tiled=False):
    """Gather k and v into contiguous tiled order (one select or gather each; given so with
    ``kv_tiled``) and run the tiled kernel over ``tile_rows``-row query tiles: it reads q and writes o
    and the LSE in model order itself, through the padded query order, so o is laid out as the
    model's ``[B, N, H, D]``."""
    from ..kernels import block_sparse_attention_tiled_fwd

    t, kt_ = _query_and_key_tables(q, token_order, kv_token_order, tile_counts.shape[-1], tile_rows, kv_block)
    # Packed: no padding rows; the positions past the keys read token 0 and are never attended.
    kt, vt = (k, v) if kv_tiled else (_gather_keys(k, kt_.key_gather), _gather_keys(v, kt_.key_gather))
    o, lse = block_sparse_attention_tiled_fwd(q, t.order, kt, vt, tile_counts, tile_indices, tile_flags,
                                              kt_.key_starts, kt_.key_rows, kt_.key_short, scale, tile_rows,
                                              q_block, kv_block, head_map, head_factor)
    if t.missing is not None:  # tokens the order leaves out (never stored): zeros and LSE -inf
        o.masked_fill_(t.missing[None, None, :, None], 0.0)
        lse.masked_fill_(t.missing[None, None, :], float("-inf"))
    return o, lse


def _query_and_key_tables(q, token_order, kv_token_order, query_tiles: int, tile_rows: int, kv_block: int):
    """The tables of the query order and of the key order (the same object without a key order) for
    ``query_tiles`` tiles of ``tile_rows`` rows, cached per order tensor."""
    N = q.shape[2]
    step = tile_rows * kv_block // math.gcd(tile_rows, kv_block)
    length = max(query_tiles * tile_rows, token_order.numel() if token_order is not None else N)
    t = _order_tables(q, token_order, length, step, kv_block)
    # A key order (e.g. per batch element under a key mask) has tables of its own, cached the same way.
    kt = t if kv_token_order is None else _order_tables(q, kv_token_order, length, step, kv_block, keys_only=True)
    return t, kt


def tiled_key_order(q: torch.Tensor, mask: BlockSparseMask, token_order: torch.Tensor | None,
                    kv_token_order: torch.Tensor | None = None) -> torch.Tensor:
    """int32 ``[N]`` (or ``[B, N]`` for a table of key orders): the packed key order along which the
    tiled kernel reads k and v: the keys of the tiled order's key blocks one after another, with no
    padding between them (:func:`sparse_vdit.ops.order.packed_keys`), then -1 where a row has fewer
    than N keys (a key mask, an order that leaves tokens out). k and v written in this order (``[B,
    H, N, D]``, e.g. by :func:`sparse_vdit.ops.rope` with it) go to :func:`block_sparse_attention`
    with ``kv_tiled=True`` and are never copied again. ``q [B, H, N, D]`` gives N and the device."""
    tile_rows = tiled_kernel_rows(mask.q_block)
    tiles = mask.query_tiles(tile_rows)[0].shape[-1]
    if torch.compiler.is_compiling():  # traced: the same padding, no caches (the op's body keeps its own)
        step = tile_rows * mask.kv_block // math.gcd(tile_rows, mask.kv_block)
        length = max(tiles * tile_rows, token_order.numel() if token_order is not None else q.shape[2])
        return packed_keys(_tiled_orders(q, token_order, kv_token_order, length, step)[1], q.shape[2],
                           mask.kv_block)[0]
    return _query_and_key_tables(q, token_order, kv_token_order, tiles, tile_rows, mask.kv_block)[1].keys


def _gather_keys(x: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D] at the tiled key positions ``gather``: one order [L] for the batch (a select),
    or a [B, L] table, one order per batch element (one gather with a batch stride, no loop)."""
    if gather.dim() == 1:
        return x.index_select(2, gather)
    B, H, _, D = x.shape
    return torch.gather(x, 2, gather[:, None, :, None].expand(B, H, gather.shape[-1], D))


def _back_to_model(xt: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """xt [B, H, L, ...] in tiled order at each model token's tiled position ``pos`` ([N], or [B, N]
    per batch element), zeros where a token has none."""
    if pos.dim() == 1:
        out = xt.index_select(2, pos.clamp(min=0))
        return out.masked_fill((pos < 0).view(1, 1, -1, *([1] * (xt.dim() - 3))), 0.0)
    B, H = xt.shape[:2]
    idx = pos.clamp(min=0).view(B, 1, -1, *([1] * (xt.dim() - 3))).expand(B, H, pos.shape[-1], *xt.shape[3:])
    return torch.gather(xt, 2, idx).masked_fill((pos < 0).view(B, 1, -1, *([1] * (xt.dim() - 3))), 0.0)


class _OrderTables:
    """What the tiled path derives from a query order, once per order tensor and shape: the padded
    order (int32, -1 for padding: the kernel's query order), the packed key layout (``keys``, its
    gather positions and each key block's start: :func:`sparse_vdit.ops.order.packed_keys`), and the
    tokens it leaves out (``missing``; None when the order holds every token)."""

    def __init__(self, q, token_order, length, step, kv_block, keys_only=False, cached=True):
        N = q.shape[2]
        order, _ = _tiled_orders(q, token_order, None, length, step)
        self.order = order  # int32, -1 for padding: the kernel's query order
        self.keys, self.key_starts = packed_keys(order, N, kv_block)
        # Which rows of each key block's tile are its keys (the first ones), and which blocks are short.
        counts = self.key_starts[..., 1:] - self.key_starts[..., :-1]
        self.key_short = (counts < kv_block).to(torch.int8)
        rows = torch.arange(kv_block, device=order.device, dtype=torch.int32)
        self.key_rows = (rows < counts[..., None]).to(torch.int8).flatten(-2)
        # A [B, N] table of key orders (one per batch element) gathers with int64 indices.
        self.key_gather = self.keys.clamp(min=0) if order.dim() == 1 else self.keys.clamp(min=0).long()
        if keys_only:  # a key order: no way back
            self.missing = None
            return
        pos = tiled_position(order, N)
        # Read back once per cached order (a sync on its first call only): later calls skip the fill.
        # Tables built for one call only fill every time instead (no read-back).
        self.missing = (pos < 0) if not cached or bool((pos < 0).any()) else None


_ORDER_TABLES = WeakIdKeyDictionary()


def _order_tables(q, token_order, length, step, kv_block, keys_only=False) -> _OrderTables:
    if not frozen(token_order):  # e.g. computed in a compiled graph: identity says nothing about its values
        return _OrderTables(q, token_order, length, step, kv_block, keys_only, cached=False)
    key = (q.shape[2], length, step, kv_block, str(q.device), keys_only,
           None if token_order is None else token_order._version)
    holder = token_order if token_order is not None else _NO_ORDER
    per_order = _ORDER_TABLES.setdefault(holder, {})
    if key not in per_order:
        if len(per_order) >= 16:
            per_order.clear()
        per_order[key] = _OrderTables(q, token_order, length, step, kv_block, keys_only)
    return per_order[key]


_NO_ORDER = torch.empty(0)  # stands for "no token order" as a cache key


def _tiled_orders(q, token_order, kv_token_order, length, step):
    """(order, kv order) padded with -1 to a multiple of ``step`` covering ``length`` positions."""
    N = q.shape[2]
    Lt = -(-length // step) * step
    if token_order is None:
        order = torch.arange(Lt, device=q.device, dtype=torch.int32)
        order = torch.where(order < N, order, torch.full_like(order, -1))
    else:
        order = torch.nn.functional.pad(token_order, (0, Lt - token_order.shape[-1]), value=-1)
    kv_order = order if kv_token_order is None else \
        torch.nn.functional.pad(kv_token_order, (0, Lt - kv_token_order.shape[-1]), value=-1)
    return order, kv_order


def _tiled_triton_bwd(grad_o, grad_lse, q, k, v, o, lse, kv_counts, kv_indices, token_order, kv_token_order, scale,
                      q_block, kv_block, num_q_blocks, kv_tiled=False):
    """dq, dk, dv by the Triton backward kernels on contiguous tiled copies (gathered once). With
    ``kv_tiled``, k and v come in the forward's packed key order and dk, dv go back in it."""
    from ..kernels import block_sparse_attention_tiled_bwd

    B, H, N, D = q.shape
    step = q_block * kv_block // math.gcd(q_block, kv_block)
    # Rounded up to whole query and key blocks, this covers every key block the mask can list.
    length = max(num_q_blocks * q_block, token_order.numel() if token_order is not None else N)
    order, kv_order = _tiled_orders(q, token_order, kv_token_order, length, step)
    Lt = order.numel()
    q_ok, kv_ok = order >= 0, kv_order >= 0
    qi, ki = order.clamp(min=0), kv_order.clamp(min=0)
    ki = ki if ki.dim() == 1 else ki.long()  # a [B, L] table: one key order per batch element
    qt = q.index_select(2, qi)
    if kv_tiled:  # k and v packed (the forward's layout): spread onto the padded tiled order here
        index, source = packed_source(kv_order, N)
        kt, vt = _back_to_model(k, index).contiguous(), _back_to_model(v, index).contiguous()
    else:
        kt, vt = _gather_keys(k, ki), _gather_keys(v, ki)
    dot = (grad_o.index_select(2, qi) * q_ok[:, None]).contiguous()
    ot = o.index_select(2, qi)
    lse_t = lse.index_select(2, qi)
    # Rows of padding or without keys get no gradient: LSE = +inf makes their P zero.
    lse_t = torch.where(q_ok & torch.isfinite(lse_t), lse_t, torch.full_like(lse_t, float("inf"))).contiguous()
    delta_t = ((dot.float() * ot.float()).sum(-1) - grad_lse.index_select(2, qi).float() * q_ok).contiguous()
    kv_valid = kv_ok.to(torch.int8)
    kv_block_pad = (~kv_ok.view(*kv_ok.shape[:-1], -1, kv_block)).any(-1).to(torch.int8)
    counts_r, indices_r, counts_c, indices_c = _backward_lists(kv_counts, kv_indices, Lt // q_block, Lt // kv_block)
    dqt, dkt, dvt = block_sparse_attention_tiled_bwd(qt, kt, vt, dot, lse_t, delta_t, counts_r, indices_r, counts_c,
                                                     indices_c, kv_valid, kv_block_pad, scale, q_block, kv_block)
    pos_q = tiled_position(order, N)
    if kv_tiled:  # back to the packed layout; packed positions past the keys get no gradient
        return _back_to_model(dqt, pos_q), _back_to_model(dkt, source), _back_to_model(dvt, source)
    pos_k = tiled_position(kv_order, N)
    return _back_to_model(dqt, pos_q), _back_to_model(dkt, pos_k), _back_to_model(dvt, pos_k)


# The backward's row and column lists of a mask, per mask tensor (the mask's own lists stand for it:
# masks are immutable). Built on a mask's first backward (that build reads widths back, a sync); a
# steady-state backward only looks them up.
_BACKWARD_LISTS = WeakIdKeyDictionary()  # tensor -> {...}, by identity (tensors compare elementwise)


def _backward_lists(kv_counts, kv_indices, rows, cols):
    """(row counts, row indices, column counts, column indices) of the mask over ``rows`` query blocks
    and ``cols`` key blocks: the key blocks of each query block, and the query blocks that visit each key block."""
    cacheable = frozen(kv_counts, kv_indices)
    per_mask = _BACKWARD_LISTS.setdefault(kv_indices, {}) if cacheable else {}
    key = (rows, cols, kv_counts.data_ptr(), kv_indices._version)
    if key not in per_mask:
        from .mask import blocks_to_indices

        Bm, Hm, Mq = kv_counts.shape
        dense = torch.zeros(Bm, Hm, rows, cols + 1, dtype=torch.bool, device=kv_indices.device)
        valid = torch.arange(kv_indices.shape[-1], device=kv_indices.device) < kv_counts.unsqueeze(-1)
        idx = torch.where(valid, kv_indices.long(), torch.full_like(kv_indices, cols, dtype=torch.long))
        dense[:, :, :Mq].scatter_(-1, idx, True)
        dense = dense[..., :cols]
        per_mask.clear()
        per_mask[key] = (*blocks_to_indices(dense, max(int(dense.sum(-1).max()), 1)),
                         *blocks_to_indices(dense.transpose(-1, -2), max(int(dense.sum(-2).max()), 1)))
    return per_mask[key]


@block_sparse_attention_op.register_fake
def _(q, k, v, kv_counts, kv_indices, token_order, kv_token_order, scale, q_block, kv_block, num_q_blocks, backend,
      tile_counts=None, tile_indices=None, tile_flags=None, tile_rows=0, head_map=None, head_factor=None,
      kv_tiled=False):
    B, H, N, D = q.shape
    o = q.new_empty(B, N, H, D).transpose(1, 2) if backend == "triton" else q.new_empty(B, H, N, D)
    return o, q.new_empty(B, H, N, dtype=torch.float32)


# The forward op, its backward op, the Triton launcher and the torch backend spell out the same
# parameters on purpose: torch.library needs them explicit, and each dispatches to the others with
# one call. (`duplicates` rows; justified.)
@torch.library.custom_op("sparse_vdit::block_sparse_attention_bwd", mutates_args=())
def block_sparse_attention_bwd_op(
    grad_o: torch.Tensor,
    grad_lse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    token_order: torch.Tensor | None,
    kv_token_order: torch.Tensor | None,
    scale: float,
    q_block: int,
    kv_block: int,
    num_q_blocks: int,
    backend: str,
    kv_tiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the forward: the Triton backward kernels (``backend`` triton) or the torch
    block-gather algebra (any other backend; exact on any device). The same function either way."""
    if backend == "triton":
        grads = _tiled_triton_bwd(grad_o, grad_lse, q, k, v, o, lse, kv_counts, kv_indices, token_order,
                                  kv_token_order, scale, q_block, kv_block, num_q_blocks, kv_tiled)
    else:
        grads = torch_block_sparse_attention_bwd(grad_o, grad_lse, q, k, v, kv_counts, kv_indices, token_order,
                                                 kv_token_order, scale, q_block, kv_block, num_q_blocks)
    # Contiguous whatever q's strides (diffusers hands over [B, N, H, D] views): what the fake promises.
    return tuple(g.contiguous() for g in grads)


@block_sparse_attention_bwd_op.register_fake
def _(grad_o, grad_lse, q, k, v, o, lse, *rest):
    # Contiguous, as the real op returns: inductor asserts the strides of fallback outputs.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_counts, kv_indices, token_order, kv_token_order, scale, q_block, kv_block, num_q_blocks, backend = \
        inputs[:12]
    o, lse = output
    head_map = inputs[16] if len(inputs) > 16 else None
    head_factor = inputs[17] if len(inputs) > 17 else None
    kv_tiled = bool(inputs[18]) if len(inputs) > 18 else False
    ctx.save_for_backward(q, k, v, o, lse, kv_counts, kv_indices, token_order, kv_token_order, head_map, head_factor)
    # The Triton backward follows a Triton forward (tiled or gather: the same function).
    ctx.meta = (scale, q_block, kv_block, num_q_blocks, "triton" if backend in TRITON_BACKENDS else "torch", kv_tiled)


def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse, kv_counts, kv_indices, token_order, kv_token_order, head_map, head_factor = ctx.saved_tensors
    if head_map is not None:  # the heads' own rows of the patterns' lists (the forward's expansion, cached)
        kv_counts, kv_indices = _head_rows(kv_counts, kv_indices, head_map)
    if grad_o is None:
        grad_o = torch.zeros_like(q)
    if grad_lse is None:
        grad_lse = q.new_zeros(q.shape[:3], dtype=torch.float32)
    factor = None if head_factor is None else head_factor.view(1, -1, 1, 1)
    if factor is not None:  # per-head scales: the same attention as scale alone on q * factor (rescaled in fp32)
        q = (q.float() * factor).to(q.dtype)
    dq, dk, dv = block_sparse_attention_bwd_op(grad_o, grad_lse, q, k, v, o, lse, kv_counts, kv_indices, token_order,
                                               kv_token_order, *ctx.meta)
    if factor is not None:
        dq = (dq.float() * factor).to(dq.dtype)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None


block_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


_compiled_flex = None


def _flex_fn(device: torch.device):
    """Compiled FlexAttention on CUDA (eager FlexAttention there materialises every score: slow and,
    at video lengths, out of memory); eager elsewhere (the CPU, where it is the intended use)."""
    global _compiled_flex
    if device.type != "cuda":
        return None
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _auto(q, k, v, mask, scale, token_order, kv_token_order, return_lse) -> str:
    """The backend ``auto`` resolves to for this call (measured once per key on CUDA)."""
    from .auto import auto_key, cuda_time_ms, pick_backend

    if torch.compiler.is_compiling():
        return "triton" if q.device.type == "cuda" else "torch"
    if q.device.type != "cuda":
        return _auto_cpu(q, k, v, mask, scale, token_order, kv_token_order, return_lse)
    B, H, N, D = q.shape
    candidates = [b for b in ("triton", "triton_gather")
                  if unsupported(b, q.dtype, D, mask.q_block, mask.kv_block, "cuda") is None]
    if mask.q_block * D >= 128 * 128:  # the gather kernel spills at any config there (static table)
        candidates = [b for b in candidates if b != "triton_gather"]
    candidates.append("flex")  # compiled FlexAttention: exact for any dtype and block pair
    if not mask.selected and mask.density() == 1.0 and token_order is None and kv_token_order is None and not return_lse:
        candidates.append("sdpa")

    def time_ms(name):
        if name == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            from .flex import flex_block_sparse_attention

            return cuda_time_ms(lambda: flex_block_sparse_attention(q, k, v, mask, scale, token_order, kv_token_order,
                                                                    flex_fn=_flex_fn(q.device)))
        return cuda_time_ms(lambda: block_sparse_attention(q, k, v, mask, scale=scale, token_order=token_order,
                                                           kv_token_order=kv_token_order, backend=name, check=False)
                            if name != "sdpa" else torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale))

    return pick_backend(auto_key(q, mask, token_order, kv_token_order, return_lse), candidates, time_ms)


# The token-level mask of ``torch_masked`` holds N x N booleans per mask head, and beside them their
# additive form in q's dtype for SDPA: beyond this many bytes, auto on the CPU does not consider it.
CPU_MASKED_MAX_BYTES = 1 << 28


def _auto_cpu(q, k, v, mask, scale, token_order, kv_token_order, return_lse) -> str:
    """Off CUDA: the faster of the block-gather path (``torch``) and dense attention under the token
    mask (``torch_masked``, while its N x N mask is small), timed once per key on the call's inputs."""
    from .auto import auto_key, cpu_time_ms, pick_backend

    N = q.shape[2]
    candidates = ["torch"]
    if N * N * mask.batch * mask.heads * (1 + q.element_size()) <= CPU_MASKED_MAX_BYTES:
        candidates.append("torch_masked")
    if len(candidates) == 1:
        return candidates[0]

    def time_ms(name):
        return cpu_time_ms(lambda: block_sparse_attention(q, k, v, mask, scale=scale, return_lse=return_lse,
                                                          token_order=token_order, kv_token_order=kv_token_order,
                                                          backend=name, check=False))

    key = auto_key(q, mask, token_order, kv_token_order, return_lse) + (torch.is_grad_enabled(),)
    return pick_backend(key, candidates, time_ms)


def _current_arch() -> str | None:
    """The current GPU's architecture name (see ``kernels.common.current_arch``); None without CUDA.
    Kept free of a Triton import so the CPU path never needs Triton."""
    if not torch.cuda.is_available():
        return None
    from ..kernels.common import current_arch

    return current_arch()


# Architectures without wgmma and TMA-fed tiles (A100, RTX 30/40, L40S): a 128-row tile there needs
# more than 255 registers at any head_dim (static table), so their tiles have 64 rows.
SMALL_TILE_ARCHS = ("sm_80", "sm_86", "sm_89")


# Architectures with 99 KB of shared memory a block whose tiles are otherwise Hopper-sized (RTX 5090):
# a 128-token key block at head_dim 128 needs 128 KB in the tiled kernel (static table).
SMALL_SMEM_ARCHS = {"sm_120": 99}


def tiled_kernel_rows(q_block: int, arch: str | None = None) -> int:
    """Query rows per program of the tiled kernel on ``arch`` (None: the current GPU, or none):
    ``TILE_ROWS`` (128; 64 on the architectures of ``SMALL_TILE_ARCHS``) when the mask's query block
    divides it, else the query block itself."""
    if arch is None:
        arch = _current_arch()
    rows = 64 if arch in SMALL_TILE_ARCHS else TILE_ROWS
    return rows if q_block <= rows and rows % q_block == 0 else q_block


# ---------------------------------------------------------------------------- checks
TILED_MAX_BLOCK = 128  # rows of a query tile and tokens of a key block the tiled kernel holds in shared memory


def unsupported(backend: str, dtype: torch.dtype, head_dim: int, q_block: int, kv_block: int,
                device_type: str, arch: str | None = None) -> str | None:
    """Why ``backend`` cannot run these inputs (a sentence that says what would), or None if it can.
    ``arch`` (e.g. "sm_80") defaults to the current GPU's on CUDA. ``auto`` leaves such backends out;
    an explicit choice raises with this sentence."""
    if backend not in TRITON_BACKENDS:
        return None
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is not supported by the Triton kernels (at most {MAX_HEAD_DIM}); use backend='torch'"
    if dtype == torch.float64:
        return "float64 runs on the torch backend only (backend='torch')"
    if device_type == "cuda" and dtype == torch.float32:
        return ("float32 is not run by the Triton kernels on a GPU: tl.dot would round it to TF32, and a 128-token "
                "fp32 tile at head_dim 128 needs more shared memory than the GPU has; pass float16/bfloat16 inputs, "
                "or backend='torch' for exact float32")
    if backend == "triton":
        if head_dim % 8:
            return (f"head_dim {head_dim} is not a multiple of 8: the tiled kernel reads rows through tensor "
                    "descriptors (16-byte strides); use backend='triton_gather' or 'torch'")
        if arch is None and device_type == "cuda":
            arch = _current_arch()
        limit = 64 if arch in SMALL_TILE_ARCHS else TILED_MAX_BLOCK
        if arch in SMALL_SMEM_ARCHS and kv_block * head_dim > 64 * 128:
            return (f"on {arch} ({SMALL_SMEM_ARCHS[arch]} KB of shared memory a block) the tiled kernel holds key "
                    f"blocks of at most {64 * 128 // head_dim} tokens at head_dim {head_dim}, this mask has {kv_block}: "
                    "use backend='triton_gather' or 'torch', or a mask with smaller blocks")
        if kv_block > limit or q_block > limit:
            where = f" on {arch} (no wgmma: larger tiles spill registers there)" if limit < TILED_MAX_BLOCK else \
                " (larger ones do not fit shared memory)"
            return (f"the tiled kernel holds query and key blocks of at most {limit} tokens{where}; this mask has "
                    f"blocks ({q_block}, {kv_block}) at head_dim {head_dim}: use backend='triton_gather' or 'torch', "
                    "or a mask with smaller blocks")
    return None


def _check_order(name, order, q, mask, N, per_batch: bool = False):
    if per_batch and isinstance(order, torch.Tensor) and order.dim() == 2:
        if order.shape[0] not in (1, q.shape[0]):
            raise ValueError(f"{name} as a table [B, L] of one key order per batch element needs B = 1 or "
                             f"{q.shape[0]} (the batch size), got {tuple(order.shape)}")
    elif not isinstance(order, torch.Tensor) or order.dim() != 1:
        raise ValueError(f"{name} must be a 1-D int32 tensor of tiled positions"
                         + (" (or a [B, L] table of them, one per batch element)" if per_batch else ""))
    if order.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {order.dtype}")
    if order.device != q.device:
        raise ValueError(f"{name} is on {order.device} but q is on {q.device}")
    L = order.shape[-1]
    if L % mask.q_block or L % mask.kv_block:
        raise ValueError(f"{name} length {L} must be a multiple of the block sizes ({mask.q_block}, {mask.kv_block})")
    if not torch.compiler.is_compiling():
        lo, hi, most, _ = order_facts(order)
        if lo < -1 or hi >= N:
            raise ValueError(f"{name} values must lie in [-1, {N - 1}] (N={N}), got range [{lo}, {hi}]")
        if most > N:
            raise ValueError(f"{name} holds {most} tokens in one row but the sequence has {N}: an order lists "
                             f"each token at most once (the others' positions are -1)")


def _check_inputs(q, k, v, mask, token_order, kv_token_order, backend, heads_mapped: bool = False,
                  kv_tiled: bool = False):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, N, D], got {tuple(x.shape)}")
    if kv_tiled:  # the backend was checked on entry
        L = tiled_key_order(q, mask, token_order, kv_token_order).shape[-1]
        want = (*q.shape[:2], L, q.shape[3])
        if not (tuple(k.shape) == tuple(v.shape) == want):
            raise ValueError(f"with kv_tiled, k and v must be [B, H, N, D] = {want} in the packed key order of "
                             f"tiled_key_order, got {tuple(k.shape)}, {tuple(v.shape)}")
        k = v = q  # the rest of the checks as for model-order keys
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            "q, k and v must have the same shape [B, H, N, D] (self-attention), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of float16, bfloat16, float32 (float64: torch backend), got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"mask must be a BlockSparseMask, got {type(mask).__name__}")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}: call mask.to(q.device) once")
    B, H, N, D = q.shape

    def swapped() -> str:
        """A hint when q looks like [B, N, H, D] (diffusers' layout) where [B, H, N, D] is expected."""
        fits = mask.heads in (1, N) and H != N
        if fits and token_order is not None:  # (an error path: the sync is fine here)
            top = int(token_order.max()) if token_order.numel() else -1
            fits = N <= top < H
        elif fits:
            try:
                mask.check_seq_len(H)
            except ValueError:
                fits = False
        return (f"; q looks like [B, N, H, D] = {tuple(q.shape)} (diffusers' layout): pass q, k, v .transpose(1, 2) "
                f"(or use ops.sparse_attention, which takes [B, N, H, D])") if fits else ""

    if mask.batch not in (1, B):
        raise ValueError(f"mask batch dimension must be 1 (broadcast) or {B} (the batch size), got {mask.batch}")
    if mask.heads not in (1, H) and not heads_mapped:
        raise ValueError(f"mask head dimension must be 1 (broadcast) or {H} (the number of heads), got {mask.heads}"
                         + swapped())
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in TRITON_BACKENDS:
        why = unsupported(backend, q.dtype, D, mask.q_block, mask.kv_block, q.device.type)
        if why:
            raise (TypeError if "float" in why.split(" ")[0] else ValueError)(why)
        if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"the Triton backend needs a CUDA device (q is on {q.device}); use backend='torch' on the CPU "
                "or set TRITON_INTERPRET=1 before importing triton"
            )
    if token_order is None:
        if kv_token_order is not None:
            raise ValueError("kv_token_order needs token_order (the query order) too")
        if mask.token_order_digest is not None:
            raise ValueError("this mask was built on a VideoLayout, whose blocks are tiles of the tiled order: pass "
                             "token_order=layout.token_order(q.device) (without it the blocks would be raster runs)")
        try:
            mask.check_seq_len(N)
        except ValueError as e:
            raise ValueError(str(e) + swapped()) from None
        return
    try:
        _check_order("token_order", token_order, q, mask, N)
    except ValueError as e:
        raise ValueError(str(e) + swapped()) from None
    if mask.token_order_digest is not None and not torch.compiler.is_compiling():
        given = order_facts(token_order, digest=True)[3]
        if given != tuple(mask.token_order_digest):
            raise ValueError(
                f"token_order is not the order of the layout this mask was built for (mask: {mask.token_order_digest[0]} "
                f"positions, checksum {mask.token_order_digest[1]}; given: {given[0]} positions, checksum {given[1]}): "
                "use the token_order of the same VideoLayout as the mask")
    mask.check_seq_len(N, padded_len=token_order.numel())
    if kv_token_order is not None:
        _check_order("kv_token_order", kv_token_order, q, mask, N, per_batch=True)
        if kv_token_order.shape[-1] != token_order.numel():
            raise ValueError(
                f"kv_token_order has {kv_token_order.shape[-1]} positions but token_order has {token_order.numel()}"
            )


# ---------------------------------------------------------------------------- public API
def _check_head_factor(head_factor, q) -> None:
    H = q.shape[1]
    if not isinstance(head_factor, torch.Tensor) or head_factor.dtype != torch.float32 or \
            tuple(head_factor.shape) != (H,) or head_factor.device != q.device:
        got = (f"{tuple(head_factor.shape)} {head_factor.dtype} on {head_factor.device}"
               if isinstance(head_factor, torch.Tensor) else type(head_factor).__name__)
        raise ValueError(f"head_factor must be a float32 tensor [{H}] (one factor per head) on {q.device}, got {got}")
    if not torch.compiler.is_compiling() and not bool((head_factor > 0).all()):
        raise ValueError("head_factor must be positive (1 / each head's softmax temperature)")


def _check_head_map(head_map, q, mask) -> None:
    H = q.shape[1]
    if not isinstance(head_map, torch.Tensor) or head_map.dtype != torch.int32 or head_map.shape != (H,):
        raise ValueError(f"head_map must be an int32 tensor [H] = [{H}] (the mask row of each head), got "
                         f"{type(head_map).__name__ if not isinstance(head_map, torch.Tensor) else (head_map.dtype, tuple(head_map.shape))}")
    if head_map.device != q.device:
        raise ValueError(f"head_map is on {head_map.device} but q is on {q.device}")
    if not torch.compiler.is_compiling():
        lo, hi, _, _ = order_facts(head_map)
        if lo < 0 or hi >= mask.heads:
            raise ValueError(f"head_map values must lie in [0, {mask.heads - 1}] (the mask's {mask.heads} rows), "
                             f"got range [{lo}, {hi}]")


_EXPANDED = WeakIdKeyDictionary()  # head map -> (the patterns' index lists, the heads' lists)


def _head_rows(kv_counts: torch.Tensor, kv_indices: torch.Tensor, head_map: torch.Tensor):
    """(counts, indices) of each head's row of the patterns' block lists, frozen and cached per frozen
    map and lists: the forward on the other backends and the backward find one expansion (and the
    tables cached for it)."""
    cacheable = frozen(head_map) and frozen(kv_counts, kv_indices)
    hit = _EXPANDED.get(head_map) if cacheable else None
    if hit is not None and hit[0] is kv_indices:
        return hit[1]
    idx = head_map.long()
    rows = (freeze(kv_counts.index_select(1, idx).contiguous()), freeze(kv_indices.index_select(1, idx).contiguous()))
    if cacheable:
        _EXPANDED[head_map] = (kv_indices, rows)
    return rows


def _expand_heads(mask: BlockSparseMask, head_map: torch.Tensor) -> BlockSparseMask:
    """``mask``'s rows taken per head by ``head_map``."""
    counts, indices = _head_rows(mask.kv_counts, mask.kv_indices, head_map)
    return BlockSparseMask(counts, indices, mask.q_block, mask.kv_block, mask.num_kv_blocks, mask.token_order_digest,
                           mask.selected)


def _each_batch_element(q, k, v, mask, scale, return_lse, token_order, kv_token_order, backend):
    """``block_sparse_attention`` per batch element with its row of the key-order table (and of a
    per-batch mask), concatenated."""
    rows = table_rows(kv_token_order)
    outs = [block_sparse_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask.batch_element(b), scale=scale,
                                   return_lse=True, token_order=token_order, kv_token_order=rows[b if len(rows) > 1 else 0],
                                   backend=backend, check=False) for b in range(q.shape[0])]
    o = outs[0][0] if len(outs) == 1 else torch.cat([x[0] for x in outs])
    if not return_lse:
        return o
    return o, outs[0][1] if len(outs) == 1 else torch.cat([x[1] for x in outs])


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    token_order: torch.Tensor | None = None,
    kv_token_order: torch.Tensor | None = None,
    backend: str | None = None,
    check: bool = True,
    head_map: torch.Tensor | None = None,
    head_factor: torch.Tensor | None = None,
    kv_tiled: bool = False,
):
    """Exact softmax attention over the key blocks ``mask`` lists for each query block.

    Args:
        q, k, v: ``[B, H, N, D]`` tensors of one dtype (fp16/bf16 on CUDA; fp16/fp32 under the
            Triton interpreter; float64 on the torch backend). Any strides, any N.
        mask: a :class:`BlockSparseMask` with batch 1 or B and heads 1 or H, whose block counts fit N
            (or the tiled length when ``token_order`` is given).
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the natural-log log-sum-exp per query, fp32 ``[B, H, N]``.
        token_order: optional int32 ``[L]``: tiled position ``p`` holds model token
            ``token_order[p]``, or padding when -1. The permutation is applied inside the kernel's
            loads and stores, so inputs and output stay in model order.
        kv_token_order: optional int32 ``[L]`` for keys (default: ``token_order``): a token it marks
            -1 is never attended as a key but still computed as a query (e.g. padded text tokens);
            or ``[B, L]``, one key order per batch element (the tiled Triton kernel reads it with a
            batch stride in one launch; the other backends run the batch elements one by one).
        backend: ``"auto"`` (default on CUDA: the fastest exact backend, measured once per shape),
            ``"triton"`` (tiled kernel), ``"triton_gather"``, ``"torch"`` (block gather; default elsewhere),
            ``"torch_masked"`` (dense attention under the token-level mask: exact, fast for short sequences
            on the CPU) or ``"flex"``.
        check: validate inputs (cheap except for a ``token_order`` range check that syncs).
        head_map: optional int32 ``[H]``: head ``h`` follows mask row ``head_map[h]`` (a mask of P
            patterns shared by a layer whose heads mix them): the tiled kernel reads q, k and v once
            and launches once; the other backends take the mask expanded to the heads.
        head_factor: optional float32 ``[H]``: head ``h``'s logits are scaled by ``scale *
            head_factor[h]`` (heads at different softmax temperatures: ``1 / temperature``). The
            tiled kernel reads it per head (one launch); the other backends scale q by it.
        kv_tiled: k and v are given in the packed key order, ``[B, H, N, D]`` along
            :func:`tiled_key_order` (written so by :func:`sparse_vdit.ops.rope`, say): the tiled kernel
            reads them as they are, with no copy. Backend ``triton`` only (``auto`` on CUDA resolves to it).

    Returns:
        ``o`` ``[B, H, N, D]`` in q's dtype, and ``lse`` if ``return_lse``. A query with no visible key
        gets zeros and LSE = -inf.
    """
    backend = backend or default_backend(q.device)
    if kv_tiled:  # packed keys are the tiled kernel's layout: no other backend may read them
        if backend == "auto" and q.device.type == "cuda":
            backend = "triton"
        if backend != "triton":
            raise ValueError(f"kv_tiled (k and v already in the packed key order) needs backend='triton', "
                             f"got {backend!r}")
    if head_map is not None:
        if check:
            _check_head_map(head_map, q, mask)
        if backend == "auto" and q.device.type == "cuda" and \
                unsupported("triton", q.dtype, q.shape[-1], mask.q_block, mask.kv_block, "cuda") is None:
            backend = "triton"
        if backend != "triton":
            mask, head_map = _expand_heads(mask, head_map), None
    if head_factor is not None:
        if check:
            _check_head_factor(head_factor, q)
        if backend == "auto" and q.device.type == "cuda" and \
                unsupported("triton", q.dtype, q.shape[-1], mask.q_block, mask.kv_block, "cuda") is None:
            backend = "triton"
        if backend != "triton":  # the same logits from q scaled per head (exact in the dtypes these run)
            q, head_factor = q * head_factor.to(q.dtype).view(1, -1, 1, 1), None
    if check:
        _check_inputs(q, k, v, mask, token_order, kv_token_order, backend, heads_mapped=head_map is not None,
                      kv_tiled=kv_tiled)
    D = q.shape[-1]
    scale = float(D ** -0.5) if scale is None else float(scale)
    if kv_token_order is not None and kv_token_order.dim() == 2:
        # One key order per batch element: the tiled kernel reads the table with a batch stride (one
        # launch); the other backends take the batch elements one by one.
        if backend == "auto" and q.device.type == "cuda" and \
                unsupported("triton", q.dtype, D, mask.q_block, mask.kv_block, "cuda") is None:
            backend = "triton"
        if backend != "triton":
            return _each_batch_element(q, k, v, mask, scale, return_lse, token_order, kv_token_order, backend)
    if head_map is not None or kv_tiled:  # the tiled kernel, one launch over the patterns' lists
        tile_rows = tiled_kernel_rows(mask.q_block)
        o, lse = block_sparse_attention_op(
            q, k, v, mask.kv_counts, mask.kv_indices, token_order, kv_token_order, scale,
            mask.q_block, mask.kv_block, mask.num_q_blocks, backend, *mask.query_tiles(tile_rows), tile_rows, head_map,
            head_factor, kv_tiled,
        )
        return (o, lse) if return_lse else o
    if backend == "auto":
        backend = _auto(q, k, v, mask, scale, token_order, kv_token_order, return_lse)
    if backend == "sdpa":  # auto chose dense attention for a mask that visits every block
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    if backend == "torch_masked" and not return_lse and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))):
        # Inference without the LSE: fused SDPA under the token mask (the op below computes the LSE too).
        return torch_masked_sdpa(q, k, v, mask.kv_counts, mask.kv_indices, token_order, kv_token_order, scale,
                                 mask.q_block, mask.kv_block, mask.num_q_blocks)
    if backend == "flex":
        from .flex import flex_block_sparse_attention

        o, lse = flex_block_sparse_attention(q, k, v, mask, scale, token_order, kv_token_order,
                                             flex_fn=_flex_fn(q.device))
    elif backend == "triton":
        tile_rows = tiled_kernel_rows(mask.q_block)
        o, lse = block_sparse_attention_op(
            q, k, v, mask.kv_counts, mask.kv_indices, token_order, kv_token_order, scale,
            mask.q_block, mask.kv_block, mask.num_q_blocks, backend, *mask.query_tiles(tile_rows), tile_rows,
            None, head_factor,
        )
    else:
        o, lse = block_sparse_attention_op(
            q, k, v, mask.kv_counts, mask.kv_indices, token_order, kv_token_order, scale,
            mask.q_block, mask.kv_block, mask.num_q_blocks, backend,
        )
    return (o, lse) if return_lse else o
