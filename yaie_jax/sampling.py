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

Randomness: each row's key is fold_in(fold_in(K(seed), sample_index), step), where K(seed) is the threefry key
whose data is the seed's 64 bits [hi, lo] (= jax.random.PRNGKey(seed) for 0 <= seed < 2**32), sample_index is
the sample's index among the request's n, and step is the number of tokens that sample has generated so far. The
draw depends on nothing else (not the row's position, the batch size or the other rows), so the same seed and
prompt give the same text whatever else is in the batch, and a preempted-and-recomputed sample redraws the same
tokens. Requests without a seed get one derived from the engine seed and the request id (`row_seed`), which
makes a whole engine run reproducible.

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

from .sampling_params import SamplingParams

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

def _bucket(n: int, lo: int) -> int:
    """Round up to lo * 2^k so that shapes (and so compiled programs) stay few."""
    b = lo
    while b < n:
        b *= 2
    return b


def logprobs_bucket(n: int) -> int:
    """Top-logprob count to compute for a batch whose rows ask for at most n: 0 or 20 (OpenAI's maximum).

    Computing 20 when fewer are asked costs next to nothing and keeps one compiled program instead of 21."""
    return 0 if n <= 0 else 20


def row_seed(params: SamplingParams, engine_seed: int, request_id: str) -> int:
    """The seed a row samples with: the request's own seed, else one derived from the engine seed and request id."""
    if params.seed is not None:
        return int(params.seed)
    return zlib.crc32(f"{engine_seed}:{request_id}".encode())


def request_seed(engine_seed: int, request_id: str) -> int:
    """Seed of a request that did not give one (kept for callers of the earlier name)."""
    return zlib.crc32(f"{engine_seed}:{request_id}".encode())


def seed_key_data(seed: int) -> Tuple[int, int]:
    """Threefry key data [hi, lo] of a Python int seed taken modulo 2**64 (negative seeds wrap)."""
    s = int(seed) % (1 << 64)
    return s >> 32, s & 0xFFFFFFFF


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k0, k1, x0, x1):
    """Threefry-2x32 (20 rounds; Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) on uint32
    numpy arrays, bit-identical to JAX's threefry2x32 so host-made keys equal jax.random.fold_in's."""
    def rotl(v, r):
        return (v << np.uint32(r)) | (v >> np.uint32(32 - r))

    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = rotl(x1, r) ^ x0
        x0 = x0 + ks[(block + 1) % 3]
        x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def fold_in_np(key_data: np.ndarray, data) -> np.ndarray:
    """jax.random.fold_in for threefry keys, vectorized on the host: key_data [..., 2] uint32, data uint32."""
    key_data = np.asarray(key_data, np.uint32)
    data = np.asarray(data, np.uint32)
    with np.errstate(over="ignore"):
        y0, y1 = _threefry2x32(key_data[..., 0], key_data[..., 1], np.zeros_like(data), data)
    return np.stack([y0, y1], axis=-1).astype(np.uint32)


def row_key_data(seeds: Sequence[int], sample_indices: Sequence[int], steps: Sequence[int]) -> np.ndarray:
    """[len(seeds), 2] uint32: fold_in(fold_in(K(seed), sample_index), step) per row, computed on the host so the
    device program holds a single threefry (for the noise) instead of three: cheaper to compile."""
    s64 = np.array([int(s) & 0xFFFFFFFFFFFFFFFF for s in seeds], np.uint64)     # modulo 2**64
    base = np.stack([(s64 >> np.uint64(32)).astype(np.uint32), (s64 & np.uint64(0xFFFFFFFF)).astype(np.uint32)], -1)
    return fold_in_np(fold_in_np(base, np.asarray(sample_indices, np.int64).astype(np.uint32)),
                      np.asarray(steps, np.int64).astype(np.uint32))


def _uses_filters(p: SamplingParams) -> bool:
    return p.temperature > 0 and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0)


def _uses_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def make_sampling_batch(params_list: Sequence[SamplingParams], *, pad_to: int,
                        seeds: Sequence[int], steps: Sequence[int],
                        sample_indices: Optional[Sequence[int]] = None,
                        token_ids: Optional[Sequence[Sequence[int]]] = None,
                        num_prompt_tokens: Optional[Sequence[int]] = None,
                        eos_token_ids: Sequence[int] = ()) -> Tuple[SamplingBatch, SamplingFlags]:
    """Build the per-row arrays for one step (host, numpy only).

    Row i (i < len(params_list)) samples with params_list[i]; rows i >= len(params_list) up to pad_to are padding.
    seeds[i]: the row's seed (`row_seed`); steps[i]: tokens the row's sample has generated so far (decides
    min_tokens suppression and the per-token key); sample_indices[i]: which of the request's n samples (default 0).
    token_ids[i] / num_prompt_tokens[i]: the row's prompt + output tokens and how many are prompt; needed only
    when some row uses a penalty. eos_token_ids: suppressed (with the row's stop_token_ids) while
    steps[i] < min_tokens, unless ignore_eos.
    """
    S = int(pad_to)
    n = len(params_list)
    if n > S:
        raise ValueError(f"pad_to={S} is smaller than the number of rows ({n})")
    temperature = np.zeros(S, np.float32)                  # [S]; padding rows are greedy
    top_k = np.zeros(S, np.int32)                          # [S]
    top_p = np.ones(S, np.float32)                         # [S]
    min_p = np.zeros(S, np.float32)                        # [S]
    rep = np.ones(S, np.float32)                           # [S]
    pres = np.zeros(S, np.float32)                         # [S]
    freq = np.zeros(S, np.float32)                         # [S]
    key_data = np.zeros((S, 2), np.uint32)                 # [S, 2]
    suppress_lists = []
    any_filters = any_pen = False
    max_logprobs = 0
    for i, p in enumerate(params_list):
        temperature[i] = p.temperature
        if _uses_filters(p):                               # filters only matter for sampled rows
            any_filters = True
            top_k[i], top_p[i], min_p[i] = p.top_k, p.top_p, p.min_p
        if _uses_penalties(p):
            any_pen = True
            rep[i], pres[i], freq[i] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
        ids = []
        if steps[i] < p.min_tokens:
            ids = list(dict.fromkeys(list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))))
        suppress_lists.append(ids)
        if p.logprobs is not None:
            max_logprobs = max(max_logprobs, p.logprobs)
    if n:
        key_data[:n] = row_key_data(seeds[:n], [0] * n if sample_indices is None else sample_indices[:n], steps[:n])
    any_suppress = any(suppress_lists)
    K = _bucket(max(len(x) for x in suppress_lists), 4) if any_suppress else 0
    suppress = np.full((S, K), -1, np.int32)               # [S, K]
    for i, ids in enumerate(suppress_lists):
        suppress[i, :len(ids)] = ids
    if any_pen:
        if token_ids is None or num_prompt_tokens is None:
            raise ValueError("penalties need token_ids and num_prompt_tokens for every row")
        L = _bucket(max(len(token_ids[i]) for i in range(n)), 64)
    else:
        L = 0
    prev = np.full((S, L), -1, np.int32)                   # [S, L]
    is_out = np.zeros((S, L), bool)                        # [S, L]
    if any_pen:
        for i in range(n):
            if not _uses_penalties(params_list[i]):
                continue                                   # its penalties are neutral; save the copy
            toks = token_ids[i]
            prev[i, :len(toks)] = toks
            is_out[i, num_prompt_tokens[i]:len(toks)] = True
    batch = SamplingBatch(temperature, top_k, top_p, min_p, rep, pres, freq, key_data, suppress, prev, is_out)
    flags = SamplingFlags(all_greedy=bool(np.all(temperature[:n] == 0)), any_filters=any_filters,
                          any_penalties=any_pen, any_suppress=bool(any_suppress),
                          num_logprobs=logprobs_bucket(max_logprobs))
    return batch, flags


def build_sampling_batch(rows, *, pad_to: int, eos_token_ids: Sequence[int], engine_seed: int,
                         vocab_size: Optional[int] = None) -> Tuple[SamplingBatch, SamplingFlags]:
    """Adapter for the engine. rows: (sequence, SamplingParams) per step row, in row order; a sequence has
    `.request.request_id`, `.index`, `.token_ids`, `.num_prompt_tokens`, `.num_output_tokens`.
    vocab_size is accepted for the caller's convenience and not needed."""
    seqs = [s for s, _ in rows]
    params = [p for _, p in rows]
    return make_sampling_batch(
        params, pad_to=pad_to,
        seeds=[row_seed(p, engine_seed, s.request.request_id) for s, p in rows],
        steps=[s.num_output_tokens for s in seqs],
        sample_indices=[s.index for s in seqs],
        token_ids=[s.token_ids for s in seqs],
        num_prompt_tokens=[s.num_prompt_tokens for s in seqs],
        eos_token_ids=eos_token_ids)


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
           num_logprobs: Optional[int] = None) -> SampleResult:
    """Device side (call inside jit with flags/num_logprobs static). logits: [S, V] float32 raw model output.

    num_logprobs overrides flags.num_logprobs when given (0 = only the sampled token's logprob)."""
    logits = logits.astype(jnp.float32)
    S, V = logits.shape
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
    lse = jax.nn.logsumexp(logits, axis=-1)                                            # [S]
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
           "seed_key_data", "row_key_data", "fold_in_np", "logprobs_bucket"]
