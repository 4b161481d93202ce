"""A pool of fixed-size KV blocks: ids, a reference count per block, a FIFO free list (plain Python, no JAX).

The same class serves the device pool and the host (swap) pool. It knows nothing about who holds a block: the
`BlockManager` and the `RadixCache` each take one reference per holding (a sequence's block table entry, a radix
node). A block returns to the free list when its count reaches zero.

Each block also carries a `version` that changes whenever its bytes may change (every allocation; in-place
appends bump it through `touch`). Swap uses it to know whether an earlier copy of a block is still identical.
"""
from __future__ import annotations

import collections
from typing import Deque, List


class OutOfBlocksError(RuntimeError):
    """Raised by a check-then-act call that cannot get the blocks it needs; nothing was changed."""


class BlockPool:
    """Blocks `0 .. num_blocks-1`. Contracts: `allocate` needs `num_free > 0`; `incref`/`decref` need the block
    to be allocated (refcount > 0). Violations raise (AssertionError for a double free / use of a free block)."""

    __slots__ = ("num_blocks", "refcount", "version", "free")

    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0 (got {num_blocks})")
        self.num_blocks = num_blocks
        self.refcount: List[int] = [0] * num_blocks
        self.version: List[int] = [0] * num_blocks
        # FIFO: the lowest ids go first at start, then blocks in the order they were freed.
        self.free: Deque[int] = collections.deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        """Pop the next free block; it leaves with refcount 1 and a new version."""
        if not self.free:
            raise OutOfBlocksError("no free block")
        b = self.free.popleft()
        if self.refcount[b]:
            raise AssertionError(f"block {b} on the free list has refcount {self.refcount[b]}")
        self.refcount[b] = 1
        self.version[b] += 1
        return b

    def allocate_many(self, n: int) -> List[int]:
        """`n` blocks at once (same order as n calls to allocate). Needs `num_free >= n`."""
        free = self.free
        if n > len(free):
            raise OutOfBlocksError(f"{n} blocks asked, {len(free)} free")
        out = [free.popleft() for _ in range(n)]
        refcount, version = self.refcount, self.version
        for b in out:
            if refcount[b]:
                raise AssertionError(f"block {b} on the free list has refcount {refcount[b]}")
            refcount[b] = 1
            version[b] += 1
        return out

    def incref(self, b: int) -> None:
        if self.refcount[b] <= 0:
            raise AssertionError(f"incref of free block {b}")
        self.refcount[b] += 1

    def decref(self, b: int) -> int:
        """Drop one reference; at zero the block goes back to the free list. Returns the new count."""
        rc = self.refcount[b] - 1
        if rc < 0:
            raise AssertionError(f"double free of block {b}")
        self.refcount[b] = rc
        if rc == 0:
            self.free.append(b)
        return rc

    def touch(self, b: int) -> None:
        """Record that the block's bytes change (an in-place append): older copies of it are no longer twins."""
        self.version[b] += 1

    def check_invariants(self, expected_refcount: List[int]) -> None:
        """AssertionError unless every refcount equals `expected_refcount` and the free list is exactly the
        blocks at zero, each once."""
        assert len(expected_refcount) == self.num_blocks
        for b in range(self.num_blocks):
            assert self.refcount[b] == expected_refcount[b], (
                f"block {b}: refcount {self.refcount[b]} != {expected_refcount[b]} holders")
        free = list(self.free)
        assert len(free) == len(set(free)), "a block is twice on the free list"
        assert set(free) == {b for b in range(self.num_blocks) if expected_refcount[b] == 0}, "free list mismatch"
