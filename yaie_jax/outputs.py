"""What the engine returns (vLLM-shaped): one `RequestOutput` per request, one `CompletionOutput` per sample."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional


@dataclasses.dataclass
class Logprob:
    """Log-probability of one token, with its decoded text when known."""
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# For each generated token: {token_id: Logprob} holding the sampled token and the top-k alternatives.
SampleLogprobs = List[Dict[int, Logprob]]
# For each prompt token: the same, for the prompt token given the ones before it; entry 0 is None.
PromptLogprobs = List[Optional[Dict[int, Logprob]]]


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: List[int] = dataclasses.field(default_factory=list)
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[SampleLogprobs] = None
    finish_reason: Optional[str] = None     # None while running; "stop" | "length" | "timeout" | "abort"
    stop_reason: Optional[object] = None    # the stop string or stop token id that ended it, if any

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0              # prompt tokens served from the prefix cache
    metrics: Optional[dict] = None          # arrival/first-token/finish times (s, time.monotonic)
    prompt_logprobs: Optional[PromptLogprobs] = None   # SamplingParams.prompt_logprobs (None: not asked for)
