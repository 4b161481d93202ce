"""SamplingParams.prompt_logprobs: each prompt token's log-probability (and top-k) equals HF's log_softmax of the
previous position's fp32 logits, through whole-prompt prefill, chunked prefill and a warm prefix cache (which a
prompt-logprobs request does not read), with n > 1 and after preemption by recompute."""
import numpy as np
import pytest

import support
from yaie_jax import LLM, SamplingParams

BASE = dict(dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None, max_num_seqs=8)


def hf_logprobs(path, ids):
    logits = support.hf_logits(path, ids).astype(np.float64)                      # [len, V]
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def check_entries(path, prompt, entries, k):
    ref = hf_logprobs(path, prompt)
    assert len(entries) == len(prompt) and entries[0] is None
    for j in range(1, len(prompt)):
        e = entries[j]
        row = ref[j - 1]
        assert prompt[j] in e
        np.testing.assert_allclose(e[prompt[j]].logprob, row[prompt[j]], atol=2e-4)
        assert e[prompt[j]].rank == 1 + int((row > row[prompt[j]] + 1e-5).sum())
        for t, lp in e.items():
            np.testing.assert_allclose(lp.logprob, row[t], atol=2e-4)
        assert set(np.argsort(-row)[:k].tolist()) <= set(e) and len(e) in (k, k + 1)


@pytest.mark.parametrize("case", ["whole", "chunked", "recompute"])
def test_prompt_logprobs_match_hf(llama_dir, case):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 384, size=int(n)).tolist() for n in (45, 7, 1, 30)]
    args = dict(BASE)
    if case == "chunked":
        args.update(max_num_batched_tokens=16)
    if case == "recompute":
        args.update(num_gpu_blocks=7, preemption_mode="recompute", max_num_batched_tokens=32)
    llm = LLM(llama_dir, **args)
    params = SamplingParams(temperature=0, max_tokens=24 if case == "recompute" else 2, prompt_logprobs=3,
                            ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    if case == "recompute":
        assert llm.get_stats()["num_preemptions"] > 0
    for p, o in zip(prompts, outs):
        check_entries(llama_dir, p, o.prompt_logprobs, 3)


def test_prompt_logprobs_skip_the_prefix_cache_and_n(llama_dir):
    rng = np.random.default_rng(1)
    prompt = rng.integers(1, 384, size=50).tolist()
    llm = LLM(llama_dir, **BASE)
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert first.prompt_logprobs is None
    again = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert again.num_cached_tokens > 0                                             # the cache is warm
    out = llm.generate([prompt], SamplingParams(temperature=1.0, n=3, max_tokens=2, prompt_logprobs=0, seed=0),
                       use_tqdm=False)[0]
    assert out.num_cached_tokens == 0 and len(out.outputs) == 3
    check_entries(llama_dir, prompt, out.prompt_logprobs, 0)


def test_prompt_logprobs_validation():
    for bad in (-1, 21, 1.5):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
