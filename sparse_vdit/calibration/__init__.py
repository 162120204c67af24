"""Calibration: measure each head's output error under candidate masks and choose per-head masks."""
from .calibrate import DEFAULT_CANDIDATES, calibrate, decide
from .measure import block_mass, head_errors, mass_inside, sink_frames
from .report import save_report

__all__ = ["DEFAULT_CANDIDATES", "block_mass", "calibrate", "decide", "head_errors", "mass_inside", "save_report", "sink_frames"]
