"""Each adapter's sparse_forward mirrors one diffusers processor (``adapter.mirrors``). Run the
mirror with dense attention (SDPA, no mask code of ours) against the installed diffusers' stock
processor on a tiny model: this fails when diffusers changes the computation we copied."""
import pytest
import torch

import sparse_vdit as sv
from sparse_vdit.integration import ADAPTERS, AttentionStrategy, adapter_for
from sparse_vdit.ops import dense_attention
from sparse_vdit.testing import FAMILIES, make


class DenseMirror(AttentionStrategy):
    """Runs every planned layer through the adapter's mirror, with plain dense attention."""

    def __init__(self):
        self.calls = 0

    def runs(self, slot):
        return slot.layer is not None and slot.layout is not None

    def attend(self, q, k, v, slot, key_valid=None):
        self.calls += 1
        return dense_attention(q, k, v, key_valid=key_valid)


def test_every_adapter_names_what_it_mirrors():
    import diffusers

    for adapter in ADAPTERS:
        where, version = adapter.mirrors
        assert "::" in where and version, adapter.family
        path, cls = where.split("::")
        module = path.removesuffix(".py").replace("/", ".")
        mod = __import__(f"diffusers.{module}", fromlist=[cls])
        assert hasattr(mod, cls), f"{adapter.family}: diffusers {diffusers.__version__} has no {where}"


@pytest.mark.parametrize("family", FAMILIES)
def test_mirror_equals_installed_stock_processor(family):
    model, call = make(family)
    with torch.no_grad():
        ref = call(model, batch=2, grid=(2, 8, 8))
        strategy = DenseMirror()
        sv.apply(model, sv.dense_plan(model, tile=(1, 4, 4)), attention=strategy)
        out = call(model, batch=2, grid=(2, 8, 8))
        sv.remove(model)
    layers, _ = sv.integration.attention_shape(model)
    assert strategy.calls == layers  # every planned layer went through the mirror
    rel = float((out - ref).norm() / ref.norm())
    assert rel <= 1e-5, (f"{family}: the adapter's copy of {adapter_for(model).mirrors[0]} differs from the installed "
                         f"diffusers' processor (relative error {rel:.2e}): update the adapter")
