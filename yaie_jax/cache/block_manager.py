"""BlockManager: the scheduler's one interface to KV memory (paged pool, prefix cache, host swap pool).

Plain Python. Every method is check-then-act: a call that cannot succeed raises and changes nothing. Slots are
`block_id * block_size + offset`. Device work (copy-on-write copies, swaps) is returned as (src, dst) block pairs
for the runner to execute before the step that uses them.

A sequence's state is its block table and `num_tokens` (positions it has slots for). Prefix-cache blocks are
shared by reference: a sequence holding a cached block holds all of that block's ancestors too.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Dict, Hashable, List, Sequence, Tuple

from .block_pool import BlockPool
from .radix_cache import RadixCache
from .swap import HostPool


@dataclasses.dataclass
class SeqBlocks:
    blocks: List[int]                 # GPU block table (empty while swapped)
    num_tokens: int
    cpu_blocks: List[int] = dataclasses.field(default_factory=list)   # host blocks while swapped
    _swapped_flag: bool = False


class BlockManager:
    def __init__(self, num_gpu_blocks: int, block_size: int, num_cpu_blocks: int = 0,
                 enable_prefix_caching: bool = True):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 (got {block_size})")
        self.block_size = block_size
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_gpu_blocks)
        self.tree = RadixCache(self.pool, block_size)
        self.host = HostPool(num_cpu_blocks)
        self.seqs: Dict[Hashable, SeqBlocks] = {}
        self.queried_tokens = 0
        self.hit_tokens = 0

    # ------------------------------------------------------------------ capacity
    @property
    def num_free_gpu_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_evictable_gpu_blocks(self) -> int:
        return self.tree.num_evictable()

    @property
    def num_free_cpu_blocks(self) -> int:
        return self.host.num_free

    def _available(self) -> int:
        return self.pool.num_free + self.tree.num_evictable()

    def _alloc(self) -> int:
        if self.pool.num_free == 0:
            if self.tree.evict_one() is None:
                raise RuntimeError("out of KV blocks (caller skipped the can_* check)")
        return self.pool.allocate()

    def _seq(self, seq_id) -> SeqBlocks:
        s = self.seqs.get(seq_id)
        if s is None:
            raise KeyError(f"unknown sequence {seq_id!r}")
        return s

    # ------------------------------------------------------------------ admission
    def add_sequence(self, seq_id, token_ids: Sequence[int]) -> int:
        """Register a sequence; reuse the longest cached full-block prefix of token_ids[:-1] (at least one token
        is always left to compute). Takes references on the cached blocks; allocates nothing else.
        Returns the number of cached tokens (a multiple of block_size)."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        blocks: List[int] = []
        if self.enable_prefix_caching:
            self.queried_tokens += len(token_ids)
            blocks = self.tree.match(token_ids[:-1])
            for b in blocks:
                self.tree.incref(b)
            self.hit_tokens += len(blocks) * self.block_size
        self.seqs[seq_id] = SeqBlocks(blocks=list(blocks), num_tokens=len(blocks) * self.block_size)
        return len(blocks) * self.block_size

    def num_tokens(self, seq_id) -> int:
        return self._seq(seq_id).num_tokens

    def get_block_table(self, seq_id) -> List[int]:
        return self._seq(seq_id).blocks

    # ------------------------------------------------------------------ growth
    def _needs(self, s: SeqBlocks, n: int) -> Tuple[int, bool]:
        bs = self.block_size
        new_blocks = -(-(s.num_tokens + n) // bs) - len(s.blocks)
        cow = (n > 0 and s.num_tokens % bs != 0 and self.pool.refcount[s.blocks[-1]] > 1)
        return max(0, new_blocks), cow

    def can_append_slots(self, seq_id, num_new_tokens: int) -> bool:
        s = self._seq(seq_id)
        if s._swapped_flag:
            return False
        new_blocks, cow = self._needs(s, num_new_tokens)
        return new_blocks + int(cow) <= self._available()

    def append_slots(self, seq_id, num_new_tokens: int) -> Tuple[List[int], List[Tuple[int, int]]]:
        """Reserve slots for the next `num_new_tokens` positions. Returns (slots, copy-on-write pairs)."""
        if not self.can_append_slots(seq_id, num_new_tokens):
            raise RuntimeError(f"cannot append {num_new_tokens} slots to sequence {seq_id!r}")
        s = self._seq(seq_id)
        bs = self.block_size
        new_blocks, cow = self._needs(s, num_new_tokens)
        copies: List[Tuple[int, int]] = []
        if cow:
            old = s.blocks[-1]
            new = self._alloc()
            copies.append((old, new))
            self.tree.decref(old)
            s.blocks[-1] = new
        for _ in range(new_blocks):
            s.blocks.append(self._alloc())
        start = s.num_tokens
        slots = [s.blocks[p // bs] * bs + p % bs for p in range(start, start + num_new_tokens)]
        s.num_tokens += num_new_tokens
        return slots, copies

    def fork(self, parent_seq_id, child_seq_id) -> None:
        """The child shares every block of the parent (parallel sampling); writes go copy-on-write."""
        if child_seq_id in self.seqs:
            raise ValueError(f"sequence {child_seq_id!r} already exists")
        p = self._seq(parent_seq_id)
        if p._swapped_flag:
            raise ValueError("cannot fork a swapped-out sequence")
        for b in p.blocks:
            self.tree.incref(b)
        self.seqs[child_seq_id] = SeqBlocks(blocks=list(p.blocks), num_tokens=p.num_tokens)

    # ------------------------------------------------------------------ prefix cache
    def cache_sequence(self, seq_id, token_ids: Sequence[int]) -> None:
        """Insert the sequence's full blocks whose K/V are written (`token_ids` = tokens computed so far)."""
        if not self.enable_prefix_caching:
            return
        s = self._seq(seq_id)
        if s._swapped_flag:
            return
        n_full = min(len(token_ids), s.num_tokens) // self.block_size
        if n_full:
            self.tree.insert(token_ids[:n_full * self.block_size], s.blocks[:n_full])

    def reset_prefix_cache(self) -> None:
        self.tree.reset()

    # ------------------------------------------------------------------ release
    def free_sequence(self, seq_id) -> None:
        """Drop every reference the sequence holds (GPU or host) and forget it."""
        s = self._seq(seq_id)
        for b in s.blocks:
            self.tree.decref(b)
        for c in s.cpu_blocks:
            self.host.free(c)
        del self.seqs[seq_id]

    # ------------------------------------------------------------------ swap
    def is_swapped(self, seq_id) -> bool:
        return self._seq(seq_id)._swapped_flag

    def can_swap_out(self, seq_id) -> bool:
        s = self._seq(seq_id)
        return not s._swapped_flag and len(s.blocks) <= self.host.num_free

    def swap_out(self, seq_id) -> List[Tuple[int, int]]:
        """Copy the sequence's blocks to fresh host blocks and drop its GPU references. Returns (gpu, cpu)
        pairs that must be copied device->host before any of those GPU blocks is written again. Shared blocks
        are copied per sequence, so sharers stay consistent (each has its own identical copy)."""
        if not self.can_swap_out(seq_id):
            raise RuntimeError(f"cannot swap out sequence {seq_id!r}")
        s = self._seq(seq_id)
        pairs = [(b, self.host.allocate()) for b in s.blocks]
        for b in s.blocks:
            self.tree.decref(b)
        s.cpu_blocks = [c for _, c in pairs]
        s.blocks = []
        s._swapped_flag = True
        return pairs

    def can_swap_in(self, seq_id) -> bool:
        s = self._seq(seq_id)
        return s._swapped_flag and len(s.cpu_blocks) <= self._available()

    def swap_in(self, seq_id) -> List[Tuple[int, int]]:
        """Bring a swapped sequence back into fresh GPU blocks. Returns (cpu, gpu) host->device copies."""
        if not self.can_swap_in(seq_id):
            raise RuntimeError(f"cannot swap in sequence {seq_id!r}")
        s = self._seq(seq_id)
        pairs = [(c, self._alloc()) for c in s.cpu_blocks]
        for c in s.cpu_blocks:
            self.host.free(c)
        s.blocks = [g for _, g in pairs]
        s.cpu_blocks = []
        s._swapped_flag = False
        return pairs

    # ------------------------------------------------------------------ stats / checks
    def get_stats(self) -> dict:
        free = self.pool.num_free + self.tree.num_evictable()
        return {
            "prefix_cache_queried_tokens": self.queried_tokens,
            "prefix_cache_hit_tokens": self.hit_tokens,
            "kv_blocks_total": self.num_gpu_blocks,
            "kv_blocks_free": free,
            "kv_blocks_used": self.num_gpu_blocks - free,
            "kv_blocks_cached": len(self.tree),
            "cpu_blocks_total": self.num_cpu_blocks,
            "cpu_blocks_free": self.host.num_free,
            "num_evictions": self.tree.num_evictions,
        }

    def check_invariants(self) -> None:
        """Raise AssertionError on any leak, double free or refcount mismatch."""
        expect = collections.Counter()
        for s in self.seqs.values():
            assert not (s.blocks and s._swapped_flag)
            for b in s.blocks:
                expect[b] += 1
            if not s._swapped_flag:
                assert len(s.blocks) == -(-s.num_tokens // self.block_size), (s.blocks, s.num_tokens)
        for b in self.tree.nodes:
            expect[b] += 1
        for b in range(self.num_gpu_blocks):
            assert self.pool.refcount[b] == expect[b], f"block {b}: refcount {self.pool.refcount[b]} != {expect[b]}"
        free = list(self.pool.free)
        assert len(free) == len(set(free)), "duplicate block in the free list"
        assert set(free) == {b for b in range(self.num_gpu_blocks) if expect[b] == 0}, "free list mismatch"
        tree_only = sum(1 for b in self.tree.nodes if self.pool.refcount[b] == 1)
        assert tree_only == self.tree.num_tree_only, (tree_only, self.tree.num_tree_only)
        for b, node in self.tree.nodes.items():
            assert node.parent.children.get(node.key) is node
            if self.pool.refcount[b] > 1 and node.parent is not self.tree.root:
                assert self.pool.refcount[node.parent.block] >= 1
        cpu_expect = collections.Counter(c for s in self.seqs.values() for c in s.cpu_blocks)
        assert all(v == 1 for v in cpu_expect.values()), "host block shared"
        assert self.host.num_free + sum(cpu_expect.values()) == self.num_cpu_blocks, "host block leak"
