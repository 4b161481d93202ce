"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (tests/parallel/test_tp.py)."""
import json
import sys

import numpy as np

from yaie_jax import LLM, SamplingParams

path, backend = sys.argv[1], sys.argv[2]
sizes = [int(x) for x in sys.argv[3].split(",")]
rng = np.random.default_rng(int(sys.argv[4]))
prompts = [rng.integers(1, 384, size=int(rng.integers(3, 40))).tolist() for _ in range(6)]
sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
result = {}
for tp in sizes:
    llm = LLM(path, dtype="float32", attention_backend=backend, warmup=False, compile_cache_dir=None,
              tensor_parallel_size=tp, max_num_batched_tokens=64, num_decode_steps=2)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    r = llm.engine.runner
    k_pages = r.kv_caches[0][0]
    qkv = [v for k, v in __import__("jax").tree_util.tree_leaves_with_path(r.params)
           if "kernel" in str(k) and ("attn_qkv" in str(k) or "q_proj" in str(k))][0]
    result[tp] = {"tokens": [o.outputs[0].token_ids for o in outs],
                  "kv_shards": len(k_pages.sharding.device_set),
                  "kv_shard_shape": list(k_pages.addressable_shards[0].data.shape),
                  "qkv_shard_shape": list(qkv.addressable_shards[0].data.shape),
                  "qkv_shape": list(qkv.shape)}
print("RESULT" + json.dumps(result))
