"""Radix tree over token ids at block granularity (SGLang's RadixAttention idea), owning full KV blocks.

Each node below the root stands for one full block: its key is the block's `block_size` token ids, its value the
KV block id. A path from the root spells a cached prefix. The tree holds one reference on each of its blocks;
a node is evictable when it is a leaf and nobody but the tree references its block. Eviction is least recently
used (by the time of the last match or insert touching the node).
"""
from __future__ import annotations

import heapq
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

from .block_pool import BlockPool


class RadixNode:
    __slots__ = ("key", "block", "parent", "children", "last_access")

    def __init__(self, key: Tuple[int, ...], block: int, parent: Optional["RadixNode"]):
        self.key = key
        self.block = block
        self.parent = parent
        self.children: Dict[Tuple[int, ...], "RadixNode"] = {}
        self.last_access = 0


class RadixCache:
    def __init__(self, pool: BlockPool, block_size: int):
        self.pool = pool
        self.block_size = block_size
        self.root = RadixNode((), -1, None)
        self.nodes: Dict[int, RadixNode] = {}          # block id -> node
        self._clock = itertools.count(1)
        self._heap: List[Tuple[int, int]] = []         # (last_access, block) candidates, validated on pop
        self.num_evictions = 0
        self.num_tree_only = 0                         # cached blocks referenced by the tree alone (evictable)

    def __len__(self) -> int:
        return len(self.nodes)

    def contains_block(self, b: int) -> bool:
        return b in self.nodes

    # ------------------------------------------------------------------ lookups
    def match(self, token_ids: Sequence[int]) -> List[int]:
        """Blocks of the longest cached prefix of `token_ids` (whole blocks only); touches them (LRU).
        Changes no reference counts: the caller takes its own references."""
        bs = self.block_size
        node, out = self.root, []
        now = next(self._clock)
        for i in range(len(token_ids) // bs):
            child = node.children.get(tuple(token_ids[i * bs:(i + 1) * bs]))
            if child is None:
                break
            child.last_access = now
            out.append(child.block)
            node = child
        return out

    def insert(self, token_ids: Sequence[int], blocks: Sequence[int]) -> None:
        """Cache `blocks[i]` as holding tokens `token_ids[i*bs:(i+1)*bs]` for every full block given.
        Where the tree already has a block for a prefix, it keeps its own; new nodes take a reference."""
        bs = self.block_size
        node = self.root
        now = next(self._clock)
        for i in range(min(len(token_ids) // bs, len(blocks))):
            key = tuple(token_ids[i * bs:(i + 1) * bs])
            child = node.children.get(key)
            if child is None:
                b = blocks[i]
                if b in self.nodes:    # block already cached under another path: cannot happen for valid input
                    raise ValueError(f"block {b} is already cached for a different prefix")
                child = RadixNode(key, b, node)
                node.children[key] = child
                self.nodes[b] = child
                self.pool.incref(b)
            child.last_access = now
            node = child
        self._push_candidates()

    # ------------------------------------------------------------------ eviction
    def is_evictable(self, node: RadixNode) -> bool:
        return not node.children and self.pool.refcount[node.block] == 1

    def num_evictable(self) -> int:
        """Blocks that eviction could free now. A sequence holding a cached block holds all its ancestors too,
        so every tree-only block is reachable by evicting leaves first."""
        return self.num_tree_only

    def incref(self, b: int) -> None:
        """Take a reference on a block (through the tree, so the evictable count stays right)."""
        if b in self.nodes and self.pool.refcount[b] == 1:
            self.num_tree_only -= 1
        self.pool.incref(b)

    def decref(self, b: int) -> None:
        """Drop a reference on a block; a cached block left to the tree alone becomes an eviction candidate."""
        left = self.pool.decref(b)
        if left == 1 and b in self.nodes:
            self.num_tree_only += 1
            node = self.nodes[b]
            if not node.children:
                heapq.heappush(self._heap, (node.last_access, b))

    def _push_candidates(self) -> None:
        pass

    def evict_one(self) -> Optional[int]:
        """Remove the least recently used evictable leaf; its block goes back to the pool. Returns the block."""
        while True:
            if not self._heap:
                self._heap = [(n.last_access, b) for b, n in self.nodes.items() if self.is_evictable(n)]
                heapq.heapify(self._heap)
                if not self._heap:
                    return None
            t, b = heapq.heappop(self._heap)
            node = self.nodes.get(b)
            if node is None or node.last_access != t or not self.is_evictable(node):
                continue
            self._remove(node)
            parent = node.parent
            if parent is not self.root and self.is_evictable(parent):
                heapq.heappush(self._heap, (parent.last_access, parent.block))
            return b

    def _remove(self, node: RadixNode) -> None:
        del node.parent.children[node.key]
        del self.nodes[node.block]
        self.num_tree_only -= 1
        self.pool.decref(node.block)
        self.num_evictions += 1

    def reset(self) -> None:
        """Evict every evictable node (repeatedly, leaves first)."""
        self._heap = []
        while self.evict_one() is not None:
            pass
        self._heap = []
