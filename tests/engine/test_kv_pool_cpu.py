"""The KV pool of a 16-bit float model on the CPU ("xla" backend) is updated in place by every step program.

XLA:CPU upcasts bf16 ops to float32 over the whole operand: the pool used to be converted to f32 and back in every
step (temporaries of 2x the pool per layer; SmolLM2's 2 GiB pool took 5-6 s per decode step). The pool now holds
the values' uint16 bit patterns there (`attention.kv_storage_dtype`): the checks below read each compiled
program's buffer sizes (temporaries far below one layer's pages; the pool aliased to the donated input) and
compare bit storage with float storage run for run (same tokens, same pool bits)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yaie_jax import LLM, SamplingParams
from yaie_jax.executor import runner as runner_mod

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU backend's pool storage")

BASE = dict(attention_backend="xla", warmup=False, compile_cache_dir=None, max_num_seqs=8,
            max_num_batched_tokens=64, max_model_len=128)


def pool_bytes(runner) -> tuple:
    """(bytes of one layer's K pages, bytes of the whole pool)."""
    k = runner.kv_caches[0][0]
    return k.size * k.dtype.itemsize, sum(a.size * a.dtype.itemsize for kv in runner.kv_caches for a in kv)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("kind,T", [("decode", 8), ("prefill", 32)])
def test_step_program_updates_the_pool_in_place(llama_dir, dtype, kind, T):
    runner = LLM(llama_dir, dtype=dtype, num_gpu_blocks=8192, **BASE).engine.runner
    want = jnp.uint16 if dtype == "bfloat16" else jnp.float32
    assert all(a.dtype == want for kv in runner.kv_caches for a in kv)
    layer_bytes, total = pool_bytes(runner)
    batch, sbatch, flags, K = runner._dummy_inputs(kind, T, 8)
    mem = runner.compiled(kind, batch, sbatch, flags, K).memory_analysis()
    # before: every layer's pages converted to f32 (2x their bytes) and back, 2 GiB of temporaries per GiB of pool
    assert mem.temp_size_in_bytes < layer_bytes / 4, (mem.temp_size_in_bytes, layer_bytes)
    assert mem.alias_size_in_bytes >= total                     # the donated pool is the output pool


def test_donated_pool_is_consumed_and_memory_flat(llama_dir):
    llm = LLM(llama_dir, dtype="bfloat16", num_gpu_blocks=1024, **BASE)
    eng = llm.engine
    eng.add_request("a", [5, 6, 7, 8, 9], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    live0 = None
    while eng.has_unfinished_requests():
        old = [a for kv in eng.runner.kv_caches for a in kv]
        eng.step()
        assert all(a.is_deleted() for a in old)                 # donated: the step consumed the old pool
        live = sum(a.nbytes for a in jax.live_arrays())
        live0 = live if live0 is None else live0
        assert live <= live0                                    # no second pool kept alive


def run_engine(llama_dir, monkeypatch, bits: bool):
    if not bits:    # float storage, as before (each step then converts the pool on this backend)
        monkeypatch.setattr(runner_mod, "kv_storage_dtype", lambda dtype, backend: jnp.dtype(dtype))
    llm = LLM(llama_dir, dtype="bfloat16", num_gpu_blocks=12, num_cpu_blocks=64, preemption_mode="swap",
              block_size=8, **BASE)
    rng = np.random.default_rng(0)
    prefix = rng.integers(1, 384, size=20).tolist()
    prompts = [rng.integers(1, 384, size=int(rng.integers(3, 30))).tolist() for _ in range(5)]
    prompts += [prefix + [i + 1, i + 2] for i in range(3)]         # prefix-cache hits (block copies)
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True) for _ in prompts]
    params[1] = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=16, ignore_eos=True, n=2)  # forks
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.get_stats()
    monkeypatch.undo()
    pool = [np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype != jnp.uint16 else a)
            for kv in llm.engine.runner.kv_caches for a in kv]
    return [[c.token_ids for c in o.outputs] for o in outs], pool, stats


def test_bit_storage_equals_float_storage(llama_dir, monkeypatch):
    tokens_f, pool_f, stats_f = run_engine(llama_dir, monkeypatch, bits=False)
    tokens_b, pool_b, stats_b = run_engine(llama_dir, monkeypatch, bits=True)
    assert stats_b["num_preemptions"] > 0 and stats_b["prefix_cache_hit_tokens"] > 0   # swaps and copies ran
    assert tokens_b == tokens_f
    for a, b in zip(pool_f, pool_b):
        np.testing.assert_array_equal(a, b)
