"""The ``dynamic`` family on a layout: its static part (window, text keys, sinks) built once, the
key blocks selected per call from q and k on the device (``ops.select_blocks``)."""
from __future__ import annotations

import torch

from ..ops import BlockSparseMask, select_blocks, selection_flops
from .families import Spec, block_matrix, is_dynamic, spec_layout, without_temperature
from .layout import VideoLayout


class DynamicSelection:
    """Per call, the mask of a ``dynamic`` spec's heads on ``layout``.

    ``static``: bool ``[Hs, M, M]`` (Hs 1 or the heads) blocks always visited; default the spec's
    own block matrix (window, text keys, sinks) with the text query rows emptied, as the processor
    runs text queries dense beside the kernel (``text_rows=False`` keeps them). Calling it with q, k
    ``[B, N, H, D]`` (model order) returns a ``BlockSparseMask`` ``[B, H, M, width]`` on the layout's
    token order; nothing is read back to the host."""

    def __init__(self, spec: str | Spec, layout: VideoLayout, device=None, static: torch.Tensor | None = None,
                 text_rows: bool = False):
        spec = without_temperature(spec)
        if not is_dynamic(spec):
            raise ValueError(f"{spec['kind']} is not a dynamic family")
        self.spec = spec
        self.layout = spec_layout(spec, layout)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if static is None:
            static = block_matrix(spec, self.layout, device)
            if self.layout.text_len and not text_rows:
                static = static.clone()
                static[self.layout.num_video_blocks:] = False
        static = static if static.dim() == 3 else static[None]
        self.static = static.to(device)
        self.static_width = max(int(self.static.sum(-1).max()), 1)  # once per layout: the mask's width is fixed
        self.keep = int(spec["keep"])
        self.mass = spec["mass"]

    def __call__(self, q, k, key_valid=None, scale=None) -> BlockSparseMask:
        lay = self.layout
        return select_blocks(q, k, self.static, lay.token_order(q.device), lay.block_size, self.keep,
                             self.static_width, mass=self.mass, key_valid=key_valid, scale=scale,
                             digest=lay.order_digest)

    @property
    def width(self) -> int:
        """Key blocks per row of every mask it makes."""
        return min(self.static.shape[-1], self.static_width + self.keep)

    def selection_cost(self, head_dim: int) -> float:
        """Selection FLOPs as a fraction of dense attention's on this layout (``ops.selection_flops``)."""
        select, dense = selection_flops(self.layout.seq_len, self.layout.block_size, head_dim)
        return select / dense
