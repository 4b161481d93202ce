"""aot_cache.ExecutableStore: compiled step programs saved and loaded again give the same results; the
fingerprint is the same in two processes for the same model and settings, and changes with what decides a
program; a damaged entry is dropped (the caller compiles)."""
import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import support  # noqa: E402

from yaie_jax.executor import aot_cache  # noqa: E402
from yaie_jax.executor.aot_cache import ExecutableStore  # noqa: E402

ENGINE = dict(dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None, max_num_seqs=8,
              num_decode_steps=2, max_num_batched_tokens=64, num_gpu_blocks=64)


@pytest.fixture(autouse=True)
def _store_on(monkeypatch):
    monkeypatch.setenv("YAIE_AOT_CACHE", "1")          # (on by default; set in case the environment has it off)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return support.make_gpt2_dir(str(tmp_path_factory.mktemp("aot_gpt2")), n_positions=128)


@pytest.fixture(scope="module")
def engine(model_dir):
    from yaie_jax.engine.core import LLMEngine
    return LLMEngine(model=model_dir, compiled_program_store=True, **ENGINE)     # (off by default on the CPU)


def _inputs(runner, kind, T, S, seed=0):
    batch, sbatch, flags, K = runner._dummy_inputs(kind, T, S)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, runner.mc.vocab_size, size=batch.input_ids.shape).astype(np.int32)
    batch = batch.replace(input_ids=ids)
    if kind == "prefill":            # one sequence of T tokens in blocks 0.., so attention reads something
        batch = batch.replace(positions=np.arange(T, dtype=np.int32), slot_mapping=np.arange(T, dtype=np.int32))
        batch.query_start[1:] = T
        batch.context_lens[0] = T
        batch.block_tables[0, :T // runner.block_size] = np.arange(T // runner.block_size)
        batch.logits_index[0] = T - 1
    return batch, sbatch, flags, K


def test_saved_program_loads_and_computes_the_same(engine, tmp_path):
    runner = engine.runner
    store = ExecutableStore.for_runner(runner, cache_dir=str(tmp_path))
    assert store is not None
    for kind, T, S in (("prefill", 32, 8), ("multi", 8, 8)):
        batch, sbatch, flags, K = _inputs(runner, kind, T, S)
        key = (kind, flags, K, runner._shape_key(batch), runner._shape_key(sbatch))
        assert store.load(key) is None
        fn = runner.compiled(kind, batch, sbatch, flags, K)
        assert store.save(key, fn)
        again = ExecutableStore.for_runner(runner, cache_dir=str(tmp_path))
        assert again.digest == store.digest
        loaded = again.load(key)
        assert loaded is not None and again.loaded == 1
        kv0 = [(np.asarray(k), np.asarray(v)) for k, v in runner.kv_caches]   # both calls from the same pool
        res_a, kv_a = fn(runner.params, runner.kv_caches, batch, sbatch)
        runner.kv_caches = [(jax.device_put(k), jax.device_put(v)) for k, v in kv0]
        res_b, kv_b = loaded(runner.params, runner.kv_caches, batch, sbatch)
        runner.kv_caches = kv_b
        if kind == "multi":            # (SampleResult, last tokens [S_max])
            np.testing.assert_array_equal(np.asarray(res_a[1]), np.asarray(res_b[1]))
            res_a, res_b = res_a[0], res_b[0]
        np.testing.assert_array_equal(np.asarray(res_a.token_ids), np.asarray(res_b.token_ids))
        np.testing.assert_allclose(np.asarray(res_a.sampled_logprob), np.asarray(res_b.sampled_logprob))
        for (ka, va), (kb, vb) in zip(kv_a, kv_b):
            np.testing.assert_array_equal(np.asarray(ka), np.asarray(kb))
            np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))


def test_damaged_entry_is_dropped(engine, tmp_path):
    runner = engine.runner
    store = ExecutableStore.for_runner(runner, cache_dir=str(tmp_path))
    batch, sbatch, flags, K = _inputs(runner, "decode", 8, 8)
    key = ("decode", flags, K, runner._shape_key(batch), runner._shape_key(sbatch))
    assert store.save(key, runner.compiled("decode", batch, sbatch, flags, K))
    with open(store.path_of(key), "wb") as f:
        f.write(b"not a pickle")
    assert store.load(key) is None
    assert not os.path.exists(store.path_of(key))


def test_fingerprint_follows_what_decides_programs(engine, tmp_path, monkeypatch):
    runner = engine.runner
    base = ExecutableStore.for_runner(runner, cache_dir=str(tmp_path)).digest
    monkeypatch.setattr(runner, "config", dataclasses.replace(runner.config, block_size=32))
    assert ExecutableStore.for_runner(runner, cache_dir=str(tmp_path)).digest != base
    monkeypatch.setattr(runner, "config", dataclasses.replace(runner.config, block_size=16, served_model_name="x",
                                                              compile_cache_dir="/elsewhere"))
    assert ExecutableStore.for_runner(runner, cache_dir=str(tmp_path)).digest == base     # not in programs
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert ExecutableStore.for_runner(runner, cache_dir=str(tmp_path)).digest != base
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(aot_cache, "source_digest", lambda: "other code")
    assert ExecutableStore.for_runner(runner, cache_dir=str(tmp_path)).digest != base


def test_off_switches(engine, tmp_path, monkeypatch):
    """The engine argument compiled_program_store, as its environment alias YAIE_AOT_CACHE sets it (read when an
    EngineConfig is made: config.env_default)."""
    from yaie_jax.config import EngineConfig
    runner = engine.runner

    def store_for_env(value):
        if value is None:
            monkeypatch.delenv("YAIE_AOT_CACHE", raising=False)
        else:
            monkeypatch.setenv("YAIE_AOT_CACHE", value)
        setting = EngineConfig().compiled_program_store
        monkeypatch.setattr(runner, "config", dataclasses.replace(runner.config, compiled_program_store=setting))
        return ExecutableStore.for_runner(runner, cache_dir=str(tmp_path))

    assert ExecutableStore.for_runner(engine.runner) is None                 # no compile_cache_dir
    assert store_for_env("0") is None
    assert store_for_env("off") is None
    assert store_for_env(None) is None                       # unset: on for a GPU backend, off on the CPU
    monkeypatch.setattr(aot_cache, "default_on", lambda: True)
    assert store_for_env(None) is not None


def test_store_follows_the_engine_argument(engine, tmp_path, monkeypatch):
    runner = engine.runner
    for setting, on in ((False, False), (True, True), (None, False)):      # None: off on the CPU backend
        monkeypatch.setattr(runner, "config", dataclasses.replace(runner.config, compiled_program_store=setting))
        assert (ExecutableStore.for_runner(runner, cache_dir=str(tmp_path)) is not None) == on


def test_fingerprint_has_the_head_layout_not_the_cache_log_and_hub_knobs(engine, tmp_path, monkeypatch):
    runner = engine.runner
    config = runner.config
    monkeypatch.setattr(aot_cache, "default_on", lambda: True)        # so that compiled_program_store=None is on
    base = ExecutableStore.for_runner(runner, cache_dir=str(tmp_path)).digest
    for change, same in (({"tp_head_layout": "vocab"}, False), ({"log_compiles": 2}, True),
                         ({"hub_timeout_s": 1.5}, True), ({"compiled_program_store": None}, True)):
        monkeypatch.setattr(runner, "config", dataclasses.replace(config, **change))
        assert (ExecutableStore.for_runner(runner, cache_dir=str(tmp_path)).digest == base) == same, change


def test_fingerprint_is_the_same_in_two_processes(model_dir, tmp_path):
    code = ("import sys; from yaie_jax.engine.core import LLMEngine; from yaie_jax.executor.aot_cache import ExecutableStore; "
            f"e = LLMEngine(model=sys.argv[1], **{ENGINE!r}); "
            "print('DIGEST', ExecutableStore.for_runner(e.runner, cache_dir=sys.argv[2]).digest)")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    digests = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", code, model_dir, str(tmp_path)], capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        digests.append([ln for ln in r.stdout.splitlines() if ln.startswith("DIGEST")])
    assert digests[0] and digests[0] == digests[1]


def test_cpu_programs_from_the_persistent_cache_are_not_stored(tmp_path):
    """Three processes on one compile cache: the first compiles with the store off (filling JAX's persistent cache),
    the second with the store on (its compiles are persistent-cache hits), the third with the store on. On the CPU
    the second must not store what the persistent cache gave it: loaded in the third, such a program failed on its
    first call (NOT_FOUND: Function wrapped_iota not found)."""
    assert aot_cache.may_save(False) and not aot_cache.may_save(True)        # the CPU backend
    model = support.make_llama_dir(str(tmp_path / "llama"))
    code = ("import sys; from yaie_jax import LLM, SamplingParams; "
            "llm = LLM(sys.argv[1], dtype='float32', attention_backend='xla', warmup=False, "
            "compile_cache_dir=sys.argv[2], max_num_seqs=4, max_num_batched_tokens=64, num_decode_steps=4); "
            "o = llm.generate([[1, 2, 3, 4, 5]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), "
            "use_tqdm=False); print('TOKENS', o[0].outputs[0].token_ids)")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    tokens = []
    for store in ("0", "1", "1"):
        env["YAIE_AOT_CACHE"] = store
        r = subprocess.run([sys.executable, "-c", code, model, str(tmp_path / "cache")], capture_output=True,
                           text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        tokens.append([ln for ln in r.stdout.splitlines() if ln.startswith("TOKENS")])
    assert tokens[0] and tokens[0] == tokens[1] == tokens[2]
