"""The CPU compile plan (yaie_jax/executor/cpu_programs.py, warm-up on): a first chat request's programs compile in the
background from start-up, any mix of sampling options then runs without compiling (greedy or superset program),
with the same tokens and logprobs as the exact variants of an engine without the plan (given the same buckets:
the plan has no prefill bucket below 64 tokens), and a program needed by two threads compiles once."""
import threading

import jax
import numpy as np
import pytest

from yaie_jax import LLM, SamplingParams
from yaie_jax.executor.sampling_superset import GREEDY

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU backend's compile plan")

BASE = dict(dtype="float32", attention_backend="xla", compile_cache_dir=None, max_num_seqs=8,
            max_num_batched_tokens=64)


def mixed_params():
    out = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
           SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_tokens=12, ignore_eos=True),
           SamplingParams(temperature=0, presence_penalty=0.8, max_tokens=12, ignore_eos=True),
           SamplingParams(temperature=1.0, seed=2, logprobs=3, max_tokens=12, ignore_eos=True),
           SamplingParams(temperature=0.5, top_k=5, seed=3, min_tokens=6, max_tokens=12, n=2)]
    return out


def outputs(llm, prompts, params):
    # priorities given: every request is added before the first step (the same batches whatever the timing)
    outs = llm.generate(prompts, params, use_tqdm=False, priority=[0] * len(prompts))
    return [[(c.token_ids, c.cumulative_logprob,
              [sorted((t, lp.logprob) for t, lp in e.items()) for e in c.logprobs or []]) for c in o.outputs]
            for o in outs]


def test_plan_gives_the_exact_variants_outputs_without_compiling_mid_stream(llama_dir):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 384, size=int(rng.integers(33, 50))).tolist() for _ in range(5)]
    planned = LLM(llama_dir, warmup=True, **BASE)
    runner = planned.engine.runner
    assert runner.cpu_plan is not None
    runner.wait_for_warmup()                            # the start-up compiles: prefill T=64, decode S=8
    startup = len(runner.compile_log)
    assert startup == len(runner.cpu_plan.startup_programs()) == 4
    exact = LLM(llama_dir, warmup=False, **BASE)
    assert exact.engine.runner.cpu_plan is None
    assert runner.token_buckets == [64] and exact.engine.runner.token_buckets == [16, 32, 64]
    exact.engine.runner.token_buckets = [64]       # the same buckets: only the sampling programs differ
    # one request at a time in those buckets (prefill T=64, decode S=8): any option runs at once, in the greedy
    # or the superset program; then all together (larger buckets); the same calls on both engines (same cache)
    for p, sp in zip(prompts[:4], mixed_params()[:4]):
        assert outputs(planned, [p], sp) == outputs(exact, [p], sp)
    runner.wait_for_warmup()
    assert len(runner.compile_log) == startup
    assert runner.cpu_plan.num_superset_steps > 0
    assert outputs(planned, prompts, mixed_params()) == outputs(exact, prompts, mixed_params())
    # per bucket at most a greedy and a superset program (the exact engine compiled one per variant met)
    runner.wait_for_warmup()
    buckets = {(k, s, t) for k, s, t, *_ in runner.compile_log}
    assert len(runner.compile_log) <= 2 * len(buckets) < len(exact.engine.runner.compile_log)


def test_a_program_needed_by_two_threads_compiles_once(llama_dir):
    runner = LLM(llama_dir, warmup=False, **BASE).engine.runner
    batch, sbatch, flags, _ = runner._dummy_inputs("decode", 8, 8)
    assert flags == GREEDY
    seen = []

    def need():
        runner.compiled("decode", batch, sbatch, flags, reason="test")
        seen.append(runner.compile_tracker.snapshot())

    threads = [threading.Thread(target=need) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runner.compile_log) == 1 and runner.is_compiled("decode", batch, sbatch, flags)
    assert runner.compile_tracker.snapshot() == []


def test_compile_tracker_reports_what_compiles_and_why():
    from yaie_jax.executor.compile_tracker import CompileTracker
    tr = CompileTracker()
    assert tr.begin("a", {"program": "decode S=8 T=8", "sampling": "greedy", "reason": "start-up"}) is None
    ev = tr.begin("a", {"program": "decode S=8 T=8", "sampling": "greedy", "reason": "a step"})
    assert ev is not None and not ev.is_set()
    (entry,) = tr.snapshot()
    assert entry["program"] == "decode S=8 T=8" and entry["reason"] == "start-up" and entry["seconds"] >= 0
    tr.end("a")
    assert ev.is_set() and tr.snapshot() == []
