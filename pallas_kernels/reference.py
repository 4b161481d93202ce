"""Plain-jnp references of the paged attention kernels (same signatures as the Pallas ones).

They double as the engine's `attention_backend="xla"` path, so they are written to be reasonable under XLA:
decode gathers each sequence's pages once; ragged prefill gathers, per sequence row, its pages and attends its
query tokens (looked up by token -> sequence) with a causal mask.

Layouts: q [tokens or seqs, num_q_heads, head_dim]; k_pages/v_pages [num_kv_heads, num_blocks, block_size,
head_dim]; block_tables [num_seqs, max_blocks] int32; context_lens [num_seqs] int32 (0 = padding row).
Accumulation in float32; outputs in q.dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def _scale(scale, head_dim):
    return (1.0 / head_dim ** 0.5) if scale is None else scale


def write_kv(k_pages, v_pages, k, v, slot_mapping):
    """Write new tokens' K/V at their slots. k, v [num_tokens, num_kv_heads, head_dim]; slot_mapping
    [num_tokens] int32 (block * block_size + offset; negative = padding, not written). Under donation of the
    pages XLA updates them in place (a scatter, no copy of the pool)."""
    H, NB, BS, D = k_pages.shape
    slots = jnp.where(slot_mapping < 0, NB * BS, slot_mapping)          # out of range -> dropped
    kf = k_pages.reshape(H, NB * BS, D)
    vf = v_pages.reshape(H, NB * BS, D)
    kf = kf.at[:, slots].set(jnp.swapaxes(k, 0, 1).astype(k_pages.dtype), mode="drop")
    vf = vf.at[:, slots].set(jnp.swapaxes(v, 0, 1).astype(v_pages.dtype), mode="drop")
    return kf.reshape(H, NB, BS, D), vf.reshape(H, NB, BS, D)


def _gather_pages(pages, block_tables):
    # pages [H, NB, BS, D], block_tables [S, MB] -> [S, H, MB*BS, D]
    H, NB, BS, D = pages.shape
    S, MB = block_tables.shape
    g = pages[:, block_tables]                                           # [H, S, MB, BS, D]
    return jnp.transpose(g, (1, 0, 2, 3, 4)).reshape(S, H, MB * BS, D)


def paged_attention(q, k_pages, v_pages, block_tables, context_lens, *, scale=None, interpret=None):
    """Decode attention: one query per sequence over its `context_lens[i]` cached tokens."""
    S, Hq, D = q.shape
    Hkv = k_pages.shape[0]
    G = Hq // Hkv
    k = _gather_pages(k_pages, block_tables).astype(jnp.float32)       # [S, Hkv, L, D]
    v = _gather_pages(v_pages, block_tables).astype(jnp.float32)
    qg = q.reshape(S, Hkv, G, D).astype(jnp.float32) * _scale(scale, D)
    s = jnp.einsum("shgd,shld->shgl", qg, k)                            # [S, Hkv, G, L]
    L = k.shape[2]
    valid = jnp.arange(L)[None, :] < context_lens[:, None]              # [S, L]
    s = jnp.where(valid[:, None, None, :], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("shgl,shld->shgd", p, v).reshape(S, Hq, D)
    out = jnp.where((context_lens > 0)[:, None, None], out, 0.0)
    return out.astype(q.dtype)


def ragged_prefill_attention(q, k_pages, v_pages, query_start, context_lens, block_tables, *, scale=None,
                             interpret=None):
    """Attention for query chunks of many sequences laid back to back (see pallas_kernels docs).

    Sequence i's queries q[query_start[i]:query_start[i+1]] are the last positions of its context_lens[i]
    tokens and attend causally to everything before them. Tokens past query_start[-1] output zeros."""
    T, Hq, D = q.shape
    S = context_lens.shape[0]
    Hkv = k_pages.shape[0]
    G = Hq // Hkv
    t = jnp.arange(T)
    # token -> sequence row (rows with empty query ranges are skipped by searchsorted's right side)
    seq_of = jnp.clip(jnp.searchsorted(query_start, t, side="right") - 1, 0, S - 1)   # [T]
    q_len = query_start[1:] - query_start[:-1]                                          # [S]
    valid_tok = t < query_start[S]
    pos = context_lens[seq_of] - q_len[seq_of] + (t - query_start[seq_of])              # [T] absolute position
    k = _gather_pages(k_pages, block_tables)                                             # [S, Hkv, L, D]
    v = _gather_pages(v_pages, block_tables)
    L = k.shape[2]
    qg = q.reshape(T, Hkv, G, D).astype(jnp.float32) * _scale(scale, D)

    def one_token(qt, s_row, p):
        kt = k[s_row].astype(jnp.float32)                                                # [Hkv, L, D]
        vt = v[s_row].astype(jnp.float32)
        sc = jnp.einsum("hgd,hld->hgl", qt, kt)
        sc = jnp.where((jnp.arange(L) <= p)[None, None, :], sc, NEG_INF)
        pr = jax.nn.softmax(sc, axis=-1)
        return jnp.einsum("hgl,hld->hgd", pr, vt)

    out = jax.lax.map(lambda a: one_token(*a), (qg, seq_of, pos), batch_size=64)       # [T, Hkv, G, D]
    out = out.reshape(T, Hq, D)
    out = jnp.where(valid_tok[:, None, None], out, 0.0)
    return out.astype(q.dtype)
