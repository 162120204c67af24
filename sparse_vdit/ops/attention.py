"""Public block-sparse attention: input checks, backend choice and the torch.library custom op."""
from __future__ import annotations

import os

import torch

from .mask import BlockSparseMask
from .order import order_digest
from .torch_backend import torch_block_sparse_attention, torch_block_sparse_attention_bwd

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward as one opaque op for torch.compile: (o [B, H, N, D], lse fp32 [B, H, N])."""
    if backend == "triton":
        from ..kernels import block_sparse_attention_fwd

        return block_sparse_attention_fwd(q, k, v, kv_counts, kv_indices, token_order, kv_token_order, scale,
                                     q_block, kv_block, num_q_blocks)
    return torch_block_sparse_attention(q, k, v, kv_counts, kv_indices, token_order, kv_token_order, scale,
                                        q_block, kv_block, num_q_blocks)


@block_sparse_attention_op.register_fake
def _(q, k, v, kv_counts, kv_indices, token_order, kv_token_order, scale, q_block, kv_block, num_q_blocks, backend):
    B, H, N, D = q.shape
    return q.new_empty(B, H, N, D), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("sparse_vdit::block_sparse_attention_bwd", mutates_args=())
def block_sparse_attention_bwd_op(
    grad_o: torch.Tensor,
    grad_lse: torch.Tensor,
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the forward, by the torch backend's block-gather backward (exact; any device;
    memory as the torch forward). The same function whichever backend ran the forward."""
    return torch_block_sparse_attention_bwd(grad_o, grad_lse, q, k, v, kv_counts, kv_indices, token_order,
                                            kv_token_order, scale, q_block, kv_block, num_q_blocks)


@block_sparse_attention_bwd_op.register_fake
def _(grad_o, grad_lse, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_counts, kv_indices, token_order, kv_token_order, scale, q_block, kv_block, num_q_blocks, _ = inputs
    ctx.save_for_backward(q, k, v, kv_counts, kv_indices, token_order, kv_token_order)
    ctx.meta = (scale, q_block, kv_block, num_q_blocks)


def _backward(ctx, grad_o, grad_lse):
    q, k, v, kv_counts, kv_indices, token_order, kv_token_order = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(q)
    if grad_lse is None:
        grad_lse = q.new_zeros(q.shape[:3], dtype=torch.float32)
    dq, dk, dv = block_sparse_attention_bwd_op(grad_o, grad_lse, q, k, v, kv_counts, kv_indices, token_order,
                                               kv_token_order, *ctx.meta)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


block_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


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
        if mask.token_order_digest is not None:
            raise ValueError("this mask was built on a VideoLayout, whose blocks are tiles of the tiled order: pass "
                             "token_order=layout.token_order(q.device) (without it the blocks would be raster runs)")
        mask.check_seq_len(N)
        return
    _check_order("token_order", token_order, q, mask, N)
    if mask.token_order_digest is not None and not torch.compiler.is_compiling():
        given = order_digest(token_order)
        if given != tuple(mask.token_order_digest):
            raise ValueError(
                f"token_order is not the order of the layout this mask was built for (mask: {mask.token_order_digest[0]} "
                f"positions, checksum {mask.token_order_digest[1]}; given: {given[0]} positions, checksum {given[1]}): "
                "use the token_order of the same VideoLayout as the mask")
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
        from .flex import flex_block_sparse_attention

        o, lse = flex_block_sparse_attention(q, k, v, mask, scale, token_order, kv_token_order)
    else:
        o, lse = block_sparse_attention_op(
            q, k, v, mask.kv_counts, mask.kv_indices, token_order, kv_token_order, scale,
            mask.q_block, mask.kv_block, mask.num_q_blocks, backend,
        )
    return (o, lse) if return_lse else o
