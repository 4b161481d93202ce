"""On-device sampling with per-row parameters, inside the jitted step: the host never sees [S, vocab].

`build_sampling_batch` (host) turns the step's sequences into small per-row arrays plus static flags; `sample`
(device) applies penalties, min_tokens suppression, temperature, top-k / top-p / min-p and draws with per-row
keys. Static flags keep the cheap cases cheap: an all-greedy batch compiles to an argmax, and the sort behind
top-k/top-p/min-p only exists when some row uses them.

Randomness: row key = fold_in(fold_in(PRNGKey(seed), sample_index), token_index). With a request `seed` the
same seed and prompt give the same text whatever else is in the batch; without one, the seed is derived from the
engine seed and the request id, so an engine run is reproducible as a whole.
Logprobs are log_softmax of the raw model logits (before penalties and temperature), as vLLM reports by default.
"""
from __future__ import annotations

import zlib
from typing import List, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e30


class SamplingFlags(NamedTuple):
    all_greedy: bool
    any_filters: bool        # top_k / top_p / min_p used by some row
    any_penalties: bool      # repetition / presence / frequency penalties used by some row
    any_suppress: bool       # min_tokens suppression active in some row
    num_logprobs: int        # top-k logprobs to return (0 = only the sampled token's)


class SampleResult(NamedTuple):
    token_ids: jax.Array        # [S] int32
    sampled_logprob: jax.Array  # [S] float32
    sampled_rank: jax.Array     # [S] int32 (1 = most likely)
    top_ids: jax.Array          # [S, num_logprobs] int32
    top_logprobs: jax.Array     # [S, num_logprobs] float32


def _bucket(n: int, lo: int = 16) -> int:
    b = lo
    while b < n:
        b *= 2
    return b


def request_seed(engine_seed: int, request_id: str) -> int:
    return zlib.crc32(f"{engine_seed}:{request_id}".encode()) & 0x7FFFFFFF


def build_sampling_batch(rows: Sequence[Tuple[object, object]], *, pad_to: int, eos_token_ids: Sequence[int],
                         engine_seed: int, vocab_size: int):
    """Host side. rows: (sequence, SamplingParams) per step row, in row order. Returns (dict of numpy, flags)."""
    S = pad_to
    temperature = np.zeros(S, np.float32)                  # [S]; 0 = greedy (also for padding rows)
    top_k = np.zeros(S, np.int32)                          # [S]; 0 = off
    top_p = np.ones(S, np.float32)                         # [S]
    min_p = np.zeros(S, np.float32)                        # [S]
    rep = np.ones(S, np.float32)                           # [S]
    pres = np.zeros(S, np.float32)                         # [S]
    freq = np.zeros(S, np.float32)                         # [S]
    seeds = np.zeros(S, np.uint32)                         # [S]
    sample_index = np.zeros(S, np.int32)                   # [S]
    counters = np.zeros(S, np.int32)                       # [S]
    any_filters = any_pen = any_sup = False
    num_logprobs = 0
    suppress_lists: List[List[int]] = [[] for _ in range(S)]
    for i, (seq, p) in enumerate(rows):
        temperature[i] = p.temperature
        if p.temperature > 0:
            if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0:
                any_filters = True
            top_k[i], top_p[i], min_p[i] = p.top_k, p.top_p, p.min_p
        if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            any_pen = True
            rep[i], pres[i], freq[i] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
        seeds[i] = p.seed & 0xFFFFFFFF if p.seed is not None else request_seed(engine_seed, seq.request.request_id)
        sample_index[i] = seq.index
        counters[i] = seq.num_output_tokens
        if seq.num_output_tokens < p.min_tokens:
            ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            if ids:
                suppress_lists[i] = ids
                any_sup = True
        if p.logprobs is not None:
            num_logprobs = max(num_logprobs, p.logprobs)
    batch = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, rep=rep, pres=pres, freq=freq,
                 seeds=seeds, sample_index=sample_index, counters=counters)
    if any_sup:
        K = _bucket(max(len(x) for x in suppress_lists), 4)
        sup = np.full((S, K), -1, np.int32)                # [S, K] ids to suppress, -1 pad
        for i, ids in enumerate(suppress_lists):
            sup[i, :len(ids)] = ids
        batch["suppress"] = sup
    if any_pen:
        L = _bucket(max(len(seq.token_ids) for seq, _ in rows), 64)
        prev = np.full((S, L), -1, np.int32)               # [S, L] prompt + output tokens, -1 pad
        is_out = np.zeros((S, L), bool)                    # [S, L] True for generated tokens
        for i, (seq, _) in enumerate(rows):
            n = len(seq.token_ids)
            prev[i, :n] = seq.token_ids
            is_out[i, seq.num_prompt_tokens:n] = True
        batch["prev"] = prev
        batch["prev_is_output"] = is_out
    flags = SamplingFlags(all_greedy=bool(np.all(temperature[:len(rows)] == 0)), any_filters=any_filters,
                          any_penalties=any_pen, any_suppress=any_sup, num_logprobs=num_logprobs)
    return batch, flags


def _row_keys(seeds, sample_index, counters):
    def one(seed, idx, ctr):
        k = jax.random.PRNGKey(seed)
        return jax.random.fold_in(jax.random.fold_in(k, idx), ctr)
    return jax.vmap(one)(seeds, sample_index, counters)


def apply_penalties(logits, prev, prev_is_output, rep, pres, freq):
    """vLLM/HF semantics: repetition over prompt+output (divide positive logits, multiply negative ones);
    presence and frequency (OpenAI) over output tokens only."""
    S, V = logits.shape
    rows = jnp.broadcast_to(jnp.arange(S)[:, None], prev.shape)
    idx = jnp.where(prev < 0, V, prev)
    seen = jnp.zeros((S, V), bool).at[rows, idx].set(True, mode="drop")
    out_counts = jnp.zeros((S, V), jnp.float32).at[rows, idx].add(prev_is_output.astype(jnp.float32), mode="drop")
    r = rep[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    logits = logits - freq[:, None] * out_counts - pres[:, None] * (out_counts > 0)
    return logits


def _filter_mask(x, top_k, top_p, min_p):
    """Mask of allowed tokens per row for top-k, top-p (nucleus) and min-p, on temperature-scaled logits x."""
    S, V = x.shape
    order = jnp.argsort(-x, axis=-1)                                # [S, V] descending
    xs = jnp.take_along_axis(x, order, axis=-1)
    ps = jax.nn.softmax(xs, axis=-1)
    rank = jnp.arange(V)[None, :]
    k = jnp.where(top_k > 0, top_k, V)[:, None]
    keep = rank < k
    cum_before = jnp.cumsum(ps, axis=-1) - ps                       # probability mass strictly before this token
    keep &= cum_before < top_p[:, None]
    keep &= ps >= min_p[:, None] * ps[:, :1]
    keep = keep.at[:, 0].set(True)                                  # the most likely token always survives
    allowed = jnp.zeros((S, V), bool).at[jnp.arange(S)[:, None], order].set(keep)
    return allowed


def sample(logits, batch, *, flags: SamplingFlags) -> SampleResult:
    """Device side. logits [S, V] float32 (raw model output) -> SampleResult."""
    S, V = logits.shape
    logprobs_raw = jax.nn.log_softmax(logits, axis=-1)
    x = logits
    if flags.any_penalties:
        x = apply_penalties(x, batch["prev"], batch["prev_is_output"], batch["rep"], batch["pres"], batch["freq"])
    if flags.any_suppress:
        sup = batch["suppress"]
        x = x.at[jnp.arange(S)[:, None], jnp.where(sup < 0, V, sup)].set(NEG_INF, mode="drop")
    greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)
    if flags.all_greedy:
        tokens = greedy
    else:
        temp = batch["temperature"]
        xt = x / jnp.where(temp > 0, temp, 1.0)[:, None]
        if flags.any_filters:
            xt = jnp.where(_filter_mask(xt, batch["top_k"], batch["top_p"], batch["min_p"]), xt, NEG_INF)
        keys = _row_keys(batch["seeds"], batch["sample_index"], batch["counters"])
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys)     # [S, V]
        drawn = jnp.argmax(xt + gumbel, axis=-1).astype(jnp.int32)
        tokens = jnp.where(temp > 0, drawn, greedy)
    sampled_lp = jnp.take_along_axis(logprobs_raw, tokens[:, None], axis=-1)[:, 0]
    rank = 1 + jnp.sum(logprobs_raw > sampled_lp[:, None], axis=-1).astype(jnp.int32)
    if flags.num_logprobs > 0:
        top_lp, top_ids = jax.lax.top_k(logprobs_raw, flags.num_logprobs)
    else:
        top_lp = jnp.zeros((S, 0), jnp.float32)
        top_ids = jnp.zeros((S, 0), jnp.int32)
    return SampleResult(tokens, sampled_lp, rank, top_ids.astype(jnp.int32), top_lp)
