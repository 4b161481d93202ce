"""On-device sampling (yaie_jax/executor/sampling.py) against independent references: numpy / torch argmax, HF's logits
processors (repetition penalty, top-k, top-p, min-p warpers), the OpenAI presence/frequency formula in numpy,
torch.log_softmax, and empirical distributions over many seeded draws (chi-square)."""
from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from scipy import stats
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from yaie_jax.executor.sampling import (SamplingFlags, apply_penalties, build_sampling_batch, filter_mask,
                               make_sampling_batch, row_key_data, row_seed, sample)
from yaie_jax.sampling_params import SamplingParams as SP

V = 64          # one vocabulary size (and 16 padded rows) for most tests, so compiled programs are reused
sample_jit = jax.jit(sample, static_argnames=("flags", "num_logprobs"))
filter_jit = jax.jit(filter_mask)
penalties_jit = jax.jit(apply_penalties)


def run(logits, params, *, seeds=None, steps=None, sample_indices=None, token_ids=None, num_prompt=None,
        pad_to=None, eos=(), num_logprobs=None):
    n = len(params)
    batch, flags = make_sampling_batch(
        params, pad_to=pad_to or max(n, 16), seeds=seeds if seeds is not None else [0] * n,
        steps=steps if steps is not None else [0] * n, sample_indices=sample_indices, token_ids=token_ids,
        num_prompt_tokens=num_prompt, eos_token_ids=eos)
    logits = np.asarray(logits, np.float32)
    if logits.shape[0] < batch.temperature.shape[0]:
        pad = np.zeros((batch.temperature.shape[0] - logits.shape[0], logits.shape[1]), np.float32)
        logits = np.concatenate([logits, pad])
    out = jax.device_get(sample_jit(logits, batch, flags=flags, num_logprobs=num_logprobs))
    return type(out)(*(np.asarray(a)[:n] for a in out)), flags          # the real rows only


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------------------------------- greedy

def test_greedy_is_argmax_with_lowest_id_on_ties():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, V)).astype(np.float32)
    logits[2, [3, 7, 40]] = 9.0                      # exact tie: the lowest id wins, as torch.argmax
    logits[5, :] = 1.0                               # all equal -> 0
    out, flags = run(logits, [SP(temperature=0.0)] * 7)
    assert flags.all_greedy and not flags.any_filters and not flags.any_penalties
    np.testing.assert_array_equal(out.token_ids[:7], torch.argmax(torch.from_numpy(logits), -1).numpy())
    assert out.token_ids[2] == 3 and out.token_ids[5] == 0


def test_greedy_rows_in_a_sampled_batch_are_argmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, V)).astype(np.float32) * 3
    params = [SP(temperature=0.0), SP(temperature=1.0, top_k=5), SP(temperature=0.0, top_p=0.5),
              SP(temperature=0.7, min_p=0.1), SP(temperature=0.0), SP(temperature=1.2)]
    out, flags = run(logits, params, seeds=list(range(6)))
    assert not flags.all_greedy and flags.any_filters
    for i in (0, 2, 4):
        assert out.token_ids[i] == np.argmax(logits[i])


def test_tiny_temperature_is_finite_and_greedy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, V)).astype(np.float32) * 5
    out, _ = run(logits, [SP(temperature=1e-9, top_p=0.9)] * 2 + [SP(temperature=1e-7)] * 2, seeds=[1, 2, 3, 4])
    np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))
    assert np.all(np.isfinite(out.sampled_logprob))


def test_all_greedy_compiles_without_noise_or_sort():
    logits = jnp.zeros((4, 32), jnp.float32)

    def walk(jaxpr, names):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner, names)
        return names

    def prims(params):
        batch, flags = make_sampling_batch(params, pad_to=4, seeds=[0] * len(params), steps=[0] * len(params))
        return walk(jax.make_jaxpr(functools.partial(sample, flags=flags))(logits, batch).jaxpr, set())

    def random(names):
        return any("threefry" in n or "random" in n for n in names)

    greedy = prims([SP(temperature=0.0)] * 4)
    assert "sort" not in greedy and not random(greedy) and "scatter" not in greedy
    plain = prims([SP(temperature=1.0)])
    assert "sort" not in plain and random(plain)
    assert "sort" in prims([SP(temperature=1.0, top_p=0.9)])
    assert "sort" not in prims([SP(temperature=0.0, top_k=3)])        # filters are moot for greedy rows


# -------------------------------------------------------------------------------------------------- penalties

def reference_penalties(logits_row, prompt, output, rep, pres, freq):
    """HF's RepetitionPenaltyLogitsProcessor over prompt + output, then OpenAI's presence/frequency formula over
    the output tokens only (vLLM's semantics)."""
    scores = torch.from_numpy(logits_row[None].astype(np.float32).copy())
    ids = torch.tensor([list(prompt) + list(output)], dtype=torch.long)
    if ids.shape[1]:
        scores = RepetitionPenaltyLogitsProcessor(penalty=rep)(ids, scores)
    x = scores[0].numpy().astype(np.float64)
    counts = np.bincount(np.asarray(output, np.int64), minlength=len(x)).astype(np.float64)
    return x - freq * counts - pres * (counts > 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_penalties_match_hf_and_openai(seed):
    rng = np.random.default_rng(seed)
    S = 6
    logits = (rng.normal(size=(S, V)) * 3).astype(np.float32)
    params, prompts, outputs = [], [], []
    for i in range(S):
        prompts.append(list(rng.integers(0, V, size=rng.integers(0, 30))))
        outputs.append(list(rng.integers(0, V // 2, size=rng.integers(0, 40))))      # repeats likely
        params.append(SP(temperature=0.0, repetition_penalty=float(rng.choice([1.0, 0.7, 1.3, 2.0])),
                         presence_penalty=float(rng.uniform(-2, 2)), frequency_penalty=float(rng.uniform(-2, 2))))
    params[0] = SP(temperature=0.0)                                # a row with no penalties in the batch
    token_ids = [p + o for p, o in zip(prompts, outputs)]
    batch, flags = make_sampling_batch(params, pad_to=16, seeds=[0] * S, steps=[len(o) for o in outputs],
                                       token_ids=token_ids, num_prompt_tokens=[len(p) for p in prompts])
    assert flags.any_penalties
    padded = np.concatenate([logits, np.zeros((16 - S, V), np.float32)])
    got = np.asarray(penalties_jit(padded, batch))[:S]
    for i in range(S):
        p = params[i]
        ref = reference_penalties(logits[i], prompts[i], outputs[i], p.repetition_penalty, p.presence_penalty,
                                  p.frequency_penalty)
        np.testing.assert_allclose(got[i], ref, rtol=1e-5, atol=1e-5)
    out = jax.device_get(sample_jit(padded, batch, flags=flags))
    for i in range(S):
        p = params[i]
        ref = reference_penalties(logits[i], prompts[i], outputs[i], p.repetition_penalty, p.presence_penalty,
                                  p.frequency_penalty)
        assert out.token_ids[i] == np.argmax(ref)


def test_presence_and_frequency_ignore_prompt_tokens():
    logits = np.zeros((1, V), np.float32)
    logits[0, 3] = 1.0
    # token 3 only in the prompt: presence/frequency leave it alone, so it stays the argmax
    out, _ = run(logits, [SP(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)],
                 token_ids=[[3, 3, 3, 1]], num_prompt=[3], steps=[1])
    assert out.token_ids[0] == 3
    # in the output it is penalised: 1 - 2 - 2 < 0
    out, _ = run(logits, [SP(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)],
                 token_ids=[[1, 3]], num_prompt=[1], steps=[1])
    assert out.token_ids[0] != 3


# ---------------------------------------------------------------------------------------------------- filters

def reference_allowed(logits_row, T, top_k, top_p, min_p):
    """Allowed set of the documented order in float64: min_p, top_k, then top_p over the renormalized rest."""
    x = logits_row.astype(np.float64) / T
    p = softmax(x)
    order = np.argsort(-x, kind="stable")
    keep = np.ones_like(x, bool)
    if min_p > 0:
        keep &= p >= min_p * p.max()
    if top_k > 0:
        keep &= np.isin(np.arange(len(x)), order[:top_k])
    if top_p < 1:
        q = np.where(keep, p, 0.0)
        q = q / q.sum()
        qs = q[order]
        before = np.cumsum(qs) - qs
        k2 = np.zeros_like(keep)
        k2[order] = before < top_p
        keep &= k2
    keep[order[0]] = True
    return keep


def hf_allowed(logits_row, T, top_k, top_p, min_p):
    """The same with HF's warpers, only for one filter at a time (HF orders top_p before min_p)."""
    scores = torch.from_numpy((logits_row / T)[None].astype(np.float32))
    for warper, on in ((TopKLogitsWarper(top_k) if top_k else None, top_k > 0),
                       (TopPLogitsWarper(top_p), top_p < 1), (MinPLogitsWarper(min_p), min_p > 0)):
        if on:
            scores = warper(None, scores)
    return torch.isfinite(scores[0]).numpy()


FILTER_CASES = [  # (T, top_k, top_p, min_p)
    (1.0, 5, 1.0, 0.0), (0.7, 0, 0.8, 0.0), (1.3, 0, 1.0, 0.2), (1.0, 8, 0.7, 0.0), (0.8, 0, 0.9, 0.05),
    (1.5, 10, 0.6, 0.1), (1.0, 1, 1.0, 0.0), (1.0, 0, 0.05, 0.0), (1.0, 0, 1.0, 1.0), (1.0, 0, 1.0, 0.0),
]


@pytest.mark.parametrize("T,top_k,top_p,min_p", FILTER_CASES)
def test_filter_mask_matches_references(T, top_k, top_p, min_p):
    rng = np.random.default_rng(int(T * 100) + top_k + int(top_p * 10) + int(min_p * 100))
    logits = (rng.normal(size=(16, V)) * 2).astype(np.float32)
    xt = logits / np.float32(T)
    got = np.asarray(filter_jit(xt, np.full(16, top_k, np.int32), np.full(16, top_p, np.float32),
                                np.full(16, min_p, np.float32)))
    for i in range(16):
        np.testing.assert_array_equal(got[i], reference_allowed(logits[i], T, top_k, top_p, min_p))
        if (top_k > 0) + (top_p < 1) + (min_p > 0) <= 1:
            np.testing.assert_array_equal(got[i], hf_allowed(logits[i], T, top_k, top_p, min_p))


def near_boundary(logits_row, T, top_k, top_p, min_p, eps=1e-5):
    """True when some token sits within eps of a min_p or top_p threshold (float32 vs float64 may disagree)."""
    x = logits_row.astype(np.float64) / T
    p = softmax(x)
    if min_p > 0 and np.any(np.abs(p / p.max() - min_p) < eps):
        return True
    if top_p < 1:
        order = np.argsort(-x)
        keep = reference_allowed(logits_row, T, top_k, 1.0, min_p)
        q = np.where(keep, p, 0.0)
        qs = (q / q.sum())[order]
        before = np.cumsum(qs) - qs
        return bool(np.any(np.abs(before[keep[order]] - top_p) < eps))
    return False


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2 ** 31), T=st.floats(0.2, 3.0), top_k=st.integers(0, 20),
       top_p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)), min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0)))
def test_filter_mask_property(seed, T, top_k, top_p, min_p):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(1, 16)) * rng.uniform(0.1, 5)).astype(np.float32)
    assume(not near_boundary(logits[0], T, top_k, top_p, min_p))
    xt = (logits / np.float32(T)).astype(np.float32)
    got = np.asarray(filter_jit(xt, np.array([top_k], np.int32), np.array([top_p], np.float32),
                                np.array([min_p], np.float32)))[0]
    np.testing.assert_array_equal(got, reference_allowed(logits[0], T, top_k, top_p, min_p))


@pytest.mark.parametrize("T,top_k,top_p,min_p", FILTER_CASES[:6] + [(1.0, 0, 1.0, 0.0)])
def test_sampled_distribution_matches_restricted_softmax(T, top_k, top_p, min_p):
    """20000 draws (rows with seeds 0..19999): every draw is allowed and the frequencies fit the renormalized
    softmax(logits / T) over the allowed set (chi-square)."""
    V, N = 12, 20000
    rng = np.random.default_rng(7)
    row = (rng.normal(size=V) * 1.5).astype(np.float32)
    allowed = reference_allowed(row, T, top_k, top_p, min_p)
    params = SP(temperature=T, top_k=top_k, top_p=top_p, min_p=min_p)
    out, _ = run(np.tile(row, (N, 1)), [params] * N, seeds=list(range(N)), steps=[3] * N)
    toks = out.token_ids
    assert allowed[toks].all(), "a draw outside the allowed set"
    expected = np.where(allowed, softmax(row.astype(np.float64) / T), 0.0)
    expected = expected / expected.sum() * N
    observed = np.bincount(toks, minlength=V)
    idx = expected > 0
    if idx.sum() > 1:
        pval = stats.chisquare(observed[idx], expected[idx]).pvalue
        assert pval > 1e-4, (observed, expected)


def test_sampling_respects_suppressed_and_large_vocab_rows():
    """Each draw stays inside the allowed set for many different rows at once (not only one repeated row)."""
    rng = np.random.default_rng(11)
    for rep in range(16):
        logits = (rng.normal(size=(16, V)) * 2).astype(np.float32)
        params = [SP(temperature=float(rng.uniform(0.3, 2)), top_k=int(rng.integers(0, 30)),
                     top_p=float(rng.uniform(0.3, 1)), min_p=float(rng.choice([0, 0.05, 0.3])))
                  for i in range(16)]
        out, _ = run(logits, params, seeds=list(range(rep * 16, rep * 16 + 16)))
        for i, p in enumerate(params):
            assert reference_allowed(logits[i], p.temperature, p.top_k, p.top_p, p.min_p)[out.token_ids[i]]


# ------------------------------------------------------------------------------------- seeds and batch shape

def test_seeded_draws_do_not_depend_on_the_batch():
    rng = np.random.default_rng(3)
    target_logits = rng.normal(size=V).astype(np.float32)
    target = SP(temperature=0.9, top_k=40, top_p=0.95, seed=1234)

    def draw(step, position, size, others):
        logits = rng.normal(size=(size, V)).astype(np.float32) * 2
        logits[position] = target_logits
        params = list(others[:size])
        params[position] = target
        seeds = [p.seed if p.seed is not None else 99 + i for i, p in enumerate(params)]
        steps = [step if i == position else int(rng.integers(0, 50)) for i in range(size)]
        token_ids = [list(rng.integers(0, V, size=5)) for _ in range(size)]
        out, flags = run(logits, params, seeds=seeds, steps=steps, token_ids=token_ids, num_prompt=[2] * size,
                         sample_indices=[2 if i == position else 0 for i in range(size)], eos=[0],
                         pad_to=4 if size == 1 else 16)
        return int(out.token_ids[position])

    mixed = [SP(temperature=0.0), SP(temperature=1.0, seed=5, repetition_penalty=1.5),
             SP(temperature=0.5, min_p=0.2, min_tokens=60, max_tokens=100, presence_penalty=1.0),
             SP(temperature=1.0)] * 4
    plain = [SP(temperature=1.0)] * 16
    for step in range(12):
        tokens = {draw(step, 0, 1, plain), draw(step, 3, 8, mixed), draw(step, 15, 16, mixed),
                  draw(step, 1, 2, plain)}
        assert len(tokens) == 1, (step, tokens)


def test_unfiltered_row_draw_is_the_same_whatever_the_flags():
    """A row that uses no filter/penalty draws the same token whether or not other rows turn those code paths on."""
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, V)).astype(np.float32)
    row = SP(temperature=1.0, seed=77)
    for step in range(10):
        alone, f1 = run(logits[:1], [row], seeds=[77], steps=[step])
        other = SP(temperature=1.0, top_p=0.5, repetition_penalty=1.2, min_tokens=20, max_tokens=30)
        mixed, f2 = run(logits, [row, other],
                        seeds=[77, 1], steps=[step, 0], token_ids=[[1, 2], [3, 4]], num_prompt=[1, 1], eos=[0])
        assert f2.any_filters and f2.any_penalties and f2.any_suppress and not f1.any_filters
        assert alone.token_ids[0] == mixed.token_ids[0]


def test_seed_step_and_sample_index_drive_the_draws():
    rng = np.random.default_rng(5)
    steps = 30
    logits = np.tile(rng.normal(size=V).astype(np.float32) * 0.1, (1, 1))   # near-uniform: draws differ a lot

    def seq(seed, index):
        return [int(run(logits, [SP(temperature=1.0)], seeds=[seed], steps=[t], sample_indices=[index])[0]
                    .token_ids[0]) for t in range(steps)]

    a = seq(42, 0)
    assert a == seq(42, 0)
    assert len(set(a)) > steps // 2                    # the step changes the key
    assert a != seq(43, 0) and a != seq(42, 1)
    # seeds beyond 32 bits and negative seeds are keys too
    assert seq(2 ** 40 + 42, 0) != a and seq(-1, 0) == seq(2 ** 64 - 1, 0)


def test_row_keys_are_jax_threefry():
    """Host-made keys equal JAX's own: fold_in(PRNGKey(seed), step) for sample 0, threefry2x32(K(seed),
    (sample_index, step)) in general."""
    from jax.extend.random import threefry_2x32
    seeds, idx, steps = [0, 7, 2 ** 31 + 5, 123456789, 2 ** 40 + 3, -5], [0, 1, 3, 0, 2, 0], [0, 5, 1000, 2 ** 20, 9, 1]
    got = row_key_data(seeds, idx, steps)
    for i in range(len(seeds)):
        if idx[i] == 0 and 0 <= seeds[i] < 2 ** 32:
            k = jax.random.fold_in(jax.random.PRNGKey(seeds[i]), steps[i])
            np.testing.assert_array_equal(got[i], np.asarray(jax.random.key_data(k)))
        s64 = seeds[i] % 2 ** 64
        key = jnp.array([s64 >> 32, s64 & 0xFFFFFFFF], jnp.uint32)
        want = threefry_2x32(key, jnp.array([idx[i], steps[i]], jnp.uint32))
        np.testing.assert_array_equal(got[i], np.asarray(want))
    # broadcasting: a [num_steps, rows] grid in one call
    grid = row_key_data(np.array([[3, 4]] * 3, object), np.array([0, 1]), np.arange(3)[:, None] + 10)
    assert grid.shape == (3, 2, 2)
    np.testing.assert_array_equal(grid[2, 1], row_key_data([4], [1], [12])[0])


def test_row_seed():
    assert row_seed(SP(seed=9), 0, "a") == 9
    assert row_seed(SP(), 0, "a") == row_seed(SP(), 0, "a")
    assert row_seed(SP(), 0, "a") != row_seed(SP(), 0, "b")
    assert row_seed(SP(), 0, "a") != row_seed(SP(), 1, "a")


# ---------------------------------------------------------------------------------------------- min_tokens

def test_min_tokens_suppresses_eos_and_stop_token_ids():
    logits = np.zeros((2, V), np.float32)
    logits[:, 0] = 50.0       # EOS overwhelmingly likely
    logits[:, 5] = 40.0       # then the stop token
    for temp in (0.0, 1.0):
        p = SP(temperature=temp, min_tokens=3, stop_token_ids=[5], max_tokens=10)
        for step in range(3):
            out, flags = run(logits, [p, p], seeds=[1, 2], steps=[step, step], eos=[0])
            assert flags.any_suppress
            assert not set(out.token_ids.tolist()) & {0, 5}
        out, flags = run(logits, [p, p], seeds=[1, 2], steps=[3, 3], eos=[0])
        assert not flags.any_suppress and list(out.token_ids) == [0, 0]
    # ignore_eos: EOS is not a stop, so it is not suppressed; the stop token still is
    p = SP(temperature=0.0, min_tokens=3, stop_token_ids=[5], ignore_eos=True)
    out, _ = run(logits[:1], [p], steps=[0], eos=[0])
    assert out.token_ids[0] == 0
    logits2 = logits[:1].copy()
    logits2[0, 0], logits2[0, 9] = 0.0, 1.0
    out, _ = run(logits2, [p], steps=[0], eos=[0])
    assert out.token_ids[0] == 9


# ------------------------------------------------------------------------------------------------- logprobs

def test_logprobs_are_raw_log_softmax():
    rng = np.random.default_rng(6)
    S = 5
    logits = (rng.normal(size=(S, V)) * 4).astype(np.float32)
    params = [SP(temperature=0.0, logprobs=5), SP(temperature=0.5, logprobs=0, seed=3),
              SP(temperature=1.0, top_k=3, repetition_penalty=1.8, logprobs=20),
              SP(temperature=0.0, presence_penalty=2.0), SP(temperature=2.0, min_p=0.1, logprobs=1)]
    out, flags = run(logits, params, seeds=[0, 3, 1, 2, 4], steps=[1] * S, token_ids=[[1, 2, 3]] * S,
                     num_prompt=[1] * S)
    assert flags.num_logprobs == 20
    ref = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()
    for i in range(S):
        t = out.token_ids[i]
        np.testing.assert_allclose(out.sampled_logprob[i], ref[i, t], rtol=1e-5, atol=1e-5)
        assert out.sampled_rank[i] == 1 + np.sum(logits[i] > logits[i, t])
        top_vals, top_ids = torch.topk(torch.from_numpy(ref[i]), 20)
        np.testing.assert_array_equal(out.top_ids[i], top_ids.numpy())
        np.testing.assert_allclose(out.top_logprobs[i], top_vals.numpy(), rtol=1e-5, atol=1e-5)
    out, flags = run(logits, [SP(temperature=0.0)] * S, num_logprobs=0)
    assert flags.num_logprobs == 0 and out.top_ids.shape == (S, 0)
    np.testing.assert_allclose(out.sampled_logprob[:S], ref.max(-1), rtol=1e-5, atol=1e-5)
    out, _ = run(logits, [SP(temperature=0.0)] * S, num_logprobs=3)
    np.testing.assert_array_equal(out.top_ids[:S], np.argsort(-logits, -1)[:, :3])


# -------------------------------------------------------------------------------------------- host builders

def test_make_sampling_batch_shapes_and_padding():
    params = [SP(temperature=0.8, top_k=4, repetition_penalty=1.1, min_tokens=2, stop_token_ids=[7, 8]),
              SP(temperature=0.0)]
    batch, flags = make_sampling_batch(params, pad_to=4, seeds=[1, 2], steps=[0, 5],
                                       token_ids=[list(range(70)), [1]], num_prompt_tokens=[60, 1],
                                       eos_token_ids=[0])
    assert flags == SamplingFlags(all_greedy=False, any_filters=True, any_penalties=True, any_suppress=True,
                                  num_logprobs=0)
    assert batch.prev_tokens.shape == (4, 128) and batch.suppress_ids.shape == (4, 4)
    assert batch.suppress_ids[0].tolist() == [7, 8, 0, -1] and (batch.suppress_ids[1:] == -1).all()
    assert batch.prev_is_output[0].sum() == 10 and batch.temperature[2:].tolist() == [0, 0]
    assert (batch.prev_tokens[1] == -1).all()          # a row without penalties is not copied
    with pytest.raises(ValueError):
        make_sampling_batch(params, pad_to=1, seeds=[1, 2], steps=[0, 0])
    batch, flags = make_sampling_batch([], pad_to=4, seeds=[], steps=[])
    assert flags.all_greedy and batch.prev_tokens.shape == (4, 0)


def test_multi_step_batch_equals_stacked_single_steps():
    params = [SP(temperature=0.8, top_p=0.9, min_tokens=3, max_tokens=9, stop_token_ids=[4], seed=5),
              SP(temperature=0.0), SP(temperature=1.0, logprobs=2)]
    kw = dict(pad_to=4, seeds=[5, 6, 7], sample_indices=[0, 0, 1], eos_token_ids=[0])
    fused, flags = make_sampling_batch(params, steps=[1, 0, 7], num_steps=4, **kw)
    singles = [make_sampling_batch(params, steps=[1 + j, j, 7 + j], **kw) for j in range(4)]
    assert flags.any_suppress and all(f.num_logprobs == flags.num_logprobs for _, f in singles)
    for field, got in zip(fused._fields, fused):
        want = [b for b, _ in singles]
        K = got.shape[-1] if field == "suppress_ids" else None
        for j in range(4):
            w = getattr(want[j], field)
            if K is not None and w.shape[-1] < K:                 # a step without suppression has no columns
                w = np.concatenate([w, np.full(w.shape[:-1] + (K - w.shape[-1],), -1, np.int32)], -1)
            np.testing.assert_array_equal(got[j], w, err_msg=field)
    with pytest.raises(ValueError):
        make_sampling_batch([SP(repetition_penalty=1.2)], pad_to=1, seeds=[0], steps=[0], token_ids=[[1]],
                            num_prompt_tokens=[1], num_steps=2)


def test_build_sampling_batch_from_sequences():
    def seq(rid, index, prompt, out):
        req = types.SimpleNamespace(request_id=rid)
        return types.SimpleNamespace(request=req, index=index, token_ids=prompt + out, num_prompt_tokens=len(prompt),
                                     num_output_tokens=len(out))

    rows = [(seq("r1", 0, [1, 2, 3], [4]), SP(temperature=1.0, seed=11, frequency_penalty=0.5)),
            (seq("r2", 1, [5], []), SP(temperature=0.7))]
    got, flags = build_sampling_batch(rows, pad_to=4, eos_token_ids=[0], engine_seed=3, vocab_size=10)
    want, flags2 = make_sampling_batch([p for _, p in rows], pad_to=4, seeds=[11, row_seed(rows[1][1], 3, "r2")],
                                       steps=[1, 0], sample_indices=[0, 1], token_ids=[[1, 2, 3, 4], [5]],
                                       num_prompt_tokens=[3, 1], eos_token_ids=[0])
    assert flags == flags2
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
