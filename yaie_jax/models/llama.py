"""Llama family in Flax (linen), numerically matching HF transformers' LlamaForCausalLM.

RMSNorm, rotary position embeddings (RoPE) with the config's theta (plain, "linear" or "llama3" scaling),
grouped-query attention, SwiGLU MLP, tied or untied LM head, optional attention / MLP biases. Covers Llama 2/3,
SmolLM/SmolLM2, TinyLlama, Mistral-style dense models without sliding windows.

The model is the shared decoder of models/base.py with its defaults (RMSNorm, RoPE applied to q and k before
the attention callable, separate q/k/v projections, SiLU-gated MLP); this file holds only Llama's config checks
and checkpoint names.

Params: {"embed_tokens": {"embedding" [V, D]}, "layers_i": {"input_layernorm": {"scale"}, "q_proj", "k_proj",
"v_proj", "o_proj", "post_attention_layernorm", "gate_proj", "up_proj", "down_proj"}, "norm": {"scale"},
"lm_head": {"kernel" [D, V]} (untied only)}. Dense kernels are [in, out] (HF Linear weights transposed); q/k/v
kept separate so tensor parallelism can split them by head.
"""
from __future__ import annotations

from .base import CausalLMBase
from .config import ModelConfig
from .decoder import DecoderSpec
from .hf_checkpoint import HFCheckpoint
from .rope import rope_from_hf


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
    theta, scaling = rope_from_hf(hf)
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


SPEC = DecoderSpec()  # Llama's kinds and names are the defaults
CHECKPOINT = HFCheckpoint(
    family="Llama", layer="layers.{}", prefixes=("model.",),
    modules={"embed_tokens": "embed_tokens", "norm": "norm", "lm_head": "lm_head",
             "input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
             **{p: "self_attn." + p for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
             **{p: "mlp." + p for p in ("gate_proj", "up_proj", "down_proj")}})


class LlamaForCausalLM(CausalLMBase):
    spec = SPEC
    checkpoint = CHECKPOINT


params_from_hf = LlamaForCausalLM.params_from_hf
