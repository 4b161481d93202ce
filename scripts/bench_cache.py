"""Host cost of KV bookkeeping per scheduler step (CPU, microseconds): 256 running sequences.

    python scripts/bench_cache.py
Prints a table and writes bench/results/cache_bench_cpu.json. These are CPU-host numbers (the scheduler runs
on the host in production too), measured on whatever machine runs the script.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import bench_common as bc  # noqa: E402
from yaie_jax.cache import BlockManager  # noqa: E402

NUM_SEQS, BLOCK, PROMPT = 256, 16, 512


def timed(fn, repeats=20):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main():
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50000, size=PROMPT).tolist() for _ in range(NUM_SEQS)]
    rows = []

    def fresh():
        bm = BlockManager(num_gpu_blocks=NUM_SEQS * (PROMPT // BLOCK + 40), block_size=BLOCK)
        for i, p in enumerate(prompts):
            bm.add_sequence(i, p)
            bm.append_slots(i, PROMPT)
        return bm

    bm = fresh()
    step = [0]

    def decode_step():
        for i in range(NUM_SEQS):
            if bm.can_append_slots(i, 1):
                bm.append_slots(i, 1)
                bm.get_block_table(i)
    rows.append({"operation": "decode step: can_append + append 1 slot + block table, x256",
                 "us_per_step": timed(decode_step), "us_per_seq": timed(decode_step) / NUM_SEQS})

    def cache_all():
        for i, p in enumerate(prompts):
            bm.cache_sequence(i, p)
    rows.append({"operation": "cache_sequence of a 512-token prompt, x256", "us_per_step": timed(cache_all, 3)})
    cache_all()

    def match_all():
        for i, p in enumerate(prompts):
            bm.tree.match(p)
    rows.append({"operation": "prefix match of a 512-token prompt (hit), x256", "us_per_step": timed(match_all)})

    def admit_free():
        for i, p in enumerate(prompts):
            bm.add_sequence(("x", i), p)
        for i in range(NUM_SEQS):
            bm.free_sequence(("x", i))
    rows.append({"operation": "add_sequence (32-block hit) + free_sequence, x256", "us_per_step": timed(admit_free)})
    for r in rows:
        r.setdefault("us_per_seq", r["us_per_step"] / NUM_SEQS)
    bc.print_table(rows, ["operation", "us_per_step", "us_per_seq"])
    path = bc.write_result("bench/results", "cache_bench_cpu",
                           {"env": bc.environment(), "num_seqs": NUM_SEQS, "block_size": BLOCK,
                            "prompt_len": PROMPT, "results": rows, "note": "CPU host timings"})
    print("wrote", path)


if __name__ == "__main__":
    main()
