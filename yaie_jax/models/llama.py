"""Llama family in Flax (linen), numerically matching HF transformers' LlamaForCausalLM.

RMSNorm, rotary position embeddings (RoPE) with the config's theta (plain, "linear" or "llama3" scaling),
grouped-query attention, SwiGLU MLP, tied or untied LM head, optional attention / MLP biases. Covers Llama 2/3,
SmolLM/SmolLM2, TinyLlama, Mistral-style dense models without sliding windows.

RoPE is applied here, from the `positions` input, before the attention callable of models/base.py: the engine
passes arbitrary positions for one flat ragged batch, so nothing may assume `positions == arange(seq)`.
Layers are a Python loop with one params dict per layer (`layers_0` ...), so each layer keeps its own KV cache
array (see DESIGN.md: a scan over stacked layers copied the cache).

Params: {"embed_tokens": {"embedding" [V, D]}, "layers_i": {"input_layernorm": {"scale"}, "q_proj", "k_proj",
"v_proj", "o_proj", "post_attention_layernorm", "gate_proj", "up_proj", "down_proj"}, "norm": {"scale"},
"lm_head": {"kernel" [D, V]} (untied only)}. Dense kernels are [in, out] (HF Linear weights transposed); q/k/v
kept separate so tensor parallelism can split them by head.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .base import CausalLMBase, DecoderModule
from .config import ModelConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _rope_scaling_from_hf(hf: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling or None) from either config.json style: transformers<5 keeps `rope_theta` and
    `rope_scaling` at the top level, transformers 5 nests both in `rope_parameters`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling:
        params.update(scaling)
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {rope_type!r} (yaie_jax supports: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)})")
    if params.get("partial_rotary_factor") not in (None, 1.0):
        raise ValueError(f"unsupported partial_rotary_factor={params['partial_rotary_factor']!r}")
    if rope_type == "default":
        return theta, None
    if params.get("attention_factor") not in (None, 1.0):
        raise ValueError(f"unsupported rope attention_factor={params['attention_factor']!r}")
    need = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    missing = [k for k in need[rope_type] if k not in params]
    if missing:
        raise ValueError(f"rope scaling {rope_type!r} is missing {missing}")
    return theta, {"rope_type": rope_type, **{k: params[k] for k in need[rope_type]}}


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a HF Llama config.json dict; raises ValueError for options we would silently get wrong."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported Llama hidden_act={act!r} (yaie_jax supports only 'silu')")
    if hf.get("pretraining_tp", 1) not in (None, 1):
        raise ValueError(f"unsupported Llama pretraining_tp={hf['pretraining_tp']!r}")
    if hf.get("sliding_window") or hf.get("use_sliding_window"):
        raise ValueError("unsupported: sliding-window attention")
    d = hf.get("hidden_size", 4096)
    heads = hf.get("num_attention_heads", 32)
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or d // heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    theta, scaling = _rope_scaling_from_hf(hf)
    eos = hf.get("eos_token_id")
    if isinstance(eos, (list, tuple)):  # Llama 3 lists several; ModelConfig keeps one (the tokenizer knows all)
        eos = eos[0] if eos else None
    return ModelConfig(
        arch="llama", vocab_size=hf.get("vocab_size", 32000), hidden_size=d,
        num_layers=hf.get("num_hidden_layers", 32), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=hf.get("intermediate_size", 11008),
        max_position_embeddings=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), activation="silu", rope_theta=theta,
        rope_scaling=scaling, attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), bos_token_id=hf.get("bos_token_id"), eos_token_id=eos)


def params_from_hf(sd: Dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """HF Llama state dict (numpy, `model.layers.N.self_attn.q_proj.weight` ...) -> our params pytree."""

    def get(name):
        for key in (name, "model." + name):
            if key in sd:
                return np.asarray(sd[key])
        raise KeyError(f"checkpoint is missing tensor {name!r}")

    def dense(prefix, bias):  # HF Linear stores [out, in]; ours is [in, out]
        p = {"kernel": np.ascontiguousarray(get(prefix + ".weight").T)}
        if bias:
            p["bias"] = get(prefix + ".bias")
        return p

    params = {"embed_tokens": {"embedding": get("embed_tokens.weight")}, "norm": {"scale": get("norm.weight")}}
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        ab, mb = cfg.attention_bias, cfg.mlp_bias
        params[f"layers_{i}"] = {
            "input_layernorm": {"scale": get(p + ".input_layernorm.weight")},
            "q_proj": dense(p + ".self_attn.q_proj", ab), "k_proj": dense(p + ".self_attn.k_proj", ab),
            "v_proj": dense(p + ".self_attn.v_proj", ab), "o_proj": dense(p + ".self_attn.o_proj", ab),
            "post_attention_layernorm": {"scale": get(p + ".post_attention_layernorm.weight")},
            "gate_proj": dense(p + ".mlp.gate_proj", mb), "up_proj": dense(p + ".mlp.up_proj", mb),
            "down_proj": dense(p + ".mlp.down_proj", mb)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": np.ascontiguousarray(_get_lm_head(sd).T)}
    return params


def _get_lm_head(sd):
    if "lm_head.weight" not in sd:
        raise KeyError("checkpoint is missing tensor 'lm_head.weight' (and tie_word_embeddings is false)")
    return np.asarray(sd["lm_head.weight"])


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Per rotary pair frequencies, float32 `[head_dim // 2]`, with the config's scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    s = cfg.rope_scaling
    if s is None:
        pass
    elif s["rope_type"] == "linear":
        inv = inv / s["factor"]
    elif s["rope_type"] == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(wavelen > old_len / lo, inv / factor, np.where(wavelen < old_len / hi, inv, blended))
    else:
        raise ValueError(f"unsupported rope scaling {s!r}")
    return inv.astype(np.float32)


def rope_cos_sin(positions, inv_freq):
    """cos, sin float32 `[*lead, 1, head_dim // 2]` for positions `[*lead]` (computed once per forward pass)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq                    # [*lead, head_dim/2]
    return jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (HF layout: pair i is (x[i], x[i + head_dim/2])) on x `[*lead, heads, head_dim]`;
    computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back to the input dtype, then scale."""
    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * y.astype(x.dtype)


class Dense(nn.Module):
    features: int
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features))
        y = jnp.dot(x, kernel.astype(x.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        return y


class LlamaBlock(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, rope, layer_idx, attention, kv_cache):
        cfg = self.cfg
        lead = x.shape[:-1]
        hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = RMSNorm(cfg.norm_eps, name="input_layernorm")(x)
        q = Dense(hq * hd, cfg.attention_bias, name="q_proj")(h).reshape(*lead, hq, hd)
        k = Dense(hkv * hd, cfg.attention_bias, name="k_proj")(h).reshape(*lead, hkv, hd)
        v = Dense(hkv * hd, cfg.attention_bias, name="v_proj")(h).reshape(*lead, hkv, hd)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        a, kv_cache = attention(layer_idx, q, k, v, kv_cache)                    # [*lead, hq, hd]
        x = x + Dense(cfg.hidden_size, cfg.attention_bias, name="o_proj")(a.reshape(*lead, hq * hd))
        h = RMSNorm(cfg.norm_eps, name="post_attention_layernorm")(x)
        gate = Dense(cfg.intermediate_size, cfg.mlp_bias, name="gate_proj")(h)
        up = Dense(cfg.intermediate_size, cfg.mlp_bias, name="up_proj")(h)
        x = x + Dense(cfg.hidden_size, cfg.mlp_bias, name="down_proj")(jax.nn.silu(gate) * up)
        return x, kv_cache


class LlamaModule(DecoderModule):
    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens")
        self.layers = [LlamaBlock(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg.norm_eps, name="norm")
        self.setup_lm_head()

    def embed(self, input_ids, positions):
        rope = rope_cos_sin(positions, jnp.asarray(rope_inv_freq(self.cfg)))       # shared by all layers
        return jnp.take(self.embed_tokens.embedding, input_ids, axis=0), (rope,)   # [*lead, D]

    def token_embedding(self):
        return self.embed_tokens.embedding


class LlamaForCausalLM(CausalLMBase):
    module_cls = LlamaModule
