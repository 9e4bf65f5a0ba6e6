"""Where each parameter lives in a chunked flat buffer (see :mod:`secant.linalg.lbfgs`).

A :class:`BlockLayout` places blocks of parameters one after the other in a ``[K, c]`` buffer,
each block padded to whole chunks of ``c`` entries, and hands out per-parameter views into any
buffer of that shape, so that ``torch._foreach_*`` ops act on parameters and flat state alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class BlockLayout:
    """Chunked flat layout of ``blocks`` (each a sequence of parameters)."""

    def __init__(self, blocks: Sequence[Sequence[Tensor]], chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        largest = max((sum(p.numel() for p in b) for b in blocks), default=1)
        # No wider than the largest block, rounded up to a multiple of 64 entries.
        self.chunk_size = min(chunk_size, -(-largest // 64) * 64)
        self.params: list[Tensor] = []
        self.offsets: list[int] = []
        chunk_block: list[int] = []
        offset = 0
        for b, block in enumerate(blocks):
            start = offset
            for p in block:
                self.params.append(p)
                self.offsets.append(offset)
                offset += p.numel()
            chunks = max(1, -(-(offset - start) // self.chunk_size))
            chunk_block += [b] * chunks
            offset = start + chunks * self.chunk_size
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.num_blocks = len(blocks)
        self.block_sizes = [sum(p.numel() for p in b) for b in blocks]
        device = self.params[0].device if self.params else torch.device("cpu")
        self.chunk_block = torch.tensor(chunk_block, dtype=torch.long, device=device)
        self.shape = (len(chunk_block), self.chunk_size)

    def new_buffer(self, dtype: torch.dtype | None = None) -> Tensor:
        """A zero ``[K, c]`` buffer on the parameters' device."""
        dtype = dtype or (self.params[0].dtype if self.params else torch.float32)
        return torch.zeros(self.shape, dtype=dtype, device=self.chunk_block.device)

    def views(self, buf: Tensor, params: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Views of ``buf`` shaped like ``params`` (default: all parameters, in layout order)."""
        flat = buf.view(-1)
        out = []
        for p in self.params if params is None else params:
            o = self.offsets[self._index[id(p)]]
            out.append(flat[o : o + p.numel()].view_as(p))
        return out
