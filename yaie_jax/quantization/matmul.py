"""x @ W for a quantized kernel (the leaves weights.quantize_kernel makes), in the activation dtype.

Weight-only modes dequantize in the graph (`kernel_q.astype(dt) * scale`) and leave the fusion of the
dequantization into the matmul to XLA (scripts/bench_quant.py measures whether it keeps up with the bytes);
fp8 quantizes the activations per token and runs a float8 x float8 dot accumulated in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .weights import FP8_MAX

QUANT_LEAVES = ("kernel_q", "scale", "group_scale")   # param names of a quantized kernel (besides "bias")


def is_quantized(leaves: dict) -> bool:
    return "kernel_q" in leaves


def _dot_last(x, w, **kw):
    """x [..., in] . w [in, out] -> [..., out]."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), **kw)


def quantized_matmul(x, leaves: dict):
    """x [..., in] (activation dtype dt) -> [..., out] of dtype dt, for `leaves` = {"kernel_q", "scale" |
    "group_scale"}."""
    dt = x.dtype
    q = leaves["kernel_q"]                                                    # [in, out]
    if "group_scale" in leaves:                                               # int4, groups along `in`
        gs = leaves["group_scale"]                                            # [G, out]
        n_in, n_out = q.shape
        w = (q.astype(dt).reshape(gs.shape[0], n_in // gs.shape[0], n_out) * gs.astype(dt)[:, None, :])
        return _dot_last(x, w.reshape(n_in, n_out))
    scale = leaves["scale"]                                                   # [out]
    if np.dtype(q.dtype) == ml_dtypes.float8_e4m3fn:                          # W8A8, per-token activation scale
        xf = x.astype(jnp.float32)
        sx = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / FP8_MAX           # [..., 1]
        sx = jnp.where(sx > 0, sx, 1.0)
        xq = (xf / sx).astype(jnp.float8_e4m3fn)                              # [..., in]
        y = _dot_last(xq, q, preferred_element_type=jnp.float32)              # [..., out] float32
        return (y * sx * scale.astype(jnp.float32)).astype(dt)
    return _dot_last(x, q.astype(dt)) * scale.astype(dt)                      # int8 weight-only
