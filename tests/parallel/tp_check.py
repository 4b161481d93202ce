"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (tests/parallel/test_tp.py).

    python tp_check.py SEED MODEL_DIR RUNS [MODEL_DIR RUNS ...]

One process for several models saves JAX's start-up per model. RUNS: comma-separated `backend:tp[:head]` (e.g.
`xla:1,pallas:2,xla:4:vocab`); head is the LM head / embedding layout, "replicated" (default) or "vocab" (engine
argument tp_head_layout, yaie_jax/executor/parallel.py). Prints one line `RESULT{json}`: per model dir and run the greedy
tokens, how the KV pool, the first QKV kernel, the token embedding and an untied head are split, and the wall time.
"""
import json
import re
import sys
import time

import jax
import numpy as np

from yaie_jax import LLM, SamplingParams

# Interpret mode (the "pallas" backend on CPU) costs seconds per kernel call, so: 3 short prompts in one prefill
# step, then one fused call of 2 decode steps (3 tokens each); 4 sequence slots keep the decode grid small.
SP = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


EXTRA_COLLECTIVE = re.compile(r"= \S+ (?:all-gather|collective-permute|all-to-all)[-a-z]*\(")


def check_model(path, runs, rng):
    """{run: tokens and shard shapes} for one model dir and its `backend:tp[:head]` runs."""
    prompts = [rng.integers(1, 384, size=int(rng.integers(3, 20))).tolist() for _ in range(3)]
    result = {}
    for run in runs:
        backend, tp, *head = run.split(":")
        tp = int(tp)
        t0 = time.perf_counter()
        llm = LLM(path, dtype="float32", attention_backend=backend, warmup=False, compile_cache_dir=None,
                  tensor_parallel_size=tp, tp_head_layout=head[0] if head else "replicated", max_num_batched_tokens=64, num_decode_steps=2,
                  max_model_len=64, max_num_seqs=4, num_gpu_blocks=16)
        outs = llm.generate(prompts, SP, use_tqdm=False)
        r = llm.engine.runner
        k_pages = r.kv_caches[0][0]
        leaves = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(r.params)}
        qkv = [v for k, v in leaves.items() if "kernel" in k and ("attn_qkv" in k or "q_proj" in k)][0]
        emb = [v for k, v in leaves.items() if "wte" in k or "embed_tokens" in k][0]
        lm_head = [v for k, v in leaves.items() if "lm_head" in k]
        result[run] = {
            "tokens": [o.outputs[0].token_ids for o in outs],
            "kv_shards": len(k_pages.sharding.device_set),
            "kv_shard_shape": list(k_pages.addressable_shards[0].data.shape),
            "qkv_shard_shape": list(qkv.addressable_shards[0].data.shape),
            "qkv_shape": list(qkv.shape),
            "embedding_shard_shape": list(emb.addressable_shards[0].data.shape),
            "embedding_shape": list(emb.shape),
            "lm_head_shard_shape": list(lm_head[0].addressable_shards[0].data.shape) if lm_head else None,
            "lm_head_shape": list(lm_head[0].shape) if lm_head else None,
            # data moves XLA added besides the Megatron all-reduces (none when every shard owns whole heads)
            "extra_collectives": sum(len(EXTRA_COLLECTIVE.findall(fn.as_text()))
                                      for fn in r.programs._compiled.values()),
            "seconds": round(time.perf_counter() - t0, 1)}
        del llm, r, k_pages, qkv, emb, lm_head, leaves
    return result


rng = np.random.default_rng(int(sys.argv[1]))
pairs = sys.argv[2:]
print("RESULT" + json.dumps({path: check_model(path, runs.split(","), rng)
                             for path, runs in zip(pairs[::2], pairs[1::2])}))
