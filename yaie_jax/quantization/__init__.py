"""Weight quantization at load: int8 / int4 weight-only and fp8 W8A8 for every decoder family.

    params = quantize_params(params, "int4", group_size=128)   # models/loader.py does this for quantization=
    y = quantized_matmul(x, leaves)                            # models/layers.py Dense, when its params say so

Modes (`MODES`; the engine argument `quantization`):
  * "int8": weight-only, symmetric per output channel: kernel_q int8 [in, out], scale [out] = absmax_col / 127.
  * "int4": weight-only, symmetric per group of `group_size` input rows and output channel: kernel_q int4
    [in, out], group_scale [in / group_size, out] = absmax_group / 7 (values in [-7, 7]).
  * "fp8": W8A8 float8_e4m3fn: kernel_q [in, out] with per-output-channel scale [out] = absmax_col / 448; the
    activations are quantized per token (row) at run time with scale absmax_row / 448, the dot runs on the
    float8 operands accumulating in float32 (Hopper's FP8 tensor cores through XLA; the CPU computes the same
    numbers more slowly, which the tests use).
Every 2-D "kernel" of the model except the LM head's (`lm_head`) is quantized, so a family built on
models/decoder.py's `DecoderSpec` gets it without code of its own; the token (and position) embeddings and the
LM head (tied or untied) stay in the model dtype: they are a small share of a large model's bytes and the
logits are the most error-sensitive product. Biases and norms stay too. Scales are kept in the params' dtype.

The param names (`kernel_q`, `scale`, `group_scale`) are what executor/parallel.py's placement rules match:
a column-split kernel splits its scales by column; a row-split kernel replicates its per-channel `scale` and
splits int4's `group_scale` by group (row), so a shard holds the groups of its rows (needs the group count
divisible by the TP size).

Why not qwix (PyPI, evaluated at 0.1.8 on jax 0.10.2): it installs and works here (`qwix.quantize`,
`qwix.dot` give the same graphs as `quantized_matmul`: dequantize-then-dot for weight-only, a native float8
dot for W8A8), but (1) its `QArray` pytree leaves do not fit the params contract that parallel.py's path
rules, orbax `save_model` and `group_fused_qkv` work on (plain named arrays), (2) its PTQ of linen models
intercepts every dot of the wrapped module, including attention's einsums and the LM head, which would have to
be excluded by rules, (3) it is not on the GPU image and would be one more wheel to carry, for about 40 lines of
jnp that it would replace. tests/models/test_quantization.py checks these functions against plain fp32 math.
"""
from .matmul import QUANT_LEAVES, is_quantized, quantized_matmul
from .weights import MODES, describe, mode_name, quantize_kernel, quantize_params

__all__ = ["MODES", "QUANT_LEAVES", "describe", "is_quantized", "mode_name", "quantize_kernel", "quantize_params",
           "quantized_matmul"]
