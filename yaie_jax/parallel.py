"""Tensor parallelism with jit shardings: a 1-D mesh axis `tp` and the one place that maps params to it.

Megatron layout: QKV / MLP-up (and Llama's gate) are split by column, the attention out-projection and MLP-down
by row; XLA (GSPMD) inserts the all-reduces. Embeddings and the LM head stay replicated (for models this small
the vocab-parallel head's extra all-gather of logits costs more than it saves; measure before changing). The KV
pool is split by KV head. Because jit shardings are semantics-preserving, TP=N computes what TP=1 computes; the
layout only decides where the bytes live and what is communicated.

Head counts: TP=N needs num_heads and num_kv_heads divisible by N (each shard owns whole heads and their KV).
Other N are refused at start-up with a message naming the counts; padding or replicating heads would change
what every shard computes and is left for later (GPT-2 XL's 25 heads: use TP=1 or 5; SmolLM2's 9/3 heads: TP=3).
"""
from __future__ import annotations

import re
from typing import Dict

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "tp"

# (regex on the "/"-joined param path, spec). First match wins; no match = replicated.
RULES = [
    (r"(attn_qkv|q_proj|k_proj|v_proj|gate_proj|up_proj|mlp_fc)/kernel$", P(None, AXIS)),
    (r"(attn_qkv|q_proj|k_proj|v_proj|gate_proj|up_proj|mlp_fc)/bias$", P(AXIS)),
    (r"(attn_out|o_proj|down_proj|mlp_proj)/kernel$", P(AXIS, None)),
]


def check_divisible(config, tp: int) -> None:
    if config.num_heads % tp or config.num_kv_heads % tp:
        raise ValueError(
            f"invalid engine argument tensor_parallel_size={tp}: the model has {config.num_heads} query heads and "
            f"{config.num_kv_heads} KV heads, and each must be divisible by tensor_parallel_size (so every shard "
            f"owns whole heads). Choose a divisor of both.")


def make_mesh(tp: int) -> Mesh:
    devices = jax.devices()
    if tp > len(devices):
        raise ValueError(f"invalid engine argument tensor_parallel_size={tp}: only {len(devices)} devices are "
                         f"visible ({jax.default_backend()})")
    return Mesh(np.array(devices[:tp]), (AXIS,))


def spec_for(path: str) -> P:
    for pattern, spec in RULES:
        if re.search(pattern, path):
            return spec
    return P()


def param_specs(params) -> Dict:
    def one(path, leaf):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        spec = spec_for(name)
        return spec if len(spec) <= np.ndim(leaf) else P()
    return jax.tree_util.tree_map_with_path(one, params)


def make_tp_placement(model, tp: int) -> dict:
    """Keyword arguments for ModelRunner: mesh, param shardings, KV-pool sharding."""
    check_divisible(model.config, tp)
    mesh = make_mesh(tp)
    shardings = jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), param_specs(model.params),
                                       is_leaf=lambda x: isinstance(x, P))
    return {"mesh": mesh, "param_shardings": shardings,
            "kv_sharding": NamedSharding(mesh, P(AXIS, None, None, None))}
