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

Shared implementation: `DecoderModule` (the Flax body every family reuses: layer loop, final norm, tied or untied
LM head) and `CausalLMBase` (the host-side wrapper: params, `init_params`, jitted full-sequence `logits`).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Protocol, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .attention_dense import dense_causal_attention
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


class LMHead(nn.Module):
    """Untied LM head: [..., D] @ kernel [D, V] -> float32 [..., V], accumulated in float32."""
    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features))
        return jnp.einsum("...d,dv->...v", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)


class DecoderModule(nn.Module):
    """What the decoder-only families share: embed -> layers -> final norm, and a tied or untied LM head.

    A subclass's `setup` creates its submodules under its own param names (`h_i`, `layers_i`, ...), assigning
    `self.layers` (blocks called as `layer(x, *layer_args, layer_idx, attention, kv_cache) -> (x, kv_cache)`) and
    `self.final_norm`, then calls `self.setup_lm_head()`. It implements `embed(input_ids, positions) ->
    (x [*lead, D], layer_args)` (layer_args: what every layer gets besides x, e.g. Llama's RoPE tables) and
    `token_embedding()` (the [V, D] table a tied head multiplies by). The untied head's params are `lm_head`.
    """
    cfg: ModelConfig

    def setup_lm_head(self):
        if not self.cfg.tie_word_embeddings:
            self.lm_head = LMHead(self.cfg.vocab_size, name="lm_head")

    def __call__(self, input_ids, positions, attention, kv_caches):
        x, layer_args = self.embed(input_ids, positions)                           # [*lead, D]
        new_caches = None if kv_caches is None else []
        for i, layer in enumerate(self.layers):  # unrolled on purpose: per-layer caches stay separate arrays
            x, c = layer(x, *layer_args, i, attention, None if kv_caches is None else kv_caches[i])
            if new_caches is not None:
                new_caches.append(c)
        x = self.final_norm(x)
        if self.is_initializing() and not self.cfg.tie_word_embeddings:
            self.lm_head(x)  # create the untied head's params during `init`
        return x, new_caches

    def logits(self, hidden):
        # LM head: [..., D] -> float32 [..., V], products accumulated in float32
        if self.cfg.tie_word_embeddings:
            w = self.token_embedding()                                             # [V, D]
            return jnp.einsum("...d,vd->...v", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
        return self.lm_head(hidden)


class CausalLMBase:
    """A Flax module + host params implementing the models/base.py contract (shared by GPT-2 and Llama).

    `logits` keeps one device copy of `params` (made on first use, remade when `.params` is replaced), so repeated
    scoring calls do not re-upload the weights."""
    module_cls = None

    def __init__(self, config: ModelConfig, params: Optional[dict] = None):
        self.config = config
        self.module = self.module_cls(config)
        self.params = params
        self._logits_jit = jax.jit(self._full_logits)
        self._device_params = None
        self._device_params_of = None  # the host pytree `_device_params` was made from

    def init_params(self, seed: int = 0, dtype=jnp.float32) -> dict:
        """Random params of this config (numpy), e.g. for tests and shape inspection."""
        ids = jnp.zeros((1, 2), jnp.int32)
        variables = self.module.init(jax.random.PRNGKey(seed), ids, jnp.zeros_like(ids),
                                     dense_causal_attention(), None)
        return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=dtype), variables["params"])

    def apply_hidden(self, params, input_ids, positions, attention, kv_caches):
        """(input_ids, positions int [*lead]) -> (final-norm hidden [*lead, D], updated kv_caches)."""
        return self.module.apply({"params": params}, input_ids, positions, attention, kv_caches)

    def apply_logits(self, params, hidden):
        """hidden [..., D] -> float32 logits [..., V]."""
        return self.module.apply({"params": params}, hidden, method=self.module_cls.logits)

    def _full_logits(self, params, input_ids, mask):
        B, S = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))      # [B, S]
        hidden, _ = self.apply_hidden(params, input_ids, positions, dense_causal_attention(mask), None)
        return self.apply_logits(params, hidden)                                  # [B, S, V] float32

    def logits(self, input_ids: np.ndarray, attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """Full-sequence scoring: int [B, S] (right-padded, `attention_mask` 1 = real token) -> float32 numpy
        [B, S, V]. Rows at padded positions are meaningless. Compiles once per (B, S)."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
        if self._device_params is None or self._device_params_of is not self.params:
            self._device_params = jax.device_put(self.params)
            self._device_params_of = self.params
        out = self._logits_jit(self._device_params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
        return np.asarray(out, dtype=np.float32)
