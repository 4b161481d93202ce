"""BlockManager unit tests: exact block ids, slots, copy-on-write, LRU eviction order, swap pairs. No JAX."""
import pathlib
import subprocess
import sys

import pytest

from yaie_jax.cache import BlockManager, OutOfBlocksError


def snapshot(bm):
    return ({sid: (list(s.blocks), s.num_tokens, list(s.cpu_blocks), s.swapped) for sid, s in bm.seqs.items()},
            list(bm.pool.refcount), list(bm.pool.free), list(bm.host.refcount), list(bm.host.free),
            sorted(bm.tree.nodes), bm.get_stats())


def run_prompt(bm, sid, toks, cache=True, free=True):
    """Admit, compute the whole prompt, cache it, finish: the engine's life cycle of a 0-output request."""
    cached = bm.add_sequence(sid, toks)
    bm.append_slots(sid, len(toks) - cached)
    if cache:
        bm.cache_sequence(sid, toks)
    if free:
        bm.free_sequence(sid)
    return cached


# ---------------------------------------------------------------------------------------------- allocation
def test_append_allocates_lowest_free_blocks_and_slots():
    bm = BlockManager(num_gpu_blocks=8, block_size=4)
    assert bm.add_sequence("a", list(range(10))) == 0
    assert bm.num_tokens("a") == 0 and bm.get_block_table("a") == []
    slots, copies = bm.append_slots("a", 10)
    assert bm.get_block_table("a") == [0, 1, 2]
    assert slots == list(range(10)) and copies == []
    slots, _ = bm.append_slots("a", 3)            # fills block 2, spills into block 3
    assert slots == [10, 11, 12] and bm.get_block_table("a") == [0, 1, 2, 3]
    assert bm.num_tokens("a") == 13
    bm.add_sequence("b", [5])
    assert bm.append_slots("b", 1) == ([16], [])  # block 4, offset 0
    assert bm.append_slots("b", 0) == ([], [])
    assert bm.num_free_gpu_blocks == 3
    bm.check_invariants()


def test_freed_blocks_are_reused_fifo():
    bm = BlockManager(num_gpu_blocks=4, block_size=2, enable_prefix_caching=False)
    bm.add_sequence("a", [1, 2, 3])
    bm.append_slots("a", 3)                       # [0, 1]
    bm.add_sequence("b", [1])
    bm.append_slots("b", 1)                       # [2]
    bm.free_sequence("a")                         # released leaf first: free list 3, 1, 0
    bm.add_sequence("c", [1] * 5)
    bm.append_slots("c", 5)
    assert bm.get_block_table("c") == [3, 1, 0]
    bm.check_invariants()


def test_check_then_act_leaves_state_unchanged():
    bm = BlockManager(num_gpu_blocks=2, block_size=4, num_cpu_blocks=1)
    bm.add_sequence("a", [1] * 5)
    assert not bm.can_append_slots("a", 9)
    before = snapshot(bm)
    with pytest.raises(OutOfBlocksError):
        bm.append_slots("a", 9)
    assert snapshot(bm) == before
    bm.append_slots("a", 6)                       # 2 blocks
    assert not bm.can_swap_out("a")               # 2 host blocks needed, 1 exists
    before = snapshot(bm)
    with pytest.raises(OutOfBlocksError):
        bm.swap_out("a")
    assert snapshot(bm) == before
    with pytest.raises(ValueError):
        bm.add_sequence("a", [1])
    with pytest.raises(KeyError):
        bm.append_slots("nobody", 1)
    with pytest.raises(KeyError):
        bm.free_sequence("nobody")
    with pytest.raises(ValueError):
        bm.swap_in("a")                           # not swapped
    assert snapshot(bm) == before
    bm.check_invariants()


def test_num_blocks_needed_matches_append():
    bm = BlockManager(num_gpu_blocks=16, block_size=4)
    bm.add_sequence("a", [1] * 6)
    assert bm.num_blocks_needed("a", 6) == 2
    bm.append_slots("a", 6)
    assert bm.num_blocks_needed("a", 2) == 0 and bm.num_blocks_needed("a", 3) == 1
    bm.fork("a", "b")
    assert bm.num_blocks_needed("a", 1) == 1      # copy-on-write of the shared half-full block
    assert bm.num_blocks_needed("a", 3) == 2
    free = bm.num_available_gpu_blocks
    bm.append_slots("a", 3)
    assert bm.num_available_gpu_blocks == free - 2


# ---------------------------------------------------------------------------------------------- prefix cache
def test_prefix_match_reuses_full_blocks_and_leaves_one_token():
    bm = BlockManager(num_gpu_blocks=10, block_size=4)
    toks = list(range(100, 112))                  # 3 full blocks
    run_prompt(bm, "a", toks)                     # blocks 0, 1, 2 now cached, unreferenced
    assert bm.num_free_gpu_blocks == 7 and bm.num_evictable_gpu_blocks == 3
    # same 12 tokens: only 2 blocks reused (the last token must be computed for its logits)
    assert bm.add_sequence("b", toks) == 8
    assert bm.get_block_table("b") == [0, 1] and bm.num_tokens("b") == 8
    assert bm.num_evictable_gpu_blocks == 1       # block 2 alone is unreferenced
    # a longer prompt with the same prefix reuses all 3; a different 3rd block reuses 2
    assert bm.add_sequence("c", toks + [7]) == 12
    assert bm.get_block_table("c") == [0, 1, 2]
    assert bm.add_sequence("d", toks[:8] + [0, 0, 0, 0, 1]) == 8
    assert bm.add_sequence("e", toks[:7]) == 4    # partial second block is not matched
    assert bm.add_sequence("f", [100]) == 0
    st = bm.get_stats()
    assert st["prefix_cache_queried_tokens"] == 12 + 12 + 13 + 13 + 7 + 1
    assert st["prefix_cache_hit_tokens"] == 8 + 12 + 8 + 4
    assert bm.num_evictable_gpu_blocks == 0
    # b resumes after its cached prefix: the recomputed 3rd block is a new block
    slots, copies = bm.append_slots("b", 4)
    assert bm.get_block_table("b") == [0, 1, 3] and slots == [12, 13, 14, 15] and copies == []
    bm.check_invariants()


def test_prefix_caching_off_never_hits_nor_caches():
    bm = BlockManager(num_gpu_blocks=10, block_size=4, enable_prefix_caching=False)
    toks = list(range(9))
    run_prompt(bm, "a", toks)
    assert bm.add_sequence("b", toks) == 0
    assert bm.num_free_gpu_blocks == 10 and bm.get_stats()["prefix_cache_queried_tokens"] == 0
    bm.check_invariants()


def test_cache_sequence_partial_tokens_and_repeated_calls():
    bm = BlockManager(num_gpu_blocks=10, block_size=2)
    bm.add_sequence("a", [1, 2, 3, 4, 5])
    bm.append_slots("a", 5)                       # [0, 1, 2]
    bm.cache_sequence("a", [1, 2, 3])             # one full block written so far
    assert sorted(bm.tree.nodes) == [0]
    bm.cache_sequence("a", [1, 2, 3, 4, 5, 6, 7])  # more tokens than slots: only slots count
    assert sorted(bm.tree.nodes) == [0, 1]
    bm.cache_sequence("a", [1, 2, 3, 4, 5])       # idempotent
    assert sorted(bm.tree.nodes) == [0, 1] and bm.pool.refcount[:3] == [2, 2, 1]
    bm.append_slots("a", 1)
    bm.cache_sequence("a", [1, 2, 3, 4, 5, 6])    # long-running sequence: the tail block joins later
    assert sorted(bm.tree.nodes) == [0, 1, 2]
    bm.free_sequence("a")
    assert bm.num_evictable_gpu_blocks == 3
    bm.check_invariants()


def test_cache_sequence_dedupes_against_an_existing_prefix():
    """Two identical prompts computed at once get separate blocks; caching the second switches it to the
    first's blocks and frees its duplicates."""
    bm = BlockManager(num_gpu_blocks=10, block_size=2)
    toks = [1, 2, 3, 4, 5]
    for sid in "ab":
        bm.add_sequence(sid, toks)
        bm.append_slots(sid, 5)
    assert bm.get_block_table("a") == [0, 1, 2] and bm.get_block_table("b") == [3, 4, 5]
    bm.cache_sequence("a", toks)
    bm.cache_sequence("b", toks)
    assert bm.get_block_table("b") == [0, 1, 5]
    assert bm.pool.refcount[:6] == [3, 3, 1, 0, 0, 1] and bm.num_free_gpu_blocks == 6
    assert bm.get_stats()["kv_blocks_cached"] == 2
    bm.check_invariants()


def test_cache_sequence_walks_from_known_blocks_with_the_same_result():
    """cache_sequence starts its tree walk after the blocks it knows are cached (matched at admission, cached
    before): the same tree, tables, refcounts and LRU order as a walk from the root, over random life cycles."""
    import random
    rng = random.Random()
    for _ in range(30):
        bms = [BlockManager(num_gpu_blocks=64, block_size=4) for _ in range(2)]
        prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 14))] for _ in range(3)]
        live = []
        for step in range(40):
            op = rng.random()
            if op < 0.35 or not live:
                sid = f"s{step}"
                toks = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 9))]
                for bm in bms:
                    bm.add_sequence(sid, toks)
                    bm.append_slots(sid, len(toks) - bm.num_tokens(sid))
                live.append((sid, toks))
            elif op < 0.7:
                i = rng.randrange(len(live))
                sid, toks = live[i]
                toks = toks + [rng.randrange(50) for _ in range(rng.randrange(1, 6))]
                live[i] = (sid, toks)
                for k, bm in enumerate(bms):
                    bm.append_slots(sid, len(toks) - bm.num_tokens(sid))
                    if k == 1:
                        bm.seqs[sid].tree_blocks = 0          # the reference: walk from the root
                    bm.cache_sequence(sid, toks)
            else:
                sid, toks = live.pop(rng.randrange(len(live)))
                for bm in bms:
                    bm.cache_sequence(sid, toks)
                    bm.free_sequence(sid)
            a, b = (snapshot(bm) for bm in bms)
            assert a == b
            assert [(n.block, n.last_access) for n in bms[0].tree.nodes.values()] == \
                [(n.block, n.last_access) for n in bms[1].tree.nodes.values()]


def test_reset_prefix_cache_keeps_referenced_blocks():
    bm = BlockManager(num_gpu_blocks=8, block_size=2)
    run_prompt(bm, "a", [1, 2, 3, 4, 5])          # caches blocks 0, 1
    assert bm.add_sequence("b", [1, 2, 9]) == 2   # holds block 0
    bm.reset_prefix_cache()
    assert sorted(bm.tree.nodes) == [0] and bm.num_evictable_gpu_blocks == 0
    bm.free_sequence("b")
    assert bm.num_evictable_gpu_blocks == 1
    bm.reset_prefix_cache()
    assert bm.num_free_gpu_blocks == 8 and bm.get_stats()["num_evictions"] == 0   # resets are not evictions
    bm.check_invariants()


# ---------------------------------------------------------------------------------------------- eviction
def test_lru_eviction_order():
    bm = BlockManager(num_gpu_blocks=4, block_size=2)
    run_prompt(bm, "a", [1, 2, 3, 4])             # a: blocks 0, 1 cached
    run_prompt(bm, "b", [5, 6, 7, 8])             # b: blocks 2, 3 cached
    assert sorted(bm.tree.nodes) == [0, 1, 2, 3]
    assert bm.num_free_gpu_blocks == 0 and bm.num_evictable_gpu_blocks == 4
    assert bm.add_sequence("touch", [1, 2, 3, 4, 9]) == 4   # touches a's path: b is now least recently used
    bm.free_sequence("touch")
    bm.add_sequence("x", [42])
    assert bm.can_append_slots("x", 3) and not bm.can_append_slots("x", 9)
    bm.append_slots("x", 3)                       # needs 2 blocks: b's leaf (3), then b's first block (2)
    assert bm.get_block_table("x") == [3, 2]
    assert bm.get_stats()["num_evictions"] == 2
    bm.append_slots("x", 2)                       # next: a's leaf (1)
    assert bm.get_block_table("x") == [3, 2, 1] and sorted(bm.tree.nodes) == [0]
    bm.check_invariants()


def test_lru_leaf_of_a_branch_goes_before_its_older_sibling_parent():
    bm = BlockManager(num_gpu_blocks=6, block_size=1)
    run_prompt(bm, "a", [1, 2, 3])                # path 1 -> 2 -> 3 in blocks 0, 1, 2
    assert run_prompt(bm, "b", [1, 5]) == 1       # reuses block 0, adds 5 as block 3 (newer)
    assert [bm.tree.nodes[b].key for b in (0, 1, 2, 3)] == [(1,), (2,), (3,), (5,)]
    assert bm.evict_cached_blocks(2) == [2, 1]    # the a-branch is older: leaf 3 then 2
    assert bm.evict_cached_blocks(5) == [3, 0]
    assert bm.num_free_gpu_blocks == 6
    bm.check_invariants()


def test_referenced_cached_blocks_are_not_evictable():
    bm = BlockManager(num_gpu_blocks=4, block_size=2)
    run_prompt(bm, "a", [1, 2, 3, 4, 5])          # caches 0, 1 (2 freed)
    assert bm.add_sequence("b", [1, 2, 3, 4, 5]) == 4   # locks both
    assert bm.num_evictable_gpu_blocks == 0
    bm.add_sequence("c", [9])
    assert bm.can_append_slots("c", 4) and not bm.can_append_slots("c", 5)
    bm.append_slots("c", 4)                       # free list: 3, then 2 (freed by a)
    assert bm.get_block_table("c") == [3, 2] and sorted(bm.tree.nodes) == [0, 1]
    bm.check_invariants()


# ---------------------------------------------------------------------------------------------- fork / CoW
def test_copy_on_write_after_fork():
    bm = BlockManager(num_gpu_blocks=8, block_size=4)
    bm.add_sequence("p", [1] * 6)
    bm.append_slots("p", 6)                       # blocks [0, 1], block 1 half full
    bm.fork("p", "c")
    assert bm.get_block_table("c") == [0, 1] and bm.num_tokens("c") == 6
    slots, copies = bm.append_slots("c", 1)
    assert copies == [(1, 2)] and bm.get_block_table("c") == [0, 2] and slots == [2 * 4 + 2]
    slots, copies = bm.append_slots("p", 1)       # p is now the only holder of block 1: no copy
    assert copies == [] and slots == [1 * 4 + 2]
    assert bm.pool.refcount[:3] == [2, 1, 1] and bm.get_stats()["num_cow_copies"] == 1
    bm.check_invariants()


def test_fork_at_block_boundary_needs_no_copy():
    bm = BlockManager(num_gpu_blocks=8, block_size=4)
    bm.add_sequence("p", [1] * 8)
    bm.append_slots("p", 8)                       # [0, 1] both full
    bm.fork("p", "c1")
    bm.fork("p", "c2")
    assert bm.append_slots("c1", 1) == ([8], [])
    assert bm.append_slots("c2", 2) == ([12, 13], [])
    assert bm.append_slots("p", 1) == ([16], [])
    assert bm.pool.refcount[:5] == [3, 3, 1, 1, 1]
    bm.free_sequence("p")
    bm.free_sequence("c1")
    bm.free_sequence("c2")
    assert bm.num_free_gpu_blocks == 8
    bm.check_invariants()


# ---------------------------------------------------------------------------------------------- swap
def test_swap_out_and_in_pairs():
    bm = BlockManager(num_gpu_blocks=4, block_size=2, num_cpu_blocks=4, enable_prefix_caching=False)
    bm.add_sequence("a", [1, 2, 3])
    bm.append_slots("a", 3)                       # gpu [0, 1]
    assert bm.can_swap_out("a")
    assert bm.swap_out("a") == [(0, 0), (1, 1)]
    assert bm.is_swapped("a") and bm.get_block_table("a") == [] and bm.get_cpu_block_table("a") == [0, 1]
    assert bm.num_free_gpu_blocks == 4 and bm.num_free_cpu_blocks == 2 and bm.num_tokens("a") == 3
    assert not bm.can_append_slots("a", 1)
    bm.add_sequence("b", [9])
    bm.append_slots("b", 1)                       # free list was 2, 3, 1, 0: b takes 2
    assert bm.get_block_table("b") == [2]
    assert bm.can_swap_in("a")
    assert bm.swap_in("a") == [(0, 3), (1, 1)]
    assert bm.get_block_table("a") == [3, 1] and bm.num_tokens("a") == 3 and not bm.is_swapped("a")
    assert bm.num_free_cpu_blocks == 4
    assert bm.append_slots("a", 1) == ([3], [])   # continues in its last block, offset 1
    bm.check_invariants()


def test_free_swapped_sequence_returns_host_blocks():
    bm = BlockManager(num_gpu_blocks=4, block_size=2, num_cpu_blocks=2)
    bm.add_sequence("a", [1, 2, 3])
    bm.append_slots("a", 3)
    bm.swap_out("a")
    bm.free_sequence("a")
    assert bm.num_free_cpu_blocks == 2 and bm.num_free_gpu_blocks == 4
    bm.check_invariants()


def test_swapping_forked_siblings_one_by_one_keeps_sharing():
    bm = BlockManager(num_gpu_blocks=8, block_size=4, num_cpu_blocks=8)
    bm.add_sequence("p", [1] * 6)
    bm.append_slots("p", 6)                       # [0, 1]
    bm.fork("p", "c")
    assert bm.num_cpu_blocks_needed("p") == 2
    assert bm.swap_out("p") == [(0, 0), (1, 1)]
    assert bm.num_cpu_blocks_needed("c") == 0     # same, unchanged device blocks: reuse the host copies
    assert bm.swap_out("c") == []
    assert bm.get_cpu_block_table("c") == [0, 1] and bm.host.refcount[:2] == [2, 2]
    assert bm.num_free_gpu_blocks == 8 and bm.num_free_cpu_blocks == 6
    assert bm.swap_in("c") == [(0, 2), (1, 3)]    # fresh blocks (the old ones were freed)
    assert bm.swap_in("p") == []                  # the sibling's device copies are reused
    assert bm.get_block_table("p") == [2, 3] and bm.pool.refcount[2:4] == [2, 2]
    # still shared, so the first write copies
    slots, copies = bm.append_slots("p", 1)
    assert copies == [(3, 4)] and slots == [4 * 4 + 2]
    bm.check_invariants()


def test_swap_copy_is_not_reused_after_the_block_changed():
    bm = BlockManager(num_gpu_blocks=8, block_size=4, num_cpu_blocks=8)
    bm.add_sequence("p", [1] * 6)
    bm.append_slots("p", 6)                       # [0, 1]
    bm.fork("p", "c")
    bm.swap_out("p")                              # host [0, 1]; c alone holds 0, 1 now
    bm.append_slots("c", 1)                       # c writes block 1 in place
    assert bm.swap_out("c") == [(1, 2)]           # block 0 unchanged: reused; block 1 changed: new copy
    assert bm.get_cpu_block_table("c") == [0, 2]
    bm.check_invariants()


def test_swap_in_reusing_a_cached_block_locks_its_ancestors():
    """A swapped-in sequence can hold a cached block without holding its tree parent; the parent must count
    as locked (not evictable)."""
    bm = BlockManager(num_gpu_blocks=8, block_size=2, num_cpu_blocks=8)
    bm.add_sequence("x", [1, 2, 9])
    bm.append_slots("x", 3)                       # [0, 1]
    bm.add_sequence("a", [1, 2, 3, 4, 5])
    bm.append_slots("a", 5)                       # [2, 3, 4]
    bm.cache_sequence("x", [1, 2, 9])             # tree: (1,2) -> block 0
    bm.free_sequence("x")
    bm.fork("a", "b")
    assert bm.swap_out("a") == [(2, 0), (3, 1), (4, 2)]
    bm.cache_sequence("b", [1, 2, 3, 4, 5])       # b switches to block 0; block 3 joins the tree under it
    assert bm.get_block_table("b") == [0, 3, 4]
    bm.free_sequence("b")                         # blocks 0 and 3 cached, unreferenced; free: 5, 6, 7, 1, 2, 4
    assert bm.num_evictable_gpu_blocks == 2
    assert bm.can_swap_in("a")
    assert bm.swap_in("a") == [(0, 5), (2, 6)]    # block 3 still holds host block 1's bytes: reused
    assert bm.get_block_table("a") == [5, 3, 6]
    assert bm.num_evictable_gpu_blocks == 0       # block 0 is locked through its child 3
    assert bm.evict_cached_blocks(8) == []
    bm.check_invariants()
    bm.free_sequence("a")
    assert bm.num_evictable_gpu_blocks == 2
    bm.reset_prefix_cache()
    assert bm.num_free_gpu_blocks == 8 and bm.num_free_cpu_blocks == 8
    bm.check_invariants()


def _cached_twin_scenario(filler_blocks):
    """As above, then a filler sequence takes `filler_blocks` of the 6 free blocks. Swapping "a" back in needs
    2 new blocks + the 2 cached blocks it locks (3 by holding it, 0 as 3's parent) = 4 of free + evictable."""
    bm = BlockManager(num_gpu_blocks=8, block_size=2, num_cpu_blocks=8)
    bm.add_sequence("x", [1, 2, 9])
    bm.append_slots("x", 3)
    bm.add_sequence("a", [1, 2, 3, 4, 5])
    bm.append_slots("a", 5)
    bm.cache_sequence("x", [1, 2, 9])
    bm.free_sequence("x")
    bm.fork("a", "b")
    bm.swap_out("a")
    bm.cache_sequence("b", [1, 2, 3, 4, 5])
    bm.free_sequence("b")
    bm.add_sequence("filler", [7])
    bm.append_slots("filler", 2 * filler_blocks)
    assert bm.num_free_gpu_blocks == 6 - filler_blocks and bm.num_evictable_gpu_blocks == 2
    return bm


def test_can_swap_in_counts_the_cached_blocks_it_would_lock():
    bm = _cached_twin_scenario(filler_blocks=5)   # 1 free + 2 evictable < 4
    assert not bm.can_swap_in("a")
    before = snapshot(bm)
    with pytest.raises(OutOfBlocksError):
        bm.swap_in("a")
    assert snapshot(bm) == before
    bm = _cached_twin_scenario(filler_blocks=4)   # 2 free + 2 evictable == 4
    assert bm.can_swap_in("a")
    assert bm.swap_in("a") == [(0, 2), (2, 4)]
    assert bm.get_block_table("a") == [2, 3, 4] and bm.num_available_gpu_blocks == 0
    bm.check_invariants()


def test_fork_of_swapped_sequence_shares_host_blocks():
    bm = BlockManager(num_gpu_blocks=4, block_size=2, num_cpu_blocks=4)
    bm.add_sequence("p", [1, 2, 3])
    bm.append_slots("p", 3)
    bm.swap_out("p")
    bm.fork("p", "c")
    assert bm.is_swapped("c") and bm.get_cpu_block_table("c") == [0, 1] and bm.host.refcount[:2] == [2, 2]
    bm.swap_in("c")
    assert bm.swap_in("p") == []
    bm.check_invariants()


def test_everything_free_after_finish_and_reset():
    bm = BlockManager(num_gpu_blocks=16, block_size=4, num_cpu_blocks=4)
    for i in range(3):
        run_prompt(bm, i, [i] * 9)
    bm.add_sequence("s", [7] * 5)
    bm.append_slots("s", 5)
    bm.swap_out("s")
    bm.free_sequence("s")
    bm.reset_prefix_cache()
    st = bm.get_stats()
    assert bm.num_free_gpu_blocks == 16 and st["kv_blocks_cached"] == 0 and st["kv_blocks_used"] == 0
    assert st["kv_blocks_free"] == 16 and st["cpu_blocks_free"] == 4 and st["cpu_blocks_total"] == 4
    bm.check_invariants()


def test_check_invariants_catches_a_leak():
    bm = BlockManager(num_gpu_blocks=4, block_size=2)
    bm.add_sequence("a", [1, 2, 3])
    bm.append_slots("a", 3)
    bm.pool.refcount[0] += 1                      # a reference nobody holds
    with pytest.raises(AssertionError):
        bm.check_invariants()


def test_cache_package_is_plain_python():
    """The scheduler's bookkeeping must not pull in JAX (or numpy): it runs on the host between device steps."""
    code = "import sys, yaie_jax.cache; print(sorted(m for m in ('jax', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for f in (pathlib.Path(__file__).parents[2] / "yaie_jax" / "cache").glob("*.py"):
        assert "import jax" not in f.read_text() and "from jax" not in f.read_text(), f
