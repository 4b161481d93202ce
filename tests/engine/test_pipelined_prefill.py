"""Pipelined prefill (`pipelined_prefill`): the next prompt step is dispatched before a prompt-only step's tokens
are read back. Same tokens, finish reasons and text as without it, with aborts while a step is in flight, streaming
and several samples per prompt; nothing is held afterwards."""
import numpy as np

from yaie_jax import LLM, SamplingParams

BASE = dict(dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None,
            max_num_batched_tokens=48, num_decode_steps=4)


def _run(engine, prompts, params, abort_after_first_step=()):
    ids = [engine.add_request(None, p, sp, stream=True) for p, sp in zip(prompts, params)]
    last, steps = {}, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            last[o.request_id] = o
        steps += 1
        if steps == 1 and abort_after_first_step:
            engine.abort_request([ids[i] for i in abort_after_first_step])
    return [last.get(i) for i in ids]


def test_same_outputs_as_unpipelined_with_aborts_streams_and_samples(gpt2_dir):
    rng = np.random.default_rng()
    prompts = [rng.integers(1, 384, size=int(rng.integers(5, 40))).tolist() for _ in range(12)]
    params = [SamplingParams(temperature=0.0, max_tokens=int(rng.integers(1, 12)), ignore_eos=True)
              for _ in prompts]
    params[3] = SamplingParams(temperature=0.8, n=3, seed=5, max_tokens=6, ignore_eos=True)
    params[4] = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    ref_llm, pip_llm = LLM(gpt2_dir, **BASE), LLM(gpt2_dir, pipelined_prefill=True, **BASE)
    for abort in ((), (2, 9)):
        ref = _run(ref_llm.engine, prompts, params, abort)
        got = _run(pip_llm.engine, prompts, params, abort)
        for i, (a, b) in enumerate(zip(ref, got)):
            if i in abort:
                continue                      # (an aborted request's end is reported by whoever aborted it)
            assert [(o.token_ids, o.finish_reason, o.text) for o in b.outputs] == \
                   [(o.token_ids, o.finish_reason, o.text) for o in a.outputs]
            if params[i].logprobs:
                assert [sorted(e) for e in b.outputs[0].logprobs] == [sorted(e) for e in a.outputs[0].logprobs]
    stats = pip_llm.get_stats()
    assert stats["num_pipelined_prefill_calls"] > 0 and ref_llm.get_stats()["num_pipelined_prefill_calls"] == 0
    pip_llm.engine.block_manager.reset_prefix_cache()
    assert pip_llm.engine.block_manager.num_free_gpu_blocks == pip_llm.engine.runner.num_gpu_blocks
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
