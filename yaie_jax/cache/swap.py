"""Host (CPU) pool for swapping sequences out of device memory, and the bookkeeping that keeps shared blocks shared.

Block ids only; the runner owns the bytes and executes the (src, dst) copies the `BlockManager` returns.

Sharing across a swap (`SwapTwins`): when two sequences share a device block (parallel sampling forks) and are
swapped out one after the other, the second must reuse the first one's host copy instead of making its own, and
on the way back in they must land on one device block again, or copy-on-write could no longer see that they
share. A "twin" is a (device block, host block) pair known to hold the same bytes: made by every swap copy, and
valid only while both blocks stay allocated and neither changed since (checked with `BlockPool.version`, which
moves on every allocation and every in-place append). Host blocks are never written after their copy-in.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from .block_pool import BlockPool


class HostPool(BlockPool):
    """The host block pool: a `BlockPool` (refcounted, since swapped sequences can share host blocks)."""


class SwapTwins:
    """Known identical (device block, host block) pairs, validated lazily: a stale entry is simply ignored."""

    __slots__ = ("gpu", "host", "_of_gpu", "_of_host")

    def __init__(self, gpu: BlockPool, host: BlockPool):
        self.gpu = gpu
        self.host = host
        # Both maps store the same (gpu block, host block, gpu version, host version) record for a link.
        self._of_gpu: Dict[int, Tuple[int, int, int, int]] = {}
        self._of_host: Dict[int, Tuple[int, int, int, int]] = {}

    def _valid(self, rec: Tuple[int, int, int, int]) -> bool:
        g, c, gv, hv = rec
        return (self.gpu.refcount[g] > 0 and self.gpu.version[g] == gv
                and self.host.refcount[c] > 0 and self.host.version[c] == hv)

    def host_twin(self, g: int) -> Optional[int]:
        """The host block holding the same bytes as device block `g` right now, or None."""
        rec = self._of_gpu.get(g)
        if rec is None:
            return None
        if self._valid(rec):
            return rec[1]
        del self._of_gpu[g]
        return None

    def gpu_twin(self, c: int) -> Optional[int]:
        """The device block holding the same bytes as host block `c` right now, or None."""
        rec = self._of_host.get(c)
        if rec is None:
            return None
        if self._valid(rec):
            return rec[0]
        del self._of_host[c]
        return None

    def link(self, g: int, c: int) -> None:
        """Record that a copy between `g` and `c` is being made (both allocated, at their current versions).
        Callers link only blocks without a valid twin, so an older record of either partner is already stale."""
        rec = (g, c, self.gpu.version[g], self.host.version[c])
        self._of_gpu[g] = rec
        self._of_host[c] = rec

    def __len__(self) -> int:
        return len(self._of_gpu)
