"""Dense causal attention for full-sequence scoring (`model.logits`, research losses and gradients).

`dense_causal_attention(mask=None)` returns an attention callable (models/base.py contract) for inputs shaped
`q [batch, seq, num_heads, head_dim]`, `k, v [batch, seq, num_kv_heads, head_dim]`: causal, with right padding
masked out by `mask [batch, seq]` (1 = real token, 0 = padding, as HF's attention_mask). Scores and softmax are
computed in float32; the output has q's dtype. Softmax scale 1/sqrt(head_dim). GQA: each K/V head serves
num_heads // num_kv_heads query heads. The KV cache argument is passed through untouched.
Positions are the column index: full-sequence scoring uses positions = arange(seq).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so a row with nothing allowed (left padding) gives a uniform softmax, not NaN


def dense_causal_attention(mask=None):
    def attention(layer_idx, q, k, v, kv_cache):
        B, S, Hq, D = q.shape
        Hkv = k.shape[2]
        if Hkv != Hq:
            k = jnp.repeat(k, Hq // Hkv, axis=2)                                  # [B, S, Hq, D]
            v = jnp.repeat(v, Hq // Hkv, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
        scores = scores * (1.0 / jnp.sqrt(jnp.float32(D)))                        # [B, Hq, S, S]
        allowed = jnp.tril(jnp.ones((S, S), bool))[None, None]                    # [1, 1, S, S]
        if mask is not None:
            allowed = allowed & (mask[:, None, None, :] > 0)                      # [B, 1, S, S]
        scores = jnp.where(allowed, scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32))         # [B, S, Hq, D]
        return out.astype(q.dtype), kv_cache

    return attention
