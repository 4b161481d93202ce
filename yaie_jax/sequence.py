"""Request and sequence state, owned by the scheduler (plain Python, no JAX).

A `Request` is what a user submitted; it holds `n` `Sequence`s (one per parallel sample). A request starts with
one sequence; at the step that completes its prompt the scheduler forks the other n-1, which share the prompt's
KV blocks.
"""
from __future__ import annotations

import enum
import itertools
import time
from typing import Any, List, Optional

from .sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"      # not admitted, or preempted by recompute (no KV held)
    RUNNING = "running"      # holds KV blocks on the device
    SWAPPED = "swapped"      # KV blocks parked in the host pool
    FINISHED = "finished"


_seq_ids = itertools.count()


class Sequence:
    """One token stream: the prompt plus what was generated for it.

    `num_computed_tokens` counts tokens whose K/V are written in the KV pool; the tokens in
    `token_ids[num_computed_tokens:]` still need a forward pass (prompt chunks, or the last sampled token).
    """

    def __init__(self, request: "Request", index: int, token_ids: List[int]):
        self.seq_id: int = next(_seq_ids)
        self.request = request
        self.index = index                          # sample index within the request (CompletionOutput.index)
        self.token_ids: List[int] = list(token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0                  # prompt tokens that came from the prefix cache
        self.status = SeqStatus.WAITING
        self.finish_reason: Optional[str] = None
        self.stop_reason: Any = None
        self.logprobs: Optional[list] = [] if request.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.detokenizer: Any = None                # set by the engine
        self.detok_fed = 0                          # output tokens fed to the detokenizer
        self.detok_flushed = False                  # the detokenizer has released its held-back tail
        self.text_excludes_last = False             # the last token (a stop token) is not part of the text
        self.final_text: Optional[str] = None       # text decoded in a batch at the finish (engine), if so
        self.rng_counter = 0                        # draws made for this sequence (seeds per-token keys)

    @property
    def output_token_ids(self) -> List[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its request asked for prompt logprobs and some are not computed yet (only sample 0 computes them)."""
        req = self.request
        return req.params.prompt_logprobs is not None and self.index == 0 and \
            len(req.prompt_logprobs) < len(req.prompt_token_ids)

    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id}, len={len(self.token_ids)}, "
                f"computed={self.num_computed_tokens}, {self.status.value})")


class Request:
    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: List[int],
                 params: SamplingParams, *, priority: int = 0, client_id: Optional[str] = None,
                 arrival_time: Optional[float] = None, queue_timeout_s: Optional[float] = None,
                 timeout_s: Optional[float] = None, max_tokens: int = 16):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.priority = priority
        self.client_id = client_id or ""
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.queue_timeout_s = queue_timeout_s
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens                # resolved: never None
        self.seqs: List[Sequence] = [Sequence(self, 0, prompt_token_ids)]
        self.first_scheduled_time: Optional[float] = None
        self.first_token_time: Optional[float] = None
        self.finished_time: Optional[float] = None
        self.forked = params.n == 1                 # children created (trivially true for n == 1)
        self.prompt_logprobs: list = []             # entry j: {token: Logprob} of prompt token j (0: None)

    @property
    def finished(self) -> bool:
        return self.forked and all(s.is_finished() for s in self.seqs)

    def remaining_work_tokens(self) -> int:
        """Tokens still to process (prompt not yet computed + outputs still to generate), for `latency` policy."""
        seq = self.seqs[0]
        return seq.num_uncomputed_tokens + max(0, self.max_tokens - seq.num_output_tokens)
