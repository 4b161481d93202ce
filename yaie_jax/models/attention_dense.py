"""Dense causal attention for full-sequence scoring (`model.logits`, research losses).

`dense_causal_attention(mask)` returns an attention callable (models/base.py contract) for inputs shaped
`[batch, seq, heads, head_dim]`, causal, with right padding masked by `mask [batch, seq]` (1 = real token).
GQA: K/V heads are repeated to the query heads.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_causal_attention(mask=None):
    def attention(layer_idx, q, k, v, kv_cache):
        # q [B, S, Hq, D]; k, v [B, S, Hkv, D]
        B, S, Hq, D = q.shape
        Hkv = k.shape[2]
        if Hkv != Hq:
            k = jnp.repeat(k, Hq // Hkv, axis=2)
            v = jnp.repeat(v, Hq // Hkv, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / jnp.sqrt(D)
        allowed = jnp.tril(jnp.ones((S, S), bool))[None, None]              # [1, 1, S, S]
        if mask is not None:
            allowed = allowed & (mask[:, None, None, :] > 0)                 # [B, 1, S, S]
        scores = jnp.where(allowed, scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32))
        return out.astype(q.dtype), kv_cache

    return attention
