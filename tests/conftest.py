import os

import torch

# Kernels run through Triton's interpreter when there is no GPU; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI runs the same property-test examples every time (a failure there is reproducible); local runs
# explore new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def nan_empty(monkeypatch):
    """Fill every floating tensor from torch.empty / empty_like / Tensor.new_empty with NaN, so output
    a kernel or backend fails to write shows (flash-linear-attention's habit)."""
    def poison(real):
        def poisoned(*args, **kwargs):
            t = real(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(float("nan"))
            return t

        return poisoned

    monkeypatch.setattr(torch, "empty", poison(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poison(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", poison(torch.Tensor.new_empty))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
