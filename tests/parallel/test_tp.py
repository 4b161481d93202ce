"""Tensor parallelism on 4 fake CPU devices: TP=2 and TP=4 give TP=1's greedy tokens (GPT-2 and Llama), with the
XLA attention path and with the Pallas kernels per shard (interpret mode), LM head replicated and vocab-parallel;
the params and KV pool are really split (checked through their shardings). Each model runs in one subprocess,
because the device count is fixed when JAX starts; all its runs share that process to keep the suite fast."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import support  # noqa: E402

HERE = os.path.dirname(__file__)


def run_tp(model_runs):
    """{model dir: {run: greedy tokens and shard shapes}} for {model dir: [`backend:tp[:head]` runs]}: tp_check.py
    in one 4-device subprocess per model, all at once (interpret mode is mostly single-threaded Python, so the
    models share the cores instead of queueing)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env.pop("YAIE_TP_HEAD", None)
    procs = {}
    for path, runs in model_runs.items():
        seed = str(np.random.default_rng().integers(1 << 30))
        procs[path] = subprocess.Popen([sys.executable, os.path.join(HERE, "tp_check.py"), seed, path,
                                        ",".join(runs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=env)
    results = {}
    for path, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        line = [l for l in out.splitlines() if l.startswith("RESULT")][-1]
        results.update(json.loads(line[6:]))
    return results


def check(res, num_kv_heads):
    """Every run's tokens equal the first (TP=1) run's; the KV pool and QKV kernel are split N ways, and with
    the "vocab" head the token embedding rows and an untied head's columns too."""
    runs = list(res)
    base = res[runs[0]]["tokens"]
    for run in runs[1:]:
        r = res[run]
        assert r["tokens"] == base, f"{run} diverged from {runs[0]}: {r['tokens']} vs {base}"
        _, tp, *head = run.split(":")
        tp = int(tp)
        vocab_split = tp if head == ["vocab"] else 1
        assert r["kv_shards"] == tp
        assert r["kv_shard_shape"][0] == num_kv_heads // tp
        if head != ["vocab"]:   # (a vocab-split head gathers per-shard maxima / logits by design)
            assert r["extra_collectives"] == 0, f"{run}: XLA moves activations between devices (all-gather...)"
        assert r["qkv_shard_shape"][1] == r["qkv_shape"][1] // tp
        assert r["embedding_shard_shape"] == [r["embedding_shape"][0] // vocab_split, r["embedding_shape"][1]]
        if r["lm_head_shape"] is not None:   # untied head [D, V]
            assert r["lm_head_shard_shape"] == [r["lm_head_shape"][0], r["lm_head_shape"][1] // vocab_split]


# TP=1 first (the reference, with both backends), then the Pallas kernels per shard (interpret mode) at TP=2 and
# 4, and the XLA path at TP=2 and 4 with one head layout each (layout and backend are independent; each model
# gets both layouts and both sizes).
PALLAS = ["xla:1", "pallas:1", "pallas:2", "pallas:4"]
RUNS = {"gpt2": PALLAS + ["xla:2", "xla:4:vocab"], "llama": PALLAS + ["xla:4", "xla:2:vocab"]}


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    """Both models' runs (a subprocess each, concurrently): GPT-2 (tied head, fused QKV, 4 heads) and Llama (GQA 8 query / 4 KV
    heads, untied head), one layer each."""
    root = tmp_path_factory.mktemp("tp")
    gpt2 = support.make_gpt2_dir(str(root / "gpt2"), n_head=4, n_embd=64, n_layer=1)
    llama = support.make_llama_dir(str(root / "llama"), hidden_size=128, num_attention_heads=8,
                                   num_key_value_heads=4, num_hidden_layers=1)
    res = run_tp({gpt2: RUNS["gpt2"], llama: RUNS["llama"]})
    return {"gpt2": res[gpt2], "llama": res[llama]}


def test_gpt2_tp_1_2_4_same_tokens(tp_results):
    check(tp_results["gpt2"], 4)


def test_llama_tp_1_2_4_same_tokens(tp_results):
    assert tp_results["llama"]["xla:1"]["lm_head_shape"] is not None    # untied: the head is split too
    check(tp_results["llama"], 4)


def test_tp_refuses_indivisible_heads(tmp_path):
    from yaie_jax.executor.parallel import check_divisible
    from yaie_jax.models.config import ModelConfig
    cfg = ModelConfig(arch="llama", vocab_size=10, hidden_size=576, num_layers=1, num_heads=9, num_kv_heads=3,
                      head_dim=64, intermediate_size=8, max_position_embeddings=8, norm_eps=1e-5)
    with pytest.raises(ValueError, match="9 query heads and 3 KV heads"):
        check_divisible(cfg, 2)
    check_divisible(cfg, 3)


def test_head_layout_choice_and_vocab_refusal(monkeypatch):
    from yaie_jax.executor import parallel
    from yaie_jax.models.config import ModelConfig
    monkeypatch.delenv("YAIE_TP_HEAD", raising=False)
    assert parallel.head_layout() == "replicated"
    monkeypatch.setenv("YAIE_TP_HEAD", "vocab")
    assert parallel.head_layout() == "vocab"
    assert parallel.head_layout("replicated") == "replicated"
    with pytest.raises(ValueError, match="unknown tensor-parallel head layout"):
        parallel.head_layout("rows")
    cfg = ModelConfig(arch="gpt2", vocab_size=50257, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=4,
                      head_dim=16, intermediate_size=8, max_position_embeddings=8, norm_eps=1e-5)
    with pytest.raises(ValueError, match="50257 % 2"):
        parallel.check_vocab_divisible(cfg, 2)
    parallel.check_vocab_divisible(cfg, 1)
