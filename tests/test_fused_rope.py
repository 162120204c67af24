"""The rotary pass that writes k in tiled order (issue 21, item 4): the op against float64 torch, the
adapters' fused path against the stock diffusers processors (the mirror test's rule), gradients
through the new layout, and what it saves at the seam."""
import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.ops import reference_attention, rope, sparse_attention_tiled, tiled_keys
from sparse_vdit.ops.rotary import _to_order, rope_torch
from sparse_vdit.testing import make

from .conftest import requires_cuda

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _tables(n, heads=1, batch=1, half=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    angle = torch.randn(batch, n, heads, half, generator=g) * 3
    return angle.cos(), angle.sin()


def _err(a, b):
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_op_against_float64(dtype):
    """Model order, tiled order (one order, and a [B, L] table), per-head tables, a rotated range that
    leaves tokens unrotated, strided input: the op (the Triton kernel under the interpreter) against
    the float64 rotation."""
    torch.manual_seed(0)
    B, N, H, D = 2, 37, 3, 16
    x = torch.randn(B, H, N, D).to(dtype).transpose(1, 2)  # [B, N, H, D] with diffusers' strides
    cos, sin = _tables(30)
    ref = rope_torch(x.double(), cos.double(), sin.double(), 5)
    floor = 2e-6 if dtype == torch.float32 else 2e-3
    assert _err(rope(x, cos, sin, 5), ref) <= floor
    assert _err(rope(x, cos, sin, 5)[:, :5], x[:, :5]) == 0  # outside the range: copied
    perm = torch.randperm(N).int()
    pad = torch.full((3,), -1, dtype=torch.int32)
    order = torch.cat([perm[:20], pad, perm[20:], pad])
    tiled = rope(x, cos, sin, 5, order)
    assert tiled.shape == (B, H, order.numel(), D) and tiled.is_contiguous()
    assert _err(tiled, _to_order(ref, order)) <= floor
    assert bool((tiled[:, :, 20:23] == 0).all())  # padding positions hold zeros
    table = torch.stack([order, order.flip(0)])
    assert _err(rope(x, cos, sin, 5, table), _to_order(ref, table)) <= floor
    c2, s2 = _tables(N, heads=H, batch=B)
    assert _err(rope(x, c2, s2), rope_torch(x.double(), c2.double(), s2.double(), 0)) <= floor


def test_rope_gradient_and_opcheck():
    torch.manual_seed(1)
    B, N, H, D = 2, 21, 2, 8
    x = torch.randn(B, N, H, D)
    cos, sin = _tables(N, half=D // 2)
    order = torch.cat([torch.randperm(N).int(), torch.full((3,), -1, dtype=torch.int32)])
    g = torch.randn(B, H, order.numel(), D)
    xg = x.clone().requires_grad_()
    (rope(xg, cos, sin, 0, order) * g).sum().backward()
    xr = x.double().requires_grad_()
    (_to_order(rope_torch(xr, cos.double(), sin.double(), 0), order) * g.double()).sum().backward()
    assert _err(xg.grad, xr.grad) <= 2e-6
    result = torch.library.opcheck(torch.ops.sparse_vdit.rope.default, (x, cos, sin, 0, order))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_rope_rejects_bad_tables():
    x = torch.randn(1, 8, 2, 8)
    cos, sin = _tables(8, half=4)
    with pytest.raises(ValueError, match="float32"):
        rope(x, cos.double(), sin.double())
    with pytest.raises(ValueError, match=r"\[1 or 1, Nr, 1 or 2, 4\]"):
        rope(x, *_tables(8, half=3))
    with pytest.raises(ValueError, match="within the sequence"):
        rope(x, cos, sin, 4)
    with pytest.raises(ValueError, match="even"):
        rope(torch.randn(1, 8, 2, 7), cos[..., :3], sin[..., :3])


def _layout_case(key_mask: bool):
    # 6 x 7 frames in 4 x 4 tiles: tiles cut by the grid's edge, so the packed key order's blocks are short
    layout = sv.VideoLayout(2, 6, 7, tile=(1, 4, 4), text_len=5, text_position="after")
    mask = sv.masks.build([{"kind": "sliding_tile", "window": [1, 1, 1]}], layout)
    order = layout.token_order("cpu")
    N = layout.seq_len
    key_valid = None
    if key_mask:
        key_valid = torch.ones(2, N, dtype=torch.bool)
        key_valid[0, N - 2:] = False  # the first prompt has two padded text tokens
    return layout, mask, order, N, key_valid


@pytest.mark.parametrize("key_mask", [False, True])
def test_fused_attention_forward_and_backward_against_float64(key_mask):
    """Rotate k into tiled order, copy v, attend with kv_tiled: output and gradients of q, k, v (in
    model order, through the rotation's and the tiled layout's backward) against float64 torch."""
    torch.manual_seed(2)
    layout, mask, order, N, key_valid = _layout_case(key_mask)
    B, H, D = 2, 2, 16
    cos, sin = _tables(N - 5, half=D // 2, seed=3)
    q, k, v = (torch.randn(B, N, H, D, requires_grad=True) for _ in range(3))
    g = torch.randn(B, N, H, D)
    kt, vt, valid = tiled_keys(q, k, v, mask, order, key_valid=key_valid, rotary=(cos, sin, 0))
    out = sparse_attention_tiled(rope(q, cos, sin), kt, vt, mask, order, key_valid=key_valid)
    (out * g).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    qr, kr = (rope_torch(x, cos.double(), sin.double(), 0) for x in (q64, k64))
    from sparse_vdit.ops import key_order

    kv_orders = [None] if key_valid is None else [key_order(order, key_valid[b]) for b in range(B)]
    refs = []
    for b in range(B):
        ko = kv_orders[0] if key_valid is None else kv_orders[b]
        refs.append(reference_attention(qr[b:b + 1].transpose(1, 2), kr[b:b + 1].transpose(1, 2),
                                        v64[b:b + 1].transpose(1, 2), mask, token_order=order,
                                        kv_token_order=ko)[0].transpose(1, 2))
    ref = torch.cat(refs)
    (ref * g.double()).sum().backward()
    assert _err(out, ref) <= 2e-5
    for mine, theirs, name in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"), (v.grad, v64.grad, "dv")):
        assert _err(mine, theirs) <= 5e-5, name
    # dense attention over the tiled keys (the text rows' path) is attention over the model's keys
    dense = sv.ops.dense_attention(q[:, :4].detach(), kt.detach().transpose(1, 2), vt.detach().transpose(1, 2),
                                   key_valid=valid.expand(B, -1))
    k_rot = rope(k.detach(), cos, sin)
    want = sv.ops.dense_attention(q[:, :4].detach(), k_rot, v.detach(), key_valid=key_valid)
    assert _err(dense, want) <= 2e-6


FUSED_FAMILIES = ("wan", "hunyuan_video", "ltx_video", "mochi")


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fused_rotary_path_is_the_stock_processor(family, monkeypatch):
    """The mirror test's rule for the fused path: with a covering mask, the tiled Triton backend (k
    rotated into tiled order by the rope pass) reproduces the installed diffusers' stock processor;
    with a real mask it equals the unfused path (stock rotation, then attention). The rope pass ran
    twice per layer (q, k)."""
    import sparse_vdit.ops.rotary as rope_mod

    calls = []
    real = rope_mod.rope_op

    def counted(*a, **kw):
        calls.append(a[4] is not None)
        return real(*a, **kw)

    monkeypatch.setattr(rope_mod, "rope_op", counted)
    model, call = make(family)
    layers, _ = sv.integration.attention_shape(model)
    with torch.no_grad():
        ref = call(model, batch=2, grid=(2, 8, 8))
        sv.apply(model, sv.uniform_plan(model, {"kind": "sliding_tile", "window": [99, 99, 99]}, tile=(1, 4, 4)),
                 backend="triton")
        out = call(model, batch=2, grid=(2, 8, 8))
        sv.remove(model)
        assert sorted(calls) == [False] * layers + [True] * layers  # q in model order, k tiled: each layer
        rel = float((out - ref).norm() / ref.norm())
        assert rel <= 1e-5, f"{family}: fused rotary path differs from the stock processor by {rel:.2e}"
        plan = sv.uniform_plan(model, {"kind": "sliding_tile", "window": [1, 1, 1]}, tile=(1, 4, 4))
        sv.apply(model, plan, backend="triton")
        fused = call(model, batch=2, grid=(2, 8, 8))
        sv.remove(model)
        sv.apply(model, plan, backend="torch")
        unfused = call(model, batch=2, grid=(2, 8, 8))
        sv.remove(model)
    assert float((fused - unfused).norm() / unfused.norm()) <= 1e-5
    assert float((fused - ref).norm() / ref.norm()) > 1e-3  # the real mask changed the output


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_training_through_the_fused_path(family):
    """Parameter gradients of a whole tiny model under a sparse plan: the fused path (triton) against
    the unfused one (torch backend, the stock rotation)."""
    model, call = make(family)
    plan = sv.uniform_plan(model, {"kind": "sliding_tile", "window": [1, 1, 1]}, tile=(1, 4, 4))
    grads = {}
    for backend in ("triton", "torch"):
        model.zero_grad()
        sv.apply(model, plan, backend=backend)
        call(model, batch=2, grid=(2, 8, 8)).square().mean().backward()
        sv.remove(model)
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert float((grads["triton"] - grads["torch"]).norm() / grads["torch"].norm()) <= 1e-5


@requires_cuda
def test_bf16_at_wan_size_on_the_gpu():
    """bf16 at the Wan2.1-1.3B shape (one batch element): the rope op against float64, and the fused
    layer call against the stock rotation then the seam."""
    from sparse_vdit.integration.adapters import Rotary, _wan_rotary
    from sparse_vdit.integration.processor import grouped_attention

    dev = torch.device("cuda")
    layout = sv.VideoLayout(21, 30, 52, tile=(1, 8, 8))
    N, H, D = layout.seq_len, 12, 128
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    angle = torch.rand(1, N, 1, D // 2, device=dev, generator=g) * 6.28
    cos, sin = angle.cos(), angle.sin()
    ref = rope_torch(q.double(), cos.double(), sin.double(), 0)
    assert _err(rope(q, cos, sin), ref) <= 2 * _err(ref.to(torch.bfloat16), ref) + 1e-6  # one rounding
    full = (cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1))
    rot = Rotary(lambda x: _wan_rotary(x, *full), cos, sin)
    proc = sv.SparseAttnProcessor(sv.SparsityPlan(heads=[[{"kind": "sliding_tile", "window": [3, 3, 3]}] * H],
                                                  tile=(1, 8, 8)), backend="triton")
    groups = proc.head_groups(0, layout, dev)
    order = layout.token_order(dev)
    with torch.no_grad():
        fused = grouped_attention(q, k, v, groups, order, None, "triton", None, rotary=rot)
        stock = grouped_attention(rot.apply(q), rot.apply(k), v, groups, order, None, "triton", None)
    assert float((fused.float() - stock.float()).norm() / stock.float().norm()) <= 1e-2
