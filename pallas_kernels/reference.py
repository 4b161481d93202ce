"""Plain-jnp references of the paged attention kernels (same signatures as the Pallas ones), and the K/V writer.

They double as the engine's `attention_backend="xla"` path, so they are written to be reasonable under XLA:
- decode gathers each sequence's pages once (one gather of [num_kv_heads, num_seqs, max_blocks, block_size,
  head_dim] in the pool's dtype), then two batched contractions with fp32 accumulation;
- ragged prefill cuts the query tokens into work items of (sequence, chunk of `C` query rows), and walks the
  items in a loop whose trip count is the number of real items (computed on the device), a few items per
  iteration: each item gathers its sequence's pages once (not once per token), so the live memory is
  O(items_per_step * C * num_q_heads * max_context) scores, never num_tokens^2 * head_dim.

Layouts: q [tokens or seqs, num_q_heads, head_dim]; k_pages/v_pages [num_kv_heads, num_blocks, block_size,
head_dim]; block_tables [num_seqs, max_blocks] int32; context_lens [num_seqs] int32 (0 = padding row).
Accumulation in float32 (products of the inputs' dtype, precision HIGHEST so fp32 inputs are not rounded to
tf32 on GPUs); outputs in q.dtype. Block-table entries past a sequence's last block may hold anything in
[0, num_blocks) (out-of-range entries are clamped); the pool is assumed finite (the engine zero-initializes it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -1e30
_HI = lax.Precision.HIGHEST


def _scale(scale, head_dim):
    return (1.0 / head_dim ** 0.5) if scale is None else float(scale)


def write_kv(k_pages, v_pages, k, v, slot_mapping):
    """Write new tokens' K/V at their slots.

    k, v [num_tokens, num_kv_heads, head_dim]; slot_mapping [num_tokens] int32 (block * block_size + offset;
    negative = padding, not written). Returns the updated (k_pages, v_pages). Under donation of the pages XLA
    updates them in place (a scatter of num_tokens rows, no copy of the pool)."""
    H, NB, BS, D = k_pages.shape
    slots = jnp.where(slot_mapping < 0, NB * BS, slot_mapping)          # out of range -> dropped by the scatter
    kf = k_pages.reshape(H, NB * BS, D)
    vf = v_pages.reshape(H, NB * BS, D)
    kf = kf.at[:, slots].set(jnp.swapaxes(k, 0, 1).astype(k_pages.dtype), mode="drop")
    vf = vf.at[:, slots].set(jnp.swapaxes(v, 0, 1).astype(v_pages.dtype), mode="drop")
    return kf.reshape(H, NB, BS, D), vf.reshape(H, NB, BS, D)


def paged_attention(q, k_pages, v_pages, block_tables, context_lens, *, scale=None, interpret=None,
                    pages_dtype=None):
    """Decode attention: one query per sequence over its `context_lens[i]` cached tokens.

    q [num_seqs, num_q_heads, head_dim] -> [num_seqs, num_q_heads, head_dim] (zeros where context_lens == 0).
    `pages_dtype`: as in `ragged_prefill_attention` (the gathered pages are reinterpreted)."""
    del interpret
    dt = k_pages.dtype if pages_dtype is None else jnp.dtype(pages_dtype)
    S, Hq, D = q.shape
    Hkv, NB, BS, _ = k_pages.shape
    MB = block_tables.shape[1]
    G = Hq // Hkv
    bt = jnp.clip(block_tables, 0, NB - 1)
    k = _view(k_pages[:, bt], dt)                                        # [Hkv, S, MB, BS, D] pool dtype
    v = _view(v_pages[:, bt], dt)
    qg = q.reshape(S, Hkv, G, D).astype(dt)
    s = jnp.einsum("shgd,hsmbd->shgmb", qg, k, precision=_HI,
                   preferred_element_type=jnp.float32) * _scale(scale, D)  # [S, Hkv, G, MB, BS]
    valid = (jnp.arange(MB * BS) < context_lens[:, None]).reshape(S, 1, 1, MB, BS)
    s = jnp.where(valid, s, NEG_INF)
    m = jnp.max(s, axis=(-2, -1), keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=(-2, -1))                                        # [S, Hkv, G]
    o = jnp.einsum("shgmb,hsmbd->shgd", p, v.astype(jnp.float32), precision=_HI)
    o = o / l[..., None]
    o = jnp.where((context_lens > 0)[:, None, None, None], o, 0.0)
    return o.reshape(S, Hq, D).astype(q.dtype)


def _view(pages, dtype):
    """Gathered pages as `dtype` values (a bitcast where they hold that dtype's bit patterns)."""
    return pages if pages.dtype == dtype else lax.bitcast_convert_type(pages, dtype)


def _cdiv(a, b):
    return -(-a // b)


def cascade_paged_attention(q, k_pages, v_pages, block_tables, context_lens, cascade, *, scale=None,
                            interpret=None):
    """Decode attention with cascade metadata (see pallas_kernels.cascade_paged_attention): the shared prefix
    is part of every sequence's own block table, so the plain decode attention gives the same result."""
    del cascade
    return paged_attention(q, k_pages, v_pages, block_tables, context_lens, scale=scale, interpret=interpret)


def ragged_prefill_attention(q, k_pages, v_pages, query_start, context_lens, block_tables, *, scale=None,
                             interpret=None, q_chunk=None, items_per_step=None, pages_dtype=None):
    """Attention for query chunks of many sequences laid back to back.

    q [num_tokens, num_q_heads, head_dim]; query_start [num_seqs + 1] int32. Sequence i's queries
    q[query_start[i]:query_start[i+1]] are the last positions of its context_lens[i] tokens (their K/V already in
    the pages) and attend causally to everything before them, cached prefix included. Tokens past
    query_start[-1] output zeros. `q_chunk`/`items_per_step` only tune the XLA loop. `pages_dtype`: the pages
    hold the bit patterns of values of this (same-width) dtype (yaie_jax.executor.attention.kv_storage_dtype); they are
    reinterpreted after each gather, inside the loop, so XLA:CPU does not convert the whole pool before it."""
    del interpret
    dt = k_pages.dtype if pages_dtype is None else jnp.dtype(pages_dtype)
    T, Hq, D = q.shape
    Hkv, NB, BS, _ = k_pages.shape
    S, MB = block_tables.shape
    G = Hq // Hkv
    L = MB * BS
    sc = _scale(scale, D)
    # Chunk size: about the mean query length per sequence slot (mixed batches of many 1-token rows get small
    # chunks, one long prompt gets 128-row chunks), a power of two in [8, 128].
    if q_chunk is None:
        per_seq = max(1, T // max(S, 1))
        q_chunk = min(128, max(8, 1 << (per_seq - 1).bit_length()))
    C = max(1, min(q_chunk, T))
    W = _cdiv(T, C) + S                                                  # static bound on the number of items
    if items_per_step is None:
        budget = 1 << 24                                                 # fp32 scores per loop iteration
        items_per_step = max(1, min(W, budget // max(1, C * Hq * L), max(1, 1024 // C)))
    B = items_per_step

    q_len = jnp.maximum(query_start[1:] - query_start[:-1], 0)          # [S]
    n_chunks = (q_len + C - 1) // C
    item_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(n_chunks).astype(jnp.int32)])  # [S+1]
    n_items = item_start[S]
    bt_all = jnp.clip(block_tables, 0, NB - 1)
    q_pad = jnp.concatenate([q, jnp.zeros((C, Hq, D), q.dtype)]).astype(dt)          # [T + C, Hq, D]
    key_idx = jnp.arange(L)

    def step(i, out):
        item = i * B + jnp.arange(B)                                     # [B]
        item_ok = item < n_items
        seq = jnp.clip(jnp.searchsorted(item_start, item, side="right") - 1, 0, S - 1)
        chunk = item - item_start[seq]
        row0 = query_start[seq] + chunk * C                              # [B]
        rows = row0[:, None] + jnp.arange(C)[None, :]                    # [B, C]
        row_ok = item_ok[:, None] & (rows < query_start[seq + 1][:, None])
        pos = (context_lens[seq] - q_len[seq])[:, None] + (rows - query_start[seq][:, None])  # [B, C] absolute
        qi = q_pad[jnp.clip(rows, 0, T + C - 1)].reshape(B, C, Hkv, G, D)
        bt = bt_all[seq]                                                 # [B, MB]
        k = _view(k_pages[:, bt], dt).reshape(Hkv, B, L, D)
        v = _view(v_pages[:, bt], dt).reshape(Hkv, B, L, D)
        s = jnp.einsum("bchgd,hbld->bhgcl", qi, k, precision=_HI, preferred_element_type=jnp.float32) * sc
        mask = key_idx[None, None, :] <= pos[:, :, None]                 # [B, C, L]
        s = jnp.where(mask[:, None, None], s, NEG_INF)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1)                                          # [B, Hkv, G, C]
        o = jnp.einsum("bhgcl,hbld->bchgd", p, v.astype(jnp.float32), precision=_HI)
        o = o / jnp.moveaxis(l, -1, 1)[..., None]                        # [B, C, Hkv, G, D]
        dst = jnp.where(row_ok, rows, T + C)                             # not ours / padding -> dropped
        return out.at[dst.reshape(-1)].set(o.reshape(B * C, Hq, D), mode="drop")

    out = jnp.zeros((T, Hq, D), jnp.float32)
    out = lax.fori_loop(0, (n_items + B - 1) // B, step, out)
    return out.astype(q.dtype)
