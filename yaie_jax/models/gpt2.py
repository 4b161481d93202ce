"""GPT-2 family in Flax (linen), numerically matching HF transformers' GPT2LMHeadModel.

Contract (models/base.py): `GPT2ForCausalLM(config, params)` with `.config`, `.params` (numpy on the host after
loading), `apply_hidden` / `apply_logits` (pure, jittable, differentiable functions of `params`) and `logits`
(jitted full-sequence scoring). Family interface used by the registry and loader: `config_from_hf(dict)`,
`params_from_hf(state_dict, config)` and the model class.

Config-driven for every GPT-2 size (layers, width, heads, positions, vocab, n_inner); tied LM head (an untied
`lm_head.weight` is used when the config says so); gelu_new (or exact gelu); HF's `layer_norm_epsilon`. HF options
we do not implement raise ValueError instead of silently computing something else.

Attention is the callable of models/base.py, so the engine plugs in paged KV and Pallas kernels without touching
this file. Layers are a Python loop with one params dict per layer (`h_0` ...), which keeps per-layer KV cache
arrays separate (DESIGN.md: a scan over stacked layers copied the cache).

Params: {"wte": {"embedding" [V, D]}, "wpe": {"embedding" [P, D]},
         "h_i": {"ln_1", "ln_2": {"scale" [D], "bias" [D]},
                 "attn_qkv": {"kernel" [D, 3D], "bias" [3D]}, "attn_out": {"kernel" [D, D], "bias" [D]},
                 "mlp_fc": {"kernel" [D, F], "bias" [F]}, "mlp_proj": {"kernel" [F, D], "bias" [D]}},
         "ln_f": {"scale", "bias"}, "lm_head": {"kernel" [D, V]} (untied only)}.
Dense kernels are [in, out], the layout of HF's Conv1D weights, so conversion is a rename.
"""
from __future__ import annotations

import functools
from typing import Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .base import CausalLMBase, DecoderModule
from .config import ModelConfig

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


def params_from_hf(sd: Dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """HF GPT-2 state dict (numpy) -> our params pytree (same arrays, renamed; shapes checked against `cfg`).

    Accepts names with the `transformer.` prefix (GPT2LMHeadModel) or without it (GPT2Model, the original hub
    checkpoints); ignores the causal-mask buffers (`attn.bias`, `attn.masked_bias`) of old checkpoints."""
    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in sd.items()}
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size

    def get(name, shape):
        if name not in sd:
            raise KeyError(f"GPT-2 checkpoint is missing tensor {name!r}")
        a = np.asarray(sd[name])
        if a.shape != shape:
            raise ValueError(f"GPT-2 tensor {name!r} has shape {a.shape}, config says {shape}")
        return a

    def ln(prefix):
        return {"scale": get(prefix + ".weight", (D,)), "bias": get(prefix + ".bias", (D,))}

    def dense(prefix, n_in, n_out):  # HF Conv1D stores [in, out], as our kernels do
        return {"kernel": get(prefix + ".weight", (n_in, n_out)), "bias": get(prefix + ".bias", (n_out,))}

    params = {"wte": {"embedding": get("wte.weight", (V, D))},
              "wpe": {"embedding": get("wpe.weight", (cfg.max_position_embeddings, D))},
              "ln_f": ln("ln_f")}
    for i in range(cfg.num_layers):
        p = f"h.{i}"
        params[f"h_{i}"] = {"ln_1": ln(p + ".ln_1"), "attn_qkv": dense(p + ".attn.c_attn", D, 3 * D),
                            "attn_out": dense(p + ".attn.c_proj", D, D), "ln_2": ln(p + ".ln_2"),
                            "mlp_fc": dense(p + ".mlp.c_fc", D, F), "mlp_proj": dense(p + ".mlp.c_proj", F, D)}
    if f"h.{cfg.num_layers}.ln_1.weight" in sd:
        raise ValueError(f"GPT-2 checkpoint has more layers than its config's n_layer={cfg.num_layers}")
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight", (V, D)).T}    # HF Linear [V, D] -> [D, V]
    return params


def activation_fn(name: str):
    if name == "gelu_new":  # HF gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return functools.partial(jax.nn.gelu, approximate=True)
    if name == "gelu":      # exact erf GELU (torch.nn.functional.gelu)
        return functools.partial(jax.nn.gelu, approximate=False)
    raise ValueError(f"unsupported GPT-2 activation {name!r}")


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (as HF does for fp32; steadier for bf16), output in the input dtype."""
    eps: float

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,))
        bias = self.param("bias", nn.initializers.zeros, (d,))
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)     # biased variance, like torch
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class Dense(nn.Module):
    """x @ kernel + bias, kernel [in, out], computed in the activation dtype."""
    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return jnp.dot(x, kernel.astype(x.dtype)) + bias.astype(x.dtype)


class GPT2Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, layer_idx, attention, kv_cache):
        cfg = self.cfg
        lead = x.shape[:-1]
        h = LayerNorm(cfg.norm_eps, name="ln_1")(x)
        qkv = Dense(3 * cfg.hidden_size, name="attn_qkv")(h)                      # [*lead, 3D]
        # columns: G groups of [q_g | k_g | v_g] (G = qkv_groups; 1 = HF order q | k | v), so that a column split
        # over G tensor-parallel shards gives each shard whole heads of q, k and v (no regrouping between devices)
        G = cfg.qkv_groups
        parts = qkv.reshape(*lead, G, 3, cfg.hidden_size // G)                   # [*lead, G, 3, D/G]
        q, k, v = (parts[..., i, :].reshape(*lead, cfg.hidden_size) for i in range(3))   # [*lead, D] each
        heads = lambda t: t.reshape(*lead, cfg.num_heads, cfg.head_dim)           # [*lead, H, Dh]
        a, kv_cache = attention(layer_idx, heads(q), heads(k), heads(v), kv_cache)  # [*lead, H, Dh]
        x = x + Dense(cfg.hidden_size, name="attn_out")(a.reshape(*lead, cfg.hidden_size).astype(x.dtype))
        h = LayerNorm(cfg.norm_eps, name="ln_2")(x)
        h = activation_fn(cfg.activation)(Dense(cfg.intermediate_size, name="mlp_fc")(h))  # [*lead, F]
        x = x + Dense(cfg.hidden_size, name="mlp_proj")(h)
        return x, kv_cache


class GPT2Module(DecoderModule):
    def setup(self):
        cfg = self.cfg
        self.wte = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="wte")
        self.wpe = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="wpe")
        self.layers = [GPT2Block(cfg, name=f"h_{i}") for i in range(cfg.num_layers)]
        self.final_norm = LayerNorm(cfg.norm_eps, name="ln_f")
        self.setup_lm_head()

    def embed(self, input_ids, positions):
        dtype = self.wte.embedding.dtype
        x = (jnp.take(self.wte.embedding, input_ids, axis=0)
             + jnp.take(self.wpe.embedding, positions, axis=0)).astype(dtype)    # [*lead, D]
        return x, ()

    def token_embedding(self):
        return self.wte.embedding


class GPT2ForCausalLM(CausalLMBase):
    module_cls = GPT2Module
