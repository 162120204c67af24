"""diffusers integration: the processor, the hook that learns grid and step, one adapter per family."""
from ..plan import register_attention_shape_resolver
from .adapters import ADAPTERS, ModelAdapter, adapter_for, attention_shape
from .api import apply, load_pipeline, remove
from .processor import SparseAttnProcessor

register_attention_shape_resolver(attention_shape)

__all__ = ["ADAPTERS", "ModelAdapter", "SparseAttnProcessor", "adapter_for", "apply", "attention_shape", "load_pipeline", "remove"]
