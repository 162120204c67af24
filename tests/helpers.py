"""Shared helpers for tests: random inputs, error measures and tolerances."""
import contextlib

import torch

from sparse_vdit.ops import reference_attention
from sparse_vdit.testing.counting import DispatchCounter


def rand_qkv(B, H, N, D, dtype, device="cpu", layout="bhnd"):
    if layout == "bnhd":  # strided, as diffusers hands them over: [B, N, H, D] viewed as [B, H, N, D]
        return [torch.randn(B, N, H, D, dtype=dtype, device=device).transpose(1, 2) for _ in range(3)]
    return [torch.randn(B, H, N, D, dtype=dtype, device=device) for _ in range(3)]


def random_blocks(B, H, Mq, Mk, density):
    return torch.rand(B, H, Mq, Mk) < density


def max_err(a, b):
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    return (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0


def check_against_reference(o, lse, q, k, v, mask, token_order=None, scale=None, kv_token_order=None):
    """Compare (o, lse) with the float64 reference. The tolerance is twice the error that torch's
    own attention makes in the same dtype against float64 (flash-attention's rule), with a floor at
    a few units of rounding of that dtype."""
    ref_o, ref_lse = reference_attention(q.double(), k.double(), v.double(), mask, scale=scale,
                                         token_order=token_order, kv_token_order=kv_token_order)
    own_o, _ = reference_attention(q, k, v, mask, scale=scale, token_order=token_order, kv_token_order=kv_token_order)
    floor = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5}[q.dtype]
    tol = max(2 * max_err(own_o, ref_o), floor)
    assert not torch.isnan(o).any(), "output has NaN"
    err = max_err(o, ref_o)
    assert err <= tol, f"output error {err:.3g} > tolerance {tol:.3g}"
    # Rows with no visible key: zeros and LSE = -inf.
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty), "LSE -inf pattern differs from reference"
    assert (o.double()[empty.expand_as(o[..., 0])] == 0).all()
    lse_err = max_err(lse, ref_lse)
    assert lse_err <= max(tol, 1e-4), f"LSE error {lse_err:.3g}"
    return err, tol


class SyncCounter(DispatchCounter):
    """Counts host syncs (``_local_scalar_dense``, ``nonzero``, ``item``, boolean indexing, ...) while
    active, inside sparse_vdit's custom ops too, leaving out what the Triton interpreter does to run
    a kernel (on a GPU that is a launch, not host work): ``sparse_vdit.testing.counting``."""


def compiled_like_eager(model, call):
    """``call(torch.compile(model, fullgraph=True))`` twice: no recompile on the second call, and both
    bit-equal to eager. Returns (eager, compiled) outputs."""
    from torch._dynamo.testing import CompileCounter

    with torch.no_grad():
        eager = call(model)
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        first = call(compiled)
        frames = counter.frame_count
        second = call(compiled)
    assert counter.frame_count == frames, "a repeated call recompiled"
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    torch.testing.assert_close(second, eager, rtol=0, atol=0)
    return eager, first


@contextlib.contextmanager
def tiled_launches():
    """A list that gets one entry per launch of the tiled Triton forward while active."""
    import sparse_vdit.kernels as kernels

    real, launches = kernels.block_sparse_attention_tiled_fwd, []

    def counted(*a, **kw):
        launches.append(1)
        return real(*a, **kw)
    kernels.block_sparse_attention_tiled_fwd = counted
    try:
        yield launches
    finally:
        kernels.block_sparse_attention_tiled_fwd = real
