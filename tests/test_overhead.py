"""The hot path around the kernel: the CPU block-gather path in chunks, CPU ``auto``, and what one
sparse layer call does on the host (counted with stubbed kernels, as ``bench overhead`` counts it)."""
import re

import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.integration.processor import grouped_attention, text_queries
from sparse_vdit.ops import block_sparse_attention
from sparse_vdit.testing.counting import DispatchCounter, attention_kernel_stubs

from .helpers import check_against_reference


def _case(grid=(2, 8, 16), heads=2, D=32, text=0, where="after", spec=None):
    layout = sv.VideoLayout(*grid, tile=(1, 8, 8), text_len=text, text_position=where)
    mask = sv.masks.build(spec or {"kind": "sliding_tile", "window": [1, 1, 1]}, layout, heads=1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, layout.seq_len, D, generator=g) for _ in range(3))
    return layout, mask, q, k, v


def test_block_gather_in_chunks_matches_reference(nan_empty, monkeypatch):
    """Many small chunks of query blocks give the same exact result as one (float64 reference)."""
    import sparse_vdit.ops.torch_backend as tb

    layout, mask, q, k, v = _case(grid=(3, 8, 16), text=5)
    order = layout.token_order("cpu")
    kv_order = order.clone()
    kv_order[kv_order >= layout.seq_len - 3] = -1  # some keys left out
    for chunk in (1, 3 * 32 * 64 * 4 + 1, tb.GATHER_CHUNK_BYTES):
        monkeypatch.setattr(tb, "GATHER_CHUNK_BYTES", chunk)
        o, lse = block_sparse_attention(q, k, v, mask, token_order=order, kv_token_order=kv_order, backend="torch",
                                        return_lse=True)
        check_against_reference(o, lse, q, k, v, mask, token_order=order, kv_token_order=kv_order)


def test_block_gather_float64_is_exact_to_rounding():
    layout, mask, q, k, v = _case()
    q, k, v = q.double(), k.double(), v.double()
    order = layout.token_order("cpu")
    o, lse = block_sparse_attention(q, k, v, mask, token_order=order, backend="torch", return_lse=True)
    ref_o, ref_lse = sv.ops.reference_attention(q, k, v, mask, token_order=order)
    assert o.dtype == torch.float64 and (o - ref_o).abs().max() < 1e-12
    assert lse.dtype == torch.float32 and (lse - ref_lse).abs().max() < 1e-6  # the LSE is fp32 by contract


def test_cpu_auto_times_both_paths_and_caches_its_choice(nan_empty, monkeypatch):
    from sparse_vdit.ops import auto

    timed = []
    real = auto.cpu_time_ms
    monkeypatch.setattr(auto, "cpu_time_ms", lambda fn, reps=3: timed.append(1) or real(fn, reps))
    layout, mask, q, k, v = _case(heads=3, D=16)
    order = layout.token_order("cpu")
    before = set(auto.choices())
    o, lse = block_sparse_attention(q, k, v, mask, token_order=order, backend="auto", return_lse=True)
    check_against_reference(o, lse, q, k, v, mask, token_order=order)
    new = {key: c for key, c in auto.choices().items() if key not in before}
    assert len(new) == 1 and set(new.values()) <= {"torch", "torch_masked"}
    assert len(timed) == 2  # both candidates timed once
    o2 = block_sparse_attention(q, k, v, mask, token_order=order, backend="auto", return_lse=True)[0]
    assert len(timed) == 2  # the second call reads the cached choice
    assert torch.equal(o, o2)


def _layer_call(specs, text=0, where="after", B=2, key_mask=False, heads=4, grid=(2, 8, 16)):
    layout = sv.VideoLayout(*grid, tile=(1, 8, 8), text_len=text, text_position=where)
    plan = sv.SparsityPlan(heads=[[specs[h % len(specs)] for h in range(heads)]], tile=(1, 8, 8))
    proc = sv.SparseAttnProcessor(plan, backend="triton")
    groups = proc.head_groups(0, layout, "cpu")
    N = layout.seq_len
    q, k, v = (torch.randn(B, N, heads, 32) for _ in range(3))
    key_valid = None
    if key_mask:
        key_valid = torch.ones(B, N, dtype=torch.bool)
        key_valid[:, -2:] = False
    args = (q, k, v, groups, layout.token_order("cpu"), key_valid, "triton", text_queries(layout))
    with torch.no_grad(), DispatchCounter(attention_kernel_stubs()):
        grouped_attention(*args)  # first call: per-order and per-mask tables
    with torch.no_grad(), DispatchCounter(attention_kernel_stubs()) as c:
        out = grouped_attention(*args)
    return c, out, q


@pytest.mark.parametrize("text,where", [(0, "after"), (6, "after"), (6, "before")])
def test_one_spec_layer_call_host_work(text, where):
    """One spec per layer: no sync, one launch for the video rows (plus one dense call for text
    rows), the issue's op budget, and no copy beyond k and v's tiled copies and the output (the
    kernel reads q and writes o in model order)."""
    c, out, q = _layer_call([{"kind": "sliding_tile", "window": [1, 1, 1]}], text=text, where=where)
    s = c.summary()
    assert s["syncs"] == 0, c.syncs
    assert s["launches"] == (2 if text else 1)
    assert s["host_ops"] <= 8, s["ops"]
    assert "cat" not in s["ops"] and "masked_fill" not in s["ops"], s["ops"]
    assert sum(n for name, n in s["ops"].items() if name.startswith("index_select")) == 2, s["ops"]  # k and v
    L = sv.VideoLayout(2, 8, 16, tile=(1, 8, 8), text_len=text, text_position=where).token_order("cpu").numel()
    L = -(-L // 128) * 128  # the tiled kernel's 128-row query tiles
    size_q = q.numel() * q.element_size()
    # k and v gathered into tiled order (L positions each, padding included); o and the LSE in model
    # order, from the kernel (the text rows' dense output besides).
    produced = s["allocated_bytes"] + s["written_bytes"] + s["kernel_output_bytes"]
    text_rows = 2 * text / q.shape[1] * size_q
    assert produced <= (2 * L / q.shape[1] + 1) * size_q + text_rows + q.shape[0] * q.shape[2] * q.shape[1] * 4


def test_packed_keys_are_each_blocks_keys_one_after_another():
    """The packed key layout against a plain loop over the blocks: each block's keys in order, no
    padding between blocks, -1 after the last key; ``starts`` where each block begins; and the way
    back (``packed_source``) to the padded positions. 1-D and per batch element."""
    from sparse_vdit.ops.order import packed_keys, packed_source

    g = torch.Generator().manual_seed(5)
    N, L, block = 50, 96, 16
    rows = []
    for _ in range(3):
        order = torch.full((L,), -1, dtype=torch.int32)
        slots = torch.randperm(L, generator=g)[:N - 7]  # 7 tokens left out, padding scattered
        order[slots] = torch.randperm(N, generator=g)[:N - 7].to(torch.int32)
        order[:block] = -1  # one whole block without keys
        rows.append(order)
    for order in (rows[0], torch.stack(rows)):
        packed, starts = packed_keys(order, N, block)
        index, source = packed_source(order, N)
        for r, (row, prow, srow, irow, sorow) in enumerate(zip(*(x.reshape(-1, x.shape[-1]) for x in
                                                                  (order, packed, starts, index, source)))):
            want, want_starts, want_source = [], [0], []
            for j in range(L // block):
                for p in range(j * block, (j + 1) * block):
                    if row[p] >= 0:
                        want.append(int(row[p]))
                        want_source.append(p)
                want_starts.append(len(want))
            assert prow.tolist() == want + [-1] * (N - len(want))
            assert srow.tolist() == want_starts
            assert sorow.tolist() == want_source + [-1] * (N - len(want))
            assert all(prow[i] == row[p] for p, i in enumerate(irow.tolist()) if i >= 0)
            assert (irow >= 0).tolist() == (row >= 0).tolist()


@pytest.mark.parametrize("text,where", [(0, "after"), (6, "before")])
def test_tiles_cut_by_the_grid_edge_copy_no_padding_rows(nan_empty, text, where):
    """A grid that 8 x 8 tiles do not divide (6 x 12: every tile row ends in a half tile): k and v are
    copied with N rows each (the packed key order), not the tiled order's padded length, so that one
    sparse call produces one copy of k and v, the output and the LSE, and nothing else; and the
    kernel, reading its short key blocks there, is still exact against float64."""
    c, out, q = _layer_call([{"kind": "sliding_tile", "window": [1, 3, 3]}], text=text, where=where, grid=(2, 6, 12))
    s = c.summary()
    assert s["syncs"] == 0 and s["launches"] == (2 if text else 1), s
    layout = sv.VideoLayout(2, 6, 12, tile=(1, 8, 8), text_len=text, text_position=where)
    assert layout.token_order("cpu").numel() >= 1.5 * layout.seq_len  # the padded order is much longer
    size_q = q.numel() * q.element_size()
    produced = s["allocated_bytes"] + s["written_bytes"] + s["kernel_output_bytes"]
    text_rows = 2 * text / q.shape[1] * size_q
    assert produced <= 3 * size_q + text_rows + q.shape[0] * q.shape[2] * q.shape[1] * 4
    # the real kernel on that layout, with a key mask (a per-element packing) and without
    mask = sv.masks.build({"kind": "sliding_tile", "window": [1, 3, 3]}, layout, heads=1)
    order = layout.token_order("cpu")
    g = torch.Generator().manual_seed(1)
    qh, kh, vh = (torch.randn(2, 2, layout.seq_len, 32, generator=g) for _ in range(3))
    key_valid = torch.ones(2, layout.seq_len, dtype=torch.bool)
    key_valid[0, 5:40] = False
    for table in (None, sv.ops.key_order(order, key_valid)):
        o, lse = block_sparse_attention(qh, kh, vh, mask, token_order=order, kv_token_order=table, backend="triton",
                                        return_lse=True)
        check_against_reference(o, lse, qh, kh, vh, mask, token_order=order, kv_token_order=table)


def test_key_mask_with_one_batch_element_does_not_copy_the_output():
    c, _, _ = _layer_call([{"kind": "sliding_tile", "window": [1, 1, 1]}], B=1, key_mask=True)
    assert c.summary()["syncs"] == 0 and "cat" not in c.ops, c.ops


def test_text_rows_written_in_place_only_without_autograd():
    layout, mask, q, k, v = _case(text=6)
    plan = sv.SparsityPlan(heads=[[{"kind": "sliding_tile", "window": [1, 1, 1]}] * 2], tile=(1, 8, 8))
    groups = sv.SparseAttnProcessor(plan, backend="torch").head_groups(0, layout, "cpu")
    qb, kb, vb = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    order = layout.token_order("cpu")
    with torch.no_grad():
        inference = grouped_attention(qb, kb, vb, groups, order, None, "torch", text_queries(layout))
    trained = grouped_attention(qb, kb, vb, groups, order, None, "torch", text_queries(layout))
    assert torch.allclose(inference, trained, atol=1e-6)
    trained.square().sum().backward()  # the autograd path (cat) still reaches every input
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (qb, kb, vb))


def test_key_mask_over_a_batch_is_one_launch_per_group_with_no_sync_and_no_cat():
    """A key mask gives every batch element its own key order: a [B, L] table that the tiled kernel
    reads with a batch stride, so one launch per layer (not one per batch element) and no cat."""
    c, _, _ = _layer_call([{"kind": "sliding_tile", "window": [1, 1, 1]}], B=3, key_mask=True)
    s = c.summary()
    assert s["syncs"] == 0, c.syncs
    assert s["launches"] == 1 and "cat" not in s["ops"], s
    assert s["host_ops"] <= 8, s["ops"]
    c, _, _ = _layer_call([{"kind": "sliding_tile", "window": [1, 1, 1]}, {"kind": "radial", "dense_frames": 1}],
                          B=3, key_mask=True)
    assert c.summary()["launches"] == 1 and c.summary()["syncs"] == 0  # one per layer: the patterns stacked


@pytest.mark.parametrize("text,where", [(0, "after"), (5, "before")])
def test_tiled_kernel_writes_the_model_layout_itself(text, where):
    """The tiled kernel stores o straight into the model's [B, N, H, D] layout through the order
    (the seam's output is contiguous, no copy back), and a token the order leaves out gets zeros and
    LSE -inf; exact against the float64 reference. Poisoned allocations: a value the kernel failed
    to write would be NaN here."""
    layout, mask, q, k, v = _case(grid=(2, 8, 16), heads=2, D=32, text=text, where=where)
    order = layout.token_order("cpu").clone()
    order[order == 3] = -1  # token 3 left out of the order: never computed, never stored
    qm, km, vm = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, N, H, D], as the model holds them
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = poisoned
    try:
        o = sv.ops.sparse_attention(qm, km, vm, mask, order, backend="triton")
        oh, lse = block_sparse_attention(q, k, v, mask, token_order=order, backend="triton", return_lse=True,
                                         check=False)  # (the order is no longer the layout's)
    finally:
        torch.empty = real_empty
    assert o.is_contiguous() and o.shape == qm.shape
    assert oh.transpose(1, 2).is_contiguous()  # the op's output: [B, H, N, D] over [B, N, H, D] memory
    assert torch.equal(o, oh.transpose(1, 2))
    assert (o[:, 3] == 0).all() and torch.isinf(lse[:, :, 3]).all()
    # Every other row: the reference over the whole order, with token 3 left out as a key.
    from sparse_vdit.ops.reference import reference_attention

    full = layout.token_order("cpu")
    ref_o, ref_lse = reference_attention(q.double(), k.double(), v.double(), mask, token_order=full,
                                         kv_token_order=order)
    rows = torch.arange(layout.seq_len) != 3
    assert (oh - ref_o).abs()[:, :, rows].max() < 1e-5
    assert (lse - ref_lse).abs()[:, :, rows].max() < 1e-5


def test_gpu_part_of_the_overhead_bench_runs(monkeypatch):
    """``bench overhead --part gpu`` as a smoke run on the CPU (interpreter, a tiny shape, key mask
    and text): every timing is there, so a lent GPU's few minutes are not lost to a typo. Its
    numbers mean nothing here."""
    from benchmarks.bench_overhead import GPU_WINDOWS, gpu_rows

    rows = gpu_rows("tiny", 1, device="cpu", shape=(1, (2, 8, 8), 2, 16, 4, "after", True))
    assert len(rows) == len(GPU_WINDOWS)
    for row in rows:
        assert all(row[k] > 0 for k in ("kernel_ms", "seam_ms", "stock_rotation_then_seam_ms", "fused_rotary_ms"))


def test_an_order_listing_more_tokens_than_the_sequence_is_refused():
    """The packed key order holds N rows: an order that lists a token twice (more than N positions
    holding tokens) is refused with what is valid, not packed with keys silently dropped."""
    layout, mask, q, k, v = _case()
    order = layout.token_order("cpu")
    assert (order >= 0).all()  # the order holds every token once: one more block of token 7 is too many
    order = torch.cat([order, torch.full((mask.kv_block,), 7, dtype=torch.int32)])
    with pytest.raises(ValueError, match="at most once"):
        block_sparse_attention(q, k, v, mask, token_order=order, backend="torch")


def test_packed_keys_are_refused_off_the_tiled_kernel_or_in_the_wrong_shape():
    """``kv_tiled`` k and v are read as the tiled kernel's packed key order: another backend, or k and
    v of another shape, is refused with what is valid rather than read as model-order keys."""
    layout, mask, q, k, v = _case()
    order = layout.token_order("cpu")
    key_valid = torch.ones(2, layout.seq_len, dtype=torch.bool)
    key_valid[0, -3:] = False
    per_batch = torch.stack([sv.ops.key_order(order, key_valid[i]) for i in range(2)])
    for backend in ("torch", "torch_masked", "auto"):  # auto on the CPU is never triton
        for kv_order in (None, per_batch):  # a per-batch key order once ran element by element, unchecked
            for check in (False, True):
                with pytest.raises(ValueError, match="needs backend='triton'"):
                    block_sparse_attention(q, k, v, mask, token_order=order, kv_token_order=kv_order, backend=backend,
                                           kv_tiled=True, check=check)
    want = (*q.shape[:2], sv.ops.attention.tiled_key_order(q, mask, order, None).shape[-1], q.shape[3])
    short = k[:, :, :-1]
    with pytest.raises(ValueError, match=re.escape(f"{want} in the packed key order")):
        block_sparse_attention(q, short, short, mask, token_order=order, backend="triton", kv_tiled=True)
