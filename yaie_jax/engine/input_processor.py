"""Requests in: what a prompt may be, and the validation and tokenization that turn one into a `Request`.

No JAX, no engine state written: `InputProcessor.make_request` may run in any thread (the server calls it from its
own, see `AsyncLLMEngine`)."""
from __future__ import annotations

import array
import operator
from typing import Any, List, Optional, Tuple, Union

import numpy as np

from yaie_jax.errors import ContextLengthError, InvalidRequestError
from yaie_jax.sampling_params import SamplingParams
from yaie_jax.sequence import Request

PromptType = Union[str, List[int]]     # a text prompt, or its token ids


def is_one_prompt(prompts: Any) -> bool:
    """Whether `prompts` is one prompt (a string, or a non-empty list whose first item is an int) rather than a
    sequence of prompts."""
    return isinstance(prompts, str) or (isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int))


def checked_token_ids(ids, vocab_size: int) -> List[int]:
    """`ids` (a sequence of integers: ints, numpy integers or bools, or a 1-D integer array) as a new list of
    Python ints, or `InvalidRequestError` (param "prompt"): empty, not integers, or outside [0, vocab_size). A
    list of ints goes through a C array, cheaper than numpy's type inference; this runs once per request, before
    its first schedule."""
    try:
        arr = array.array("q", ids.tolist() if isinstance(ids, np.ndarray) and ids.ndim == 1 else ids)
    except (TypeError, OverflowError, ValueError):
        arr = None                                   # floats, strings, nested lists, huge ints: checked below
    if arr is None:
        try:
            out = [operator.index(t) for t in ids]
        except TypeError:
            raise InvalidRequestError("prompt token ids must be integers", param="prompt") from None
        if out and (min(out) < 0 or max(out) >= vocab_size):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
    else:
        out = arr.tolist()
        if out:
            view = np.frombuffer(arr, np.int64)      # [n] no copy
            if view.min() < 0 or view.max() >= vocab_size:
                raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
    if not out:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    return out


class InputProcessor:
    """Validates and tokenizes requests for one engine: `tokenizer` (None: token ids only), the model's
    `vocab_size`, the engine's `max_model_len` and `max_num_seqs`."""

    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, max_num_seqs: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs

    def prompt_parts(self, prompt: PromptType, prompt_token_ids: Optional[List[int]]) -> Tuple[Optional[str], Any]:
        """(text, token ids) of a prompt: a string is tokenized unless `prompt_token_ids` is given (then it is the
        text only); a list is the token ids (no text). The ids are not checked yet."""
        if prompt_token_ids is not None:
            return (prompt if isinstance(prompt, str) else None), prompt_token_ids
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=self._add_special_tokens())
        return None, prompt

    def make_request(self, request_id: str, prompt: PromptType, params: Optional[SamplingParams] = None,
                     *, prompt_token_ids: Optional[List[int]] = None, priority: int = 0,
                     client_id: Optional[str] = None, queue_timeout_s: Optional[float] = None,
                     timeout_s: Optional[float] = None, arrival_time: Optional[float] = None,
                     stream: bool = True) -> Request:
        """Validate and tokenize a request without queueing it. Raises `InvalidRequestError` (a ValueError with
        the field at fault as `param`; `ContextLengthError` for an over-long prompt + max_tokens) for an empty
        prompt, out-of-range ids, text without a tokenizer, n over max_num_seqs or bad stop_token_ids."""
        params = params or SamplingParams()
        if self.tokenizer is None and (isinstance(prompt, str) and prompt_token_ids is None or params.stop):
            raise InvalidRequestError("this engine has no tokenizer (skip_tokenizer_init): prompts must be token "
                                      "ids and stop must be empty (use stop_token_ids)",
                                      param="stop" if params.stop else "prompt")
        text, prompt_token_ids = self.prompt_parts(prompt, prompt_token_ids)
        prompt_token_ids = checked_token_ids(prompt_token_ids, self.vocab_size)
        n_prompt = len(prompt_token_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n_prompt
        if n_prompt + max_tokens > self.max_model_len or max_tokens < 1:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n_prompt + max(max_tokens, 1)} tokens ({n_prompt} in the prompt, {max(max_tokens, 1)} for the "
                f"completion). Please reduce the prompt or max_tokens (context length exceeded).")
        if params.n > self.max_num_seqs:
            raise InvalidRequestError(f"n={params.n} exceeds max_num_seqs={self.max_num_seqs}", param="n")
        for t in params.stop_token_ids:
            if not 0 <= t < self.vocab_size:
                raise InvalidRequestError(f"stop_token_ids must be in [0, {self.vocab_size})",
                                          param="stop_token_ids")
        req = Request(request_id, text, prompt_token_ids, params, priority=priority, client_id=client_id,
                      arrival_time=arrival_time, queue_timeout_s=queue_timeout_s, timeout_s=timeout_s,
                      max_tokens=max_tokens)
        req.stream = stream
        return req

    def _add_special_tokens(self) -> bool:
        return True
