"""Device check of the compiled-program store: run twice with the same --cache-dir; the first run compiles and
saves, the second loads. Prints the greedy tokens' digest, programs loaded/saved and the generate time.

    python scripts/gpu/aot_check.py --cache-dir /tmp/aot && python scripts/gpu/aot_check.py --cache-dir /tmp/aot
"""
import argparse
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import bench_common as bc  # noqa: E402

from yaie_jax import LLM, SamplingParams  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--cache-dir", required=True)
args = ap.parse_args()
model = bc.gpt2_124m_dir(os.path.expanduser("~/.cache/yaie_bench/gpt2_124m"))
prompts, _ = bc.workload("W1")
t0 = time.perf_counter()
llm = LLM(model, dtype="bfloat16", warmup=False, compile_cache_dir=args.cache_dir, num_decode_steps=4,
          max_num_seqs=64, max_num_batched_tokens=4096, gpu_memory_utilization=0.3)
outs = llm.generate(prompts[:48], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
tokens = [o.outputs[0].token_ids for o in outs]
store = llm.engine.runner._aot_store
print(json.dumps({"tokens_sha": hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16],
                  "loaded": store.loaded if store else None, "saved": store.saved if store else None,
                  "engine_and_generate_s": round(time.perf_counter() - t0, 2)}))
