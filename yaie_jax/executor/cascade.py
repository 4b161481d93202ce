"""Host-side planning of cascade attention for a decode batch (the kernel side: pallas_kernels.
cascade_paged_attention).

Sequences whose block tables start with the same pages -- requests that hit one prefix-cache entry, or the forks
of one prompt -- hold those pages once in the pool. Plain paged decode attention still reads them once per
sequence. A cascade plan groups such sequences into items of up to `members_per_item` rows; the kernel reads each
item's shared pages once for all its members (they are the rows of one query tile) and each sequence's own pages
after them, then merges the two partial softmaxes per row.

Grouping: live rows (context > 0) are grouped by their first page; a group's shared prefix is the longest run of
pages common to all its members, cut to pages that every member has filled before this call (pages before the
one holding position context-1, which this call may write). Groups with fewer than 2 members or fewer than
`min_prefix_blocks` shared pages are left out. A group whose members diverge early (e.g. a common system prompt,
then different per-group prefixes) shares only the common run. If there are more items than `max_items`, the
ones saving the most page reads are kept.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np


def plan_cascade(block_tables: np.ndarray, context_lens: np.ndarray, *, block_size: int, max_items: int,
                 members_per_item: int, min_prefix_blocks: int) -> Optional[Dict[str, np.ndarray]]:
    """The cascade arrays for a decode batch, or None when no rows share enough pages.

    block_tables [S, MB] int32 (row i's pages, then anything), context_lens [S] int32 (context of the call's first
    step, 0 = padding row). Returns int32 arrays (see pallas_kernels.cascade_paged_attention): item_rows
    [max_items, members_per_item], item_lens [max_items] (tokens), item_tables [max_items, MB], row_item [S]
    (-1 = none), row_slot [S]; unused item slots have item_lens 0."""
    S, MB = block_tables.shape
    ctx = np.asarray(context_lens, np.int64)
    usable = np.maximum(ctx - 1, 0) // block_size                  # [S] pages each row had filled before the call
    live = np.nonzero((ctx > 0) & (usable >= min_prefix_blocks))[0]
    if len(live) < 2 or max_items < 1:
        return None
    first = block_tables[live, 0]
    order = np.argsort(first, kind="stable")
    _, starts, counts = np.unique(first[order], return_index=True, return_counts=True)
    candidates = []                                                 # (pages saved, member rows, prefix pages)
    for start, count in zip(starts, counts):
        if count < 2:
            continue
        rows = live[order[start:start + count]]
        same = np.all(block_tables[rows] == block_tables[rows[0]], axis=0)      # [MB]
        shared = MB if same.all() else int(np.argmin(same))
        shared = min(shared, int(usable[rows].min()))
        if shared < min_prefix_blocks:
            continue
        for k in range(0, len(rows), members_per_item):
            members = rows[k:k + members_per_item]
            if len(members) >= 2:
                candidates.append(((len(members) - 1) * shared, members, shared))
    if not candidates:
        return None
    candidates.sort(key=lambda c: -c[0])
    item_rows = np.zeros((max_items, members_per_item), np.int32)   # [I, M]
    item_lens = np.zeros(max_items, np.int32)                       # [I] tokens
    item_tables = np.zeros((max_items, MB), np.int32)               # [I, MB]
    row_item = np.full(S, -1, np.int32)                             # [S]
    row_slot = np.zeros(S, np.int32)                                # [S]
    for i, (_, members, shared) in enumerate(candidates[:max_items]):
        item_rows[i, :len(members)] = members
        item_rows[i, len(members):] = members[0]
        item_lens[i] = shared * block_size
        item_tables[i] = block_tables[members[0]]
        row_item[members] = i
        row_slot[members] = np.arange(len(members))
    return dict(item_rows=item_rows, item_lens=item_lens, item_tables=item_tables, row_item=row_item,
                row_slot=row_slot)


MIN_PREFIX_TOKENS = 64       # a shared prefix shorter than one 64-key tile is not worth a second kernel


def max_items(num_rows: int) -> int:
    """Item slots of a decode bucket of `num_rows` rows (a static shape of its cascade program)."""
    return max(2, num_rows // 8)


def members_per_item(group: int) -> int:
    """Member rows of one item: the item's rows x `group` query heads per KV head fill one 64-row query tile."""
    return max(2, 64 // group)


def engine_plan(block_tables: np.ndarray, context_lens: np.ndarray, *, block_size: int,
                group: int) -> Optional[Dict[str, np.ndarray]]:
    """`plan_cascade` with the engine's policy (item slots, members per item, shortest prefix worth sharing)."""
    return plan_cascade(block_tables, context_lens, block_size=block_size,
                        max_items=max_items(block_tables.shape[0]), members_per_item=members_per_item(group),
                        min_prefix_blocks=max(1, MIN_PREFIX_TOKENS // block_size))


def empty_plan(num_rows: int, max_blocks: int, *, max_items: int, members_per_item: int) -> Dict[str, np.ndarray]:
    """A plan with no items (for compiling the cascade programs ahead of time)."""
    return dict(item_rows=np.zeros((max_items, members_per_item), np.int32),
                item_lens=np.zeros(max_items, np.int32),
                item_tables=np.zeros((max_items, max_blocks), np.int32),
                row_item=np.full(num_rows, -1, np.int32), row_slot=np.zeros(num_rows, np.int32))
