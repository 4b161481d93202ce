"""The pre-norm decoder block every family shares, and `DecoderSpec`, the record of what a family's layers are.

    x = x + out_proj(attention(layer_idx, *qkv_proj(norm(x)), kv_cache))     # RoPE on q, k when positions="rope"
    x = x + mlp(norm(x))

The projections' param names follow from the spec's kinds (they are the names yaie_jax/executor/parallel.py's placement
rules match, so a family built from these kinds is tensor-parallel without touching parallel.py):
  qkv "separate": q_proj [D, Hq*Dh], k_proj, v_proj [D, Hkv*Dh], o_proj [Hq*Dh, D]     (Llama)
  qkv "fused":    attn_qkv [D, 3D] (columns in ModelConfig.qkv_groups groups), attn_out [D, D]; MHA only (GPT-2)
  mlp "gated_silu": down_proj(silu(gate_proj(h)) * up_proj(h)), gate/up [D, F], down [F, D]   (Llama)
  mlp "gelu":       mlp_proj(act(mlp_fc(h))), act = ModelConfig.activation (gelu_new | gelu)  (GPT-2)
The norm, embedding and layer names are the family's own (`DecoderSpec` fields).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax

from .config import ModelConfig
from .layers import NORMS, Dense, activation_fn
from .rope import apply_rope

QKV_KINDS = ("separate", "fused")
MLP_KINDS = ("gated_silu", "gelu")
POSITION_KINDS = ("rope", "learned")


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """What a decoder-only family is made of (defaults: Llama's kinds and HF's Llama names)."""
    norm: str = "rmsnorm"             # "rmsnorm" (scale) | "layernorm" (scale + bias)
    positions: str = "rope"           # "rope": rotary on q, k | "learned": a [P, D] table added to the embeddings
    qkv: str = "separate"             # see the module docstring
    mlp: str = "gated_silu"           # see the module docstring
    attn_bias: Optional[bool] = None  # biases on the attention projections; None: ModelConfig.attention_bias
    mlp_bias: Optional[bool] = None   # biases on the MLP projections; None: ModelConfig.mlp_bias
    token_embed: str = "embed_tokens"  # {"embedding" [V, D]}
    pos_embed: str = "wpe"            # {"embedding" [P, D]}, positions="learned" only
    layer_prefix: str = "layers_"     # layer i's params are f"{layer_prefix}{i}"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    final_norm: str = "norm"

    def __post_init__(self):
        for field, kinds in (("norm", tuple(NORMS)), ("positions", POSITION_KINDS), ("qkv", QKV_KINDS),
                             ("mlp", MLP_KINDS)):
            if getattr(self, field) not in kinds:
                raise ValueError(f"DecoderSpec.{field}={getattr(self, field)!r} (supported: {', '.join(kinds)})")


def separate_qkv(cfg: ModelConfig, h, bias: bool):
    """h [*lead, D] -> q [*lead, Hq, Dh], k, v [*lead, Hkv, Dh] through q_proj, k_proj, v_proj."""
    lead = h.shape[:-1]
    hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = Dense(hq * hd, bias, name="q_proj")(h).reshape(*lead, hq, hd)
    k = Dense(hkv * hd, bias, name="k_proj")(h).reshape(*lead, hkv, hd)
    v = Dense(hkv * hd, bias, name="v_proj")(h).reshape(*lead, hkv, hd)
    return q, k, v


def fused_qkv(cfg: ModelConfig, h, bias: bool):
    """h [*lead, D] -> q, k, v [*lead, H, Dh] through one attn_qkv [D, 3D] (multi-head attention only)."""
    lead = h.shape[:-1]
    qkv = Dense(3 * cfg.hidden_size, bias, name="attn_qkv")(h)                   # [*lead, 3D]
    # columns: G groups of [q_g | k_g | v_g] (G = qkv_groups; 1 = HF order q | k | v), so that a column split
    # over G tensor-parallel shards gives each shard whole heads of q, k and v (no regrouping between devices)
    G = cfg.qkv_groups
    parts = qkv.reshape(*lead, G, 3, cfg.hidden_size // G)                       # [*lead, G, 3, D/G]
    q, k, v = (parts[..., i, :].reshape(*lead, cfg.hidden_size) for i in range(3))   # [*lead, D] each
    heads = lambda t: t.reshape(*lead, cfg.num_heads, cfg.head_dim)               # noqa: E731 [*lead, H, Dh]
    return heads(q), heads(k), heads(v)


def gated_silu_mlp(cfg: ModelConfig, h, bias: bool):
    """h [*lead, D] -> down_proj(silu(gate_proj(h)) * up_proj(h)) [*lead, D] (SwiGLU)."""
    gate = Dense(cfg.intermediate_size, bias, name="gate_proj")(h)                # [*lead, F]
    up = Dense(cfg.intermediate_size, bias, name="up_proj")(h)
    return Dense(cfg.hidden_size, bias, name="down_proj")(jax.nn.silu(gate) * up)


def gelu_mlp(cfg: ModelConfig, h, bias: bool):
    """h [*lead, D] -> mlp_proj(act(mlp_fc(h))) [*lead, D], act = cfg.activation."""
    h = activation_fn(cfg.activation)(Dense(cfg.intermediate_size, bias, name="mlp_fc")(h))  # [*lead, F]
    return Dense(cfg.hidden_size, bias, name="mlp_proj")(h)


QKV_PROJECTIONS = {"separate": (separate_qkv, "o_proj"), "fused": (fused_qkv, "attn_out")}
MLPS = {"gated_silu": gated_silu_mlp, "gelu": gelu_mlp}


class DecoderBlock(nn.Module):
    """One layer: `(x [*lead, D], rope (cos, sin) or None, layer_idx, attention, kv_cache) -> (x, kv_cache)`."""
    cfg: ModelConfig
    spec: DecoderSpec

    @nn.compact
    def __call__(self, x, rope, layer_idx, attention, kv_cache):
        cfg, spec = self.cfg, self.spec
        lead = x.shape[:-1]
        attn_bias = cfg.attention_bias if spec.attn_bias is None else spec.attn_bias
        mlp_bias = cfg.mlp_bias if spec.mlp_bias is None else spec.mlp_bias
        norm = NORMS[spec.norm]
        project_qkv, out_name = QKV_PROJECTIONS[spec.qkv]
        h = norm(cfg.norm_eps, name=spec.attn_norm)(x)
        q, k, v = project_qkv(cfg, h, attn_bias)                   # [*lead, Hq, Dh], [*lead, Hkv, Dh] x 2
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        a, kv_cache = attention(layer_idx, q, k, v, kv_cache)                    # [*lead, Hq, Dh]
        a = a.reshape(*lead, cfg.num_heads * cfg.head_dim).astype(x.dtype)
        x = x + Dense(cfg.hidden_size, attn_bias, name=out_name)(a)
        h = norm(cfg.norm_eps, name=spec.mlp_norm)(x)
        x = x + MLPS[spec.mlp](cfg, h, mlp_bias)
        return x, kv_cache
