"""Quantize a params pytree (or one kernel) into the int8 / int4 / fp8 leaves `quantized_matmul` reads.

Works on numpy arrays (the loader's host params) and on jax arrays (scripts/bench_quant.py quantizes on the
device): the arithmetic is done in float32 with the array's own module (numpy or jax.numpy).
"""
from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

MODES = ("int8", "int4", "fp8")
DEFAULT_GROUP_SIZE = 128                  # int4: input rows per scale
INT8_MAX, INT4_MAX, FP8_MAX = 127.0, 7.0, 448.0   # symmetric ranges (float8_e4m3fn's largest finite value: 448)
SKIPPED_MODULES = ("lm_head",)            # kernels left in the model dtype (see the package docstring)


def _xp(a):
    return np if isinstance(a, np.ndarray) else jnp


def _scale(absmax, qmax, xp):
    """absmax / qmax, with all-zero columns given scale 1 (their values quantize to 0 either way)."""
    return xp.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)


def quantize_kernel(kernel, mode: str, group_size: int = DEFAULT_GROUP_SIZE, scale_dtype=None,
                    name: str = "kernel") -> Dict[str, object]:
    """kernel [in, out] -> {"kernel_q" [in, out], "scale" [out]} (int8, fp8) or {"kernel_q" int4 [in, out],
    "group_scale" [in / group_size, out]} (int4). Scales are of `scale_dtype` (default: the kernel's dtype).
    `name` is used in error messages."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r} (supported: {', '.join(MODES)})")
    if kernel.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [in, out] kernel, got shape {tuple(kernel.shape)}")
    xp = _xp(kernel)
    scale_dtype = kernel.dtype if scale_dtype is None else scale_dtype
    w = kernel.astype(np.float32)                                             # [in, out]
    if mode == "int4":
        n_in, n_out = w.shape
        if group_size < 1 or n_in % group_size:
            raise ValueError(f"{name}: int4 group size {group_size} does not divide the input size {n_in} "
                             f"(set quantization_group_size to a divisor of it, e.g. 64 or 32)")
        g = w.reshape(n_in // group_size, group_size, n_out)                   # [G, group, out]
        s = _scale(xp.abs(g).max(axis=1), INT4_MAX, xp)                        # [G, out]
        q = xp.clip(xp.round(g / s[:, None, :]), -INT4_MAX, INT4_MAX).reshape(n_in, n_out)
        return {"kernel_q": q.astype(np.int8).astype(ml_dtypes.int4), "group_scale": s.astype(scale_dtype)}
    qmax = INT8_MAX if mode == "int8" else FP8_MAX
    s = _scale(xp.abs(w).max(axis=0), qmax, xp)                                # [out]
    if mode == "int8":
        q = xp.clip(xp.round(w / s), -INT8_MAX, INT8_MAX).astype(np.int8)
    else:
        q = xp.clip(w / s, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)  # rounds to nearest e4m3
    return {"kernel_q": q, "scale": s.astype(scale_dtype)}


def _should_quantize(path, leaf_name: str, leaf) -> bool:
    return leaf_name == "kernel" and np.ndim(leaf) == 2 and not any(p in SKIPPED_MODULES for p in path)


def quantize_params(params, mode: Optional[str], group_size: int = DEFAULT_GROUP_SIZE):
    """The params pytree with every projection kernel quantized (`mode` None: `params` unchanged). A module dict
    {"kernel" [in, out], ...} becomes {"kernel_q", "scale" | "group_scale", ...}; the LM head, embeddings, norms
    and biases are kept as they are."""
    if mode is None:
        return params

    def walk(tree, path):
        if not isinstance(tree, dict):
            return tree
        out = {}
        for key, value in tree.items():
            if _should_quantize(path, key, value):
                out.update(quantize_kernel(value, mode, group_size, name="/".join(path + (key,))))
            else:
                out[key] = walk(value, path + (key,))
        return out
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r} (supported: {', '.join(MODES)})")
    return walk(dict(params), ())


def describe(params) -> Dict[str, object]:
    """What is quantized in `params`: {"quantized_kernels": n, "float_kernels": m, "modes": sorted names}."""
    modes, n_q, n_f = set(), 0, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel_q":
            n_q += 1
            dt = np.dtype(leaf.dtype)
            modes.add("int8" if dt == np.int8 else "int4" if dt == ml_dtypes.int4 else "fp8")
        elif name == "kernel":
            n_f += 1
    return {"quantized_kernels": n_q, "float_kernels": n_f, "modes": sorted(modes)}


def mode_name(params) -> Optional[str]:
    """The quantization of `params` as one name ("int8", "int4", "fp8", several joined by "+"), None if none
    (or if `params` is None); what the server's /v1/models and /metrics report."""
    if params is None:
        return None
    modes = describe(params)["modes"]
    return "+".join(modes) if modes else None
