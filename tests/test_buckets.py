"""Bucket rounding (yaie_jax/executor/buckets.py) against brute force."""
from yaie_jax.executor.buckets import bucket_list, next_power_of, round_up


def test_next_power_of_is_the_smallest_bucket_at_least_x():
    for base in (2, 3):
        for lo in (1, 4, 8, 16):
            buckets = [lo * base ** k for k in range(12)]
            for x in range(0, 300):
                assert next_power_of(x, base, lo) == min(b for b in buckets if b >= x)


def test_bucket_list_is_the_powers_below_hi_then_hi():
    for lo in (1, 8, 16):
        for hi in range(1, 200):
            want = sorted({lo * 2 ** k for k in range(12) if lo * 2 ** k < hi} | {hi})
            assert bucket_list(lo, hi, 2) == want


def test_round_up():
    for m in (1, 7, 64):
        for x in range(0, 300):
            assert round_up(x, m) == min(v for v in range(0, 400, m) if v >= x)
