"""Block-level attention mass (Triton kernel under the interpreter, and torch) against a float64
dense reference."""
import pytest
import torch

from sparse_vdit.ops import block_attention_mass

from .helpers import rand_qkv


def _reference(q, k, block, order=None, kv_order=None):
    B, H, N, D = q.shape
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * D ** -0.5
    L = N if order is None else order.numel()
    M = -(-L // block)
    pos_q = torch.arange(N) if order is None else _positions(order, N)
    pos_k = pos_q if kv_order is None else _positions(kv_order, N)
    s = s.masked_fill((pos_k < 0)[None, None, None, :], float("-inf"))
    p = torch.softmax(s, -1)
    out = torch.zeros(B, H, M, M, dtype=torch.float64)
    qb, kb = pos_q // block, pos_k.clamp(min=0) // block
    for i in range(N):
        out[:, :, qb[i]].index_add_(-1, kb, p[:, :, i])
    counts = torch.bincount(qb, minlength=M).clamp(min=1)
    return out / counts[None, None, :, None]


def _positions(order, N):
    pos = torch.full((N,), -1, dtype=torch.long)
    valid = order >= 0
    pos[order[valid].long()] = torch.arange(order.numel())[valid]
    return pos


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_block_mass_matches_reference(nan_empty, backend, dtype):
    q, k, _ = rand_qkv(2, 2, 150, 64, dtype)  # tail block partial
    mass = block_attention_mass(q, k, 32, backend=backend)
    ref = _reference(q, k, 32)
    assert mass.shape == (2, 2, 5, 5)
    assert (mass.double() - ref).abs().max() < (2e-3 if dtype == torch.float16 else 1e-5)
    assert torch.allclose(mass.sum(-1).double(), torch.ones(2, 2, 5, dtype=torch.float64), atol=2e-3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_block_mass_with_orders(nan_empty, backend):
    q, k, _ = rand_qkv(1, 2, 90, 32, torch.float32)
    order = torch.full((128,), -1, dtype=torch.int32)
    order[torch.randperm(128)[:90]] = torch.randperm(90).to(torch.int32)
    kv_order = order.clone()
    kv_order[(order >= 80)] = -1  # tokens 80..89 are not keys
    mass = block_attention_mass(q, k, 32, token_order=order, kv_token_order=kv_order, backend=backend)
    ref = _reference(q, k, 32, order, kv_order)
    assert (mass.double() - ref).abs().max() < 1e-5
