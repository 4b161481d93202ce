"""Run by test_quantization.py in a subprocess with 4 fake CPU devices: for each model dir (argv) and mode, the
quantized model's full-sequence logits with params placed by parallel.make_tp_placement at TP=2 and TP=4 against
TP=1, and each quantized leaf's shard shape against the one its kernel's split implies. Prints RESULT {json}."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from yaie_jax.executor.parallel import group_fused_qkv, make_tp_placement
from yaie_jax.models.loader import load_model

COLUMN = ("attn_qkv", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "mlp_fc")
ROW = ("attn_out", "o_proj", "down_proj", "mlp_proj")
GROUP = 16


def expected_shard(module: str, leaf: str, shape, tp: int):
    """Shard shape of a quantized leaf: column split -> last axis / tp (scale [out] too); row split -> first axis
    / tp for kernel_q [in, out] and group_scale [G, out], per-channel scale [out] whole."""
    shape = list(shape)
    if module in COLUMN:
        shape[-1] //= tp
    elif leaf != "scale":
        shape[0] //= tp
    return shape


def logits(model, params, ids):
    mask = jnp.ones(ids.shape, jnp.int32)
    return np.asarray(jax.jit(model._full_logits)(params, jnp.asarray(ids), mask))


def main():
    ids = np.random.default_rng(0).integers(0, 384, (2, 16)).astype(np.int32)
    results = {}
    for path in sys.argv[1:]:
        for mode in ("int8", "int4", "fp8"):
            model = load_model(path, dtype="float32", quantization=mode, quantization_group_size=GROUP)
            ref = logits(model, model.params, ids)
            for tp in (2, 4):
                placed_model = group_fused_qkv(model, tp)
                placement = make_tp_placement(placed_model, tp)
                params = jax.device_put(placed_model.params, placement["param_shardings"])
                out = logits(placed_model, params, ids)
                layer = next(k for k in params if k.endswith("0") and isinstance(params[k], dict))
                shards = {}
                for module, leaves in params[layer].items():
                    for leaf in ("kernel_q", "scale", "group_scale"):
                        if leaf in leaves:
                            a = leaves[leaf]
                            shards[f"{module}/{leaf}"] = (list(a.shape), list(a.addressable_shards[0].data.shape),
                                                          expected_shard(module, leaf, a.shape, tp))
                results[f"{model.config.arch}:{mode}:tp{tp}"] = {
                    "max_abs_diff": float(np.abs(out - ref).max()), "shards": shards}
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
