"""The seed paper's findings as tools: :func:`analyze` (structure, sparsity, sinks, temperature)."""
from . import edit, quality
from .analyze import AnalysisAttention, LayerAnalysis, analyze, distance_profile, summarize, topk_mask
from .report import save_analysis

__all__ = ["AnalysisAttention", "edit", "quality", "LayerAnalysis", "analyze", "distance_profile", "save_analysis", "summarize",
           "topk_mask"]
