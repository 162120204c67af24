"""``VideoLayout``: how video (and text) tokens map onto kernel blocks of spatiotemporal tiles."""
from __future__ import annotations

from dataclasses import dataclass, field
import functools

import torch

from ..ops import freeze, order_digest, tiled_position

TEXT_POSITIONS = ("before", "after")


def _check_positive_ints(name, values, length):
    if not isinstance(values, (tuple, list)) or len(values) != length:
        raise ValueError(f"{name} must be a sequence of {length} positive ints, got {values!r}")
    for x in values:
        if not isinstance(x, int) or isinstance(x, bool) or x < 1:
            raise ValueError(f"{name} must be a sequence of {length} positive ints, got {values!r}")


ORDERS = ("fhw", "hwf")


def check_tile(tile, block: int | None = None) -> tuple[int, int, int]:
    """``tile`` as a tuple of 3 ints >= 0 (0: the whole axis); raises ValueError naming the value and
    what is valid. Without ``block`` the tile is one kernel block, so its volume must be a power of
    two >= 16; with ``block`` a tile may hold any number of tokens (it is padded to whole blocks)."""
    if not isinstance(tile, (tuple, list)) or len(tile) != 3 or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in tile):
        raise ValueError(f"tile must be a sequence of 3 ints >= 0 (t, h, w; 0 = the whole axis), got {tile!r}")
    if block is None:
        vol = tile[0] * tile[1] * tile[2]
        if 0 in tile or vol < 16 or vol & (vol - 1):
            raise ValueError(f"tile volume must be a power of two >= 16 (e.g. (1, 8, 8) = 64, (1, 4, 4) = 16, "
                             f"(2, 8, 8) = 128), got tile {tuple(tile)} = {vol}; give a kernel block size (block=64) "
                             f"for tiles of other sizes (e.g. STA's (6, 8, 8) or (0, 0, 0) for raster order)")
    else:
        check_block(block)
    return tuple(tile)


def check_block(block) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"block (kernel block size) must be a power of two >= 16 (e.g. 64 or 128), got {block!r}")
    return block


def check_order(order) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS} (axes from slowest to fastest: frame-major raster "
                         f"'fhw', or position-major 'hwf' as Sparse VideoGen's temporal heads), got {order!r}")
    return order



def _cached(fn):
    """A read-only property computed once per layout and kept in its ``_cache`` (like
    ``functools.cached_property``, without its lock, which Dynamo cannot trace)."""
    name = fn.__name__

    @functools.wraps(fn)
    def get(self):
        cache = self._cache
        if name not in cache:
            cache[name] = fn(self)
        return cache[name]
    return property(get)

@dataclass(frozen=True)
class VideoLayout:
    """Latent video grid (after patchify), its tiling, and where text tokens sit.

    Args:
        frames, height, width: latent grid in tokens. Any sizes: tiles at the far edges that the grid
            does not fill are padded to whole blocks; padding positions are never attended.
        tile: (t, h, w) tile shape; 0 stands for the whole axis, so (0, 0, 0) is plain raster order.
            Without ``block`` a tile is one kernel block and its volume must be a power of two >= 16
            (e.g. (1, 8, 8) or (2, 4, 8) for 64, (2, 8, 8) for 128).
        text_len: number of text tokens in the same self-attention sequence (0 for Wan, which has
            cross-attention only).
        text_position: "before" (CogVideoX) or "after" (HunyuanVideo, Mochi) the video tokens.
        block: kernel block size (a power of two >= 16); a tile then spans as many blocks as it needs
            (STA's 384-token (6, 8, 8) tiles are 6 blocks of 64), its last one padded.
        order: axis order, slowest first, of the tiles and of the tokens inside a tile: "fhw"
            (frame-major) or "hwf" (position-major: each position's frames are neighbours).

    Model token order: video tokens raster (frame, row, column), text before or after them.
    Tiled order: the tiles in raster order of tile coordinates (axes in ``order``), each tile's tokens
    in raster order, every tile padded to whole blocks, then the text tokens padded to whole blocks.
    """

    frames: int
    height: int
    width: int
    tile: tuple[int, int, int] = (1, 8, 8)
    text_len: int = 0
    text_position: str = "after"
    block: int | None = None
    order: str = "fhw"
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        _check_positive_ints("(frames, height, width)", [self.frames, self.height, self.width], 3)
        object.__setattr__(self, "tile", check_tile(self.tile, self.block))
        check_order(self.order)
        if not isinstance(self.text_len, int) or self.text_len < 0:
            raise ValueError(f"text_len must be an int >= 0, got {self.text_len!r}")
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"text_position must be one of {TEXT_POSITIONS}, got {self.text_position!r}")

    # ------------------------------------------------------------------ sizes
    @property
    def tile_shape(self) -> tuple[int, int, int]:
        """The tile in tokens, a 0 (whole axis) replaced by that axis' size."""
        return tuple(t if t else n for n, t in zip((self.frames, self.height, self.width), self.tile))

    @property
    def block_size(self) -> int:
        if self.block is not None:
            return self.block
        return self.tile[0] * self.tile[1] * self.tile[2]

    @property
    def blocks_per_tile(self) -> int:
        tt, th, tw = self.tile_shape
        return -(-(tt * th * tw) // self.block_size)

    @property
    def tile_grid(self) -> tuple[int, int, int]:
        """Number of tiles along (frames, height, width)."""
        return tuple(-(-n // t) for n, t in zip((self.frames, self.height, self.width), self.tile_shape))

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
        return gt * gh * gw * self.blocks_per_tile

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
    def _axis_perm(self) -> tuple[int, int, int]:
        """Indices into (f, h, w) from the slowest axis to the fastest."""
        return tuple("fhw".index(a) for a in self.order)

    def _tile_of_block(self) -> torch.Tensor:
        """int64 ``[num_video_blocks, 3]``: (t, h, w) tile coordinates of each video block."""
        grid = self.tile_grid
        a, b, c = self._axis_perm()
        i = torch.arange(self.num_video_blocks) // self.blocks_per_tile
        coords = [None, None, None]
        coords[a] = i // (grid[b] * grid[c])
        coords[b] = (i // grid[c]) % grid[b]
        coords[c] = i % grid[c]
        return torch.stack(coords, dim=1)

    @_cached
    def _token_order_cpu(self) -> torch.Tensor:
        tile = self.tile_shape
        a, b, c = self._axis_perm()
        per_tile = self.blocks_per_tile * self.block_size
        # Position p of the video part, decomposed as (tile, in-tile offset); both in ``order``'s axes.
        p = torch.arange(self.num_video_blocks * self.block_size)
        tiles = self._tile_of_block().repeat_interleave(self.block_size, dim=0)
        off = p % per_tile
        offs = [None, None, None]
        offs[a] = off // (tile[b] * tile[c])
        offs[b] = (off // tile[c]) % tile[b]
        offs[c] = off % tile[c]
        f, h, w = (tiles[:, i] * tile[i] + offs[i] for i in range(3))
        inside = (f < self.frames) & (h < self.height) & (w < self.width) & (off < tile[0] * tile[1] * tile[2])
        video = torch.where(inside, self.video_offset + (f * self.height + h) * self.width + w, -1)
        text = torch.full((self.num_text_blocks * self.block_size,), -1, dtype=torch.long)
        text[: self.text_len] = self.text_offset + torch.arange(self.text_len)
        return torch.cat([video, text]).to(torch.int32)

    @_cached
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
            self._cache[key] = freeze(self._token_order_cpu.to(device))
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
        """int64 ``[num_video_blocks, 3]``: (t, h, w) tile coordinates of each video block (the blocks
        of one tile share them)."""
        return self._tile_of_block()

    def frame_range_of_blocks(self) -> torch.Tensor:
        """int64 ``[num_video_blocks, 2]``: first and last latent frame (inclusive) of the tokens in each
        video block (a block of padding only gets its tile's first frame twice). Shared: do not modify."""
        return self._frame_range

    @_cached
    def _frame_range(self) -> torch.Tensor:
        order = self._token_order_cpu[: self.num_video_blocks * self.block_size].long()
        frame = torch.div(order - self.video_offset, self.height * self.width, rounding_mode="floor")
        frame = frame.view(self.num_video_blocks, self.block_size)
        real = order.view_as(frame) >= 0
        big = self.frames
        first = torch.where(real, frame, torch.full_like(frame, big)).min(1).values
        last = torch.where(real, frame, torch.full_like(frame, -1)).max(1).values
        t0 = self.tile_coords()[:, 0] * self.tile_shape[0]
        empty = ~real.any(1)
        first = torch.where(empty, t0.clamp(max=self.frames - 1), first)
        last = torch.where(empty, first, last)
        return torch.stack([first, last], dim=1)

    def block_has_tokens(self) -> torch.Tensor:
        """bool ``[num_blocks]``: False for the blocks of a partly filled tile that hold padding only
        (masks neither visit nor fill them). Shared: do not modify."""
        return self._has_tokens

    @_cached
    def _has_tokens(self) -> torch.Tensor:
        return (self._token_order_cpu.view(self.num_blocks, self.block_size) >= 0).any(1)

    def video_token_blocks(self) -> torch.Tensor:
        """int64 ``[num_video_tokens]``: the kernel block of each video token, tokens in raster
        (frame, row, column) order."""
        return self.block_of_token()[self.video_offset: self.video_offset + self.num_video_tokens]

    def block_of_token(self) -> torch.Tensor:
        """int64 ``[seq_len]``: kernel block of each model token."""
        return self.inverse_order() // self.block_size

    def describe(self) -> str:
        gt, gh, gw = self.tile_grid
        text = f", text {self.text_len} {self.text_position} ({self.num_text_blocks} blocks)" if self.text_len else ""
        order = "" if self.order == "fhw" else f", {self.order} order"
        return (
            f"grid {self.frames}x{self.height}x{self.width} tokens, tile {'x'.join(map(str, self.tile_shape))}{order} "
            f"-> {gt}x{gh}x{gw} tiles = {self.num_video_blocks} blocks of {self.block_size}{text}; "
            f"padding overhead {100 * self.padding_overhead:.1f}%"
        )
