"""BlockManager: the scheduler's one interface to KV memory (paged device pool, radix prefix cache, host pool).

Plain Python, no JAX. Contracts shared by every method:

- Check-then-act: a call that cannot succeed raises (`OutOfBlocksError`, a RuntimeError, for lack of space;
  KeyError for an unknown sequence; ValueError for a bad argument) and changes nothing.
- A slot is `block_id * block_size + offset`; a sequence's block table lists its device blocks in position order.
- Device work comes back as (src, dst) block pairs; nothing here touches bytes. Within one engine step the runner
  must execute, before the step's forward pass and in this order: swap-out pairs (device -> host), swap-in pairs
  (host -> device), copy-on-write pairs (device -> device). A freed block may be handed out again in the same
  step, so this order is what keeps its old bytes until they are copied. For the same reason, within one step
  call every `swap_out` before any `swap_in` (a host block that swap-in frees may be reused by a later swap-out).
  The copy-on-write pairs of one step never chain (no pair reads another's destination), so they can run as one
  batched gather/scatter, provided a sequence forked in a step does not append in that same step.
- Sharing: a block may be held by several sequences (after `fork`, or prefix-cache hits) and by the radix tree.
  Reference counts equal the number of holders; a block is free exactly when nobody holds it. A sequence never
  writes a block someone else holds: `append_slots` copies the shared, partly filled last block first.
- Prefix cache: full blocks only. Unreferenced cached blocks stay in the tree until the pool runs short, then
  they are evicted least-recently-used (`num_evictable_gpu_blocks` counts them as available).
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Sequence, Tuple

from .block_pool import BlockPool, OutOfBlocksError
from .radix_cache import RadixCache
from .swap import SwapSpace


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks of `block_size` tokens that hold `num_tokens` tokens (the last one possibly partly filled)."""
    return -(-num_tokens // block_size)


class SeqBlocks:
    """One sequence's memory: its device block table and how many positions have slots; while swapped out,
    `blocks` is empty and `cpu_blocks` is the host block table instead."""

    __slots__ = ("blocks", "num_tokens", "cpu_blocks", "swapped", "tree_blocks")

    def __init__(self, blocks: List[int], num_tokens: int, tree_blocks: int = 0):
        self.blocks = blocks
        self.num_tokens = num_tokens
        self.cpu_blocks: List[int] = []
        self.swapped = False
        # leading blocks known to be the radix tree's nodes for this sequence's tokens (matched at admission or
        # cached since): cache_sequence starts its tree walk after them
        self.tree_blocks = tree_blocks


class BlockManager:
    """Paged KV bookkeeping for a device pool of `num_gpu_blocks` blocks of `block_size` tokens and a host pool
    of `num_cpu_blocks` blocks (0: no swapping). `enable_prefix_caching=False` turns the radix cache off
    (add_sequence then never hits and cache_sequence does nothing)."""

    def __init__(self, num_gpu_blocks: int, block_size: int, num_cpu_blocks: int = 0,
                 enable_prefix_caching: bool = True):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 (got {block_size})")
        if num_gpu_blocks < 1:
            raise ValueError(f"num_gpu_blocks must be >= 1 (got {num_gpu_blocks})")
        if num_cpu_blocks < 0:
            raise ValueError(f"num_cpu_blocks must be >= 0 (got {num_cpu_blocks})")
        self.block_size = block_size
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_gpu_blocks)
        self.tree = RadixCache(self.pool, block_size)
        self.swap = SwapSpace(self.pool, self.tree, num_cpu_blocks, self._take)
        self.host = self.swap.host
        self.seqs: Dict[Hashable, SeqBlocks] = {}
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.num_cow_copies = 0

    # ------------------------------------------------------------------ capacity
    @property
    def num_free_gpu_blocks(self) -> int:
        """Blocks on the free list (not counting evictable cached blocks)."""
        return len(self.pool.free)

    @property
    def num_evictable_gpu_blocks(self) -> int:
        """Cached blocks that no sequence holds (directly or below them in the tree): eviction can free them."""
        return self.tree.num_unlocked

    @property
    def num_available_gpu_blocks(self) -> int:
        """Free + evictable: how many blocks allocation can get right now."""
        return len(self.pool.free) + self.tree.num_unlocked

    @property
    def num_free_cpu_blocks(self) -> int:
        return len(self.host.free)

    def _seq(self, seq_id) -> SeqBlocks:
        s = self.seqs.get(seq_id)
        if s is None:
            raise KeyError(f"unknown sequence {seq_id!r}")
        return s

    def _take(self, n: int) -> None:
        """Make sure `n` blocks are on the free list, evicting LRU cached blocks. Caller checked availability."""
        short = n - len(self.pool.free)
        if short > 0:
            if len(self.tree.evict(short)) != short:
                raise AssertionError("evictable count was wrong")

    # ------------------------------------------------------------------ admission
    def add_sequence(self, seq_id, token_ids: Sequence[int], match: bool = True) -> int:
        """Register `seq_id` and reuse the longest cached block-aligned prefix of `token_ids[:-1]` (the last
        token is always left to compute, for its logits); `match=False` reuses nothing. Takes a reference on each
        reused block (locking it against eviction); allocates nothing. Counts `len(token_ids)` queried and the reused tokens hit.
        Returns num_cached_tokens, a multiple of block_size; `num_tokens(seq_id)` starts there.
        Never fails for lack of space; ValueError if `seq_id` exists."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        blocks: List[int] = []
        if self.enable_prefix_caching and match:
            self.queried_tokens += len(token_ids)
            if len(token_ids) > self.block_size:
                blocks = self.tree.match(token_ids, len(token_ids) - 1)
                acquire = self.tree.acquire
                for b in blocks:          # root first: each lock stops at its already-locked parent
                    acquire(b)
                self.hit_tokens += len(blocks) * self.block_size
        self.seqs[seq_id] = SeqBlocks(blocks, len(blocks) * self.block_size, tree_blocks=len(blocks))
        return len(blocks) * self.block_size

    def num_tokens(self, seq_id) -> int:
        """Positions the sequence has slots for: cached prefix + every appended slot."""
        return self._seq(seq_id).num_tokens

    def get_block_table(self, seq_id) -> List[int]:
        """The sequence's device block table (empty while swapped). A live read-only view: do not mutate it;
        later calls (append_slots, cache_sequence, swaps) change it."""
        return self._seq(seq_id).blocks

    def get_cpu_block_table(self, seq_id) -> List[int]:
        """The host block table of a swapped-out sequence (empty while on the device). Read-only view."""
        return self._seq(seq_id).cpu_blocks

    def is_swapped(self, seq_id) -> bool:
        return self._seq(seq_id).swapped

    # ------------------------------------------------------------------ growth
    def num_blocks_needed(self, seq_id, num_new_tokens: int) -> int:
        """Blocks `append_slots(seq_id, num_new_tokens)` would take from the pool (new blocks + a copy-on-write
        block). Lets a scheduler check several sequences against `num_available_gpu_blocks` at once."""
        s = self._seq(seq_id)
        if s.swapped:
            raise ValueError(f"sequence {seq_id!r} is swapped out")
        return self._blocks_to_append(s, num_new_tokens)

    def _blocks_to_append(self, s: SeqBlocks, num_new_tokens: int) -> int:
        """New blocks for `num_new_tokens` more positions of `s` (on the device), plus one for copy-on-write
        when its partly filled last block is shared."""
        nt = s.num_tokens
        need = blocks_for(nt + num_new_tokens, self.block_size) - len(s.blocks)
        if num_new_tokens > 0 and nt % self.block_size and self.pool.refcount[s.blocks[-1]] > 1:
            need += 1
        return need

    def can_append_slots(self, seq_id, num_new_tokens: int) -> bool:
        """True if `append_slots(seq_id, num_new_tokens)` would succeed now (free + evictable blocks suffice).
        False for a swapped-out sequence."""
        s = self.seqs.get(seq_id)
        if s is None:
            raise KeyError(f"unknown sequence {seq_id!r}")
        if s.swapped:
            return False
        return self._blocks_to_append(s, num_new_tokens) <= len(self.pool.free) + self.tree.num_unlocked

    def append_slots(self, seq_id, num_new_tokens: int) -> Tuple[List[int], List[Tuple[int, int]]]:
        """Reserve slots for positions `num_tokens(seq) .. num_tokens(seq) + num_new_tokens - 1`.

        Allocates blocks as needed (evicting LRU unreferenced cached blocks if the free list is short). If the
        last block is partly filled and shared, the sequence first moves to a fresh copy of it (copy-on-write).
        Returns (slots, copies): one slot per new position, and [(src_block, dst_block)] device copies the runner
        must do before the step. Raises OutOfBlocksError (changing nothing) when `can_append_slots` is False."""
        s = self.seqs.get(seq_id)
        if s is None:
            raise KeyError(f"unknown sequence {seq_id!r}")
        if s.swapped:
            raise ValueError(f"sequence {seq_id!r} is swapped out")
        pool = self.pool
        bs = self.block_size
        blocks = s.blocks
        nt = s.num_tokens
        off = nt % bs
        if num_new_tokens == 1 and off and pool.refcount[blocks[-1]] == 1:
            # decode fast path (most steps): room in an unshared last block
            b = blocks[-1]
            pool.version[b] += 1            # written in place: an earlier swap copy of it is no longer a twin
            s.num_tokens = nt + 1
            return [b * bs + off], []
        if num_new_tokens <= 0:
            if num_new_tokens == 0:
                return [], []
            raise ValueError(f"num_new_tokens must be >= 0 (got {num_new_tokens})")
        end = nt + num_new_tokens
        cow = off != 0 and pool.refcount[blocks[-1]] > 1
        new = blocks_for(end, bs) - len(blocks)
        need = new + cow
        if need > len(pool.free):
            if need > len(pool.free) + self.tree.num_unlocked:
                raise OutOfBlocksError(
                    f"cannot append {num_new_tokens} slots to {seq_id!r}: need {need} blocks, "
                    f"{len(pool.free)} free + {self.tree.num_unlocked} evictable")
            self._take(need)
        copies: List[Tuple[int, int]] = []
        if cow:
            old = blocks[-1]
            dst = pool.allocate()
            blocks[-1] = dst
            copies.append((old, dst))
            self.tree.release(old)          # old is shared, so it stays allocated for the other holders
            self.num_cow_copies += 1
        elif off:
            pool.version[blocks[-1]] += 1   # written in place: an earlier swap copy of it is no longer a twin
        if new == 1:
            blocks.append(pool.allocate())
        elif new:
            blocks.extend(pool.allocate_many(new))
        if num_new_tokens == 1:             # decode fast path
            slots = [blocks[nt // bs] * bs + off]
        else:
            slots = []
            p = nt
            while p < end:
                bi, o = divmod(p, bs)
                take = min(bs - o, end - p)
                base = blocks[bi] * bs + o
                slots.extend(range(base, base + take))
                p += take
        s.num_tokens = end
        return slots, copies

    def fork(self, parent_seq_id, child_seq_id) -> None:
        """Make `child_seq_id` share every block of the parent (refcount + 1 each) with the same num_tokens
        (parallel sampling, n > 1). Later writes into a shared partly filled block go copy-on-write. A swapped
        parent gives a swapped child sharing its host blocks. ValueError if the child id exists."""
        if child_seq_id in self.seqs:
            raise ValueError(f"sequence {child_seq_id!r} already exists")
        p = self._seq(parent_seq_id)
        child = SeqBlocks(list(p.blocks), p.num_tokens, tree_blocks=p.tree_blocks)
        acquire = self.tree.acquire
        for b in p.blocks:
            acquire(b)
        if p.swapped:
            for c in p.cpu_blocks:
                self.host.incref(c)
            child.cpu_blocks = list(p.cpu_blocks)
            child.swapped = True
        self.seqs[child_seq_id] = child

    # ------------------------------------------------------------------ prefix cache
    def cache_sequence(self, seq_id, token_ids: Sequence[int], switch: bool = True) -> None:
        """Insert the sequence's full blocks into the radix tree. `token_ids` are the tokens whose K/V is already
        written in the sequence's blocks, from position 0 (it may be shorter than num_tokens; only
        `min(len(token_ids), num_tokens) // block_size` blocks are cached). The tree takes its own reference.

        Where a prefix was cached already under another block, the sequence switches to the cached block and
        drops its duplicate (same K/V, memory returned). Safe to call repeatedly; does nothing when prefix
        caching is off or the sequence is swapped out.

        switch=False: keep the sequence's own blocks where the tree has others (they stay uncached); for a
        scheduler caching a prompt chunk as it schedules it, whose slots already point into those blocks."""
        if not self.enable_prefix_caching:
            return
        s = self._seq(seq_id)
        if s.swapped:
            return
        n_full = min(len(token_ids), s.num_tokens) // self.block_size
        if n_full == 0:
            return
        blocks = s.blocks
        canon = self.tree.insert(token_ids, blocks[:n_full], known=min(s.tree_blocks, n_full))
        dup = [j for j in range(n_full) if canon[j] != blocks[j]]
        if dup and not switch:
            s.tree_blocks = max(s.tree_blocks, dup[0])     # its blocks are the tree's up to the first duplicate
            return
        if dup:
            for j in dup:                  # root first, so each lock stops at its parent
                self.tree.acquire(canon[j])
            for j in reversed(dup):
                self.tree.release(blocks[j])
                blocks[j] = canon[j]
        s.tree_blocks = max(s.tree_blocks, n_full)

    def reset_prefix_cache(self) -> None:
        """Drop every cached block that no sequence holds (they return to the free list). Held ones stay."""
        self.tree.reset()

    def evict_cached_blocks(self, num_blocks: int) -> List[int]:
        """Free up to `num_blocks` unreferenced cached blocks now, LRU first; returns their ids (counted in
        num_evictions). Allocation does this by itself when needed; this is for tests and memory pressure."""
        return self.tree.evict(num_blocks)

    # ------------------------------------------------------------------ release
    def free_sequence(self, seq_id) -> None:
        """Drop every reference the sequence holds (device blocks, radix locks, host blocks) and forget it.
        Works for running and swapped sequences. KeyError for an unknown id."""
        s = self._seq(seq_id)
        release = self.tree.release
        for b in reversed(s.blocks):       # leaf first: each unlock stops at its parent
            release(b)
        for c in s.cpu_blocks:
            self.host.decref(c)
        del self.seqs[seq_id]

    # ------------------------------------------------------------------ swap (the block moves: swap.SwapSpace)
    def _on_device(self, seq_id) -> SeqBlocks:
        s = self._seq(seq_id)
        if s.swapped:
            raise ValueError(f"sequence {seq_id!r} is swapped out already")
        return s

    def num_cpu_blocks_needed(self, seq_id) -> int:
        """Host blocks `swap_out(seq_id)` would take: its device blocks with no identical host copy already
        (blocks it shares with an already swapped-out sibling reuse that sibling's copy)."""
        return self.swap.host_blocks_needed(self._on_device(seq_id).blocks)

    def can_swap_out(self, seq_id) -> bool:
        s = self._seq(seq_id)
        return not s.swapped and self.swap.host_blocks_needed(s.blocks) <= len(self.host.free)

    def swap_out(self, seq_id) -> List[Tuple[int, int]]:
        """Move the sequence to host blocks and drop its device references (the sequence keeps num_tokens).
        Returns [(gpu_block, cpu_block)] device -> host copies that must run before any of those device blocks
        is written again (the runner does them first thing in the step; see the module docstring).

        Sharing: each sequence is swapped on its own, and forked siblings stay consistent and shared: a block
        already copied out for a sibling (and unchanged since) reuses that host block instead of a new copy, and
        `swap_in` brings shared host blocks back onto one device block. Swapping a group one by one therefore
        costs the same host blocks as a group swap. OutOfBlocksError (nothing changed) when `can_swap_out` is
        False; ValueError if already swapped."""
        return self.swap.swap_out(self._on_device(seq_id), seq_id)

    def can_swap_in(self, seq_id) -> bool:
        s = self._seq(seq_id)
        return s.swapped and self.swap.swap_in_plan(s)[1] <= len(self.pool.free) + self.tree.num_unlocked

    def swap_in(self, seq_id) -> List[Tuple[int, int]]:
        """Bring a swapped-out sequence back to device blocks and drop its host references. Returns
        [(cpu_block, gpu_block)] host -> device copies for the runner to do before the step; host blocks whose
        bytes are still on a live device block (a sibling swapped in earlier) reuse that block and need no copy.
        OutOfBlocksError (nothing changed) when `can_swap_in` is False; ValueError if not swapped."""
        s = self._seq(seq_id)
        if not s.swapped:
            raise ValueError(f"sequence {seq_id!r} is not swapped out")
        return self.swap.swap_in(s, seq_id)

    # ------------------------------------------------------------------ stats / checks
    def get_stats(self) -> dict:
        """Counters and gauges. kv_blocks_free counts free + evictable blocks; kv_blocks_used the rest."""
        free = len(self.pool.free) + self.tree.num_unlocked
        q = self.queried_tokens
        return {
            "prefix_cache_queried_tokens": q,
            "prefix_cache_hit_tokens": self.hit_tokens,
            "prefix_cache_hit_rate": self.hit_tokens / q if q else 0.0,
            "kv_blocks_total": self.num_gpu_blocks,
            "kv_blocks_free": free,
            "kv_blocks_used": self.num_gpu_blocks - free,
            "kv_blocks_cached": len(self.tree),
            "kv_blocks_evictable": self.tree.num_unlocked,
            "cpu_blocks_total": self.num_cpu_blocks,
            "cpu_blocks_free": len(self.host.free),
            "num_evictions": self.tree.num_evictions,
            "num_cow_copies": self.num_cow_copies,
            "num_swapped_out_blocks": self.swap.num_swapped_out_blocks,
            "num_swapped_in_blocks": self.swap.num_swapped_in_blocks,
            "num_sequences": len(self.seqs),
        }

    def check_invariants(self) -> None:
        """AssertionError on any leak, double free, refcount/lock mismatch or malformed block table.
        O(blocks + nodes + table entries): cheap enough for property tests."""
        bs = self.block_size
        gpu = [0] * self.num_gpu_blocks
        cpu = [0] * self.num_cpu_blocks
        for sid, s in self.seqs.items():
            want = blocks_for(s.num_tokens, bs)
            if s.swapped:
                assert not s.blocks, f"{sid!r}: swapped with device blocks"
                assert len(s.cpu_blocks) == want, (sid, s.cpu_blocks, s.num_tokens)
            else:
                assert not s.cpu_blocks, f"{sid!r}: on device with host blocks"
                assert len(s.blocks) == want, (sid, s.blocks, s.num_tokens)
                if s.num_tokens % bs:
                    assert s.blocks[-1] not in self.tree.nodes, f"{sid!r}: partly filled block is cached"
            assert len(set(s.blocks)) == len(s.blocks), f"{sid!r}: block twice in a table"
            assert len(set(s.cpu_blocks)) == len(s.cpu_blocks), f"{sid!r}: host block twice in a table"
            for b in s.blocks:
                gpu[b] += 1
            for c in s.cpu_blocks:
                cpu[c] += 1
        for b in self.tree.nodes:
            gpu[b] += 1
        self.pool.check_invariants(gpu)
        self.host.check_invariants(cpu)
        self.tree.check_invariants()
        if not self.enable_prefix_caching:
            assert not self.tree.nodes
