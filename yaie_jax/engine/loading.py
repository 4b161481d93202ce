"""What an engine is built from: its config, the model source, the tokenizer (loaded in a thread), the resolved
dtype and batch-shape defaults, and the end-of-sequence token ids. Used once, by `LLMEngine.__init__`."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from typing import List, Optional

import jax
import numpy as np

from yaie_jax.config import EngineConfig

logger = logging.getLogger("yaie_jax.engine.core")


def resolve_model_source(model: Optional[str]) -> str:
    """`model`, or the embedded default model's path when it is empty."""
    if model:
        return model
    from yaie_jax.models.default_model import default_model_path
    return str(default_model_path())


def config_of(config: Optional[EngineConfig], engine_args: dict) -> EngineConfig:
    """The engine's config: `config`, or one made of `engine_args` (ValueError naming unknown ones); not both."""
    if config is None:
        unknown = set(engine_args) - EngineConfig.field_names()
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
        return EngineConfig(**engine_args)
    if engine_args:
        raise ValueError("pass either an EngineConfig or engine arguments, not both")
    return config


def start_tokenizer(config: EngineConfig, source: str) -> concurrent.futures.Future:
    """Load the tokenizer in a thread (None with `skip_tokenizer_init`); its imports take seconds of a server
    start-up, which overlap the weights' reads and copies (those mostly run without the GIL)."""
    from yaie_jax.tokenizer import load_tokenizer
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="yaie-tokenizer")
    if config.skip_tokenizer_init:                 # token ids only: no tokenizer at all
        future = pool.submit(lambda: None)
    else:
        future = pool.submit(load_tokenizer, config.tokenizer or source, hub_timeout_s=config.hub_timeout_s)
    pool.shutdown(wait=False)
    return future


def resolve_dtype(config: EngineConfig) -> EngineConfig:
    """`config` with its dtype resolved ("auto": from the model, models/dtype_policy.py). float32 off the CPU
    also sets full-precision matmuls (no TF32), process-wide."""
    from yaie_jax.models.dtype_policy import resolve_dtype as policy_dtype
    dtype, why = policy_dtype(config.dtype, config.model)
    logger.info("dtype %s (%s: %s)", dtype, config.dtype, why)
    if dtype != config.dtype:
        config = dataclasses.replace(config, dtype=dtype)
    if dtype == "float32" and jax.default_backend() != "cpu":
        # GPUs run float32 matmuls in TF32 by default (10-bit mantissa): fp32 logits then differed from HF's
        # fp32 visibly (bench/NOTES.md §17). float32 means float32: full-precision products
        jax.config.update("jax_default_matmul_precision", "highest")
        logger.info("float32 on %s: jax_default_matmul_precision=highest (no TF32)", jax.default_backend())
    return config


def resolve_batch_defaults(config: EngineConfig, model, max_model_len: int):
    """Fill the batch-shape arguments the user left unset (yaie_jax/defaults.py has the rule) for `model` (its
    weights already on the device). Returns (config, {argument: value chosen})."""
    from yaie_jax import defaults
    from yaie_jax.executor.runner import JNP_DTYPES
    mc, tp = model.config, max(1, config.tensor_parallel_size)
    itemsize = np.dtype(JNP_DTYPES[config.dtype]).itemsize
    per_token = defaults.kv_bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, itemsize) // tp
    stats = None
    if jax.default_backend() != "cpu":
        try:
            stats = jax.local_devices()[0].memory_stats()
        except Exception:
            stats = None
    on_gpu = bool(stats and "bytes_limit" in stats)
    weights = sum(np.asarray(a).size for a in jax.tree_util.tree_leaves(model.params)) * itemsize // tp
    config, filled = defaults.resolve_batch_defaults(
        config, on_gpu=on_gpu, max_model_len=max_model_len, bytes_per_token=per_token,
        memory_limit_bytes=stats["bytes_limit"] if on_gpu else None,
        bytes_in_use=(stats.get("bytes_in_use", 0) if on_gpu else 0) + weights)
    if filled:
        logger.info("engine arguments chosen for this %s and model (yaie_jax/defaults.py): %s",
                    "GPU" if on_gpu else "CPU", ", ".join(f"{k}={v}" for k, v in filled.items()))
    return config, filled


def eos_token_ids(tokenizer, model_config) -> List[int]:
    """The end-of-sequence ids of the tokenizer (None: none) and of the model's config, sorted."""
    ids = set()
    for v in (getattr(tokenizer, "eos_token_id", None), model_config.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return sorted(ids)
