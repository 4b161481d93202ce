"""Host cost of KV bookkeeping per scheduler step, in microseconds (CPU): 256 running sequences.

    python scripts/bench_cache.py [--num-seqs 256] [--block-size 16] [--prompt-len 512] [--repeats 15]

Each row is one schedule-sized operation: the same call made once for each of the 256 sequences, as a scheduler
step would. Setup is not timed; every timed repetition starts from the same state. Prints a table (median and
best of the repetitions, per step and per sequence) and writes bench/results/cache_bench_cpu.json. These are host
CPU numbers: the BlockManager is plain Python and runs on the host in production too. Standard library only
(no numpy, no JAX), so it runs as-is on any host, e.g. the CPU of a GPU server.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from yaie_jax.cache import BlockManager  # noqa: E402


def print_table(rows, cols):
    def fmt(v):
        return f"{v:,.3f}" if isinstance(v, float) and abs(v) < 100 else (f"{v:,.0f}" if isinstance(v, float)
                                                                         else str(v))
    widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r[c]).ljust(w) for c, w in zip(cols, widths)))


def measure(setup, op, repeats):
    """Median and best wall time (us) of op(state) over `repeats` fresh states from setup(). The garbage
    collector is off while timing (as timeit does): the setup's garbage should not be charged to the op."""
    times = []
    for _ in range(repeats):
        state = setup()
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            op(state)
            times.append((time.perf_counter() - t0) * 1e6)
        finally:
            gc.enable()
    return statistics.median(times), min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--name", default="cache_bench_cpu", help="output file name, without .json")
    args = ap.parse_args()
    S, BS, L, R = args.num_seqs, args.block_size, args.prompt_len, args.repeats
    rng = random.Random(0)
    prompts = [[rng.randrange(50000) for _ in range(L)] for _ in range(S)]
    # decode lengths spread over a block, so 1/BS of the sequences cross into a new block at each step
    decode_extra = [rng.randrange(BS * 4) for _ in range(S)]
    num_blocks = S * (L // BS + 8) * 2 + 64

    def running(cache_prompts=False, prefix_caching=True):
        """S sequences that have computed their prompt plus some decode tokens."""
        bm = BlockManager(num_blocks, BS, num_cpu_blocks=S * (L // BS + 8), enable_prefix_caching=prefix_caching)
        for i, p in enumerate(prompts):
            bm.add_sequence(i, p)
            bm.append_slots(i, L - bm.num_tokens(i))
            for _ in range(decode_extra[i]):
                bm.append_slots(i, 1)
            if cache_prompts:
                bm.cache_sequence(i, p)
        return bm

    def cached_then_freed():
        """The prompts cached by sequences that have finished: every block evictable."""
        bm = running(cache_prompts=True)
        for i in range(S):
            bm.free_sequence(i)
        return bm

    def admitted():
        bm = BlockManager(num_blocks, BS)
        for i in range(S):
            bm.add_sequence(i, prompts[i])
        return bm

    rows = []

    def row(name, setup, op, repeats=R):
        med, best = measure(setup, op, repeats)
        rows.append({"operation": name, "us_per_step": med, "us_per_seq": med / S, "best_us_per_step": best})

    def decode(bm):
        for i in range(S):
            if bm.can_append_slots(i, 1):
                bm.append_slots(i, 1)
                bm.get_block_table(i)
    row(f"decode: can_append_slots + append_slots(1) + get_block_table, x{S}", running, decode)

    def decode8(bm):
        need = sum(bm.num_blocks_needed(i, 8) for i in range(S))
        assert need <= bm.num_available_gpu_blocks
        for i in range(S):
            bm.append_slots(i, 8)
    row(f"multi-step decode (8 steps): num_blocks_needed + append_slots(8), x{S}", running, decode8)

    def prefill(bm):
        for i in range(S):
            bm.append_slots(i, L)
    row(f"prefill: append_slots({L}) from empty, x{S}", admitted, prefill)

    def match(bm):
        m = bm.tree.match
        for p in prompts:
            m(p)
    row(f"prefix match of a {L}-token prompt (full hit, no locking), x{S}", cached_then_freed, match)

    def admit_hit(bm):
        for i, p in enumerate(prompts):
            bm.add_sequence(("x", i), p)
    row(f"add_sequence, {L}-token prompt, {L // BS - 1}-block hit + locks, x{S}", cached_then_freed, admit_hit)

    def admit_miss(bm):
        for i, p in enumerate(prompts):
            bm.add_sequence(("x", i), p)
    row(f"add_sequence, {L}-token prompt, miss (empty tree), x{S}", lambda: BlockManager(num_blocks, BS), admit_miss)

    def cache_new(bm):
        for i, p in enumerate(prompts):
            bm.cache_sequence(i, p)
    row(f"cache_sequence: insert {L // BS} new blocks, x{S}", running, cache_new)

    def cache_again(bm):
        for i, p in enumerate(prompts):
            bm.cache_sequence(i, p)
    row(f"cache_sequence: {L // BS} blocks already cached (periodic re-cache), x{S}",
        lambda: running(cache_prompts=True), cache_again)

    def free_all(bm):
        for i in range(S):
            bm.free_sequence(i)
    row(f"free_sequence, ~{L // BS + 2} blocks, not cached, x{S}", running, free_all)
    row(f"free_sequence, ~{L // BS + 2} blocks, prompt cached (unlocks), x{S}",
        lambda: running(cache_prompts=True), free_all)

    def evict_all(bm):
        bm.evict_cached_blocks(S * (L // BS))
    row(f"evict_cached_blocks: {S * (L // BS)} LRU blocks (us_per_seq here: per {L // BS} blocks)",
        cached_then_freed, evict_all, repeats=max(3, R // 3))

    def full_pool():
        """Running sequences plus enough cached, unreferenced blocks that the free list is empty."""
        bm = cached_then_freed()
        for i, p in enumerate(prompts):
            bm.add_sequence(i, p[::-1])             # other prompts: no hits, so every cached block stays evictable
            bm.append_slots(i, L - bm.num_tokens(i))
            for _ in range(decode_extra[i]):
                bm.append_slots(i, 1)
        bm.add_sequence("filler", [0])
        bm.append_slots("filler", bm.num_free_gpu_blocks * BS)
        assert bm.num_free_gpu_blocks == 0 and bm.num_evictable_gpu_blocks > S
        return bm
    row(f"decode with an empty free list (new blocks come from LRU eviction), x{S}", full_pool, decode)

    def swap_out(bm):
        for i in range(S):
            bm.swap_out(i)

    def swapped():
        bm = running(prefix_caching=False)
        swap_out(bm)
        return bm

    def swap_in(bm):
        for i in range(S):
            bm.swap_in(i)
    row(f"swap_out, ~{L // BS + 2} blocks, x{S}", lambda: running(prefix_caching=False), swap_out,
        repeats=max(3, R // 3))
    row(f"swap_in, ~{L // BS + 2} blocks, x{S}", swapped, swap_in, repeats=max(3, R // 3))

    bm = running(cache_prompts=True)
    row("check_invariants (not on the hot path)", lambda: bm, lambda b: b.check_invariants(), repeats=3)

    print_table(rows, ["operation", "us_per_step", "us_per_seq", "best_us_per_step"])
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "implementation": platform.python_implementation(),
           "machine": platform.machine(), "processor": platform.processor() or None,
           "cpu_count": os.cpu_count(), "host": platform.node(),
           "device": "cpu (host-side bookkeeping; no accelerator involved)"}
    record = {"env": env, "num_seqs": S, "block_size": BS, "prompt_len": L, "repeats": R, "results": rows,
              "note": "CPU host timings in microseconds; median (and best) of repeats, each from a fresh state"}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, args.name + ".json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    print("wrote", path)


if __name__ == "__main__":
    main()
