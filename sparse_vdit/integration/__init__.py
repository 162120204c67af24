"""diffusers integration: the processor and its attention strategies, the hook that learns grid and
step, one adapter per family, ``apply`` / ``remove`` and the model-aware plan constructors."""
from .adapters import ADAPTERS, ModelAdapter, adapter_for, attention_shape, check_plan, key_valid_from_mask
from .api import apply, dense_plan, eager_measurement, load_pipeline, remove, set_module_processor, uniform_plan
from .processor import (AttentionStrategy, Binding, HeadGroup, LayerSlot, SparseAttention, SparseAttnProcessor,
                        grouped_attention, text_queries)

__all__ = [
    "ADAPTERS",
    "AttentionStrategy",
    "Binding",
    "HeadGroup",
    "LayerSlot",
    "ModelAdapter",
    "SparseAttention",
    "SparseAttnProcessor",
    "adapter_for",
    "apply",
    "attention_shape",
    "check_plan",
    "dense_plan",
    "eager_measurement",
    "grouped_attention",
    "key_valid_from_mask",
    "load_pipeline",
    "remove",
    "set_module_processor",
    "text_queries",
    "uniform_plan",
]
