"""Flax building blocks shared by the decoder families: norms, dense projections, the untied LM head, activations.

Each computes in the activation dtype except where stated (norms normalise in float32; the LM head accumulates
in float32). Param names: norms {"scale" [D]} (+ {"bias" [D]} for LayerNorm), dense {"kernel" [in, out]}
(+ {"bias" [out]}), or, quantized at load (yaie_jax/quantization), {"kernel_q" [in, out], "scale" [out] |
"group_scale" [in / group, out]} (+ {"bias"}); LM head {"kernel" [D, V]} (never quantized).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..quantization.matmul import QUANT_LEAVES, quantized_matmul


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


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back to the input dtype, then scale."""
    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * y.astype(x.dtype)


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}  # DecoderSpec.norm -> module


class Dense(nn.Module):
    """x @ kernel (+ bias), kernel [in, out], computed in the activation dtype; a quantized kernel (params with
    "kernel_q") goes through quantization.quantized_matmul."""
    features: int
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        if self.has_variable("params", "kernel_q"):
            leaves = {n: self.get_variable("params", n) for n in QUANT_LEAVES if self.has_variable("params", n)}
            y = quantized_matmul(x, leaves)
        else:
            kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features))
            y = jnp.dot(x, kernel.astype(x.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        return y


class LMHead(nn.Module):
    """Untied LM head: [..., D] @ kernel [D, V] -> float32 [..., V], accumulated in float32."""
    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features))
        return jnp.einsum("...d,dv->...v", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)


def activation_fn(name: str):
    """The elementwise activation `ModelConfig.activation` names."""
    if name == "gelu_new":  # HF gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return functools.partial(jax.nn.gelu, approximate=True)
    if name == "gelu":      # exact erf GELU (torch.nn.functional.gelu)
        return functools.partial(jax.nn.gelu, approximate=False)
    if name == "silu":
        return jax.nn.silu
    raise ValueError(f"unsupported activation {name!r} (supported: gelu_new, gelu, silu)")
