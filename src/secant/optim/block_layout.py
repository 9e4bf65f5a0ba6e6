"""Where each parameter lives in a chunked flat buffer (see :mod:`secant.linalg.lbfgs`).

A :class:`BlockLayout` places blocks of parameters one after the other in a ``[K, c]`` buffer,
each block padded to whole chunks of ``c`` entries, and hands out per-parameter views into any
buffer of that shape, so that ``torch._foreach_*`` ops act on parameters and flat state alike.
A ``DTensor`` parameter (FSDP2) is laid out by its local shard: its views have the shard's
shape, and ``_foreach_*`` ops pair them with the local tensors
(:func:`secant.distributed.local`).

For distributed training the blocks are split into ``shards`` (one per rank). Shard ``r`` holds
chunks ``[r·K_s, r·K_s + K_r)`` with ``K_s`` the largest shard's chunk count; the rest of its
section is zero padding. A rank's own slice is then exactly what it contributes to an
``all_gather_into_tensor`` whose output is the first ``curvature_rows`` rows of a full-layout
buffer. Blocks in no shard (parameters that get no curvature) are laid out after all shards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from secant.distributed.sharding import local


class BlockLayout:
    """Chunked flat layout of ``blocks`` (each a sequence of parameters), split into shards.

    ``dtype`` is the buffers' dtype (default: the parameters' dtype).
    """

    def __init__(
        self,
        blocks: Sequence[Sequence[Tensor]],
        chunk_size: int,
        shards: Sequence[Sequence[int]] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        shards = [list(range(len(blocks)))] if shards is None else [list(s) for s in shards]
        shapes = {p: local(p).shape for b in blocks for p in b}  # tensors hash by identity
        self.block_sizes = [sum(shapes[p].numel() for p in b) for b in blocks]
        # No wider than the largest block, rounded up to a multiple of 64 entries.
        widest = max([1, *self.block_sizes])
        self.chunk_size = c = min(chunk_size, -(-widest // 64) * 64)
        chunks = [max(1, -(-n // c)) for n in self.block_sizes]
        self.shard_size = max((sum(chunks[b] for b in s) for s in shards), default=0)
        self.curvature_rows = self.shard_size * len(shards)
        sharded = {b for s in shards for b in s}
        unsharded = [b for b in range(len(blocks)) if b not in sharded]
        self.params: list[Tensor] = []
        self.shapes: list[torch.Size] = []  # local shapes
        self.offsets: list[int] = []
        self.block_chunks: list[range] = [range(0)] * len(blocks)
        chunk_block = [0] * (self.curvature_rows + sum(chunks[b] for b in unsharded))
        self.shards = shards
        starts = [r * self.shard_size for r in range(len(shards))] + [self.curvature_rows]
        for start, shard in zip(starts, [*shards, unsharded]):
            k = start
            for b in shard:
                offset = k * c
                for p in blocks[b]:
                    self.params.append(p)
                    self.shapes.append(shapes[p])
                    self.offsets.append(offset)
                    offset += shapes[p].numel()
                self.block_chunks[b] = range(k, k + chunks[b])
                chunk_block[k : k + chunks[b]] = [b] * chunks[b]
                k += chunks[b]
        self._index = {p: i for i, p in enumerate(self.params)}  # tensors hash by identity
        self.num_blocks = len(blocks)
        device = self.params[0].device if self.params else torch.device("cpu")
        if dtype is None:
            dtype = self.params[0].dtype if self.params else torch.float32
        self.dtype = dtype
        self.chunk_block = torch.tensor(chunk_block, dtype=torch.long, device=device)
        self.shape = (len(chunk_block), c)

    def shard_chunks(self, rank: int) -> slice:
        """Chunks owned by shard ``rank`` (without its padding)."""
        start = rank * self.shard_size
        return slice(start, start + sum(len(self.block_chunks[b]) for b in self.shards[rank]))

    def new_buffer(self, chunks: int | None = None) -> Tensor:
        """A zero ``[chunks, c]`` buffer (default: the full layout) on the parameters' device."""
        rows = self.shape[0] if chunks is None else chunks
        return torch.zeros(rows, self.chunk_size, dtype=self.dtype, device=self.chunk_block.device)

    def runs(self, params: Sequence[Tensor], first_chunk: int = 0
             ) -> list[tuple[slice, list[Tensor]]]:
        """``params`` (in layout order) as the maximal runs that lie back to back in a
        buffer: ``(slice of the flat buffer, the run's parameters)``. A buffer that starts at
        chunk ``first_chunk`` as in :meth:`views`. One op per run instead of one per view keeps
        a compiled step from scattering into the whole buffer once per parameter."""
        origin = first_chunk * self.chunk_size
        out: list[tuple[slice, list[Tensor]]] = []
        for p in params:
            i = self._index[p]
            start = self.offsets[i] - origin
            stop = start + self.shapes[i].numel()
            if out and out[-1][0].stop == start:
                out[-1] = (slice(out[-1][0].start, stop), [*out[-1][1], p])
            else:
                out.append((slice(start, stop), [p]))
        return out

    def views(self, buf: Tensor, params: Sequence[Tensor] | None = None,
              first_chunk: int = 0) -> list[Tensor]:
        """Views of ``buf`` shaped like ``params`` (default: all parameters, in layout order).

        ``buf`` may be a slice of the layout that starts at chunk ``first_chunk``.
        """
        flat = buf.view(-1)
        origin = first_chunk * self.chunk_size
        out = []
        for p in self.params if params is None else params:
            i = self._index[p]
            o, shape = self.offsets[i] - origin, self.shapes[i]
            out.append(flat[o : o + shape.numel()].view(shape))
        return out
