"""The engine's greedy outputs equal HF transformers' `generate`, token for token, under every memory regime.

Reference: transformers' PyTorch model (fp32) run one prompt at a time; ours runs all prompts together.
"""
import numpy as np
import pytest

import support
from yaie_jax import LLM, SamplingParams

MAX_NEW = 24


def random_prompts(rng, n, lo=3, hi=60, vocab=384, shared_prefix=None):
    out = []
    for _ in range(n):
        p = rng.integers(1, vocab, size=int(rng.integers(lo, hi))).tolist()
        if shared_prefix is not None:
            p = list(shared_prefix) + p
        out.append(p)
    return out


@pytest.fixture(scope="module")
def prompts_and_refs(gpt2_dir):
    rng = np.random.default_rng()
    prompts = random_prompts(rng, 16)
    prefix = rng.integers(1, 384, size=40).tolist()
    prompts += random_prompts(rng, 4, lo=1, hi=10, shared_prefix=prefix)
    refs = [support.hf_greedy(gpt2_dir, p, MAX_NEW) for p in prompts]
    return prompts, refs


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)

CASES = {
    "default": dict(),
    "bs32": dict(block_size=32),
    "tiny_budget_chunked": dict(max_num_batched_tokens=16, max_num_seqs=8),
    "preempt_recompute": dict(num_gpu_blocks=12, preemption_mode="recompute"),
    "preempt_swap": dict(num_gpu_blocks=12, num_cpu_blocks=64, preemption_mode="swap"),
    "no_prefix_cache": dict(enable_prefix_caching=False),
    "multi_step_decode": dict(num_decode_steps=4),
    "multi_step_sync": dict(num_decode_steps=4, async_scheduling=False),
    # more prompts than max_num_seqs: fused (and pipelined) calls run while the rest wait for a free row
    "multi_step_capped": dict(num_decode_steps=5, max_num_seqs=6),
    # prompt steps dispatched before the previous prompt step's tokens are read back
    "pipelined_prefill": dict(pipelined_prefill=True, max_num_batched_tokens=64, num_decode_steps=4),
    "pipelined_prefill_swap": dict(pipelined_prefill=True, max_num_batched_tokens=64, num_gpu_blocks=12,
                                   num_cpu_blocks=64, preemption_mode="swap"),
    "pipelined_prefill_recompute": dict(pipelined_prefill=True, max_num_batched_tokens=64, num_gpu_blocks=12,
                                        preemption_mode="recompute"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_hf(gpt2_dir, prompts_and_refs, case):
    prompts, refs = prompts_and_refs
    args = dict(dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None)
    args.update(CASES[case])
    llm = LLM(gpt2_dir, **args)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for p, o, r in zip(prompts, outs, refs):
        assert o.prompt_token_ids == p
        support.assert_same_greedy(gpt2_dir, p, o.outputs[0].token_ids, r)
        assert o.outputs[0].finish_reason == "length"
    # again: the shared-prefix prompts now find their prefix (and more) in the cache
    again = llm.generate(prompts[-4:], GREEDY, use_tqdm=False)
    for p, o, r in zip(prompts[-4:], again, refs[-4:]):
        support.assert_same_greedy(gpt2_dir, p, o.outputs[0].token_ids, r)
    stats = llm.get_stats()
    if case.startswith("preempt"):
        assert stats["num_preemptions"] > 0
    if case in ("multi_step_decode", "multi_step_capped"):
        assert stats["num_pipelined_calls"] > 0
    if case == "multi_step_sync":
        assert stats["num_pipelined_calls"] == 0
    assert (stats["num_pipelined_prefill_calls"] > 0) == case.startswith("pipelined_prefill")
    if case != "no_prefix_cache":
        assert stats["prefix_cache_hit_tokens"] > 0
    # nothing is held after everything finished, except by the prefix cache
    llm.engine.block_manager.reset_prefix_cache()
    assert llm.engine.block_manager.num_free_gpu_blocks == llm.engine.runner.num_gpu_blocks
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0


def test_burst_sharing_a_prefix_computes_it_once_per_group(gpt2_dir):
    """A burst of requests sharing a prompt prefix (issue 10's W4 shape): only the first request of each group
    computes the prefix; the others reuse its blocks from the same step on (prompt blocks enter the prefix cache
    when scheduled), and the tokens are HF's."""
    rng = np.random.default_rng()
    groups = [rng.integers(1, 384, size=48).tolist() for _ in range(2)]
    prompts = [g + rng.integers(1, 384, size=int(rng.integers(3, 9))).tolist() for g in groups for _ in range(5)]
    llm = LLM(gpt2_dir, dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None,
              max_num_batched_tokens=512)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        support.assert_same_greedy(gpt2_dir, p, o.outputs[0].token_ids, support.hf_greedy(gpt2_dir, p, 6))
    assert [o.num_cached_tokens for o in outs] == [0, 48, 48, 48, 48] * 2
    assert llm.get_stats()["num_steps"] <= 1 + 6        # one prefill step for all ten, then decode


def test_identical_and_block_aligned_prompts_in_one_step_chunked(gpt2_dir):
    """Prompts cached as they are scheduled, where that meets the corner cases: identical prompts in one step, a
    prompt that is a whole number of blocks (its last block is computed again, never deduplicated under the
    step's slots), and chunks that end inside a block; HF's tokens every time."""
    rng = np.random.default_rng()
    base = rng.integers(1, 384, size=48).tolist()                  # 3 blocks of 16
    prompts = [base, base, base + [7], base[:40], base + rng.integers(1, 384, size=21).tolist(), base]
    for budget in (512, 24):
        llm = LLM(gpt2_dir, dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None,
                  max_num_batched_tokens=budget, max_num_seqs=8)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
        for p, o in zip(prompts, outs):
            support.assert_same_greedy(gpt2_dir, p, o.outputs[0].token_ids, support.hf_greedy(gpt2_dir, p, 5))
        bm = llm.engine.block_manager
        bm.check_invariants()
        bm.reset_prefix_cache()
        assert bm.num_free_gpu_blocks == llm.engine.runner.num_gpu_blocks
