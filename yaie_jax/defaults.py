"""Batch-shape engine arguments a user did not set: chosen from the device, the model and the memory.

`max_num_seqs`, `max_num_batched_tokens` and `num_decode_steps` default to None in `EngineConfig`, meaning
"choose for me". `resolve_batch_defaults` fills each None by the rule below; a value the user gave (engine
argument, YAML, env var or flag) is never changed. The chosen values and the reason are logged at start-up and
kept in `LLMEngine.auto_args`.

The rule:
- GPU (any backend with device memory statistics):
    max_num_batched_tokens = 8192   prefill chunks large enough that a step's matmuls fill the chip;
    num_decode_steps       = 8      decode steps fused into one device call when nothing else waits (a request
                                    arriving meanwhile waits at most one fused call before its prefill);
    max_num_seqs           = the largest power of two <= 512 whose sequences fit the KV memory at a planning
                             length of min(max_model_len, 2048) tokens each (at least 16). The KV memory is
                             `gpu_memory_utilization` of the device limit, minus the weights and the runner's
                             activation reserve.
- CPU: 256 sequences, 2048 batched tokens, 1 decode step (every program compiles on first use there, and fewer
  shapes compile sooner).
These are the settings the README's benchmarks were tuned to on an H200 (bench/NOTES.md, "Fast defaults").
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

GPU_MAX_NUM_BATCHED_TOKENS = 8192
GPU_NUM_DECODE_STEPS = 8
GPU_MAX_NUM_SEQS_CAP = 512
GPU_MAX_NUM_SEQS_FLOOR = 16
PLANNING_SEQ_LEN = 2048               # tokens per sequence the KV budget is planned for (or max_model_len if less)
ACTIVATION_RESERVE_BYTES = 2 * 1024 ** 3   # kept free for activations (the runner's pool sizing keeps the same)

CPU_DEFAULTS = {"max_num_seqs": 256, "max_num_batched_tokens": 2048, "num_decode_steps": 1}
AUTO_FIELDS = tuple(CPU_DEFAULTS)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of K and V one token takes in the paged pool, over all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * itemsize


def gpu_max_num_seqs(kv_budget_bytes: float, bytes_per_token: int, max_model_len: int) -> int:
    """The largest power of two in [GPU_MAX_NUM_SEQS_FLOOR, GPU_MAX_NUM_SEQS_CAP] whose sequences, each
    min(max_model_len, PLANNING_SEQ_LEN) tokens long, fit `kv_budget_bytes` (the floor if none does)."""
    per_seq = min(max_model_len, PLANNING_SEQ_LEN) * bytes_per_token
    n = GPU_MAX_NUM_SEQS_CAP
    while n > GPU_MAX_NUM_SEQS_FLOOR and n * per_seq > kv_budget_bytes:
        n //= 2
    return n


def resolve_batch_defaults(config, *, on_gpu: bool, max_model_len: int, bytes_per_token: int,
                           memory_limit_bytes: Optional[int] = None,
                           bytes_in_use: int = 0) -> Tuple[object, Dict[str, object]]:
    """(config with every None of AUTO_FIELDS filled, {field: chosen value} for those filled).

    `bytes_per_token`: `kv_bytes_per_token` of the model in the engine's dtype, per device (divide by the TP size
    when the pool is split); `memory_limit_bytes` / `bytes_in_use`: one device's limit and current use (weights
    already placed), needed on a GPU."""
    unset = [f for f in AUTO_FIELDS if getattr(config, f) is None]
    if not unset:
        return config, {}
    if on_gpu:
        if memory_limit_bytes is None:
            raise ValueError("resolve_batch_defaults: a GPU needs memory_limit_bytes")
        budget = memory_limit_bytes * config.gpu_memory_utilization - bytes_in_use - ACTIVATION_RESERVE_BYTES
        chosen = {"max_num_seqs": gpu_max_num_seqs(budget, bytes_per_token, max_model_len),
                  "max_num_batched_tokens": GPU_MAX_NUM_BATCHED_TOKENS,
                  "num_decode_steps": GPU_NUM_DECODE_STEPS}
    else:
        chosen = dict(CPU_DEFAULTS)
    if not config.enable_chunked_prefill:   # without chunking a whole prompt must fit one step
        chosen["max_num_batched_tokens"] = max(chosen["max_num_batched_tokens"], max_model_len)
    filled = {f: chosen[f] for f in unset}
    return dataclasses.replace(config, **filled), filled
