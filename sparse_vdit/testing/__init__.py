"""Tiny random-weight diffusers models for tests, the demo and dry runs (no download): a whole Wan
pipeline with planted local attention (:mod:`.wan`), and one tiny transformer per family with
matching forward inputs (:mod:`.families`)."""
from .families import FAMILIES, make, runner
from .text import tiny_text_encoder, tiny_tokenizer
from .wan import (plant_local_attention, plant_sink_frame, planted_sink_transformer, tiny_wan_pipeline,
                  tiny_wan_transformer)

__all__ = ["FAMILIES", "make", "runner", "tiny_text_encoder", "tiny_tokenizer", "plant_local_attention", "plant_sink_frame", "planted_sink_transformer", "tiny_wan_pipeline", "tiny_wan_transformer"]
