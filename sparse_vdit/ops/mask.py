"""``BlockSparseMask``: which key blocks each query block visits (FlexAttention's BlockMask idea)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .order import freeze


def blocks_to_indices(blocks: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts int32 [..., Mq], indices int32 [..., Mq, width]) of a boolean block matrix: each row's
    visited key blocks first, in increasing order, padded with 0. ``width`` defaults to the longest row."""
    counts = blocks.sum(-1, dtype=torch.int32)
    # Stable sort of "not visited" puts visited block indices first, in increasing order.
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)
    width = blocks.shape[-1] if width is None else width
    indices = order[..., :width].to(torch.int32)
    valid = torch.arange(width, device=blocks.device) < counts.unsqueeze(-1)
    indices = torch.where(valid, indices, torch.zeros_like(indices))
    return counts.contiguous(), indices.contiguous()


def tile_lists(dense: torch.Tensor, R: int, width: int | None = None):
    """The key-block lists of tiles of ``R`` consecutive query blocks of a boolean block matrix
    ``dense [..., Mq, Mk]``: (counts int32 [..., Mt], indices int32 [..., Mt, width], flags int32
    [..., Mt, width]), each tile's key blocks (the union of its query blocks', in increasing order) and
    per entry the bit field of its query blocks that visit it (bit r: the tile's r-th). Mt covers Mq
    rounded up to whole tiles; ``width`` defaults to the longest tile (a read-back)."""
    *lead, Mq, Mk = dense.shape
    Mt = -(-Mq // R)
    padded = dense.new_zeros(*lead, Mt * R, Mk)
    padded[..., :Mq, :] = dense
    sub = padded.view(*lead, Mt, R, Mk)
    union = sub.any(dim=-2)
    width = max(int(union.sum(-1).max()), 1) if width is None else width
    counts, indices = blocks_to_indices(union, width)
    bits = (sub.to(torch.int32) << torch.arange(R, device=dense.device, dtype=torch.int32)[:, None]).sum(-2)
    flags = torch.gather(bits, -1, indices.long()).to(torch.int32)
    valid = torch.arange(width, device=dense.device) < counts.unsqueeze(-1)
    return counts, indices, torch.where(valid, flags, torch.zeros_like(flags)).contiguous()


def block_lookup_mask_mod(blocks: torch.Tensor, q_block: int, kv_block: int, key_ok: torch.Tensor | None = None):
    """A FlexAttention ``mask_mod`` that looks tokens up in a block matrix ``[Bm, H, Mq, Mk]``
    (broadcast over batch / heads where that dimension is 1); ``key_ok`` (bool [L]) also rules keys out."""
    Bm, Hm = blocks.shape[:2]

    def mask_mod(b, h, q_idx, kv_idx):
        bb = b if Bm > 1 else torch.zeros_like(b)
        hh = h if Hm > 1 else torch.zeros_like(h)
        visit = blocks[bb, hh, q_idx // q_block, kv_idx // kv_block]
        return visit if key_ok is None else visit & key_ok[kv_idx]

    return mask_mod


def block_pair(block_size) -> tuple[int, int]:
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        q_block, kv_block = block_size, block_size
    elif isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        q_block, kv_block = int(block_size[0]), int(block_size[1])
    else:
        raise ValueError(f"block_size must be an int or a (q_block, kv_block) pair, got {block_size!r}")
    for name, b in (("q_block", q_block), ("kv_block", kv_block)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (e.g. 64 or 128), got {b}")
    return q_block, kv_block


@dataclass(frozen=True, eq=False)
class BlockSparseMask:
    """Per (batch-or-broadcast, head, query block): how many key blocks to visit, and which.

    kv_counts:  int32 [Bm, H, Mq], Bm is 1 (broadcast over batch) or the batch size.
    kv_indices: int32 [Bm, H, Mq, K], the first ``kv_counts`` entries of each row are the visited
                key-block indices in increasing order; the rest is padding (0).
    q_block, kv_block: tokens per query / key block.
    num_kv_blocks: Mk, the number of key blocks of the sequence.

    Masks hold whole blocks only: a block is computed fully or skipped. Build one with
    :meth:`from_dense`.
    """

    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    q_block: int
    kv_block: int
    num_kv_blocks: int
    # (length, checksum) of the token order of the layout the mask was built for (``VideoLayout``),
    # or None for a mask over plain token order. The attention entry checks the order it is given.
    token_order_digest: tuple[int, int] | None = None
    # Built per call on the device (``ops.select``): what is derived from it takes its widths from
    # the index tensor's shape, never from a read-back, so a call that builds one makes no host sync.
    selected: bool = False
    _derived: dict = field(default_factory=dict, repr=False, compare=False)  # per-mask caches (query tiles)

    def __post_init__(self):
        # Immutable by contract: the backends' index-table caches may key by these tensors (ops.order.freeze).
        freeze(self.kv_counts)
        freeze(self.kv_indices)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, blocks: torch.Tensor, block_size: int | tuple[int, int] = 64) -> "BlockSparseMask":
        """Build from a boolean block matrix ``[H, Mq, Mk]`` or ``[B, H, Mq, Mk]``.

        ``blocks[..., i, j]`` is True when query block ``i`` visits key block ``j``.
        ``block_size`` is an int or a ``(q_block, kv_block)`` pair.
        """
        if not isinstance(blocks, torch.Tensor):
            raise TypeError(f"blocks must be a torch.Tensor, got {type(blocks).__name__}")
        if blocks.dim() == 3:
            blocks = blocks.unsqueeze(0)
        if blocks.dim() != 4:
            raise ValueError(
                f"blocks must have shape [H, Mq, Mk] or [B, H, Mq, Mk], got {tuple(blocks.shape)}"
            )
        if blocks.dtype != torch.bool:
            raise ValueError(f"blocks must be a bool tensor, got dtype {blocks.dtype}")
        if min(blocks.shape) == 0:
            raise ValueError(f"blocks has an empty dimension: {tuple(blocks.shape)}")
        q_block, kv_block = block_pair(block_size)
        width = max(int(blocks.sum(-1).max()), 1)
        counts, indices = blocks_to_indices(blocks, width)
        return cls(counts, indices, q_block, kv_block, blocks.shape[-1])

    @classmethod
    def from_indices(
        cls,
        kv_counts: torch.Tensor,
        kv_indices: torch.Tensor,
        block_size: int | tuple[int, int],
        num_kv_blocks: int,
    ) -> "BlockSparseMask":
        """Build from counts ``[Bm, H, Mq]`` and indices ``[Bm, H, Mq, K]`` (validated)."""
        q_block, kv_block = block_pair(block_size)
        if kv_counts.dim() == 2:
            kv_counts = kv_counts.unsqueeze(0)
        if kv_indices.dim() == 3:
            kv_indices = kv_indices.unsqueeze(0)
        if kv_counts.dim() != 3 or kv_indices.dim() != 4 or kv_indices.shape[:3] != kv_counts.shape:
            raise ValueError(
                "kv_counts must be [Bm, H, Mq] and kv_indices [Bm, H, Mq, K] with matching leading dims, "
                f"got {tuple(kv_counts.shape)} and {tuple(kv_indices.shape)}"
            )
        if kv_counts.min() < 0 or kv_counts.max() > min(kv_indices.shape[-1], num_kv_blocks):
            raise ValueError(
                f"kv_counts must lie in [0, {min(kv_indices.shape[-1], num_kv_blocks)}], "
                f"got range [{int(kv_counts.min())}, {int(kv_counts.max())}]"
            )
        valid = torch.arange(kv_indices.shape[-1], device=kv_indices.device) < kv_counts.unsqueeze(-1)
        used = kv_indices[valid]
        if used.numel() and (used.min() < 0 or used.max() >= num_kv_blocks):
            raise ValueError(
                f"kv_indices must lie in [0, {num_kv_blocks - 1}] (num_kv_blocks={num_kv_blocks}), "
                f"got range [{int(used.min())}, {int(used.max())}]"
            )
        indices = torch.where(valid, kv_indices, torch.zeros_like(kv_indices))
        return cls(kv_counts.to(torch.int32).contiguous(), indices.to(torch.int32).contiguous(),
                   q_block, kv_block, int(num_kv_blocks))

    # ------------------------------------------------------------------ properties
    @property
    def batch(self) -> int:
        return self.kv_counts.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_counts.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_counts.shape[2]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(Bm, H, Mq, Mk) of the block matrix."""
        return (self.batch, self.heads, self.num_q_blocks, self.num_kv_blocks)

    @property
    def device(self) -> torch.device:
        return self.kv_counts.device

    def query_tiles(self, tile_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mask seen by ``tile_rows``-row query tiles (the tiled kernel's unit), cached per mask.

        Returns (counts int32 [Bm, H, Mt], indices int32 [Bm, H, Mt, K], flags int32 [Bm, H, Mt, K]):
        each tile's key blocks (the union over its ``tile_rows // q_block`` mask query blocks, in
        increasing order) and, per entry, the bit field of the sub-blocks that visit it (bit r set:
        sub-block r does). Mt covers ``num_q_blocks`` rounded up to whole tiles.
        """
        if tile_rows % self.q_block:
            raise ValueError(f"tile_rows {tile_rows} must be a multiple of q_block {self.q_block}")
        key = ("query_tiles", tile_rows)
        if key not in self._derived:
            R = tile_rows // self.q_block
            if R > 16:
                raise ValueError(f"a query tile may span at most 16 mask query blocks, got {R}")
            width = min(self.shape[3], R * self.kv_indices.shape[-1]) if self.selected else None
            self._derived[key] = tile_lists(self.to_dense(), R, width)
        return self._derived[key]

    def to(self, device) -> "BlockSparseMask":
        return BlockSparseMask(self.kv_counts.to(device), self.kv_indices.to(device),
                               self.q_block, self.kv_block, self.num_kv_blocks, self.token_order_digest, self.selected)

    def for_token_order(self, digest: tuple[int, int] | None) -> "BlockSparseMask":
        """The same blocks, recorded as built for the token order with this ``order_digest``."""
        return BlockSparseMask(self.kv_counts, self.kv_indices, self.q_block, self.kv_block, self.num_kv_blocks, digest,
                               self.selected)

    def batch_element(self, b: int) -> "BlockSparseMask":
        """The mask of batch element ``b`` (batch 1); a broadcast mask (batch 1) is itself."""
        if self.batch == 1:
            return self
        return BlockSparseMask(self.kv_counts[b:b + 1], self.kv_indices[b:b + 1], self.q_block, self.kv_block,
                               self.num_kv_blocks, self.token_order_digest, self.selected)

    # ------------------------------------------------------------------ conversions
    def to_dense(self) -> torch.Tensor:
        """Boolean block matrix ``[Bm, H, Mq, Mk]``."""
        Bm, H, Mq, Mk = self.shape
        valid = torch.arange(self.kv_indices.shape[-1], device=self.device) < self.kv_counts.unsqueeze(-1)
        dense = torch.zeros(Bm, H, Mq, Mk + 1, dtype=torch.bool, device=self.device)
        # Padding entries scatter into an extra column that is dropped.
        idx = torch.where(valid, self.kv_indices.long(), torch.full_like(self.kv_indices, Mk, dtype=torch.long))
        dense.scatter_(-1, idx, True)
        return dense[..., :Mk]

    def density(self) -> float:
        """Fraction of (query block, key block) pairs visited, averaged over batch and heads (read back
        once per mask, then cached: masks are immutable)."""
        if "density" not in self._derived:
            self._derived["density"] = float(self.kv_counts.sum()) / (self.kv_counts.numel() * self.num_kv_blocks)
        return self._derived["density"]

    def head_density(self) -> torch.Tensor:
        """Density per head, float [H] (averaged over the mask's batch dimension)."""
        return self.kv_counts.double().sum(dim=(0, 2)) / (self.batch * self.num_q_blocks * self.num_kv_blocks)

    def to_flex(self, seq_len: int):
        """The same blocks as a ``torch.nn.attention.flex_attention.BlockMask`` over ``seq_len`` tokens.

        Blocks wholly inside the sequence are passed as "full" blocks (no per-token mask) and the
        block lookup is also given as ``mask_mod``, so eager FlexAttention (which evaluates
        ``mask_mod`` densely) and compiled FlexAttention (which walks the blocks) agree.
        """
        from torch.nn.attention.flex_attention import BlockMask

        self.check_seq_len(seq_len)
        dense = self.to_dense()
        mask_mod = block_lookup_mask_mod(dense, self.q_block, self.kv_block)
        tail_partial = seq_len % self.kv_block != 0
        full = dense.clone()
        partial = torch.zeros_like(dense)
        if tail_partial:
            full[..., -1] = False
            partial[..., -1] = dense[..., -1]

        p_cnt, p_idx = blocks_to_indices(partial)
        f_cnt, f_idx = blocks_to_indices(full)
        return BlockMask.from_kv_blocks(
            p_cnt, p_idx, f_cnt, f_idx,
            BLOCK_SIZE=(self.q_block, self.kv_block), mask_mod=mask_mod, seq_lengths=(seq_len, seq_len),
        )

    # ------------------------------------------------------------------ checks and display
    def check_seq_len(self, seq_len: int, padded_len: int | None = None) -> None:
        """Raise ValueError unless the block counts fit a sequence of ``seq_len`` tokens.

        ``padded_len`` is the length of the tiled sequence when a token order is used.
        """
        length = seq_len if padded_len is None else padded_len
        want_q = -(-length // self.q_block)
        want_kv = -(-length // self.kv_block)
        if self.num_q_blocks != want_q or self.num_kv_blocks != want_kv:
            what = f"sequence of {seq_len} tokens" if padded_len is None else f"tiled sequence of {padded_len} positions"
            raise ValueError(
                f"mask has {self.num_q_blocks} query blocks x {self.num_kv_blocks} key blocks of "
                f"{self.q_block}x{self.kv_block} tokens, but a {what} needs {want_q} x {want_kv}"
            )

    def to_string(self, max_blocks: int = 32) -> str:
        """Text picture of each head's block matrix ('#' visited, '.' skipped), for small masks."""
        dense = self.to_dense().cpu()
        lines = []
        for b in range(self.batch):
            for h in range(self.heads):
                lines.append(f"batch {b} head {h}: density {float(dense[b, h].float().mean()):.3f}")
                for row in dense[b, h, :max_blocks, :max_blocks]:
                    tail = " ..." if self.num_kv_blocks > max_blocks else ""
                    lines.append("".join("#" if x else "." for x in row.tolist()) + tail)
                if self.num_q_blocks > max_blocks:
                    lines.append("...")
        return "\n".join(lines)

    def __repr__(self) -> str:
        Bm, H, Mq, Mk = self.shape
        return (
            f"BlockSparseMask(shape=(batch={Bm}, heads={H}, q_blocks={Mq}, kv_blocks={Mk}), "
            f"block=({self.q_block}, {self.kv_block}), density={self.density():.4f}, device={self.device})"
        )
