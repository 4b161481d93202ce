"""The superset sampling variant gives every batch exactly what the batch's own variant gives: the same tokens,
sampled logprobs and ranks, and the same top logprobs where asked (both compiled with jit, compared bit for
bit), over random mixes of greedy and sampled rows with filters, penalties, min_tokens and logprobs."""
import jax
import numpy as np
import pytest

from yaie_jax.executor import sampling
from yaie_jax.sampling_params import SamplingParams
from yaie_jax.executor.sampling_superset import GREEDY, SUPERSET, SUPPRESS_WIDTH, describe, history_width, to_superset

EOS = [0, 3]


def random_params(rng) -> SamplingParams:
    kw = dict(max_tokens=64, seed=int(rng.integers(0, 2 ** 31)))
    if rng.random() < 0.6:
        kw["temperature"] = float(rng.choice([0.3, 0.7, 1.0, 1.5]))
        if rng.random() < 0.5:
            kw["top_p"] = float(rng.choice([0.5, 0.9]))
        if rng.random() < 0.3:
            kw["top_k"] = int(rng.integers(1, 8))
        if rng.random() < 0.3:
            kw["min_p"] = 0.1
    else:
        kw["temperature"] = 0.0
    if rng.random() < 0.3:
        kw["presence_penalty"] = float(rng.choice([0.5, -1.0, 2.0]))
    if rng.random() < 0.2:
        kw["frequency_penalty"] = 0.7
    if rng.random() < 0.4:
        kw["repetition_penalty"] = 3.0
    if rng.random() < 0.3:
        kw["min_tokens"] = 4
        kw["stop_token_ids"] = [int(t) for t in rng.integers(1, 10, size=int(rng.integers(0, 3)))]
    if rng.random() < 0.3:
        kw["logprobs"] = int(rng.integers(0, 6))
    return SamplingParams(**kw)


def batch_for(rng, n: int, pad_to: int, vocab: int, max_len: int):
    """Rows of random options over histories of < max_len tokens (short: most tokens not yet seen, so a penalty
    or a stray history entry changes logits that matter)."""
    params = [random_params(rng) for _ in range(n)]
    tokens = [rng.integers(0, vocab, size=int(rng.integers(2, max_len))).tolist() for _ in range(n)]
    num_prompt = [int(rng.integers(1, len(t))) for t in tokens]
    return sampling.make_sampling_batch(
        params, pad_to=pad_to, seeds=[p.seed for p in params], steps=[len(t) - k for t, k in zip(tokens, num_prompt)],
        token_ids=tokens, num_prompt_tokens=num_prompt, eos_token_ids=EOS)


sample_jit = jax.jit(sampling.sample, static_argnames=("flags",))


@pytest.mark.parametrize("vocab", [12, 384])
def test_superset_samples_like_the_exact_variant(vocab):
    rng = np.random.default_rng(vocab)
    width = history_width(100)
    variants, differs = set(), 0
    for trial in range(25):
        S = 8
        sbatch, flags = batch_for(rng, int(rng.integers(1, S + 1)), S, vocab, 8)
        variants.add(describe(flags))
        sup = to_superset(sbatch, flags, width=width)
        assert sup is not None and sup.prev_tokens.shape == (S, width) and sup.suppress_ids.shape[1] == SUPPRESS_WIDTH
        # nearly flat logits with ties: any change to a row's logits would show in its draw or argmax
        logits = np.round(rng.normal(size=(S, vocab)) * 2) / 2
        exact = jax.device_get(sample_jit(logits.astype(np.float32), sbatch, flags=flags))
        both = jax.device_get(sample_jit(logits.astype(np.float32), sup, flags=SUPERSET))
        np.testing.assert_array_equal(both.token_ids, exact.token_ids)
        np.testing.assert_array_equal(both.sampled_logprob, exact.sampled_logprob)
        np.testing.assert_array_equal(both.sampled_rank, exact.sampled_rank)
        k = exact.top_ids.shape[1]
        np.testing.assert_array_equal(both.top_ids[:, :k], exact.top_ids)
        np.testing.assert_array_equal(both.top_logprobs[:, :k], exact.top_logprobs)
        plain = jax.device_get(sample_jit(logits.astype(np.float32), sbatch._replace(
            presence_penalty=np.zeros(S, np.float32), repetition_penalty=np.ones(S, np.float32),
            frequency_penalty=np.zeros(S, np.float32)), flags=flags._replace(any_penalties=False)))
        differs += int((plain.token_ids != exact.token_ids).any())
    assert len(variants) >= 5                       # many variants met, sampled and greedy
    assert differs > 0                              # the penalties drawn here do change tokens


def test_batches_the_superset_cannot_hold():
    params = [SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=list(range(1, 12)))]
    sbatch, flags = sampling.make_sampling_batch(params, pad_to=4, seeds=[0], steps=[0], eos_token_ids=EOS)
    assert sbatch.suppress_ids.shape[1] > SUPPRESS_WIDTH and to_superset(sbatch, flags, width=64) is None
    params = [SamplingParams(temperature=0.0, presence_penalty=1.0)]
    sbatch, flags = sampling.make_sampling_batch(params, pad_to=4, seeds=[0], steps=[1], token_ids=[[1] * 100],
                                                 num_prompt_tokens=[99])
    assert to_superset(sbatch, flags, width=64) is None and to_superset(sbatch, flags, width=128) is not None
    multi, flags = sampling.make_sampling_batch([SamplingParams(temperature=1.0)], pad_to=4, seeds=[0], steps=[0],
                                                num_steps=2)
    assert to_superset(multi, flags, width=64) is None
    assert history_width(8192) == 8192 and history_width(100) == 128 and history_width(10) == 64
    assert describe(GREEDY) == "greedy" and describe(SUPERSET) == "superset"
    assert describe(flags) == "sampled"
