"""The compiled-program store (yaie_jax/executor/aot_cache.py) wired into the runner: a second engine with the same
configuration loads the first one's step programs (no tracing or compiling) and gives the same greedy tokens."""
import numpy as np

from yaie_jax import LLM, SamplingParams


def test_second_engine_loads_programs_and_matches(gpt2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("YAIE_AOT_CACHE", "1")            # (on by default; set in case the environment has it off)
    rng = np.random.default_rng()
    prompts = [rng.integers(1, 384, size=int(n)).tolist() for n in (5, 23, 40)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    common = dict(dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=str(tmp_path),
                  num_decode_steps=2)
    first = LLM(gpt2_dir, **common)
    want = [o.outputs[0].token_ids for o in first.generate(prompts, params, use_tqdm=False)]
    assert first.engine.runner._aot_store.saved >= 2
    second = LLM(gpt2_dir, **common)
    got = [o.outputs[0].token_ids for o in second.generate(prompts, params, use_tqdm=False)]
    store = second.engine.runner._aot_store
    assert store.loaded >= 2 and store.saved == 0          # every program came from the store
    assert got == want
