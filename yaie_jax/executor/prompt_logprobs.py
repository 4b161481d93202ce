"""Prompt logprobs (vLLM's `SamplingParams.prompt_logprobs`): the model's log-probability of each prompt token given
the tokens before it, computed inside the step that computes that token's predecessor (paged path, chunked prefill
included), so perplexity and numerics can be measured through the engine itself.

For a prompt p_0 .. p_{N-1}, entry j (1 <= j < N) is log_softmax(logits at position j-1)[p_j] with its rank and the
top PROMPT_TOPK alternatives; entry 0 is None (nothing predicts the first token). The logits are the raw float32
model logits (no penalties or temperature), as for sampled-token logprobs.

Host side, `rows_of_step` lists the flat batch rows of a step whose logits predict a prompt token; the runner pads
them to a power of two (one program per padded count, compiled on first use) and adds two batch keys,
`prompt_index` [P] and `prompt_target` [P]. Device side, `compute` maps their logits to `PromptLogprobs`. The
engine turns the host copy into `Logprob` entries (`entries`). A request asking for prompt logprobs does not read
the prefix cache (a cached token's logits are never computed), as in vLLM.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence as Seq, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from yaie_jax.executor.buckets import next_power_of
from yaie_jax.outputs import Logprob

PROMPT_TOPK = 20          # alternatives computed per prompt token (the largest `prompt_logprobs` allowed)
MIN_ROWS = 16             # smallest padded row count (fewer programs for short chunks)


class PromptLogprobs(NamedTuple):
    """Per requested prompt row (padded to P rows; padding rows are meaningless)."""
    target_logprob: jax.Array   # [P] float32: log-probability of the prompt token that follows
    target_rank: jax.Array      # [P] int32: 1 + number of tokens with a strictly larger logit
    top_ids: jax.Array          # [P, PROMPT_TOPK] int32, most likely first
    top_logprobs: jax.Array     # [P, PROMPT_TOPK] float32


class StepRows(NamedTuple):
    """Which prompt tokens a step's `PromptLogprobs` rows belong to (host side)."""
    requests: List[object]      # [n] the Request of each real row
    positions: List[int]        # [n] the prompt token index j predicted by the row (entry j)


def compute(logits, targets) -> PromptLogprobs:
    """logits [P, V] float32, targets [P] int32 -> PromptLogprobs (inside the jitted step)."""
    logp = jax.nn.log_softmax(logits, axis=-1)                                     # [P, V]
    tgt_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)             # [P, 1]
    rank = 1 + jnp.sum(logits > tgt_logit, axis=-1).astype(jnp.int32)              # [P]
    top_lp, top_ids = jax.lax.top_k(logp, PROMPT_TOPK)                             # [P, K]
    return PromptLogprobs(jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0], rank,
                          top_ids.astype(jnp.int32), top_lp)


def rows_of_step(scheduled: Seq, query_start: np.ndarray) -> Tuple[np.ndarray, np.ndarray, StepRows]:
    """(flat row index [n], target token [n], StepRows) for the prompt tokens the scheduled rows compute this step.

    A row computing prompt positions [start, start + n) yields entries j = p + 1 for p in that range with
    p + 1 < num_prompt_tokens and entry j not recorded yet (a recompute after preemption does not repeat them)."""
    index, target, reqs, positions = [], [], [], []
    for i, s in enumerate(scheduled):
        seq = s.seq
        if seq.request.params.prompt_logprobs is None or s.num_new_tokens == 0 or not seq.wants_prompt_logprobs:
            continue                                               # the first test is the per-row cost of a step
        req = seq.request
        start = seq.num_computed_tokens
        n_prompt = len(req.prompt_token_ids)
        first = max(start, len(req.prompt_logprobs) - 1)           # entries 0..len-1 exist already
        for p in range(first, min(start + s.num_new_tokens, n_prompt - 1)):
            index.append(int(query_start[i]) + p - start)
            target.append(req.prompt_token_ids[p + 1])
            reqs.append(req)
            positions.append(p + 1)
    return np.asarray(index, np.int32), np.asarray(target, np.int32), StepRows(reqs, positions)


def padded(index: np.ndarray, target: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Pad to a power of two >= MIN_ROWS rows (row 0, token 0: results dropped)."""
    n = len(index)
    P = next_power_of(n, 2, MIN_ROWS)
    out_i, out_t = np.zeros(P, np.int32), np.zeros(P, np.int32)       # [P]
    out_i[:n], out_t[:n] = index, target
    return out_i, out_t


def record(rows: StepRows, result: PromptLogprobs, decode_token) -> None:
    """Append the host `result` rows to each request's `prompt_logprobs` list (in position order, which is the
    order rows are made in: steps run in order, and a step's rows of one request are consecutive)."""
    for r, (req, j) in enumerate(zip(rows.requests, rows.positions)):
        if not req.prompt_logprobs:
            req.prompt_logprobs.append(None)                           # entry 0
        if j != len(req.prompt_logprobs):
            continue                                                   # already recorded (or out of order)
        req.prompt_logprobs.append(entry(req.prompt_token_ids[j], req.params.prompt_logprobs, result, r,
                                         decode_token))


def entry(token: int, k: int, result: PromptLogprobs, r: int, decode_token) -> Dict[int, Logprob]:
    """{token: Logprob} for the prompt token and its top-k alternatives (row r of a host result)."""
    out = {token: Logprob(float(result.target_logprob[r]), rank=int(result.target_rank[r]),
                          decoded_token=decode_token(token))}
    for j in range(k):
        tid = int(result.top_ids[r, j])
        if tid not in out:
            out[tid] = Logprob(float(result.top_logprobs[r, j]), rank=j + 1, decoded_token=decode_token(tid))
    return out


def finished_list(req) -> Optional[list]:
    """The request's prompt logprobs for its RequestOutput: None if not asked for; a list of
    len(prompt_token_ids) entries (entry 0 None) once the prompt is computed, else the entries so far."""
    if req.params.prompt_logprobs is None:
        return None
    return list(req.prompt_logprobs) if req.prompt_logprobs else [None]
