"""The contract between models, attention backends and the engine.

A model is a pure function of its params. The runner gives it an *attention callable* per step (built from the
step's StepBatch by executor/attention.py `make_paged_attention`); models never know about pages, requests, the
step batch or kernels.

    hidden, kv_caches = model.apply_hidden(params, input_ids, positions, attention, kv_caches)
    logits = model.apply_logits(params, hidden)

- `input_ids`, `positions`: int32 arrays of the same shape `[*lead]` (the engine uses one flat ragged batch
  `[T]`; full-sequence scoring uses `[batch, seq]`).
- `attention(layer_idx, q, k, v, kv_cache) -> (out, new_kv_cache)` with `q [*lead, num_heads, head_dim]`,
  `k`, `v [*lead, num_kv_heads, head_dim]` (RoPE already applied in rotary families), `out [*lead, num_heads,
  head_dim]`.
  `kv_cache` is `kv_caches[layer_idx]` (whatever the backend keeps per layer, e.g. `(k_pages, v_pages)`), or
  None when `kv_caches` is None. The softmax scale is 1/sqrt(head_dim) for every supported model.
- `kv_caches`: a list with one entry per layer, or None; returned updated (same structure).
- `hidden [*lead, hidden_size]` is the final-norm output; `apply_logits` maps any `[..., hidden_size]` to
  float32 `[..., vocab_size]`, so the engine computes logits only for the rows it samples.

Shared implementation: `DecoderModule` (embed -> one `DecoderBlock` (models/decoder.py) per layer -> final norm,
tied or untied LM head) and `CausalLMBase` (the host-side wrapper: params, `init_params`, HF checkpoint
conversion, jitted full-sequence `logits`). Building blocks: models/layers.py (norms, Dense, LM head), models/rope.py.

Adding a decoder-only family (models/llama.py is the file to copy):
1. `config_from_hf(hf: dict) -> ModelConfig`: read config.json; raise ValueError for every option the shared
   block would silently compute differently.
2. A `DecoderSpec` (models/decoder.py): norm kind, positions (rope | learned), QKV kind (separate | fused), MLP
   kind, biases, and the family's norm / embedding / layer param names. A feature the block lacks (q/k norm,
   sliding window, MoE MLP) becomes a new spec value there, tested against HF, not code in the family file.
3. An `HFCheckpoint` (models/hf_checkpoint.py): our module names -> HF module paths, the layer path, prefixes.
4. `class XForCausalLM(CausalLMBase): spec = ...; checkpoint = ...`, and `params_from_hf = XForCausalLM.params_from_hf`.
5. Register the HF `model_type` in models/registry.py; add tests/models/test_x.py comparing logits, greedy tokens
   and gradients with HF transformers on a tiny random checkpoint (as tests/models/test_llama.py does).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .attention_dense import dense_causal_attention
from .config import ModelConfig
from .decoder import DecoderBlock, DecoderSpec
from .hf_checkpoint import HFCheckpoint, params_from_state_dict
from .layers import NORMS, LMHead
from .rope import rope_cos_sin, rope_inv_freq

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


class DecoderModule(nn.Module):
    """What the decoder-only families share: embed -> `DecoderBlock`s -> final norm, and a tied or untied LM head,
    all as `spec` says. Params: {spec.token_embed: {"embedding" [V, D]}, spec.pos_embed (learned positions only):
    {"embedding" [P, D]}, f"{spec.layer_prefix}{i}": the block's params, spec.final_norm: the norm's params,
    "lm_head": {"kernel" [D, V]} (untied only)}."""
    cfg: ModelConfig
    spec: DecoderSpec

    def setup(self):
        cfg, spec = self.cfg, self.spec
        self.token_embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, name=spec.token_embed)
        if spec.positions == "learned":
            self.pos_embed = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name=spec.pos_embed)
        self.layers = [DecoderBlock(cfg, spec, name=f"{spec.layer_prefix}{i}") for i in range(cfg.num_layers)]
        self.final_norm = NORMS[spec.norm](cfg.norm_eps, name=spec.final_norm)
        if not cfg.tie_word_embeddings:
            self.lm_head = LMHead(cfg.vocab_size, name="lm_head")

    def embed(self, input_ids, positions):
        """-> (x [*lead, D], rope: the (cos, sin) tables every layer shares, or None for learned positions)."""
        table = self.token_embed.embedding                                         # [V, D]
        if self.spec.positions == "rope":
            rope = rope_cos_sin(positions, jnp.asarray(rope_inv_freq(self.cfg)))
            return jnp.take(table, input_ids, axis=0), rope
        x = jnp.take(table, input_ids, axis=0) + jnp.take(self.pos_embed.embedding, positions, axis=0)
        return x.astype(table.dtype), None

    def __call__(self, input_ids, positions, attention, kv_caches):
        x, rope = self.embed(input_ids, positions)                                 # [*lead, D]
        new_caches = None if kv_caches is None else []
        for i, layer in enumerate(self.layers):  # unrolled on purpose: per-layer caches stay separate arrays
            x, c = layer(x, rope, i, attention, None if kv_caches is None else kv_caches[i])
            if new_caches is not None:
                new_caches.append(c)
        x = self.final_norm(x)
        if self.is_initializing() and not self.cfg.tie_word_embeddings:
            self.lm_head(x)  # create the untied head's params during `init`
        return x, new_caches

    def logits(self, hidden):
        # LM head: [..., D] -> float32 [..., V], products accumulated in float32
        if self.cfg.tie_word_embeddings:
            w = self.token_embed.embedding                                         # [V, D]
            return jnp.einsum("...d,vd->...v", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
        return self.lm_head(hidden)


class CausalLMBase:
    """A Flax `DecoderModule` + host params implementing the models/base.py contract. A family subclasses it and
    sets `spec` (its DecoderSpec) and `checkpoint` (its HFCheckpoint).

    `logits` keeps one device copy of `params` (made on first use, remade when `.params` is replaced), so repeated
    scoring calls do not re-upload the weights."""
    spec: DecoderSpec = None
    checkpoint: HFCheckpoint = None

    def __init__(self, config: ModelConfig, params: Optional[dict] = None):
        self.config = config
        self.module = DecoderModule(config, self.spec)
        self.params = params
        self._logits_jit = jax.jit(self._full_logits)
        self._device_params = None
        self._device_params_of = None  # the host pytree `_device_params` was made from

    def _init(self, seed: int):
        ids = jnp.zeros((1, 2), jnp.int32)
        return self.module.init(jax.random.PRNGKey(seed), ids, jnp.zeros_like(ids), dense_causal_attention(), None)

    def init_params(self, seed: int = 0, dtype=jnp.float32) -> dict:
        """Random params of this config (numpy), e.g. for tests and shape inspection."""
        return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=dtype), self._init(seed)["params"])

    def param_shapes(self) -> dict:
        """The params tree of this config as jax.ShapeDtypeStructs, traced abstractly (nothing is computed) for a
        one-layer copy of the config, since every layer has the same params: the cost does not grow with depth."""
        one = type(self)(dataclasses.replace(self.config, num_layers=1))
        shapes = jax.eval_shape(lambda: one._init(0)["params"])
        layer = shapes.pop(f"{self.spec.layer_prefix}0")
        return {**shapes, **{f"{self.spec.layer_prefix}{i}": layer for i in range(self.config.num_layers)}}

    @classmethod
    def params_from_hf(cls, sd: Dict[str, np.ndarray], config: ModelConfig) -> dict:
        """HF state dict (numpy) -> our params pytree (the same arrays, renamed; [out, in] weights transposed;
        every tensor shape-checked against `config`). Tensors the model does not use are ignored."""
        return params_from_state_dict(sd, cls.checkpoint, cls(config).param_shapes(), cls.spec.layer_prefix,
                                      config.num_layers)

    def apply_hidden(self, params, input_ids, positions, attention, kv_caches):
        """(input_ids, positions int [*lead]) -> (final-norm hidden [*lead, D], updated kv_caches)."""
        return self.module.apply({"params": params}, input_ids, positions, attention, kv_caches)

    def apply_logits(self, params, hidden):
        """hidden [..., D] -> float32 logits [..., V]."""
        return self.module.apply({"params": params}, hidden, method=DecoderModule.logits)

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
