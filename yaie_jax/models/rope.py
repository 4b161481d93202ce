"""Rotary position embeddings (RoPE) as HF computes them: config parsing, frequencies, cos/sin tables, rotation.

Plain RoPE, "linear" and "llama3" scaling. The tables come from the `positions` input of each forward pass:
the engine passes arbitrary positions for one flat ragged batch, so nothing may assume `positions == arange`.
"""
from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp
import numpy as np

from .config import ModelConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_from_hf(hf: dict) -> tuple[float, Optional[dict]]:
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
