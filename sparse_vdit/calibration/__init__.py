"""Calibration: measure each head's output error under candidate masks and choose per-head masks."""
from .calibrate import (DEFAULT_CANDIDATES, MeasuringAttention, calibrate, calibration_prompts, decide, dense_reasons,
                        pipeline_runner, sample_step_indices)
from .measure import (LayerMeasurement, head_errors, layer_attention_mass, mass_inside, option_names, sink_frames,
                      top_key_share)
from .report import save_report

__all__ = ["DEFAULT_CANDIDATES", "LayerMeasurement", "MeasuringAttention", "calibrate", "calibration_prompts",
           "decide", "dense_reasons", "head_errors", "pipeline_runner", "sample_step_indices",
           "layer_attention_mass", "mass_inside", "option_names", "save_report", "sink_frames", "top_key_share"]
