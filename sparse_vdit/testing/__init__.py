"""Tiny diffusers models for tests, the demo and dry runs (no download): a tiny Wan trained on a
synthetic world of moving shapes, whose attention was learned (:mod:`.shapes`, weights shipped); a
whole Wan pipeline with random weights and planted local attention (:mod:`.wan`); and one tiny
random transformer per family with matching forward inputs (:mod:`.families`)."""
from .families import FAMILIES, make, runner
from .shapes import learned_wan_pipeline
from .text import tiny_text_encoder, tiny_tokenizer
from .wan import (plant_local_attention, plant_sink_frame, planted_sink_transformer, tiny_wan_pipeline,
                  tiny_wan_transformer)

__all__ = ["FAMILIES", "learned_wan_pipeline", "make", "runner", "tiny_text_encoder", "tiny_tokenizer", "plant_local_attention", "plant_sink_frame", "planted_sink_transformer", "tiny_wan_pipeline", "tiny_wan_transformer"]
