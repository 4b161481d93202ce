"""Paged attention callables for the models (see models/base.py for the contract).

The engine builds one per step: it writes the new tokens' K/V into the paged pool at `slot_mapping`, then runs
decode attention (one query per sequence) or ragged prefill attention (query chunks back to back) over the pages.
Backends: "pallas" (pallas_kernels: Mosaic GPU on the GPU, interpret mode on CPU) and "xla" (the plain-jnp
references of the same functions, which XLA compiles anywhere).
"""
from __future__ import annotations

import importlib

import jax


def kernel_functions(backend: str):
    """(write_kv, paged_attention, ragged_prefill_attention) for a backend name ("xla" | "pallas")."""
    if backend == "xla":
        mod = importlib.import_module("pallas_kernels.reference")
    elif backend == "pallas":
        mod = importlib.import_module("pallas_kernels")
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    return mod.write_kv, mod.paged_attention, mod.ragged_prefill_attention


def make_paged_attention(backend: str, *, decode: bool, slot_mapping, query_start, context_lens, block_tables,
                         mesh=None):
    write_kv, paged_attention, ragged_prefill_attention = kernel_functions(backend)
    if mesh is not None and backend == "pallas":
        paged_attention, ragged_prefill_attention = _per_shard(mesh, paged_attention, ragged_prefill_attention)

    def attention(layer_idx, q, k, v, kv_cache):
        # q [T, num_heads, head_dim]; k, v [T, num_kv_heads, head_dim]; pages [num_kv_heads, blocks, bs, head_dim]
        k_pages, v_pages = kv_cache
        k_pages, v_pages = write_kv(k_pages, v_pages, k, v, slot_mapping)
        if mesh is not None:  # keep the pool split by KV head across steps (no re-layout between calls)
            from jax.sharding import NamedSharding, PartitionSpec as P
            pool = NamedSharding(mesh, P("tp", None, None, None))
            k_pages = jax.lax.with_sharding_constraint(k_pages, pool)
            v_pages = jax.lax.with_sharding_constraint(v_pages, pool)
        if decode:
            out = paged_attention(q, k_pages, v_pages, block_tables, context_lens)
        else:
            out = ragged_prefill_attention(q, k_pages, v_pages, query_start, context_lens, block_tables)
        return out, (k_pages, v_pages)

    return attention


def _per_shard(mesh, paged_attention, ragged_prefill_attention):
    """Run the Pallas kernels per TP shard (each shard: its query heads and its KV heads) under shard_map."""
    from jax.sharding import PartitionSpec as P
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # older jax
        from jax.experimental.shard_map import shard_map
    heads = P(None, "tp", None)
    pool = P("tp", None, None, None)
    rep = P()

    def decode(q, kp, vp, bt, cl):
        return shard_map(paged_attention, mesh=mesh, in_specs=(heads, pool, pool, rep, rep), out_specs=heads,
                         check_vma=False)(q, kp, vp, bt, cl)

    def prefill(q, kp, vp, qs, cl, bt):
        return shard_map(ragged_prefill_attention, mesh=mesh, in_specs=(heads, pool, pool, rep, rep, rep),
                         out_specs=heads, check_vma=False)(q, kp, vp, qs, cl, bt)

    return decode, prefill
