"""Sparsity plans: per layer x head mask specs, versioned JSON tied to a model fingerprint."""
from .plan import PLAN_VERSION, SparsityPlan, model_fingerprint

__all__ = ["PLAN_VERSION", "SparsityPlan", "model_fingerprint"]
