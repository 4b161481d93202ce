"""Block manager: exact block ids, copy-on-write, eviction order, swap; no JAX involved."""
import pytest

from yaie_jax.cache import BlockManager


def test_append_allocates_lowest_free_blocks_and_slots():
    bm = BlockManager(num_gpu_blocks=8, block_size=4)
    assert bm.add_sequence("a", list(range(10))) == 0
    slots, copies = bm.append_slots("a", 10)
    assert bm.get_block_table("a") == [0, 1, 2]
    assert slots == list(range(10)) and copies == []
    slots, _ = bm.append_slots("a", 3)            # fills block 2, spills into block 3
    assert slots == [10, 11, 12] and bm.get_block_table("a") == [0, 1, 2, 3]
    bm.check_invariants()


def test_check_then_act_leaves_state_unchanged():
    bm = BlockManager(num_gpu_blocks=2, block_size=4)
    bm.add_sequence("a", [1] * 5)
    assert not bm.can_append_slots("a", 9)
    with pytest.raises(RuntimeError):
        bm.append_slots("a", 9)
    assert bm.get_block_table("a") == [] and bm.num_tokens("a") == 0 and bm.num_free_gpu_blocks == 2
    bm.check_invariants()


def test_prefix_match_reuses_full_blocks_and_leaves_one_token():
    bm = BlockManager(num_gpu_blocks=10, block_size=4)
    toks = list(range(100, 112))                 # 3 full blocks
    bm.add_sequence("a", toks)
    bm.append_slots("a", 12)
    bm.cache_sequence("a", toks)
    bm.free_sequence("a")
    # same 12 tokens: only 2 blocks reused (the last token must be computed for its logits)
    assert bm.add_sequence("b", toks) == 8
    assert bm.get_block_table("b") == [0, 1]
    # a longer prompt with the same prefix reuses all 3
    assert bm.add_sequence("c", toks + [7]) == 12
    assert bm.get_block_table("c") == [0, 1, 2]
    st = bm.get_stats()
    assert st["prefix_cache_queried_tokens"] == 12 + 12 + 13 and st["prefix_cache_hit_tokens"] == 20
    bm.check_invariants()


def test_copy_on_write_after_fork():
    bm = BlockManager(num_gpu_blocks=8, block_size=4)
    bm.add_sequence("p", [1] * 6)
    bm.append_slots("p", 6)                       # blocks [0, 1], block 1 half full
    bm.fork("p", "c")
    slots, copies = bm.append_slots("c", 1)
    assert copies == [(1, 2)] and bm.get_block_table("c") == [0, 2] and slots == [2 * 4 + 2]
    slots, copies = bm.append_slots("p", 1)       # p is now the only holder of block 1: no copy
    assert copies == [] and slots == [1 * 4 + 2]
    bm.check_invariants()


def test_lru_eviction_order():
    bm = BlockManager(num_gpu_blocks=4, block_size=2)
    for name, toks in (("a", [1, 2, 3, 4]), ("b", [5, 6, 7, 8])):
        bm.add_sequence(name, toks)
        bm.append_slots(name, 4)
        bm.cache_sequence(name, toks)
        bm.free_sequence(name)
    assert bm.num_free_gpu_blocks == 0 and bm.num_evictable_gpu_blocks == 4
    bm.add_sequence("touch", [1, 2, 3, 4, 9])     # touches a's blocks: b is now least recently used
    bm.free_sequence("touch")
    bm.add_sequence("x", [42])
    bm.append_slots("x", 3)                       # needs 2 blocks: evicts b's leaf (3) then b's root (2)
    assert bm.get_block_table("x") == [3, 2]
    assert bm.get_stats()["num_evictions"] == 2
    bm.check_invariants()


def test_swap_out_and_in_pairs():
    bm = BlockManager(num_gpu_blocks=4, block_size=2, num_cpu_blocks=4, enable_prefix_caching=False)
    bm.add_sequence("a", [1, 2, 3])
    bm.append_slots("a", 3)                       # gpu [0, 1]
    assert bm.swap_out("a") == [(0, 0), (1, 1)]
    assert bm.is_swapped("a") and bm.num_free_gpu_blocks == 4 and bm.num_free_cpu_blocks == 2
    bm.add_sequence("b", [9])
    bm.append_slots("b", 1)                       # takes gpu block 2 (free list order)
    assert bm.swap_in("a") == [(0, 3), (1, 0)]
    assert bm.get_block_table("a") == [3, 0] and bm.num_tokens("a") == 3
    bm.check_invariants()


def test_everything_free_after_finish_and_reset():
    bm = BlockManager(num_gpu_blocks=16, block_size=4)
    for i in range(3):
        toks = [i] * 9
        bm.add_sequence(i, toks)
        bm.append_slots(i, 9)
        bm.cache_sequence(i, toks)
        bm.free_sequence(i)
    bm.reset_prefix_cache()
    assert bm.num_free_gpu_blocks == 16 and bm.get_stats()["kv_blocks_cached"] == 0
    bm.check_invariants()
