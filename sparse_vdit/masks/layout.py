"""``VideoLayout``: how video (and text) tokens map onto kernel blocks of spatiotemporal tiles."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..ops import order_digest, tiled_position

TEXT_POSITIONS = ("before", "after")


def _check_positive_ints(name, values, length):
    if not isinstance(values, (tuple, list)) or len(values) != length:
        raise ValueError(f"{name} must be a sequence of {length} positive ints, got {values!r}")
    for x in values:
        if not isinstance(x, int) or isinstance(x, bool) or x < 1:
            raise ValueError(f"{name} must be a sequence of {length} positive ints, got {values!r}")


def check_tile(tile) -> tuple[int, int, int]:
    """``tile`` as a tuple of 3 positive ints whose product (the kernel block size) is a power of two
    >= 16; raises ValueError naming the value and what is valid."""
    if not isinstance(tile, (tuple, list)):
        raise ValueError(f"tile must be a sequence of 3 positive ints (t, h, w), got {tile!r}")
    _check_positive_ints("tile", list(tile), 3)
    vol = tile[0] * tile[1] * tile[2]
    if vol < 16 or vol & (vol - 1):
        raise ValueError(f"tile volume must be a power of two >= 16 (e.g. (1, 8, 8) = 64, (1, 4, 4) = 16, "
                         f"(2, 8, 8) = 128), got tile {tuple(tile)} = {vol}")
    return tuple(tile)


@dataclass(frozen=True)
class VideoLayout:
    """Latent video grid (after patchify), its tiling, and where text tokens sit.

    Args:
        frames, height, width: latent grid in tokens. Any sizes: tiles at the far edges that the grid
            does not fill are padded to whole blocks; padding positions are never attended.
        tile: (t, h, w) tile shape; its volume is the kernel block size (a power of two >= 16:
            e.g. (1, 8, 8) or (2, 4, 8) for 64, (2, 8, 8) for 128).
        text_len: number of text tokens in the same self-attention sequence (0 for Wan, which has
            cross-attention only).
        text_position: "before" (CogVideoX) or "after" (HunyuanVideo, Mochi) the video tokens.

    Model token order: video tokens raster (frame, row, column), text before or after them.
    Tiled order: the tiles in raster order of tile coordinates, each tile's tokens in raster order,
    every tile padded to ``block_size`` positions, then the text tokens padded to whole blocks.
    """

    frames: int
    height: int
    width: int
    tile: tuple[int, int, int] = (1, 8, 8)
    text_len: int = 0
    text_position: str = "after"
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        _check_positive_ints("(frames, height, width)", [self.frames, self.height, self.width], 3)
        object.__setattr__(self, "tile", check_tile(self.tile))
        if not isinstance(self.text_len, int) or self.text_len < 0:
            raise ValueError(f"text_len must be an int >= 0, got {self.text_len!r}")
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"text_position must be one of {TEXT_POSITIONS}, got {self.text_position!r}")

    # ------------------------------------------------------------------ sizes
    @property
    def block_size(self) -> int:
        return self.tile[0] * self.tile[1] * self.tile[2]

    @property
    def tile_grid(self) -> tuple[int, int, int]:
        """Number of tiles along (frames, height, width)."""
        return tuple(-(-n // t) for n, t in zip((self.frames, self.height, self.width), self.tile))

    @property
    def num_video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        """Tokens in the model's sequence (video + text)."""
        return self.num_video_tokens + self.text_len

    @property
    def num_video_blocks(self) -> int:
        gt, gh, gw = self.tile_grid
        return gt * gh * gw

    @property
    def num_text_blocks(self) -> int:
        return -(-self.text_len // self.block_size)

    @property
    def num_blocks(self) -> int:
        return self.num_video_blocks + self.num_text_blocks

    @property
    def padded_len(self) -> int:
        """Positions in the tiled sequence, padding included."""
        return self.num_blocks * self.block_size

    @property
    def padding_overhead(self) -> float:
        """Extra positions the tiling adds, as a fraction of the real tokens (work the kernel wastes)."""
        return self.padded_len / self.seq_len - 1.0

    @property
    def video_offset(self) -> int:
        """Model index of the first video token."""
        return self.text_len if self.text_position == "before" else 0

    @property
    def text_offset(self) -> int:
        """Model index of the first text token."""
        return 0 if self.text_position == "before" else self.num_video_tokens

    # ------------------------------------------------------------------ permutation
    @cached_property
    def _token_order_cpu(self) -> torch.Tensor:
        gt, gh, gw = self.tile_grid
        tt, th, tw = self.tile
        # Position p of the video part, decomposed as (tile t/h/w index, in-tile t/h/w offset).
        p = torch.arange(self.num_video_blocks * self.block_size)
        tile_id, off = p // self.block_size, p % self.block_size
        it, ih, iw = tile_id // (gh * gw), (tile_id // gw) % gh, tile_id % gw
        ot, oh, ow = off // (th * tw), (off // tw) % th, off % tw
        f, h, w = it * tt + ot, ih * th + oh, iw * tw + ow
        inside = (f < self.frames) & (h < self.height) & (w < self.width)
        video = torch.where(inside, self.video_offset + (f * self.height + h) * self.width + w, -1)
        text = torch.full((self.num_text_blocks * self.block_size,), -1, dtype=torch.long)
        text[: self.text_len] = self.text_offset + torch.arange(self.text_len)
        return torch.cat([video, text]).to(torch.int32)

    @cached_property
    def order_digest(self) -> tuple[int, int]:
        """Fingerprint of :meth:`token_order`; masks built on this layout record it."""
        return order_digest(self._token_order_cpu)

    def token_order(self, device: torch.device | str | None = None) -> torch.Tensor:
        """int32 ``[padded_len]``: tiled position -> model token index, -1 for padding.

        Cached per device, so a processor asks for it every call at no cost.
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = ("order", str(device))
        if key not in self._cache:
            self._cache[key] = self._token_order_cpu.to(device)
        return self._cache[key]

    def inverse_order(self) -> torch.Tensor:
        """int64 ``[seq_len]``: model token index -> tiled position."""
        return tiled_position(self._token_order_cpu, self.seq_len)

    def to_tiled(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Copy ``x`` (model order along ``dim``) into tiled order, zeros at padding positions.
        The kernel does not need this (it reads through :meth:`token_order`); it is for inspection."""
        order = self.token_order(x.device).long()
        dim = dim % x.dim()
        shape = list(x.shape)
        shape[dim] = order.numel()
        out = x.new_zeros(shape)
        valid = order >= 0
        idx = valid.nonzero().squeeze(1)
        out.index_copy_(dim, idx, x.index_select(dim, order[valid]))
        return out

    def from_tiled(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Inverse of :meth:`to_tiled`: back to model order, padding dropped."""
        inv = self.inverse_order().to(x.device)
        return x.index_select(dim % x.dim(), inv)

    # ------------------------------------------------------------------ coordinates
    def tile_coords(self) -> torch.Tensor:
        """int64 ``[num_video_blocks, 3]``: (t, h, w) tile coordinates of each video block."""
        gt, gh, gw = self.tile_grid
        i = torch.arange(self.num_video_blocks)
        return torch.stack([i // (gh * gw), (i // gw) % gh, i % gw], dim=1)

    def frame_range_of_blocks(self) -> torch.Tensor:
        """int64 ``[num_video_blocks, 2]``: first and last latent frame (inclusive) in each video block."""
        t0 = self.tile_coords()[:, 0] * self.tile[0]
        return torch.stack([t0, (t0 + self.tile[0] - 1).clamp(max=self.frames - 1)], dim=1)

    def block_of_token(self) -> torch.Tensor:
        """int64 ``[seq_len]``: kernel block of each model token."""
        return self.inverse_order() // self.block_size

    def describe(self) -> str:
        gt, gh, gw = self.tile_grid
        text = f", text {self.text_len} {self.text_position} ({self.num_text_blocks} blocks)" if self.text_len else ""
        return (
            f"grid {self.frames}x{self.height}x{self.width} tokens, tile {'x'.join(map(str, self.tile))} "
            f"-> {gt}x{gh}x{gw} tiles = {self.num_video_blocks} blocks of {self.block_size}{text}; "
            f"padding overhead {100 * self.padding_overhead:.1f}%"
        )
