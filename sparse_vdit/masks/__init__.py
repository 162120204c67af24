"""Video token layout and the spatiotemporal mask families, defined on tiles."""
from .families import DEFAULTS, KINDS, block_matrix, build, normalize_spec, radial_rule, sink_blocks, spec_name
from .layout import VideoLayout

__all__ = [
    "DEFAULTS",
    "KINDS",
    "VideoLayout",
    "block_matrix",
    "build",
    "normalize_spec",
    "radial_rule",
    "sink_blocks",
    "spec_name",
]
