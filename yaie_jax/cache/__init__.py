"""KV memory bookkeeping (plain Python, no JAX): device block pool, radix prefix cache, host swap pool.

`BlockManager` is the scheduler's one interface; the other classes are its parts, exported for tests and tools.
"""
from .block_manager import BlockManager, SeqBlocks
from .block_pool import BlockPool, OutOfBlocksError
from .radix_cache import RadixCache, RadixNode
from .swap import HostPool, SwapTwins

__all__ = ["BlockManager", "SeqBlocks", "BlockPool", "OutOfBlocksError", "RadixCache", "RadixNode", "HostPool",
           "SwapTwins"]
