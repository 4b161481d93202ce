"""The superset sampling variant: one step program per bucket that samples any batch, exactly as the batch's own
variant would.

`sampling.sample` compiles what the batch's static `SamplingFlags` ask for (argmax only, a sort for the filters,
penalties, min_tokens suppression, top logprobs), so each combination met is one more compile of the whole step
program (seconds each on a CPU: cpu_programs.py). The superset variant turns every feature on; a row that does
not use one carries its neutral parameters, and those leave its logits bit for bit as they were:

  penalties   repetition 1 (x / 1 and x * 1 are x), presence and frequency 0 (x - 0 * count is x); history
              padding (-1) scatters nowhere;
  suppression padding ids (-1) set nothing;
  filters     top_k 0, top_p 1, min_p 0 keep every token (the cutoff is the row's smallest logit);
  greedy rows (temperature 0) take the argmax of the same logits as in an all-greedy program;
  logprobs    20 top logprobs are computed; rows that asked for none ignore them (the sampled token's logprob
              and rank are computed the same way in every variant).

`to_superset` widens a single-step batch to the superset's fixed widths: the penalty history to the model's
length (`history_width`), the suppressed ids to SUPPRESS_WIDTH (a batch needing more gets None: it runs in its
own variant). tests/test_sampling_superset.py checks the equalities.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from yaie_jax.executor.buckets import next_power_of
from yaie_jax.executor.sampling import SamplingBatch, SamplingFlags

GREEDY = SamplingFlags(all_greedy=True, any_filters=False, any_penalties=False, any_suppress=False,
                       num_logprobs=0)
SUPERSET = SamplingFlags(all_greedy=False, any_filters=True, any_penalties=True, any_suppress=True,
                         num_logprobs=20)
SUPPRESS_WIDTH = 8            # stop_token_ids + EOS ids suppressed per row under min_tokens (more: own variant)


def history_width(max_model_len: int) -> int:
    """Width of the superset's penalty history: the smallest 64 * 2^k >= max_model_len (the width
    `make_sampling_batch` gives a batch of full-length rows), so every batch fits."""
    return next_power_of(max_model_len, 2, 64)


def to_superset(batch: SamplingBatch, flags: SamplingFlags, *, width: int) -> Optional[SamplingBatch]:
    """`batch` widened to the superset's shapes (suppress_ids [S, SUPPRESS_WIDTH], prev_tokens and prev_is_output
    [S, width]), or None where it does not fit: a fused multi-step batch (leading [num_steps] axis) or more ids
    to suppress or history than the widths hold. Sampled with SUPERSET it gives `batch`'s tokens under `flags`."""
    if np.ndim(batch.temperature) != 1:
        return None
    S = batch.temperature.shape[0]
    K, L = batch.suppress_ids.shape[1], batch.prev_tokens.shape[1]
    if K > SUPPRESS_WIDTH or L > width:
        return None
    suppress = np.full((S, SUPPRESS_WIDTH), -1, np.int32)                      # [S, SUPPRESS_WIDTH]
    suppress[:, :K] = batch.suppress_ids
    prev = np.full((S, width), -1, np.int32)                                   # [S, width]
    prev[:, :L] = batch.prev_tokens
    is_out = np.zeros((S, width), bool)                                        # [S, width]
    is_out[:, :L] = batch.prev_is_output
    return batch._replace(suppress_ids=suppress, prev_tokens=prev, prev_is_output=is_out)


def describe(flags: SamplingFlags) -> str:
    """The features a variant compiles, for the log: "greedy", "superset", or e.g. "sampled+filters"."""
    if flags == GREEDY:
        return "greedy"
    if flags == SUPERSET:
        return "superset"
    parts = ["greedy" if flags.all_greedy else "sampled"]
    parts += [name for name, on in (("filters", flags.any_filters), ("penalties", flags.any_penalties),
                                    ("min_tokens", flags.any_suppress),
                                    (f"logprobs{flags.num_logprobs}", flags.num_logprobs > 0)) if on]
    return "+".join(parts)
