"""Tensor parallelism with jit shardings: a 1-D mesh axis `tp` and the one place that maps params to it.

Layout. QKV / MLP-up (and Llama's gate) are split by column, the attention out-projection and MLP-down by row
(Megatron); XLA (GSPMD) inserts the all-reduces. The KV pool `[num_kv_heads, blocks, block_size, head_dim]` is
split by KV head, and the attention kernels run per shard (attention.py: the Pallas kernels under `shard_map`,
each shard on its own query and KV heads; the XLA path is partitioned by GSPMD). Because jit shardings are
semantics-preserving, TP=N computes what TP=1 computes; the layout only decides where the bytes live and what
is communicated.

LM head and token embedding (`head_layout`): "replicated" (default) keeps them whole on every device;
"vocab" splits the embedding table `[V, D]` by row and an untied head `[D, V]` by column, so each device holds
V/N rows and computes V/N logits; the embedding lookup becomes a masked lookup + an all-reduce of [T, D], and
sampling works on the split logits (for greedy rows the CPU programs all-gather only the per-shard maxima
[S, N]; other sampling may gather [S, V]). Pick it per engine with the engine argument `tp_head_layout`, which
the engine passes to `make_tp_placement(..., head=...)`. "vocab" needs V divisible by N (a JAX array sharding
cannot be ragged): it is refused otherwise (GPT-2's 50257 is prime to 2 and 4; pad the vocabulary to 50304 as
nanoGPT does). Replicated is the default because every vocabulary size allows it (scripts/bench_tp.py compares
the two layouts on GPUs; bench/NOTES.md).

Head counts: TP=N needs num_heads and num_kv_heads divisible by N (each shard owns whole heads and their KV).
Other N are refused at start-up with a message naming the counts; padding or replicating heads would change
what every shard computes and is left for later (GPT-2 XL's 25 heads: use TP=1 or 5; SmolLM2's 9/3 heads: TP=3).

GPT-2's fused `attn_qkv` kernel `[D, 3D]` (columns q | k | v) split by column is not head-aligned (with N=2 the
first shard would hold all of q and half of k, and XLA would re-lay q/k/v out by head in every layer), so
`group_fused_qkv` regroups its columns per shard at start-up; Llama's separate q/k/v projections are head-aligned.

tests/parallel/test_tp.py checks, on 4 fake CPU devices, that TP=2 and TP=4 give TP=1's greedy tokens (GPT-2 and
Llama; Pallas kernels per shard and the XLA path; both head layouts), that the params, KV pool and vocab-split
tables are split, and that the compiled programs hold no collectives beyond the Megatron all-reduces.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Dict, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from yaie_jax.config import TP_HEAD_LAYOUTS as HEAD_LAYOUTS, env_default

AXIS = "tp"

# (regex on the "/"-joined param path, spec). First match wins; no match = replicated. Quantized kernels
# (yaie_jax/quantization): kernel_q like the kernel; a column split's per-channel scale [out] like its bias; int4's
# group_scale [in / group, out] like the kernel (a row split gives each shard the groups of its rows); a row
# split's per-channel scale [out] stays replicated.
RULES = [
    (r"(attn_qkv|q_proj|k_proj|v_proj|gate_proj|up_proj|mlp_fc)/(kernel|kernel_q|group_scale)$", P(None, AXIS)),
    (r"(attn_qkv|q_proj|k_proj|v_proj|gate_proj|up_proj|mlp_fc)/(bias|scale)$", P(AXIS)),
    (r"(attn_out|o_proj|down_proj|mlp_proj)/(kernel|kernel_q|group_scale)$", P(AXIS, None)),
]
# Added in front of RULES for head_layout "vocab": token embedding [V, D] by row, untied head [D, V] by column.
VOCAB_RULES = [
    (r"(wte|embed_tokens)/embedding$", P(AXIS, None)),
    (r"lm_head/kernel$", P(None, AXIS)),
]


def check_divisible(config, tp: int) -> None:
    """Raise ValueError unless `tp` divides both head counts (each shard must own whole heads and their KV)."""
    if config.num_heads % tp or config.num_kv_heads % tp:
        raise ValueError(
            f"invalid engine argument tensor_parallel_size={tp}: the model has {config.num_heads} query heads and "
            f"{config.num_kv_heads} KV heads, and each must be divisible by tensor_parallel_size (so every shard "
            f"owns whole heads). Choose a divisor of both.")


def head_layout(head: Optional[str] = None) -> str:
    """The LM head / embedding layout to use: `head`, else EngineConfig's default for `tp_head_layout`
    ("replicated", or its environment alias YAIE_TP_HEAD: config.env_default)."""
    name = head or env_default("tp_head_layout")
    if name not in HEAD_LAYOUTS:
        raise ValueError(f"unknown tensor-parallel head layout {name!r} (choose from {', '.join(HEAD_LAYOUTS)})")
    return name


def make_mesh(tp: int) -> Mesh:
    """A 1-D mesh over the first `tp` visible devices, axis name AXIS."""
    devices = jax.devices()
    if tp > len(devices):
        raise ValueError(f"invalid engine argument tensor_parallel_size={tp}: only {len(devices)} devices are "
                         f"visible ({jax.default_backend()})")
    return Mesh(np.array(devices[:tp]), (AXIS,))


def spec_for(path: str, rules=RULES) -> P:
    """The PartitionSpec of the first rule whose regex matches `path`; P() (replicated) if none does."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            return spec
    return P()


def param_specs(params, head: str = "replicated") -> Dict:
    """PartitionSpec for every leaf of `params` (same tree); specs longer than a leaf's rank fall back to P()."""
    rules = (VOCAB_RULES + RULES) if head == "vocab" else RULES

    def one(path, leaf):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        spec = spec_for(name, rules)
        return spec if len(spec) <= np.ndim(leaf) else P()
    return jax.tree_util.tree_map_with_path(one, params)


def check_vocab_divisible(config, tp: int) -> None:
    """Raise ValueError unless `tp` divides the vocabulary (needed by the "vocab" head layout)."""
    if config.vocab_size % tp:
        raise ValueError(
            f"the vocab-parallel LM head needs vocab_size divisible by tensor_parallel_size, but "
            f"{config.vocab_size} % {tp} != 0; use the replicated head (tp_head_layout='replicated') or a "
            f"checkpoint with a padded vocabulary")


def group_fused_qkv(model, tp: int):
    """The model to place on `tp` shards: for GPT-2 (fused QKV, split by column), a copy whose QKV columns are
    regrouped per shard, [q_g | k_g | v_g] for g < tp (config.qkv_groups = tp), so that shard g holds whole heads of
    q, k and v. In HF order a column split would give shard 0 all of q and half of k, and XLA would move q/k/v
    between devices in every layer (collective-permutes). Other models, and tp == 1, come back unchanged."""
    cfg = model.config
    if cfg.arch != "gpt2" or tp == 1 or cfg.qkv_groups == tp:
        return model
    if cfg.qkv_groups != 1:
        raise ValueError(f"model QKV is grouped for {cfg.qkv_groups} shards, cannot regroup for {tp}")
    D = cfg.hidden_size

    def regroup(leaf):                                       # [..., 3D] in [q | k | v] order -> grouped
        a = np.asarray(leaf)
        lead = a.shape[:-1]
        return a.reshape(*lead, 3, tp, D // tp).swapaxes(-3, -2).reshape(*lead, 3 * D)

    params = {name: ({**block, "attn_qkv": {k: regroup(v) for k, v in block["attn_qkv"].items()}}
                     if isinstance(block, dict) and "attn_qkv" in block else block)
              for name, block in model.params.items()}
    return type(model)(dataclasses.replace(cfg, qkv_groups=tp), params)


def make_tp_placement(model, tp: int, head: Optional[str] = None) -> dict:
    """Keyword arguments for ModelRunner: mesh, param shardings, KV-pool sharding. `head`: see head_layout()."""
    check_divisible(model.config, tp)
    head = head_layout(head)
    if head == "vocab":
        check_vocab_divisible(model.config, tp)
    mesh = make_mesh(tp)
    shardings = jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), param_specs(model.params, head),
                                       is_leaf=lambda x: isinstance(x, P))
    return {"mesh": mesh, "param_shardings": shardings,
            "kv_sharding": NamedSharding(mesh, P(AXIS, None, None, None))}


def shard_map(f, *, mesh: Mesh, in_specs, out_specs):
    """`jax.shard_map` without its replication / varying-axes check, on old and new JAX alike.

    The check is off because the Pallas kernels have no rule for it; the specs we pass are exact (every output
    is split like the inputs it came from). Newer JAX (0.10, 0.11) has `jax.shard_map(..., check_vma=)`, older
    JAX only `jax.experimental.shard_map.shard_map(..., check_rep=)`."""
    fn = getattr(jax, "shard_map", None)
    if fn is None:
        from jax.experimental.shard_map import shard_map as fn
    params = inspect.signature(fn).parameters
    check = {"check_vma": False} if "check_vma" in params else {"check_rep": False}
    return fn(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **check)
