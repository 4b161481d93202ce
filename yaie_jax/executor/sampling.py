"""On-device sampling with per-row parameters, inside the jitted step: the host never sees [S, vocab].

Host side, `make_sampling_batch` (or `build_sampling_batch`, its adapter for the engine's sequences) turns the
rows of one step into a `SamplingBatch` of small numpy arrays plus hashable `SamplingFlags`. Device side, `sample`
applies, in this order (vLLM's order):

  1. penalties on the raw logits: repetition over prompt+output tokens (HF/vLLM: divide positive logits by the
     penalty, multiply negative ones), then frequency and presence over output tokens only (OpenAI/vLLM:
     `logit -= frequency * count + presence * (count > 0)`);
  2. min_tokens suppression: the row's EOS/stop_token_ids set to -inf while it has generated < min_tokens;
  3. greedy rows (temperature 0) take the argmax here: ties go to the lowest id, like torch.argmax / HF;
  4. temperature: logits / T;
  5. filters on the scaled logits: min_p (keep p >= min_p * p_max), top_k, then top_p on the distribution
     renormalized over what min_p and top_k kept (keep the smallest set of most likely tokens whose mass reaches
     top_p). The most likely token always survives;
  6. a Gumbel-max draw with a per-row key: argmax(x + Gumbel noise) is an exact sample of softmax(x).

Static flags keep the cheap cases cheap: an all-greedy batch compiles to an argmax (no noise, no sort); the sort
behind the filters exists only when some row uses one; penalties and suppression only when some row needs them.

Randomness: each row's key is threefry2x32(K(seed), (sample_index, step)), where K(seed) is the threefry key
whose data is the seed's 64 bits [hi, lo] (= jax.random.PRNGKey(seed) for 0 <= seed < 2**32), sample_index is
the sample's index among the request's n, and step is the number of tokens that sample has generated so far; for
sample 0 that is jax.random.fold_in(K(seed), step). The key is made on the host (`row_key_data`). The draw
depends on nothing else (not the row's position, the batch size or the other rows), so the same seed and prompt
give the same text whatever else is in the batch, and a preempted-and-recomputed sample redraws the same tokens.
Requests without a seed get one derived from the engine seed and the request id (`row_seed`), which makes a whole
engine run reproducible.

Logprobs are log_softmax of the RAW model logits, before penalties, suppression, temperature and filters (what
vLLM reports by default): they describe the model, not the sampler. `sampled_rank` is 1 + the number of tokens
with a strictly larger raw logit.
"""
from __future__ import annotations

import zlib
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from yaie_jax.executor.buckets import next_power_of
from yaie_jax.sampling_params import SamplingParams

MIN_TEMPERATURE = 1e-5


class SamplingFlags(NamedTuple):
    """Static (hashable) facts about a batch that decide which code `sample` compiles."""
    all_greedy: bool         # every real row has temperature 0 -> argmax only
    any_filters: bool        # some sampled row uses top_k / top_p / min_p -> a sort per row
    any_penalties: bool      # some row uses repetition / presence / frequency penalties
    any_suppress: bool       # some row is below its min_tokens and has ids to suppress
    num_logprobs: int        # top logprobs per row to return (0 = only the sampled token's)


class SamplingBatch(NamedTuple):
    """Per-row sampling inputs; a pytree of numpy arrays, S rows (padding rows are greedy and inert)."""
    temperature: np.ndarray         # [S] float32; 0 = greedy
    top_k: np.ndarray               # [S] int32; 0 = off
    top_p: np.ndarray               # [S] float32; 1 = off
    min_p: np.ndarray               # [S] float32; 0 = off
    repetition_penalty: np.ndarray  # [S] float32; 1 = off
    presence_penalty: np.ndarray    # [S] float32; 0 = off
    frequency_penalty: np.ndarray   # [S] float32; 0 = off
    key_data: np.ndarray            # [S, 2] uint32; the row's threefry key for this draw (`row_key_data`)
    suppress_ids: np.ndarray        # [S, K] int32; ids forbidden this step (min_tokens), -1 pad; K = 0 if unused
    prev_tokens: np.ndarray         # [S, L] int32; prompt + output tokens for penalties, -1 pad; L = 0 if unused
    prev_is_output: np.ndarray      # [S, L] bool; True where prev_tokens holds a generated token


class SampleResult(NamedTuple):
    token_ids: jax.Array        # [S] int32
    sampled_logprob: jax.Array  # [S] float32; raw log_softmax of the sampled token
    sampled_rank: jax.Array     # [S] int32; 1 = most likely under the raw logits
    top_ids: jax.Array          # [S, num_logprobs] int32; most likely first
    top_logprobs: jax.Array     # [S, num_logprobs] float32


# ---------------------------------------------------------------------------------------------------- host side

def logprobs_bucket(n: int) -> int:
    """Top-logprob count to compute for a batch whose rows ask for at most n: 0 or 20 (OpenAI's maximum).

    Computing 20 when fewer are asked costs next to nothing and keeps one compiled program instead of 21."""
    return 0 if n <= 0 else 20


def row_seed(params: SamplingParams, engine_seed: int, request_id: str) -> int:
    """The seed a row samples with: the request's own seed, else one derived from the engine seed and request id."""
    if params.seed is not None:
        return int(params.seed)
    return zlib.crc32(f"{engine_seed}:{request_id}".encode())


_ROTATIONS = tuple(tuple((np.uint32(r), np.uint32(32 - r)) for r in rs) for rs in ((13, 15, 26, 6), (17, 29, 16, 24)))
_PARITY = np.uint32(0x1BD11BDA)
_INJECT = tuple(np.uint32(i) for i in range(1, 6))


def threefry2x32_np(k0, k1, x0, x1) -> Tuple[np.ndarray, np.ndarray]:
    """Threefry-2x32, 20 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), on uint32
    numpy arrays (broadcast together): the block (x0, x1) encrypted under the key (k0, k1). Bit-identical to
    JAX's threefry2x32, so keys made here equal jax.random.fold_in's."""
    k0, k1, x0, x1 = np.broadcast_arrays(*(np.asarray(v, np.uint32) for v in (k0, k1, x0, x1)))
    ks = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0, x1 = x0 + ks[0], x1 + ks[1]                 # fresh arrays: updated in place below
    tmp = np.empty_like(x1)
    for block in range(5):
        for r, r_back in _ROTATIONS[block % 2]:
            np.add(x0, x1, out=x0)
            np.right_shift(x1, r_back, out=tmp)     # x1 = rotl(x1, r) ^ x0
            np.left_shift(x1, r, out=x1)
            np.bitwise_or(x1, tmp, out=x1)
            np.bitwise_xor(x1, x0, out=x1)
        np.add(x0, ks[(block + 1) % 3], out=x0)
        np.add(x1, ks[(block + 2) % 3], out=x1)
        np.add(x1, _INJECT[block], out=x1)
    return x0, x1


def row_key_data(seeds, sample_indices, steps) -> np.ndarray:
    """[..., 2] uint32 row keys (arguments broadcast together): threefry2x32(K(seed), (sample_index, step)).

    For sample 0 this is exactly jax.random.fold_in(jax.random.PRNGKey(seed), step) (seed < 2**32); other samples
    of the same request use other counter blocks. Made on the host (one vectorized threefry for the whole
    batch) so the device program holds a single threefry, for the noise: cheaper to compile."""
    flat = np.asarray(seeds, dtype=object)
    s64 = np.asarray([int(s) & 0xFFFFFFFFFFFFFFFF for s in flat.ravel()], np.uint64).reshape(flat.shape)
    hi = (s64 >> np.uint64(32)).astype(np.uint32)
    lo = (s64 & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    idx = np.asarray(sample_indices, np.int64).astype(np.uint32)
    step = np.asarray(steps, np.int64).astype(np.uint32)
    y0, y1 = threefry2x32_np(hi, lo, idx, step)
    return np.stack([y0, y1], axis=-1)


def _uses_filters(p: SamplingParams) -> bool:
    return p.temperature > 0 and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0)


def _column(values, S: int, fill, dtype) -> np.ndarray:
    out = np.full(S, fill, dtype)
    out[:len(values)] = values
    return out


def _suppress_ids(ps, steps_list, eos_token_ids, S: int, num_steps: int) -> np.ndarray:
    """[num_steps, S, K] ids each row suppresses per step, -1 = none (K = 0 when no row suppresses): min_tokens
    rows still short of it suppress their stop ids (and EOS unless ignore_eos) for the steps until they reach it."""
    suppressing = []                                       # (row, ids, number of steps it applies to)
    for i, p in enumerate(ps):
        if steps_list[i] < p.min_tokens:
            ids = list(dict.fromkeys(list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))))
            if ids:
                suppressing.append((i, ids, min(num_steps, p.min_tokens - steps_list[i])))
    K = next_power_of(max(len(ids) for _, ids, _ in suppressing), 2, 4) if suppressing else 0
    suppress = np.full((num_steps, S, K), -1, np.int32)                                       # [num_steps, S, K]
    for i, ids, until in suppressing:
        suppress[:until, i, :len(ids)] = ids
    return suppress


def _penalty_history(pen, token_ids, num_prompt_tokens, S: int) -> Tuple[np.ndarray, np.ndarray]:
    """(prev_tokens [S, L] padded with -1, prev_is_output [S, L]) of the rows using a penalty (L = 0 if none)."""
    n = len(pen)
    if any(pen):
        if token_ids is None or num_prompt_tokens is None:
            raise ValueError("penalties need token_ids and num_prompt_tokens for every row")
        L = next_power_of(max(len(token_ids[i]) for i in range(n)), 2, 64)
    else:
        L = 0
    prev = np.full((S, L), -1, np.int32)                   # [S, L]
    is_out = np.zeros((S, L), bool)                        # [S, L]
    for i in range(n):
        if not pen[i]:
            continue                                       # its penalties are neutral; save the copy
        toks = token_ids[i]
        prev[i, :len(toks)] = toks
        is_out[i, num_prompt_tokens[i]:len(toks)] = True
    return prev, is_out


def make_sampling_batch(params_list: Sequence[SamplingParams], *, pad_to: int,
                        seeds: Sequence[int], steps: Sequence[int],
                        sample_indices: Optional[Sequence[int]] = None,
                        token_ids: Optional[Sequence[Sequence[int]]] = None,
                        num_prompt_tokens: Optional[Sequence[int]] = None,
                        eos_token_ids: Sequence[int] = (),
                        num_steps: int = 1) -> Tuple[SamplingBatch, SamplingFlags]:
    """Build the per-row arrays for one step (host, numpy only).

    Row i (i < len(params_list)) samples with params_list[i]; rows i >= len(params_list) up to pad_to are padding.
    seeds[i]: the row's seed (`row_seed`); steps[i]: tokens the row's sample has generated so far (decides
    min_tokens suppression and the per-token key); sample_indices[i]: which of the request's n samples (default 0).
    token_ids[i] / num_prompt_tokens[i]: the row's prompt + output tokens and how many are prompt; needed only
    when some row uses a penalty. eos_token_ids: suppressed (with the row's stop_token_ids) while
    steps[i] < min_tokens, unless ignore_eos.

    num_steps > 1: the batches of num_steps consecutive decode steps (step j draws as if steps[i] + j tokens had
    been generated), every field stacked on a leading [num_steps] axis, for fused multi-step decoding; equal to
    stacking num_steps single-step batches, minus the host time. Penalties cannot be fused (the tokens drawn inside
    the fused call are not known here): ValueError.
    """
    S = int(pad_to)
    n = len(params_list)
    if n > S:
        raise ValueError(f"pad_to={S} is smaller than the number of rows ({n})")
    ps = params_list
    sampled = [p.temperature > 0 for p in ps]
    filt = [_uses_filters(p) for p in ps]
    pen = [p.uses_penalties for p in ps]
    any_filters, any_pen = any(filt), any(pen)
    if any_pen and num_steps > 1:
        raise ValueError("penalties cannot be applied in fused multi-step decoding (num_steps > 1)")
    temperature = _column([p.temperature for p in ps], S, 0.0, np.float32)                   # [S]; pad: greedy
    # filters are moot for greedy rows; leaving them off there keeps the sort out of all-greedy-filter batches
    top_k = _column([p.top_k if f else 0 for p, f in zip(ps, filt)], S, 0, np.int32)          # [S]
    top_p = _column([p.top_p if f else 1.0 for p, f in zip(ps, filt)], S, 1.0, np.float32)    # [S]
    min_p = _column([p.min_p if f else 0.0 for p, f in zip(ps, filt)], S, 0.0, np.float32)    # [S]
    rep = _column([p.repetition_penalty for p in ps], S, 1.0, np.float32)                     # [S]
    pres = _column([p.presence_penalty for p in ps], S, 0.0, np.float32)                      # [S]
    freq = _column([p.frequency_penalty for p in ps], S, 0.0, np.float32)                     # [S]
    steps_list = [int(x) for x in steps[:n]]
    idx_list = [0] * n if sample_indices is None else [int(x) for x in sample_indices[:n]]
    key_data = np.zeros((num_steps, S, 2), np.uint32)                                         # [num_steps, S, 2]
    if n:
        offsets = np.arange(num_steps, dtype=np.int64)[:, None]                                # [num_steps, 1]
        key_data[:, :n] = row_key_data(list(seeds[:n]), np.asarray(idx_list, np.int64)[None, :],
                                       np.asarray(steps_list, np.int64)[None, :] + offsets)
    suppress = _suppress_ids(ps, steps_list, eos_token_ids, S, num_steps)                   # [num_steps, S, K]
    any_suppress = suppress.shape[-1] > 0
    prev, is_out = _penalty_history(pen, token_ids, num_prompt_tokens, S)                     # [S, L] each
    max_logprobs = max((p.logprobs for p in ps if p.logprobs is not None), default=0)
    flags = SamplingFlags(all_greedy=not any(sampled), any_filters=any_filters, any_penalties=any_pen,
                          any_suppress=any_suppress, num_logprobs=logprobs_bucket(max_logprobs))
    if num_steps == 1:
        batch = SamplingBatch(temperature, top_k, top_p, min_p, rep, pres, freq, key_data[0], suppress[0], prev,
                              is_out)
    else:
        def stack(a):
            return np.ascontiguousarray(np.broadcast_to(a, (num_steps,) + a.shape))
        batch = SamplingBatch(stack(temperature), stack(top_k), stack(top_p), stack(min_p), stack(rep),
                              stack(pres), stack(freq), key_data, suppress, stack(prev), stack(is_out))
    return batch, flags


def build_sampling_batch(rows, *, pad_to: int, eos_token_ids: Sequence[int], engine_seed: int,
                         vocab_size: Optional[int] = None, num_steps: int = 1,
                         step_offset: int = 0) -> Tuple[SamplingBatch, SamplingFlags]:
    """Adapter for the engine. rows: (sequence, SamplingParams) per step row, in row order; a sequence has
    `.request.request_id`, `.index`, `.token_ids`, `.num_prompt_tokens`, `.num_output_tokens`.
    step_offset: tokens each row has sampled that are not yet in its `token_ids` (a fused call in flight).
    num_steps: see `make_sampling_batch`. vocab_size is accepted for the caller's convenience and not needed."""
    seqs = [s for s, _ in rows]
    params = [p for _, p in rows]
    need_tokens = any(p.uses_penalties for p in params)
    return make_sampling_batch(
        params, pad_to=pad_to,
        seeds=[row_seed(p, engine_seed, s.request.request_id) for s, p in rows],
        steps=[s.num_output_tokens + step_offset for s in seqs],
        sample_indices=[s.index for s in seqs],
        token_ids=[s.token_ids for s in seqs] if need_tokens else None,
        num_prompt_tokens=[s.num_prompt_tokens for s in seqs] if need_tokens else None,
        eos_token_ids=eos_token_ids, num_steps=num_steps)


# -------------------------------------------------------------------------------------------------- device side

def row_keys(batch: SamplingBatch) -> jax.Array:
    """[S] typed threefry keys from the rows' key data."""
    return jax.vmap(lambda d: jax.random.wrap_key_data(d, impl="threefry2x32"))(jnp.asarray(batch.key_data,
                                                                                             jnp.uint32))


def apply_penalties(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """Repetition (prompt + output, HF/vLLM), then frequency and presence (output only, OpenAI/vLLM)."""
    S, V = logits.shape
    prev = jnp.asarray(batch.prev_tokens)
    rows = jnp.broadcast_to(jnp.arange(S)[:, None], prev.shape)
    idx = jnp.where(prev < 0, V, prev)                               # padding scatters out of range: dropped
    seen = jnp.zeros((S, V), bool).at[rows, idx].set(True, mode="drop")                       # [S, V]
    out_counts = jnp.zeros((S, V), jnp.float32).at[rows, idx].add(
        jnp.asarray(batch.prev_is_output, jnp.float32), mode="drop")                         # [S, V]
    r = jnp.asarray(batch.repetition_penalty)[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    logits = logits - jnp.asarray(batch.frequency_penalty)[:, None] * out_counts
    logits = logits - jnp.asarray(batch.presence_penalty)[:, None] * (out_counts > 0)
    return logits


def suppress_tokens(logits: jax.Array, suppress_ids) -> jax.Array:
    """Set the listed ids (-1 = none) of each row to -inf."""
    S, V = logits.shape
    sup = jnp.asarray(suppress_ids)
    return logits.at[jnp.arange(S)[:, None], jnp.where(sup < 0, V, sup)].set(-jnp.inf, mode="drop")


def filter_mask(x: jax.Array, top_k, top_p, min_p) -> jax.Array:
    """[S, V] bool: tokens that survive min_p, top_k and then top_p (on the renormalized survivors), computed on
    temperature-scaled logits x. Every rule keeps a prefix of the tokens sorted by logit, so the survivors are
    the tokens at or above a per-row cutoff logit: one sort of values, no scatter back."""
    S, V = x.shape
    xs = -jnp.sort(-x, axis=-1)                                       # [S, V] descending
    rank = jnp.arange(V)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)[:, None]
    keep = rank < k
    # p_i >= min_p * p_max  <=>  x_i - x_max >= log(min_p); min_p = 0 gives -inf: keeps all
    log_min_p = jnp.log(jnp.asarray(min_p, jnp.float32))[:, None]
    keep &= (xs - xs[:, :1]) >= log_min_p
    probs = jax.nn.softmax(jnp.where(keep, xs, -jnp.inf), axis=-1)   # renormalized over min_p & top_k survivors
    mass_before = jnp.cumsum(probs, axis=-1) - probs                  # mass of strictly more likely tokens
    top_p = jnp.asarray(top_p, jnp.float32)[:, None]
    keep &= (mass_before < top_p) | (top_p >= 1.0)                    # top_p = 1: no rounding-error losses
    keep = keep.at[:, 0].set(True)
    num_kept = jnp.sum(keep, axis=-1)                                 # >= 1; keep is a prefix
    cutoff = jnp.take_along_axis(xs, (num_kept - 1)[:, None], axis=-1)
    return x >= cutoff                                                # ties at the cutoff survive together


def sample(logits: jax.Array, batch: SamplingBatch, *, flags: SamplingFlags,
           num_logprobs: Optional[int] = None, fence: bool = False) -> SampleResult:
    """Device side (call inside jit with flags/num_logprobs static). logits: [S, V] float32 raw model output.

    num_logprobs overrides flags.num_logprobs when given (0 = only the sampled token's logprob).
    fence=True (the engine's deterministic mode): the row log-normalizer (the only reduction whose result feeds a
    row's logprobs) is computed behind optimization barriers, so XLA compiles it the same whatever else the flags
    add to the program (which depend on the other rows); everything else a row gets is exact (argmax, sort, top-k,
    counts) or already depends on that row's own parameters only."""
    logits = logits.astype(jnp.float32)
    S, V = logits.shape
    lse = None
    if fence:
        lse_in, logits = jax.lax.optimization_barrier((logits, logits))
        lse, logits = jax.lax.optimization_barrier((jax.nn.logsumexp(lse_in, axis=-1), logits))   # [S]
    n_top = flags.num_logprobs if num_logprobs is None else int(num_logprobs)
    x = logits
    if flags.any_penalties:
        x = apply_penalties(x, batch)
    if flags.any_suppress:
        x = suppress_tokens(x, batch.suppress_ids)
    greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)                 # first maximum: lowest id on ties
    if flags.all_greedy:
        tokens = greedy
    else:
        temp = jnp.asarray(batch.temperature, jnp.float32)
        # tiny temperatures are clamped (as vLLM does) so x / T stays finite; the draw is then an argmax anyway
        xt = x / jnp.where(temp > 0, jnp.maximum(temp, MIN_TEMPERATURE), 1.0)[:, None]
        if flags.any_filters:
            xt = jnp.where(filter_mask(xt, batch.top_k, batch.top_p, batch.min_p), xt, -jnp.inf)
        keys = row_keys(batch)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys)     # [S, V]
        drawn = jnp.argmax(xt + gumbel, axis=-1).astype(jnp.int32)
        tokens = jnp.where(temp > 0, drawn, greedy)
    if lse is None:
        lse = jax.nn.logsumexp(logits, axis=-1)                                        # [S]
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    sampled_lp = picked - lse
    rank = 1 + jnp.sum(logits > picked[:, None], axis=-1).astype(jnp.int32)
    if n_top > 0:
        top_vals, top_ids = jax.lax.top_k(logits, min(n_top, V))
        top_lp = top_vals - lse[:, None]
    else:
        top_lp = jnp.zeros((S, 0), jnp.float32)
        top_ids = jnp.zeros((S, 0), jnp.int32)
    return SampleResult(tokens, sampled_lp, rank, top_ids.astype(jnp.int32), top_lp)


__all__ = ["SamplingBatch", "SamplingFlags", "SampleResult", "make_sampling_batch", "build_sampling_batch",
           "sample", "apply_penalties", "suppress_tokens", "filter_mask", "row_keys", "row_seed",
           "row_key_data", "threefry2x32_np", "logprobs_bucket"]
