"""Per-request sampling parameters (vLLM-shaped).

`SamplingParams` is plain data: validated on construction (`InvalidParameterError`, a `ValueError` whose `param`
is the field at fault), immutable in use.
The scheduler never reads it except for `n`, `max_tokens` and stop conditions; `sampling.py` turns a batch of
them into per-row device tensors.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from .errors import InvalidParameterError


@dataclasses.dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0                # (0, 1]
    top_k: int = 0                    # 0 or -1 = off
    min_p: float = 0.0                # [0, 1]
    repetition_penalty: float = 1.0   # > 0; 1 = off (HF/vLLM semantics: divide positive logits, multiply negative)
    presence_penalty: float = 0.0     # [-2, 2]
    frequency_penalty: float = 0.0    # [-2, 2]
    seed: Optional[int] = None        # per-request seed: same seed + prompt = same text whatever the batch
    max_tokens: Optional[int] = 16    # None = up to max_model_len
    min_tokens: int = 0               # EOS and stop_token_ids suppressed before this many tokens
    stop: Union[None, str, Sequence[str]] = None
    stop_token_ids: Optional[Sequence[int]] = None
    ignore_eos: bool = False
    logprobs: Optional[int] = None    # top-k logprobs per generated token (0 = only the sampled token's)
    prompt_logprobs: Optional[int] = None  # top-k logprobs per prompt token (0 = only the prompt token's)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @property
    def uses_penalties(self) -> bool:
        """Whether sampling reads this request's earlier tokens (repetition, presence or frequency penalty)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def bad(field: str, why: str) -> None:
            raise InvalidParameterError("SamplingParams", field, why, getattr(self, field))

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not self.temperature >= 0.0:
            bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be 0 or -1 (off) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", "must be > 0")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "must be a positive integer or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "must be a non-negative integer")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", "must be <= max_tokens")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", "must be an integer in [0, 20]")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            bad("prompt_logprobs", "must be an integer in [0, 20]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            bad("stop", "must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
