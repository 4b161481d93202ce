"""Paged attention callables for the models (see models/base.py for the contract).

The engine builds one per step: it writes the new tokens' K/V into the paged pool at `slot_mapping`, then runs
decode attention (one query per sequence) or ragged prefill attention (query chunks back to back) over the pages.
Backends: "pallas" (pallas_kernels: Mosaic GPU on the GPU, interpret mode on CPU) and "xla" (the plain-jnp
references of the same functions, which XLA compiles anywhere).
"""
from __future__ import annotations

import importlib


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

    def attention(layer_idx, q, k, v, kv_cache):
        # q [T, num_heads, head_dim]; k, v [T, num_kv_heads, head_dim]; pages [num_kv_heads, blocks, bs, head_dim]
        k_pages, v_pages = kv_cache
        k_pages, v_pages = write_kv(k_pages, v_pages, k, v, slot_mapping)
        if decode:
            out = paged_attention(q, k_pages, v_pages, block_tables, context_lens)
        else:
            out = ragged_prefill_attention(q, k_pages, v_pages, query_start, context_lens, block_tables)
        return out, (k_pages, v_pages)

    return attention
