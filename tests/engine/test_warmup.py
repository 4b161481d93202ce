"""Start-up warm-up: the coverage programs compile before the engine serves, the rest in the background, and a
step whose bucket is not compiled yet runs padded in the next larger ready bucket, with the same tokens."""
import numpy as np

import support
from yaie_jax import LLM, SamplingParams
from yaie_jax.step_types import ScheduledSeq, SchedulerOutput

BASE = dict(dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None, max_num_seqs=8,
            max_num_batched_tokens=64, num_decode_steps=4)


def fake_out(num_tokens_per_seq):
    rows = [ScheduledSeq(seq=None, num_new_tokens=n, slots=[], sample=True) for n in num_tokens_per_seq]
    return SchedulerOutput(scheduled=rows, block_copies=[], swap_out=[], swap_in=[], timed_out=[])


def test_coverage_set_and_fallback_to_a_larger_ready_bucket(gpt2_dir):
    runner = LLM(gpt2_dir, **BASE).engine.runner
    shapes = runner.warmup_shapes()
    assert ("prefill", 16, 8) in shapes and ("prefill", 64, 8) in shapes and ("multi", 8, 8) in shapes
    first = runner.coverage_shapes(shapes)
    assert {("decode", 8, 8), ("multi", 8, 8), ("prefill", 64, 8)} <= set(first) and ("prefill", 16, 8) not in first
    # lazy engine (no warm-up): exact buckets
    assert runner.padded_shape(fake_out([5, 4])) == (8, 16)
    # warm-up under way, only the largest prefill bucket ready: a 9-token prefill runs padded to T=64
    runner.programs.warm_started, runner.programs.ready = True, {("prefill", 64), ("decode", 8)}
    assert runner.padded_shape(fake_out([5, 4])) == (8, 64)
    runner.programs.ready.add(("prefill", 16))
    out = fake_out([5, 4])
    assert runner.padded_shape(out) == (8, 16)
    runner.programs.ready.clear()
    assert runner.padded_shape(out) == (8, 16)          # decided once per step, even if readiness changes
    assert runner.padded_shape(fake_out([1, 1, 1])) == (8, 8)


def test_background_warmup_then_same_tokens_as_hf(gpt2_dir):
    rng = np.random.default_rng()
    prompts = [rng.integers(1, 384, size=int(rng.integers(3, 40))).tolist() for _ in range(5)]
    llm = LLM(gpt2_dir, **BASE)
    llm.engine.warmup(background=True)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    runner = llm.engine.runner
    llm.engine.wait_for_warmup()                # joins the background compiles and runs each new program once
    assert not runner.first_runs_pending and runner.num_first_runs == len(runner.warmup_shapes())
    assert {(k, t if k == "prefill" else s) for k, t, s in runner.warmup_shapes()} <= runner.programs.ready
    again = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for p, o, a in zip(prompts, outs, again):
        ref = support.hf_greedy(gpt2_dir, p, 10)
        support.assert_same_greedy(gpt2_dir, p, o.outputs[0].token_ids, ref)
        assert a.outputs[0].token_ids == o.outputs[0].token_ids     # the first runs left the KV pool as it was
