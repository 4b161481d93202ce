"""Tensor parallelism on 4 fake CPU devices: TP=2 and TP=4 give TP=1's greedy tokens (GPT-2 and Llama), and the
params and KV pool are really split (checked through their shardings). Each case runs in a subprocess, because
the device count is fixed when JAX starts."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import support  # noqa: E402

HERE = os.path.dirname(__file__)


def run_tp(path, backend, sizes):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    seed = str(np.random.default_rng().integers(1 << 30))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "tp_check.py"), path, backend,
                           ",".join(map(str, sizes)), seed], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return {int(k): v for k, v in json.loads(line[6:]).items()}


def check(res, sizes, num_kv_heads):
    base = res[1]["tokens"]
    for tp in sizes[1:]:
        assert res[tp]["tokens"] == base, f"TP={tp} diverged from TP=1"
        assert res[tp]["kv_shards"] == tp
        assert res[tp]["kv_shard_shape"][0] == num_kv_heads // tp
        assert res[tp]["qkv_shard_shape"][1] == res[tp]["qkv_shape"][1] // tp


def test_gpt2_tp_1_2_4_same_tokens(tmp_path):
    path = support.make_gpt2_dir(str(tmp_path), n_head=4, n_embd=64)
    check(run_tp(path, "xla", [1, 2, 4]), [1, 2, 4], 4)


def test_llama_tp_1_2_4_same_tokens(tmp_path):
    path = support.make_llama_dir(str(tmp_path), hidden_size=128, num_attention_heads=8, num_key_value_heads=4)
    check(run_tp(path, "xla", [1, 2, 4]), [1, 2, 4], 4)


def test_tp_refuses_indivisible_heads(tmp_path):
    from yaie_jax.parallel import check_divisible
    from yaie_jax.models.config import ModelConfig
    cfg = ModelConfig(arch="llama", vocab_size=10, hidden_size=576, num_layers=1, num_heads=9, num_kv_heads=3,
                      head_dim=64, intermediate_size=8, max_position_embeddings=8, norm_eps=1e-5)
    with pytest.raises(ValueError, match="9 query heads and 3 KV heads"):
        check_divisible(cfg, 2)
    check_divisible(cfg, 3)
