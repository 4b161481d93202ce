"""Host (CPU) pool for swapping sequences out of device memory (`SwapSpace`: the block moves `BlockManager.swap_out`
and `swap_in` make), and the bookkeeping that keeps shared blocks shared.

Block ids only; the runner owns the bytes and executes the (src, dst) copies the `BlockManager` returns.

Sharing across a swap (`SwapTwins`): when two sequences share a device block (parallel sampling forks) and are
swapped out one after the other, the second must reuse the first one's host copy instead of making its own, and
on the way back in they must land on one device block again, or copy-on-write could no longer see that they
share. A "twin" is a (device block, host block) pair known to hold the same bytes: made by every swap copy, and
valid only while both blocks stay allocated and neither changed since (checked with `BlockPool.version`, which
moves on every allocation and every in-place append). Host blocks are never written after their copy-in.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

from .block_pool import BlockPool, OutOfBlocksError

if TYPE_CHECKING:
    from .block_manager import SeqBlocks
    from .radix_cache import RadixCache


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


class SwapSpace:
    """The host pool and the moves of one sequence's blocks between it and the device pool (block ids only; the
    `BlockManager` checks the sequence's state first and owns its tables). Device blocks are held and released
    through the radix cache `tree`, like every device reference; `take(n)` makes n device blocks free (evicting
    cached ones). Shared blocks stay shared across a swap (`SwapTwins`)."""

    def __init__(self, pool: BlockPool, tree: "RadixCache", num_cpu_blocks: int, take: Callable[[int], None]):
        self.pool, self.tree, self._take = pool, tree, take
        self.host = HostPool(num_cpu_blocks)
        self.twins = SwapTwins(pool, self.host)
        self.num_swapped_out_blocks = 0      # device -> host copies issued
        self.num_swapped_in_blocks = 0       # host -> device copies issued

    def host_blocks_needed(self, blocks: List[int]) -> int:
        """Host blocks a swap-out of `blocks` takes: those with no identical host copy already."""
        host_twin = self.twins.host_twin
        return sum(1 for b in blocks if host_twin(b) is None)

    def swap_out(self, s: "SeqBlocks", seq_id) -> List[Tuple[int, int]]:
        """`BlockManager.swap_out` of `s` (on the device): returns the device -> host copies."""
        host_twin = self.twins.host_twin
        twins = [host_twin(b) for b in s.blocks]
        need = sum(1 for c in twins if c is None)
        if need > len(self.host.free):
            raise OutOfBlocksError(f"cannot swap out {seq_id!r}: need {need} host blocks, "
                                   f"{len(self.host.free)} free")
        pairs: List[Tuple[int, int]] = []
        cpu: List[int] = []
        for b, c in zip(s.blocks, twins):
            if c is None:
                c = self.host.allocate()
                self.twins.link(b, c)
                pairs.append((b, c))
            else:
                self.host.incref(c)
            cpu.append(c)
        release = self.tree.release
        for b in reversed(s.blocks):
            release(b)
        s.blocks = []
        s.tree_blocks = 0
        s.cpu_blocks = cpu
        s.swapped = True
        self.num_swapped_out_blocks += len(pairs)
        return pairs

    def swap_in_plan(self, s: "SeqBlocks") -> Tuple[List, int]:
        """(device twin or None per host block, blocks the swap-in takes from the available count)."""
        gpu_twin = self.twins.gpu_twin
        twins = [gpu_twin(c) for c in s.cpu_blocks]
        need = sum(1 for g in twins if g is None)
        # Holding a twin that is an unreferenced cached block locks it (and its unlocked ancestors), which takes
        # those out of the evictable count just like an allocation would.
        locked = set()
        nodes = self.tree.nodes
        for g in twins:
            node = nodes.get(g) if g is not None else None
            while node is not None and node is not self.tree.root and node.lock_ref == 0 and id(node) not in locked:
                locked.add(id(node))
                node = node.parent
        return twins, need + len(locked)

    def swap_in(self, s: "SeqBlocks", seq_id) -> List[Tuple[int, int]]:
        """`BlockManager.swap_in` of `s` (swapped out): returns the host -> device copies."""
        twins, need = self.swap_in_plan(s)
        if need > len(self.pool.free) + self.tree.num_unlocked:
            raise OutOfBlocksError(f"cannot swap in {seq_id!r}: need {need} blocks, {len(self.pool.free)} free "
                                   f"+ {self.tree.num_unlocked} evictable")
        acquire = self.tree.acquire
        for g in twins:                     # lock the reused blocks first, so eviction cannot take them
            if g is not None:
                acquire(g)
        self._take(sum(1 for g in twins if g is None))
        pairs: List[Tuple[int, int]] = []
        blocks: List[int] = []
        for c, g in zip(s.cpu_blocks, twins):
            if g is None:
                g = self.pool.allocate()
                self.twins.link(g, c)
                pairs.append((c, g))
            blocks.append(g)
        for c in s.cpu_blocks:
            self.host.decref(c)
        s.blocks = blocks
        s.cpu_blocks = []
        s.swapped = False
        self.num_swapped_in_blocks += len(pairs)
        return pairs
