"""A pool of fixed-size KV blocks: a free list and a reference count per block (plain Python, no JAX).

Holders of a block are sequences (one reference each) and the radix prefix cache (one reference while the block
is in the tree). A block returns to the free list when its count reaches zero.
"""
from __future__ import annotations

import collections
from typing import Deque, List


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 (got {num_blocks})")
        self.num_blocks = num_blocks
        self.refcount: List[int] = [0] * num_blocks
        self.free: Deque[int] = collections.deque(range(num_blocks))   # lowest ids first

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        """Pop a free block with refcount 1. Precondition: num_free > 0."""
        b = self.free.popleft()
        assert self.refcount[b] == 0
        self.refcount[b] = 1
        return b

    def incref(self, b: int) -> None:
        assert self.refcount[b] > 0, f"incref of free block {b}"
        self.refcount[b] += 1

    def decref(self, b: int) -> int:
        """Drop one reference; the block is freed at zero. Returns the new count."""
        assert self.refcount[b] > 0, f"double free of block {b}"
        self.refcount[b] -= 1
        if self.refcount[b] == 0:
            self.free.append(b)
        return self.refcount[b]
