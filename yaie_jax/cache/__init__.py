"""KV memory bookkeeping (plain Python, no JAX): block pool, radix prefix cache, host swap pool."""
from .block_manager import BlockManager
from .block_pool import BlockPool
from .radix_cache import RadixCache
from .swap import HostPool

__all__ = ["BlockManager", "BlockPool", "RadixCache", "HostPool"]
