"""Public block-sparse attention: input checks, backend choice and the torch.library custom op."""
from __future__ import annotations

import os

import torch

from .mask import BlockSparseMask
from .reference import torch_block_sparse_attention

BACKENDS = ("triton", "torch", "flex")
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def default_backend(device: torch.device) -> str:
    """Triton on CUDA; the torch block-gather path elsewhere. ``SPARSE_VDIT_BACKEND`` overrides."""
    env = os.environ.get("SPARSE_VDIT_BACKEND")
    if env:
        if env not in BACKENDS:
            raise ValueError(f"SPARSE_VDIT_BACKEND must be one of {BACKENDS}, got {env!r}")
        return env
    return "triton" if device.type == "cuda" else "torch"


# ---------------------------------------------------------------------------- custom op
@torch.library.custom_op("sparse_vdit::block_sparse_attn_fwd", mutates_args=())
def _block_sparse_attn_fwd_op(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from sparse_vdit.kernels import block_sparse_attn_fwd

        return block_sparse_attn_fwd(q, k, v, kv_counts, kv_indices, token_order, kv_token_order, scale,
                                     q_block, kv_block, num_q_blocks)
    return torch_block_sparse_attention(q, k, v, kv_counts, kv_indices, token_order, kv_token_order, scale,
                                        q_block, kv_block, num_q_blocks)


@_block_sparse_attn_fwd_op.register_fake
def _(q, k, v, kv_counts, kv_indices, token_order, kv_token_order, scale, q_block, kv_block, num_q_blocks, backend):
    B, H, N, D = q.shape
    return q.new_empty(B, H, N, D), q.new_empty(B, H, N, dtype=torch.float32)


# ---------------------------------------------------------------------------- checks
def _check_order(name, order, q, mask, N):
    if not isinstance(order, torch.Tensor) or order.dim() != 1:
        raise ValueError(f"{name} must be a 1-D int32 tensor of tiled positions")
    if order.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {order.dtype}")
    if order.device != q.device:
        raise ValueError(f"{name} is on {order.device} but q is on {q.device}")
    L = order.numel()
    if L % mask.q_block or L % mask.kv_block:
        raise ValueError(f"{name} length {L} must be a multiple of the block sizes ({mask.q_block}, {mask.kv_block})")
    if not torch.compiler.is_compiling():
        lo, hi = int(order.min()), int(order.max())
        if lo < -1 or hi >= N:
            raise ValueError(f"{name} values must lie in [-1, {N - 1}] (N={N}), got range [{lo}, {hi}]")


def _check_inputs(q, k, v, mask, token_order, kv_token_order, backend):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, N, D], got {tuple(x.shape)}")
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
    if mask.batch not in (1, B):
        raise ValueError(f"mask batch dimension must be 1 (broadcast) or {B} (the batch size), got {mask.batch}")
    if mask.heads not in (1, H):
        raise ValueError(f"mask head dimension must be 1 (broadcast) or {H} (the number of heads), got {mask.heads}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if D > MAX_HEAD_DIM:
            raise ValueError(f"head_dim {D} is not supported by the Triton kernel (at most {MAX_HEAD_DIM})")
        if q.dtype == torch.float64:
            raise TypeError("float64 runs on the torch backend only (backend='torch')")
        if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"the Triton backend needs a CUDA device (q is on {q.device}); use backend='torch' on the CPU "
                "or set TRITON_INTERPRET=1 before importing triton"
            )
    if token_order is None:
        if kv_token_order is not None:
            raise ValueError("kv_token_order needs token_order (the query order) too")
        mask.check_seq_len(N)
        return
    _check_order("token_order", token_order, q, mask, N)
    mask.check_seq_len(N, padded_len=token_order.numel())
    if kv_token_order is not None:
        _check_order("kv_token_order", kv_token_order, q, mask, N)
        if kv_token_order.numel() != token_order.numel():
            raise ValueError(
                f"kv_token_order has {kv_token_order.numel()} positions but token_order has {token_order.numel()}"
            )


# ---------------------------------------------------------------------------- public API
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
            -1 is never attended as a key but still computed as a query (e.g. padded text tokens).
        backend: ``"triton"``, ``"torch"`` or ``"flex"``; default by device (see :func:`default_backend`).
        check: validate inputs (cheap except for a ``token_order`` range check that syncs).

    Returns:
        ``o`` ``[B, H, N, D]`` in q's dtype, and ``lse`` if ``return_lse``. A query with no visible key
        gets zeros and LSE = -inf.
    """
    backend = backend or default_backend(q.device)
    if check:
        _check_inputs(q, k, v, mask, token_order, kv_token_order, backend)
    D = q.shape[-1]
    scale = float(D ** -0.5) if scale is None else float(scale)
    if backend == "flex":
        o, lse = _flex_attention(q, k, v, mask, scale, token_order, kv_token_order)
    else:
        o, lse = _block_sparse_attn_fwd_op(
            q, k, v, mask.kv_counts, mask.kv_indices, token_order, kv_token_order, scale,
            mask.q_block, mask.kv_block, mask.num_q_blocks, backend,
        )
    return (o, lse) if return_lse else o


def _flex_call(flex_fn, q, k, v, block_mask, scale):
    """Call FlexAttention asking for the LSE in whichever way this torch version supports."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        return flex_fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)
    o, aux = flex_fn(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
    return o, aux.lse


def _flex_attention(q, k, v, mask, scale, token_order, kv_token_order=None, flex_fn=None):
    """FlexAttention on the same block mask (a baseline; permutes copies when token_order is set)."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    if flex_fn is None:
        flex_fn = flex_attention
        # Eager FlexAttention warns that it is unfused; on the CPU that is the intended use.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

    B, H, N, D = q.shape
    if token_order is not None:
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
        dense = mask.to_dense()

        def mask_mod(b, h, q_idx, kv_idx):
            bb = b if mask.batch > 1 else torch.zeros_like(b)
            hh = h if mask.heads > 1 else torch.zeros_like(h)
            return dense[bb, hh, q_idx // mask.q_block, kv_idx // mask.kv_block] & key_ok[kv_idx]

        from torch.nn.attention.flex_attention import create_block_mask

        bm = create_block_mask(mask_mod, mask.batch if mask.batch > 1 else None,
                               mask.heads if mask.heads > 1 else None, L, L, device=q.device,
                               BLOCK_SIZE=(mask.q_block, mask.kv_block))
        ot, lset = _flex_call(flex_fn, tile(q, order, valid), tile(k, kv_order, key_ok), tile(v, kv_order, key_ok),
                              bm, scale)
        o = q.new_zeros(B, H, N, D)
        lse = torch.full((B, H, N), float("-inf"), dtype=torch.float32, device=q.device)
        o[:, :, order[valid]] = ot[:, :, valid]
        lse[:, :, order[valid]] = lset[:, :, valid].float()
        return o, lse
    o, lse = _flex_call(flex_fn, q, k, v, mask.to_flex(N), scale)
    # FlexAttention leaves rows with no key as zeros and -inf LSE in recent torch; enforce the contract.
    lse = lse.float()
    o = o.masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0)
    return o, lse
