"""The paged KV pool on the device and the host swap pool: sizing, allocation, block copies and swaps.

Device pool: one `(k_pages, v_pages)` pair per layer, each `[num_kv_heads, num_blocks, block_size, head_dim]`; on
the CPU a 16-bit float pool holds the values' uint16 bit patterns (`attention.kv_storage_dtype`). Step programs
take it donated and return it updated, so XLA writes it in place; the runner stores the returned pool back into
`KVPool.caches`. Host pool: `[layers, 2 (k/v), num_kv_heads, num_cpu_blocks, block_size, head_dim]`, same
storage dtype. Block id lists are padded to powers of two (>= 8) so the copy programs stay few; padding pairs
target block `num_blocks` (out of range: the scatter drops them).
"""
from __future__ import annotations

from typing import List, Optional, Sequence as Seq, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from yaie_jax.defaults import ACTIVATION_RESERVE_BYTES, kv_bytes_per_token
from yaie_jax.executor.buckets import next_power_of

CPU_POOL_CAP_BYTES = 2 * 1024 ** 3      # the pool's size limit where the device reports no memory limit


def kv_bytes_per_block(mc, block_size: int, dtype) -> int:
    """Bytes of K and V one block takes over all layers, for a pool of `dtype` values (model config `mc`)."""
    per_token = kv_bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, jnp.dtype(dtype).itemsize)
    return block_size * per_token


def auto_num_blocks(config, max_blocks_per_seq: int, bytes_per_block: int) -> int:
    """Size the KV pool: on a GPU, `gpu_memory_utilization` of device memory minus what is in use (params)
    and the activation reserve (defaults.ACTIVATION_RESERVE_BYTES, split over the TP shards); elsewhere enough
    for max_num_seqs full-length sequences, capped at CPU_POOL_CAP_BYTES."""
    per_seq = max_blocks_per_seq
    useful = config.max_num_seqs * per_seq + 1
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:
        stats = None
    if stats and "bytes_limit" in stats:
        tp = max(1, config.tensor_parallel_size)
        limit = stats["bytes_limit"] * config.gpu_memory_utilization
        free = limit - stats.get("bytes_in_use", 0) - ACTIVATION_RESERVE_BYTES // tp
        n = int(free * tp // bytes_per_block)
        return max(per_seq + 1, min(n, useful * 2))
    return max(per_seq + 1, min(useful, CPU_POOL_CAP_BYTES // bytes_per_block))


class KVPool:
    """The device pool (`caches`) and the optional host swap pool (`host`) of one runner."""

    def __init__(self, mc, *, num_blocks: int, block_size: int, storage_dtype, num_cpu_blocks: int = 0,
                 sharding=None):
        self.num_layers, self.num_kv_heads, self.head_dim = mc.num_layers, mc.num_kv_heads, mc.head_dim
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.storage_dtype = storage_dtype
        self.sharding = sharding
        self.caches = self._alloc()
        self.host: Optional[np.ndarray] = None
        if num_cpu_blocks > 0:
            # [layers, 2 (k/v), num_kv_heads, num_cpu_blocks, block_size, head_dim]
            self.host = np.zeros((self.num_layers, 2, self.num_kv_heads, num_cpu_blocks, block_size, self.head_dim),
                                 dtype=np.dtype(storage_dtype))
        self._copy_fn = jax.jit(_copy_blocks, donate_argnums=(0,))
        self._write_blocks_fn = jax.jit(_write_blocks, donate_argnums=(0,))
        self._read_blocks_fn = jax.jit(_read_blocks)

    def shape(self) -> Tuple[int, int, int, int]:
        """[num_kv_heads, num_blocks, block_size, head_dim]: one layer's K (or V) pages."""
        return (self.num_kv_heads, self.num_blocks, self.block_size, self.head_dim)

    def _alloc(self) -> List[tuple]:
        shape = self.shape()

        def zeros():
            if self.sharding is not None:
                return jax.jit(lambda: jnp.zeros(shape, self.storage_dtype), out_shardings=self.sharding)()
            return jnp.zeros(shape, self.storage_dtype)         # bits 0 = +0.0 in either storage

        return [(zeros(), zeros()) for _ in range(self.num_layers)]

    def _pad_pairs(self, pairs: Seq[Tuple[int, int]]) -> Tuple[np.ndarray, np.ndarray]:
        n = next_power_of(len(pairs), 2, 8)
        src = np.zeros(n, np.int32)                              # [n]
        dst = np.full(n, self.num_blocks, np.int32)              # [n] out of range: dropped by the scatter
        for i, (a, b) in enumerate(pairs):
            src[i], dst[i] = a, b
        return src, dst

    def copy_blocks(self, pairs: Seq[Tuple[int, int]]) -> None:
        """Device block copies (src, dst), in one device call."""
        src, dst = self._pad_pairs(pairs)
        self.caches = self._copy_fn(self.caches, src, dst)

    def swap_out(self, pairs: Seq[Tuple[int, int]]) -> None:
        """(device block, host block) pairs: device -> host (waits for the copy)."""
        assert self.host is not None, "swap_out without a host pool"
        gpu = np.array([g for g, _ in pairs], np.int32)
        cpu = np.array([c for _, c in pairs], np.int32)
        padded = np.zeros(next_power_of(len(gpu), 2, 8), np.int32)
        padded[:len(gpu)] = gpu
        data = np.asarray(jax.device_get(self._read_blocks_fn(self.caches, padded)))
        # data: [layers, 2, num_kv_heads, n_padded, block_size, head_dim]
        self.host[:, :, :, cpu] = data[:, :, :, :len(gpu)]

    def swap_in(self, pairs: Seq[Tuple[int, int]]) -> None:
        """(host block, device block) pairs: host -> device."""
        assert self.host is not None, "swap_in without a host pool"
        cpu = np.array([c for c, _ in pairs], np.int32)
        n = next_power_of(len(pairs), 2, 8)
        dst = np.full(n, self.num_blocks, np.int32)
        dst[:len(pairs)] = [g for _, g in pairs]
        data = np.zeros(self.host.shape[:3] + (n,) + self.host.shape[4:], self.host.dtype)
        data[:, :, :, :len(pairs)] = self.host[:, :, :, cpu]
        self.caches = self._write_blocks_fn(self.caches, data, dst)


def _copy_blocks(kv_caches, src, dst):
    out = []
    for k, v in kv_caches:
        out.append((k.at[:, dst].set(k[:, src], mode="drop"), v.at[:, dst].set(v[:, src], mode="drop")))
    return out


def _read_blocks(kv_caches, ids):
    # -> [layers, 2, num_kv_heads, n, block_size, head_dim]
    return jnp.stack([jnp.stack([k[:, ids], v[:, ids]]) for k, v in kv_caches])


def _write_blocks(kv_caches, data, dst):
    out = []
    for i, (k, v) in enumerate(kv_caches):
        out.append((k.at[:, dst].set(data[i, 0].astype(k.dtype), mode="drop"),
                    v.at[:, dst].set(data[i, 1].astype(v.dtype), mode="drop")))
    return out


__all__ = ["KVPool", "kv_bytes_per_block", "auto_num_blocks"]
