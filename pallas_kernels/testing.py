"""Random paged-attention problems for the kernel tests and benchmarks (numpy; no kernel code here)."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class PagedCase:
    q: np.ndarray              # decode: [S, Hq, D]; prefill: [T, Hq, D]
    k_pages: np.ndarray        # [Hkv, NB, BS, D]
    v_pages: np.ndarray
    block_tables: np.ndarray   # [S, MB] int32
    context_lens: np.ndarray   # [S] int32
    query_start: np.ndarray | None = None   # [S+1] int32 (prefill only)


def _pools(rng, num_kv_heads, num_blocks, block_size, head_dim, dtype):
    shape = (num_kv_heads, num_blocks, block_size, head_dim)
    k = rng.standard_normal(shape, dtype=np.float32)
    v = rng.standard_normal(shape, dtype=np.float32)
    return k.astype(dtype), v.astype(dtype)


def _tables(rng, context_lens, block_size, num_blocks, max_blocks, fill):
    """Distinct random blocks per sequence (shuffled: a kernel that assumes contiguity fails); entries past a
    sequence's last block hold `fill` (None = random valid ids, like stale table rows)."""
    S = len(context_lens)
    need = sum(-(-int(c) // block_size) for c in context_lens)
    assert need <= num_blocks, (need, num_blocks)
    perm = rng.permutation(num_blocks)
    bt = rng.integers(0, num_blocks, size=(S, max_blocks)).astype(np.int32) if fill is None else \
        np.full((S, max_blocks), fill, np.int32)
    off = 0
    for i, c in enumerate(context_lens):
        n = -(-int(c) // block_size)
        bt[i, :n] = perm[off:off + n]
        off += n
    return bt


def decode_case(rng, context_lens, *, num_kv_heads=2, group=3, head_dim=64, block_size=16, dtype=np.float32,
                max_blocks=None, extra_blocks=3, table_fill=None, q_scale=1.0):
    context_lens = np.asarray(context_lens, np.int32)
    mb_needed = max(1, max(-(-int(c) // block_size) for c in context_lens))
    max_blocks = max_blocks or mb_needed
    nb = int(sum(-(-int(c) // block_size) for c in context_lens)) + extra_blocks
    k, v = _pools(rng, num_kv_heads, nb, block_size, head_dim, dtype)
    bt = _tables(rng, context_lens, block_size, nb, max_blocks, table_fill)
    q = (q_scale * rng.standard_normal((len(context_lens), num_kv_heads * group, head_dim),
                                       dtype=np.float32)).astype(dtype)
    return PagedCase(q, k, v, bt, context_lens)


def prefill_case(rng, q_lens, context_lens, *, num_tokens=None, num_kv_heads=2, group=3, head_dim=64,
                 block_size=16, dtype=np.float32, max_blocks=None, extra_blocks=3, table_fill=None):
    """q_lens[i] new tokens of sequence i (the last ones of its context_lens[i]); num_tokens >= sum(q_lens)
    pads the token batch (padding rows must come out zero)."""
    q_lens = np.asarray(q_lens, np.int32)
    context_lens = np.asarray(context_lens, np.int32)
    assert np.all(q_lens <= context_lens)
    case = decode_case(rng, context_lens, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                       block_size=block_size, dtype=dtype, max_blocks=max_blocks, extra_blocks=extra_blocks,
                       table_fill=table_fill)
    T = int(num_tokens or q_lens.sum())
    assert T >= q_lens.sum()
    case.q = rng.standard_normal((T, num_kv_heads * group, head_dim), dtype=np.float32).astype(dtype)
    case.query_start = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return case


def rel_err(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def shared_prefix_case(rng, groups, *, num_kv_heads=2, group=3, head_dim=64, block_size=16, dtype=np.float32,
                       max_blocks=None, extra_blocks=3):
    """A decode problem where sequences share leading pages. groups: list of (shared_pages, [context_lens of the
    members]); every member of a group starts with the same `shared_pages` page ids (its first member's), then its
    own pages. Returns (case, member rows of each group)."""
    lens = [c for _, members in groups for c in members]
    case = decode_case(rng, lens, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                       block_size=block_size, dtype=dtype, max_blocks=max_blocks, extra_blocks=extra_blocks)
    for shared, members in groups:
        assert shared == 0 or all(c > shared * block_size for c in members)
    rows = share_leading_pages(case.block_tables, [(shared, len(members)) for shared, members in groups])
    return case, rows


def share_leading_pages(block_tables, groups):
    """In place: consecutive groups of rows, given as (shared_pages, num_rows), get their first row's first
    `shared_pages` page ids. Returns the rows of each group."""
    rows, r = [], 0
    for shared, n in groups:
        rows.append(list(range(r, r + n)))
        block_tables[r + 1:r + n, :shared] = block_tables[r, :shared]
        r += n
    return rows
