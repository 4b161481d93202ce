"""Radix tree over token ids at block granularity (the idea of SGLang's RadixAttention), owning full KV blocks.

Every node below the root stands for one full block: its key is that block's `block_size` token ids, its value
the device block id holding their K/V. The path from the root to a node spells the whole prefix whose K/V the
block holds. The tree takes one pool reference on each of its blocks.

Locking. Every other holder of a tree block (a sequence) must take and drop its reference through `acquire` /
`release`, never on the pool directly. A node is *locked* while some non-tree holder references its block or any
block below it: `lock_ref = (pool refcount - 1) + (number of locked children)`. Unlocked nodes are exactly the
blocks eviction can free (an unlocked node's whole subtree is unlocked, so leaves-first eviction reaches all of
them), so `num_evictable` is exact even for sequences that hold a cached block without its ancestors.

Eviction is least-recently-used over unlocked leaves; `last_access` is the time (a counter) of the last
`match` or `insert` that walked through the node.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

from .block_pool import BlockPool


class RadixNode:
    __slots__ = ("key", "block", "parent", "children", "lock_ref", "last_access")

    def __init__(self, key: Tuple[int, ...], block: int, parent: Optional["RadixNode"], last_access: int = 0):
        self.key = key                  # the block's token ids (empty for the root)
        self.block = block              # device block id (-1 for the root)
        self.parent = parent            # None for the root and for removed nodes
        self.children: Dict[Tuple[int, ...], "RadixNode"] = {}
        self.lock_ref = 0
        self.last_access = last_access


class RadixCache:
    """The prefix tree. Contract summary:

    - `match(tokens)`: blocks of the longest cached block-aligned prefix; takes no references.
    - `insert(tokens, blocks)`: caches the caller's full blocks; returns the tree's block for every position
      (the caller's own where it was new, the tree's older one where that prefix was cached already).
    - `acquire(b)` / `release(b)`: the only way for a non-tree holder to change the refcount of a block.
    - `evict(n)`: frees up to n unlocked blocks, LRU leaves first; `reset()` frees every unlocked block.
    """

    def __init__(self, pool: BlockPool, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 (got {block_size})")
        self.pool = pool
        self.block_size = block_size
        self.root = RadixNode((), -1, None)
        self.nodes: Dict[int, RadixNode] = {}          # block id -> node
        self.num_unlocked = 0                          # == blocks that eviction can free
        self.num_evictions = 0                         # blocks evicted for space (not by reset)
        self._clock = itertools.count(1)
        self._push_id = itertools.count()
        # Candidates (last_access, push id, node); an entry is stale unless the node is still in the tree, is an
        # unlocked leaf and has not been touched since the push. Every unlocked leaf has a live entry.
        self._heap: List[Tuple[int, int, RadixNode]] = []

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def num_evictable(self) -> int:
        return self.num_unlocked

    def __contains__(self, b: int) -> bool:
        return b in self.nodes

    # ------------------------------------------------------------------ lookups
    def match(self, token_ids: Sequence[int], max_tokens: Optional[int] = None) -> List[int]:
        """Blocks of the longest cached prefix of `token_ids[:max_tokens]`, whole blocks only, in order. Marks
        them used now (LRU). Takes no references: a caller that keeps them must `acquire` each one."""
        bs = self.block_size
        n = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
        node = self.root
        if n < bs or not node.children:
            return []
        t = token_ids if type(token_ids) is tuple else tuple(token_ids[:n])
        now = next(self._clock)
        out = []
        for i in range(0, n - bs + 1, bs):
            child = node.children.get(t[i:i + bs])
            if child is None:
                break
            child.last_access = now
            out.append(child.block)
            node = child
        if node is not self.root and node.lock_ref == 0 and not node.children:
            self._push(node)      # an unlocked leaf touched: its LRU position moved
        return out

    def insert(self, token_ids: Sequence[int], blocks: Sequence[int], known: int = 0) -> List[int]:
        """Cache `blocks[i]` as the K/V of `token_ids[i*bs:(i+1)*bs]` (given everything before), for the first
        `min(len(token_ids) // bs, len(blocks))` blocks. Returns the tree's block for each of those positions.

        Where a prefix is cached already the tree keeps its block (the caller may switch to it and drop its
        duplicate); new nodes take one pool reference each. Precondition: the new blocks are allocated (the
        caller holds them) and not cached elsewhere; otherwise ValueError and nothing changes.
        known: the caller knows `blocks[:known]` are the tree's nodes for these tokens (a path from the root, as
        `match` or an earlier insert gave them): the walk starts after them, without hashing their tokens (it
        still marks them used, as a walk would). Ignored where blocks[known - 1] is not in the tree."""
        bs = self.block_size
        n = min(len(token_ids) // bs, len(blocks))
        if n == 0:
            return []
        now = next(self._clock)
        node = self.root
        i = 0
        if 0 < known <= n and blocks[known - 1] in self.nodes:
            node = self.nodes[blocks[known - 1]]
            i = known
            up = node
            while up is not self.root:
                up.last_access = now
                up = up.parent
        out: List[int] = list(blocks[:i])
        base = i * bs                                # tokens before the walk's start are not copied or hashed
        t = tuple(token_ids[base:n * bs])
        while i < n:
            child = node.children.get(t[i * bs - base:(i + 1) * bs - base])
            if child is None:
                break
            child.last_access = now
            out.append(child.block)
            node = child
            i += 1
        new = blocks[i:n]
        if not new:
            if node.lock_ref == 0 and not node.children:
                self._push(node)
            return out
        # check, then act
        if len(set(new)) != len(new):
            raise ValueError(f"duplicate blocks in {list(new)}")
        for b in new:
            if b in self.nodes:
                raise ValueError(f"block {b} is already cached for a different prefix")
            if self.pool.refcount[b] <= 0:
                raise ValueError(f"block {b} is free: only blocks the caller holds can be cached")
        refcount = self.pool.refcount
        for j in range(i, n):
            b = blocks[j]
            child = RadixNode(t[j * bs - base:(j + 1) * bs - base], b, node, now)
            node.children[child.key] = child
            self.nodes[b] = child
            child.lock_ref = refcount[b]           # the caller's holders; > 0, so locked
            refcount[b] += 1                       # the tree's own reference
            self._lock_up(node)                    # node has a new locked child
            out.append(b)
            node = child
        return out

    # ------------------------------------------------------------------ references
    def acquire(self, b: int) -> None:
        """A non-tree holder takes a reference on block `b` (locks its node and ancestors if cached)."""
        refcount = self.pool.refcount
        if refcount[b] <= 0:
            raise AssertionError(f"acquire of free block {b}")
        refcount[b] += 1
        node = self.nodes.get(b)
        if node is not None:
            node.lock_ref += 1
            if node.lock_ref == 1:         # newly locked: its parent gains a locked child
                self.num_unlocked -= 1
                self._lock_up(node.parent)

    def release(self, b: int) -> int:
        """A non-tree holder drops its reference on `b`. Returns the new refcount (0: the block is free).
        Releasing a path leaf-first keeps this O(1) per block."""
        node = self.nodes.get(b)
        if node is not None:
            self._unlock_up(node)
        return self.pool.decref(b)

    def _lock_up(self, node: RadixNode) -> None:
        root = self.root
        while node is not root:
            node.lock_ref += 1
            if node.lock_ref != 1:
                return
            self.num_unlocked -= 1
            node = node.parent

    def _unlock_up(self, node: RadixNode) -> None:
        root = self.root
        while node is not root:
            node.lock_ref -= 1
            if node.lock_ref:
                if node.lock_ref < 0:
                    raise AssertionError(f"lock_ref of block {node.block} below zero")
                return
            self.num_unlocked += 1
            if not node.children:
                self._push(node)
            node = node.parent

    # ------------------------------------------------------------------ eviction
    def _push(self, node: RadixNode) -> None:
        heap = self._heap
        if len(heap) > 2 * len(self.nodes) + 64:   # too many stale entries: rebuild from the live candidates
            heap[:] = [(n.last_access, next(self._push_id), n) for n in self.nodes.values()
                       if n.lock_ref == 0 and not n.children]
            heapq.heapify(heap)
            if any(e[2] is node for e in heap):
                return
        heapq.heappush(heap, (node.last_access, next(self._push_id), node))

    def evict(self, num_blocks: int, count: bool = True) -> List[int]:
        """Remove up to `num_blocks` unlocked nodes, least recently used leaf first; their blocks go back to the
        pool's free list. Returns the freed block ids in eviction order."""
        out: List[int] = []
        heap = self._heap
        root = self.root
        while len(out) < num_blocks and self.num_unlocked:
            if not heap:
                raise AssertionError("unlocked nodes without eviction candidates")
            t, _, node = heapq.heappop(heap)
            if node.parent is None or node.last_access != t or node.lock_ref or node.children:
                continue                            # stale entry
            parent = node.parent
            del parent.children[node.key]
            del self.nodes[node.block]
            node.parent = None
            self.num_unlocked -= 1
            if self.pool.decref(node.block) != 0:
                raise AssertionError(f"evicted block {node.block} still referenced")
            out.append(node.block)
            if parent is not root and parent.lock_ref == 0 and not parent.children:
                self._push(parent)
        if count:
            self.num_evictions += len(out)
        return out

    def reset(self) -> List[int]:
        """Evict every unlocked node (not counted in `num_evictions`). Locked nodes stay."""
        out = self.evict(self.num_unlocked, count=False)
        if self.num_unlocked == 0 and not self.nodes:
            self._heap = []
        return out

    # ------------------------------------------------------------------ checks
    def walk(self):
        """Yield (node, prefix token ids) for every node, parents before children."""
        stack = [(self.root, ())]
        while stack:
            node, prefix = stack.pop()
            for child in node.children.values():
                p = prefix + child.key
                yield child, p
                stack.append((child, p))

    def check_invariants(self) -> None:
        """AssertionError unless the tree's structure, lock counts and LRU candidates are consistent.
        (Refcounts against holders are checked by the BlockManager, which knows the holders.)"""
        seen = 0
        unlocked = 0
        live = {id(e[2]) for e in self._heap if e[2].parent is not None and e[0] == e[2].last_access}
        for node, prefix in self.walk():
            seen += 1
            assert self.nodes.get(node.block) is node, f"block {node.block} not indexed"
            assert len(node.key) == self.block_size
            assert node.parent.children.get(node.key) is node
            assert self.pool.refcount[node.block] >= 1
            locked_children = sum(1 for c in node.children.values() if c.lock_ref > 0)
            want = self.pool.refcount[node.block] - 1 + locked_children
            assert node.lock_ref == want, f"block {node.block}: lock_ref {node.lock_ref} != {want}"
            if node.lock_ref == 0:
                unlocked += 1
                if not node.children:
                    assert id(node) in live, f"unlocked leaf {node.block} has no eviction candidate entry"
        assert seen == len(self.nodes), "index has nodes not in the tree"
        assert unlocked == self.num_unlocked, (unlocked, self.num_unlocked)
