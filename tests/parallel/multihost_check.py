"""One process of the multi-host check (tests/parallel/test_multihost.py); run with JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=D.

    python multihost_check.py MODEL_DIR ROLE SEED TP [COORDINATOR NUM_PROCESSES]

ROLE "single": one process, TP over its own devices. ROLE "0", "1", ...: that process of a `jax.distributed` job
with TP over every process's devices. Process 0 prints `RESULT{json}` (greedy tokens, engine steps, how the KV
pool is split); a follower's engine constructor never returns: it prints `{"event": "follower_exit", ...}` with
the runner calls it made, and exits 0.
"""
import json
import sys

import jax
import numpy as np

from yaie_jax import LLM, SamplingParams

path, role, seed, tp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dist = {}
if role != "single":
    dist = dict(coordinator_address=sys.argv[5], num_processes=int(sys.argv[6]), process_id=int(role))
rng = np.random.default_rng(seed)
prompts = [rng.integers(1, 384, size=int(rng.integers(3, 14))).tolist() for _ in range(5)]
prompts[1] = prompts[1][:3] * 4                 # 12 tokens: its n=2 fork shares a partly filled block
prompts.append(prompts[0] + [7, 8, 9])          # shares a cached prefix with prompts[0]
params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True) for _ in prompts]
params[1] = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2)   # fork: copy-on-write blocks
llm = LLM(path, dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None,
          tensor_parallel_size=tp, max_num_batched_tokens=32, num_decode_steps=2, max_model_len=96,
          max_num_seqs=8, num_gpu_blocks=48, block_size=8, **dist)
# only process 0 (or the single process) gets here
outs = llm.generate(prompts, params, use_tqdm=False)
k_pages = llm.engine.runner.kv_caches[0][0]
stats = llm.get_stats()
leader = None
if jax.process_count() > 1:
    from yaie_jax.executor import distributed
    leader = dict(distributed._leader.counts)
print("RESULT" + json.dumps({
    "tokens": [[c.token_ids for c in o.outputs] for o in outs],
    "num_steps": stats["num_steps"], "leader_calls": leader,
    "process_count": jax.process_count(), "device_count": jax.device_count(),
    "kv_devices": len(k_pages.sharding.device_set),
    "kv_local_shard_shape": list(k_pages.addressable_shards[0].data.shape),
    "kv_num_local_shards": len(k_pages.addressable_shards)}), flush=True)
