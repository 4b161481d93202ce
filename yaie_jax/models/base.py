"""The contract between models, attention backends and the engine.

A model is a pure function of its params. The engine gives it an *attention callable* per step; models never
know about pages, requests or kernels.

    hidden, kv_caches = model.apply_hidden(params, input_ids, positions, attention, kv_caches)
    logits = model.apply_logits(params, hidden)

- `input_ids`, `positions`: int32 arrays of the same shape `[*lead]` (the engine uses one flat ragged batch
  `[T]`; full-sequence scoring uses `[batch, seq]`).
- `attention(layer_idx, q, k, v, kv_cache) -> (out, new_kv_cache)` with `q [*lead, num_heads, head_dim]`,
  `k`, `v [*lead, num_kv_heads, head_dim]` (RoPE already applied for Llama), `out [*lead, num_heads, head_dim]`.
  `kv_cache` is `kv_caches[layer_idx]` (whatever the backend keeps per layer, e.g. `(k_pages, v_pages)`), or
  None when `kv_caches` is None. The softmax scale is 1/sqrt(head_dim) for every supported model.
- `kv_caches`: a list with one entry per layer, or None; returned updated (same structure).
- `hidden [*lead, hidden_size]` is the final-norm output; `apply_logits` maps any `[..., hidden_size]` to
  float32 `[..., vocab_size]`, so the engine computes logits only for the rows it samples.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Protocol, Tuple

import numpy as np

from .config import ModelConfig

Params = Any  # nested dict of arrays
KVCache = Any
AttentionFn = Callable[[int, Any, Any, Any, KVCache], Tuple[Any, KVCache]]


class CausalLM(Protocol):
    config: ModelConfig
    params: Params  # numpy (host) after loading; the runner places them on devices

    def apply_hidden(self, params: Params, input_ids, positions, attention: AttentionFn,
                     kv_caches: Optional[List[KVCache]]) -> Tuple[Any, Optional[List[KVCache]]]: ...

    def apply_logits(self, params: Params, hidden) -> Any: ...

    def logits(self, input_ids: np.ndarray, attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """Full-sequence scoring: int `[batch, seq]` -> float32 numpy `[batch, seq, vocab]`, jitted.
        `attention_mask [batch, seq]` (1 = real token, 0 = right padding) as in HF."""
        ...
