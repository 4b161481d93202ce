"""Pipelined fused decode (async scheduling) under TP: the next call's input tokens are taken on the devices from
the previous call's sharded output; TP=2 must still give TP=1's greedy tokens (2 fake CPU devices, XLA path)."""
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import support  # noqa: E402

SCRIPT = r'''
import json, sys
import numpy as np
from yaie_jax import LLM, SamplingParams
path, seed = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(seed)
prompts = [rng.integers(1, 384, size=int(rng.integers(3, 20))).tolist() for _ in range(3)]
out = {}
for tp in (1, 2):
    llm = LLM(path, dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None,
              tensor_parallel_size=tp, max_num_batched_tokens=64, num_decode_steps=2, max_model_len=64,
              max_num_seqs=4, num_gpu_blocks=16)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True), use_tqdm=False)
    out[tp] = {"tokens": [o.outputs[0].token_ids for o in outs],
               "pipelined": llm.get_stats()["num_pipelined_calls"]}
print("RESULT" + json.dumps(out))
'''


def test_pipelined_decode_under_tp_keeps_tp1_tokens(tmp_path):
    path = support.make_gpt2_dir(str(tmp_path / "gpt2"), n_head=4, n_embd=64, n_layer=1)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    seed = str(np.random.default_rng().integers(1 << 30))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, path, seed], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][6:])
    assert res["2"]["pipelined"] > 0
    assert res["2"]["tokens"] == res["1"]["tokens"]
