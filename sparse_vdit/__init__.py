"""sparse_vdit: block-sparse attention for video diffusion transformers."""
from __future__ import annotations

from . import masks, ops, plan, viz
from .analysis import analyze, edit
from .calibration import calibrate
from .integration import SparseAttnProcessor, apply, dense_plan, remove, uniform_plan
from .masks import VideoLayout
from .ops import BlockSparseMask, block_sparse_attention, reference_attention
from .plan import SparsityPlan

__version__ = "0.1.0"

__all__ = [
    "BlockSparseMask",
    "SparseAttnProcessor",
    "SparsityPlan",
    "VideoLayout",
    "analyze",
    "apply",
    "block_sparse_attention",
    "calibrate",
    "dense_plan",
    "edit",
    "masks",
    "ops",
    "plan",
    "reference_attention",
    "remove",
    "uniform_plan",
    "viz",
    "__version__",
]
