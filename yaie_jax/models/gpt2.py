"""GPT-2 family in Flax (linen), numerically matching HF transformers' GPT2LMHeadModel.

Contract (models/base.py): `GPT2ForCausalLM(config, params)` with `.config`, `.params` (numpy on the host after
loading), `apply_hidden` / `apply_logits` (pure, jittable, differentiable functions of `params`) and `logits`
(jitted full-sequence scoring). Family interface used by the registry and loader: `config_from_hf(dict)`,
`params_from_hf(state_dict, config)` and the model class.

Config-driven for every GPT-2 size (layers, width, heads, positions, vocab, n_inner); tied LM head (an untied
`lm_head.weight` is used when the config says so); gelu_new (or exact gelu); HF's `layer_norm_epsilon`. HF options
we do not implement raise ValueError instead of silently computing something else.

The model is the shared decoder of models/base.py (LayerNorm, learned positions, fused QKV, GELU MLP, every
projection biased); this file holds only GPT-2's config checks and names.

Params: {"wte": {"embedding" [V, D]}, "wpe": {"embedding" [P, D]},
         "h_i": {"ln_1", "ln_2": {"scale" [D], "bias" [D]},
                 "attn_qkv": {"kernel" [D, 3D], "bias" [3D]}, "attn_out": {"kernel" [D, D], "bias" [D]},
                 "mlp_fc": {"kernel" [D, F], "bias" [F]}, "mlp_proj": {"kernel" [F, D], "bias" [D]}},
         "ln_f": {"scale", "bias"}, "lm_head": {"kernel" [D, V]} (untied only)}.
Dense kernels are [in, out], the layout of HF's Conv1D weights, so conversion is a rename.
"""
from __future__ import annotations

from .base import CausalLMBase
from .config import ModelConfig
from .decoder import DecoderSpec
from .hf_checkpoint import HFCheckpoint
from .layers import activation_fn  # noqa: F401 (the family's activations, tested against torch)

# HF GPT-2 option -> the only value we implement (anything else raises rather than silently differs)
REQUIRED_VALUES = {
    "reorder_and_upcast_attn": False,
    "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True,
    "add_cross_attention": False,
    "is_encoder_decoder": False,
}
# HF activation_function -> ours. gelu_pytorch_tanh is the same tanh approximation as gelu_new.
ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a HF GPT-2 config.json dict; raises ValueError for options we would silently get wrong."""
    for key, ok in REQUIRED_VALUES.items():
        if hf.get(key, ok) != ok:
            raise ValueError(f"unsupported GPT-2 option {key}={hf[key]!r} (yaie_jax supports only {ok!r})")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported GPT-2 activation_function={act!r} (supported: {', '.join(ACTIVATIONS)})")
    d = int(hf.get("n_embd", 768))
    heads = int(hf.get("n_head", 12))
    if d % heads:
        raise ValueError(f"GPT-2 n_embd={d} is not divisible by n_head={heads}")
    return ModelConfig(
        arch="gpt2", vocab_size=int(hf.get("vocab_size", 50257)), hidden_size=d, num_layers=int(hf.get("n_layer", 12)),
        num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
        intermediate_size=int(hf.get("n_inner") or 4 * d), max_position_embeddings=int(hf.get("n_positions", 1024)),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), activation=ACTIVATIONS[act],
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


SPEC = DecoderSpec(norm="layernorm", positions="learned", qkv="fused", mlp="gelu", attn_bias=True, mlp_bias=True,
                   token_embed="wte", pos_embed="wpe", layer_prefix="h_", attn_norm="ln_1", mlp_norm="ln_2",
                   final_norm="ln_f")
# Names with the `transformer.` prefix (GPT2LMHeadModel) or without it (GPT2Model, the original hub checkpoints);
# the causal-mask buffers of old checkpoints (`attn.bias`, `attn.masked_bias`) are not read.
CHECKPOINT = HFCheckpoint(
    family="GPT-2", layer="h.{}", prefixes=("transformer.",),
    modules={"wte": "wte", "wpe": "wpe", "ln_f": "ln_f", "lm_head": "lm_head", "ln_1": "ln_1", "ln_2": "ln_2",
             "attn_qkv": "attn.c_attn", "attn_out": "attn.c_proj", "mlp_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"},
    kernels_in_out=frozenset({"attn_qkv", "attn_out", "mlp_fc", "mlp_proj"}))  # HF Conv1D stores [in, out]


class GPT2ForCausalLM(CausalLMBase):
    spec = SPEC
    checkpoint = CHECKPOINT


params_from_hf = GPT2ForCausalLM.params_from_hf
