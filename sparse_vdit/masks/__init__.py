"""Video token layout and the spatiotemporal mask families (a registry): our own on tiles, the peers' on
their own token partitions (``peers``)."""
from . import peers
from .families import (DEFAULTS, FAMILIES, KINDS, MaskFamily, block_matrix, build, ladder, normalize_spec, radial_rule,
                       head_densities, mask_layout, register_family, sink_blocks, spec_layout, spec_name, svg_attend,
                       video_blocks, without_temperature, is_dynamic, dynamic_max_density)
from .dynamic import DynamicSelection
from .layout import VideoLayout, check_tile

__all__ = [
    "DEFAULTS",
    "DynamicSelection",
    "dynamic_max_density",
    "is_dynamic",
    "FAMILIES",
    "KINDS",
    "MaskFamily",
    "VideoLayout",
    "check_tile",
    "block_matrix",
    "build",
    "ladder",
    "normalize_spec",
    "radial_rule",
    "register_family",
    "sink_blocks",
    "spec_name",
    "spec_layout",
    "mask_layout",
    "head_densities",
    "video_blocks",
    "svg_attend",
    "without_temperature",
    "peers",
]
