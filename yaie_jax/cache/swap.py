"""Host (CPU) block pool for swapping sequences out of device memory. Ids only; the runner holds the data."""
from __future__ import annotations

import collections


class HostPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free_list = collections.deque(range(num_blocks))
        self.used = set()

    @property
    def num_free(self) -> int:
        return len(self.free_list)

    def allocate(self) -> int:
        if not self.free_list:
            raise RuntimeError("out of host blocks")
        c = self.free_list.popleft()
        self.used.add(c)
        return c

    def free(self, c: int) -> None:
        if c not in self.used:
            raise AssertionError(f"double free of host block {c}")
        self.used.remove(c)
        self.free_list.append(c)
