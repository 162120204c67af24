"""Rotary position embedding (interleaved pairs) as one op that writes where attention reads.

``rope(x, cos, sin, start)`` rotates ``x [B, N, H, D]`` (model layout) and returns it in model
order; with ``order`` (a token order, ``[L]`` or ``[B, L]``, -1 where no token) it returns
``[B, H, L, D]`` in that order instead, zeros at the -1 positions. Given the packed key order
(:func:`sparse_vdit.ops.attention.tiled_key_order`), that is the layout the tiled attention kernel
reads its keys from, so that k is written once, rotated and tiled, and never copied again.

Pairs are ``(x[..., 2i], x[..., 2i + 1])``, rotated by ``cos``/``sin`` fp32 ``[Bc, Nr, Hc, D // 2]``
(one angle per pair; Bc in (1, B), Hc in (1, H)) for tokens ``start .. start + Nr - 1``; other tokens
are copied. This is the rotation of Wan, HunyuanVideo, LTX-Video and Mochi (each adapter gives its
tables in this form). On CUDA (or under the Triton interpreter) one Triton pass; elsewhere torch.
A torch.library custom op with a fake and a backward (the inverse rotation, scattered back to model
order), so it compiles and trains.
"""
from __future__ import annotations

import os

import torch

from .attention import _back_to_model, _gather_keys
from .order import tiled_position


def _use_triton(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
    """The rotation in torch, model order (fp32 arithmetic, one rounding, as the kernel; float64 stays float64)."""
    B, N, H, D = x.shape
    n = cos.shape[1]
    work = torch.promote_types(x.dtype, torch.float32)
    seg = x[:, start:start + n].to(work)
    x1, x2 = seg[..., 0::2], seg[..., 1::2]
    c, s = cos.to(work), sin.to(work)
    rot = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).to(x.dtype)
    if start == 0 and n == N:
        return rot
    return torch.cat([x[:, :start], rot, x[:, start + n:]], dim=1)


def _to_order(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``y [B, N, H, D]`` (model order) at the positions of ``order`` as ``[B, H, L, D]``, zeros at padding."""
    idx = order.clamp(min=0) if order.dim() == 1 else order.clamp(min=0).long()
    pad = (order < 0).view(order.shape[0] if order.dim() == 2 else 1, 1, -1, 1)
    return _gather_keys(y.transpose(1, 2), idx).masked_fill(pad, 0.0).contiguous()


@torch.library.custom_op("sparse_vdit::rope", mutates_args=())
def rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
            order: torch.Tensor | None) -> torch.Tensor:
    """See the module doc; inputs checked by :func:`rope`."""
    if _use_triton(x):
        from ..kernels.rope import rope_fwd

        return rope_fwd(x, cos, sin, start, order)
    y = rope_torch(x, cos, sin, start)
    return y.contiguous() if order is None else _to_order(y, order)


@rope_op.register_fake
def _(x, cos, sin, start, order):
    B, N, H, D = x.shape
    if order is None:
        return x.new_empty(B, N, H, D)
    return x.new_empty(B, H, order.shape[-1], D)


def _setup_context(ctx, inputs, output):
    x, cos, sin, start, order = inputs
    ctx.save_for_backward(cos, sin, order)
    ctx.meta = (start, x.shape[1])


def _backward(ctx, grad):
    cos, sin, order = ctx.saved_tensors
    start, N = ctx.meta
    if order is not None:  # back to model order: each token from its tiled position (none: zero)
        grad = _back_to_model(grad, tiled_position(order, N)).transpose(1, 2)
    # The rotation's inverse is its transpose: the same rotation by minus the angle.
    return rope(grad, cos, -sin, start, check=False), None, None, None, None


rope_op.register_autograd(_backward, setup_context=_setup_context)


def check_rope_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> None:
    """Errors that say what is wrong with an angle table pair for ``x [B, N, H, D]``."""
    if x.dim() != 4:
        raise ValueError(f"rope: x must be [B, N, H, D], got {tuple(x.shape)}")
    B, N, H, D = x.shape
    if D % 2:
        raise ValueError(f"rope: head_dim must be even (interleaved pairs), got {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype != torch.float32:
            raise ValueError(f"rope: {name} must be a float32 tensor [Bc, Nr, Hc, D // 2], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                             f"{'' if not isinstance(t, torch.Tensor) else ' ' + str(t.dtype)}")
        if t.shape[0] not in (1, B) or t.shape[2] not in (1, H) or t.shape[3] != D // 2:
            raise ValueError(f"rope: {name} must be [1 or {B}, Nr, 1 or {H}, {D // 2}] for x {tuple(x.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"rope: {name} is on {t.device} but x is on {x.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"rope: cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if not 0 <= start <= N - cos.shape[1]:
        raise ValueError(f"rope: tokens {start} .. {start + cos.shape[1] - 1} (start and the tables' {cos.shape[1]} "
                         f"rows) must lie within the sequence's {N}")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0,
         order: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """Rotate ``x [B, N, H, D]``; model order ``[B, N, H, D]``, or ``[B, H, L, D]`` along ``order``."""
    if check:
        check_rope_tables(x, cos, sin, start)
    if cos.stride() != sin.stride():  # the kernel reads both through one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
    return rope_op(x, cos, sin, int(start), order)
