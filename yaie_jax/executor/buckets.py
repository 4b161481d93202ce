"""Bucket rounding: the one rule by which padded shapes are chosen, so XLA compiles a bounded set of programs.

Plain Python (no JAX): the scheduler side may import it too.
"""
from __future__ import annotations

from typing import List


def next_power_of(x: int, base: int, lo: int) -> int:
    """The smallest lo * base**k (k >= 0) that is >= x."""
    b = lo
    while b < x:
        b *= base
    return b


def bucket_list(lo: int, hi: int, base: int) -> List[int]:
    """lo, lo*base, lo*base**2, ... up to the first value >= hi, that one replaced by hi (sorted, no repeats)."""
    out, b = [], lo
    while True:
        out.append(min(b, hi) if b >= hi else b)
        if b >= hi:
            break
        b *= base
    return sorted(set(out))


def round_up(x: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= x."""
    return multiple * -(-x // multiple)


__all__ = ["next_power_of", "bucket_list", "round_up"]
