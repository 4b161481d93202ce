"""GPT-2 family in Flax (linen), numerically matching HF transformers' GPT2LMHeadModel.

Config-driven for every GPT-2 size (layers, width, heads, positions, vocab); tied LM head; gelu_new (or exact
gelu); HF's layer-norm epsilon. Attention is the callable of models/base.py, so the engine plugs in paged KV and
Pallas kernels without touching this file. Layers are a Python loop (one params dict per layer, `h_0` ...), which
keeps per-layer KV cache arrays separate (see DESIGN.md: a scan over stacked layers copied the cache).

Params: {"wte": {"embedding" [V, D]}, "wpe": {"embedding" [P, D]}, "h_i": {"ln_1", "attn_qkv", "attn_out",
"ln_2", "mlp_fc", "mlp_proj"}, "ln_f"}; Dense kernels are [in, out] like HF's Conv1D weights.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .attention_dense import dense_causal_attention
from .config import ModelConfig

UNSUPPORTED = {
    # HF option: value that we support (anything else raises)
    "reorder_and_upcast_attn": False,
    "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True,
    "add_cross_attention": False,
}
ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a HF GPT-2 config.json dict; raises ValueError for options we would silently get wrong."""
    for key, ok in UNSUPPORTED.items():
        if key in hf and hf[key] != ok:
            raise ValueError(f"unsupported GPT-2 option {key}={hf[key]!r} (yaie_jax supports only {ok!r})")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported GPT-2 activation_function={act!r} (supported: {sorted(ACTIVATIONS)})")
    d = hf.get("n_embd", 768)
    heads = hf.get("n_head", 12)
    if d % heads:
        raise ValueError(f"n_embd={d} is not divisible by n_head={heads}")
    return ModelConfig(
        arch="gpt2", vocab_size=hf.get("vocab_size", 50257), hidden_size=d, num_layers=hf.get("n_layer", 12),
        num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
        intermediate_size=hf.get("n_inner") or 4 * d, max_position_embeddings=hf.get("n_positions", 1024),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_word_embeddings=True, activation=ACTIVATIONS[act],
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def params_from_hf(sd: Dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """HF GPT-2 state dict (numpy) -> our params pytree. Accepts names with or without the `transformer.` prefix."""
    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in sd.items()}

    def get(name):
        if name not in sd:
            raise KeyError(f"checkpoint is missing tensor {name!r}")
        return np.asarray(sd[name])

    def ln(prefix):
        return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    def dense(prefix):  # HF Conv1D stores [in, out], as flax does
        return {"kernel": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    params = {"wte": {"embedding": get("wte.weight")}, "wpe": {"embedding": get("wpe.weight")},
              "ln_f": ln("ln_f")}
    for i in range(cfg.num_layers):
        p = f"h.{i}"
        params[f"h_{i}"] = {"ln_1": ln(p + ".ln_1"), "attn_qkv": dense(p + ".attn.c_attn"),
                            "attn_out": dense(p + ".attn.c_proj"), "ln_2": ln(p + ".ln_2"),
                            "mlp_fc": dense(p + ".mlp.c_fc"), "mlp_proj": dense(p + ".mlp.c_proj")}
    return params


def _activation(name: str):
    if name == "gelu_new":
        return functools.partial(jax.nn.gelu, approximate=True)
    return functools.partial(jax.nn.gelu, approximate=False)


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
        var = ((xf - mean) ** 2).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class Dense(nn.Module):
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
        qkv = Dense(3 * cfg.hidden_size, name="attn_qkv")(h)                     # [*lead, 3D]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        heads = lambda t: t.reshape(*lead, cfg.num_heads, cfg.head_dim)          # [*lead, H, Dh]
        a, kv_cache = attention(layer_idx, heads(q), heads(k), heads(v), kv_cache)
        x = x + Dense(cfg.hidden_size, name="attn_out")(a.reshape(*lead, cfg.hidden_size))
        h = LayerNorm(cfg.norm_eps, name="ln_2")(x)
        h = _activation(cfg.activation)(Dense(cfg.intermediate_size, name="mlp_fc")(h))
        x = x + Dense(cfg.hidden_size, name="mlp_proj")(h)
        return x, kv_cache


class GPT2Module(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.wte = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="wte")
        self.wpe = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="wpe")
        self.blocks = [GPT2Block(cfg, name=f"h_{i}") for i in range(cfg.num_layers)]
        self.ln_f = LayerNorm(cfg.norm_eps, name="ln_f")

    def __call__(self, input_ids, positions, attention, kv_caches):
        dtype = self.wte.embedding.dtype
        x = (jnp.take(self.wte.embedding, input_ids, axis=0)
             + jnp.take(self.wpe.embedding, positions, axis=0)).astype(dtype)   # [*lead, D]
        new_caches = None if kv_caches is None else []
        for i, block in enumerate(self.blocks):
            x, c = block(x, i, attention, None if kv_caches is None else kv_caches[i])
            if new_caches is not None:
                new_caches.append(c)
        return self.ln_f(x), new_caches

    def logits(self, hidden):
        # tied LM head: [..., D] @ [V, D]^T, accumulated and returned in float32
        return jnp.einsum("...d,vd->...v", hidden, self.wte.embedding.astype(hidden.dtype),
                          preferred_element_type=jnp.float32)


class CausalLMBase:
    """Shared wrapper: a Flax module + host params, implementing the models/base.py contract."""
    module_cls = None

    def __init__(self, config: ModelConfig, params: Optional[dict] = None):
        self.config = config
        self.module = self.module_cls(config)
        self.params = params
        self._logits_jit = jax.jit(self._full_logits)

    def init_params(self, seed: int = 0, dtype=jnp.float32) -> dict:
        ids = jnp.zeros((1, 2), jnp.int32)
        variables = self.module.init(jax.random.PRNGKey(seed), ids, jnp.zeros_like(ids),
                                     dense_causal_attention(), None)
        return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=dtype), variables["params"])

    def apply_hidden(self, params, input_ids, positions, attention, kv_caches):
        return self.module.apply({"params": params}, input_ids, positions, attention, kv_caches)

    def apply_logits(self, params, hidden):
        return self.module.apply({"params": params}, hidden, method=self.module_cls.logits)

    def _full_logits(self, params, input_ids, mask):
        B, S = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        hidden, _ = self.apply_hidden(params, input_ids, positions, dense_causal_attention(mask), None)
        return self.apply_logits(params, hidden)

    def logits(self, input_ids: np.ndarray, attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
        ids = jnp.asarray(np.asarray(input_ids, dtype=np.int32))
        mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        return np.asarray(self._logits_jit(self.params, ids, mask), dtype=np.float32)


class GPT2ForCausalLM(CausalLMBase):
    module_cls = GPT2Module
