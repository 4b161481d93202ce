"""OpenAI request schemas (pydantic v2) and their translation to `SamplingParams`.

Contract:
- Bodies are validated with `parse_request(cls, raw_bytes)` in strict JSON mode: unknown fields are ignored,
  `null` means "use the default", wrong types (a string for a number, 1.5 for an integer, a bool for an integer)
  and out-of-range values raise `APIError(400, type="invalid_request_error", param=<field>)`. Malformed JSON and a
  body that is not a JSON object are 400 too. Nothing here ever lets a bad input become a 500.
- Ranges follow OpenAI where it documents one (temperature [0, 2], top_p (0, 1], penalties [-2, 2], n [1, 128])
  and `SamplingParams` otherwise (top_k -1/0 = off, min_p [0, 1], repetition_penalty > 0, logprobs [0, 20]).
- Parameters OpenAI defines that this server cannot honour (`suffix`, non-empty `logit_bias`, `tools`,
  `response_format` other than text, `best_of` != n, `echo` with logprobs, non-text content parts) are a 400
  naming the parameter rather than being silently ignored.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..sampling_params import SamplingParams
from .errors import APIError, engine_refusal

INT64_MIN, UINT64_MAX = -(2 ** 63), 2 ** 64 - 1
MAX_PROMPTS = 256             # prompts in one completions request
MAX_STOP = 64                 # stop strings / stop token ids per request


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Base):
    include_usage: Optional[bool] = None
    continuous_usage_stats: Optional[bool] = None     # vLLM extra: usage on every chunk


class _SamplingFields(_Base):
    """Fields shared by completions and chat (OpenAI's plus vLLM's extras). None = the default."""
    model: Optional[str] = None
    n: Optional[int] = Field(None, ge=1, le=128)
    max_tokens: Optional[int] = Field(None, ge=1, le=2 ** 31)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(None, ge=INT64_MIN, le=UINT64_MAX)
    stop: Optional[Any] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    logit_bias: Optional[Dict[str, Any]] = None
    # vLLM extras
    top_k: Optional[int] = Field(None, ge=-1, le=2 ** 31)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    ignore_eos: Optional[bool] = None
    min_tokens: Optional[int] = Field(None, ge=0, le=2 ** 31)
    stop_token_ids: Optional[List[Any]] = None
    priority: Optional[int] = Field(None, ge=INT64_MIN, le=2 ** 63 - 1)
    skip_special_tokens: Optional[bool] = None
    include_stop_str_in_output: Optional[bool] = None
    prompt_logprobs: Optional[int] = Field(None, ge=0, le=20)   # vLLM's: top-k logprobs per prompt token

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return None
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError("must be a string or a list of strings")
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return items

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_token_ids(cls, v):
        if v is None:
            return None
        if not isinstance(v, list) or not all(type(t) is int and t >= 0 for t in v):
            raise ValueError("must be a list of non-negative integer token ids")
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop token ids are allowed")
        return v

    @model_validator(mode="after")
    def _common_checks(self):
        if self.stream_options is not None and not self.stream:
            raise _param_error("stream_options", "stream_options is only allowed when stream is true")
        if self.logit_bias:
            raise _param_error("logit_bias", "logit_bias is not supported by this server")
        if self.prompt_logprobs is not None and self.stream:
            raise _param_error("prompt_logprobs", "prompt_logprobs is only returned by non-streamed requests")
        return self

    def sampling_params(self, *, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
        """The engine's `SamplingParams`; its `InvalidParameterError` becomes a 400 naming the field."""
        try:
            return SamplingParams(
                n=_d(self.n, 1), temperature=_d(self.temperature, 1.0), top_p=_d(self.top_p, 1.0),
                top_k=_d(self.top_k, 0), min_p=_d(self.min_p, 0.0),
                repetition_penalty=_d(self.repetition_penalty, 1.0),
                presence_penalty=_d(self.presence_penalty, 0.0), frequency_penalty=_d(self.frequency_penalty, 0.0),
                seed=self.seed, max_tokens=max_tokens, min_tokens=_d(self.min_tokens, 0),
                stop=list(self.stop or []), stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=_d(self.ignore_eos, False), logprobs=logprobs, prompt_logprobs=self.prompt_logprobs,
                include_stop_str_in_output=_d(self.include_stop_str_in_output, False),
                skip_special_tokens=_d(self.skip_special_tokens, True))
        except ValueError as e:
            raise engine_refusal(e, "prompt") from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. `prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    prompt: Any = Field(...)
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1, le=128)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        if v is None:
            raise ValueError("prompt is required")
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list) or not v:
            raise ValueError("must be a non-empty string, list of strings, list of token ids or list of "
                             "token-id lists")
        if all(isinstance(p, str) for p in v):
            prompts = list(v)
        elif all(type(t) is int for t in v):
            prompts = [list(v)]
        elif all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in v):
            prompts = [list(p) for p in v]
        else:
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of non-empty "
                             "token-id lists (no mixing)")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        for p in prompts:
            if isinstance(p, list) and any(t < 0 for t in p):
                raise ValueError("token ids must be non-negative")
        return prompts

    @model_validator(mode="after")
    def _completion_checks(self):
        if self.suffix:
            raise _param_error("suffix", "suffix is not supported by this server")
        if self.best_of is not None and self.best_of != _d(self.n, 1):
            raise _param_error("best_of", "best_of must be equal to n (or omitted)")
        if self.echo and self.logprobs is not None:
            raise _param_error("echo", "echo together with logprobs is not supported")
        return self

    @property
    def prompts(self) -> List[Union[str, List[int]]]:
        return self.prompt

    def to_sampling_params(self) -> SamplingParams:
        """max_tokens defaults to 16 (OpenAI's completions default)."""
        return self.sampling_params(max_tokens=self.max_tokens if self.max_tokens is not None else 16,
                                    logprobs=self.logprobs)


class TextContentPart(_Base):
    type: str
    text: Optional[str] = None


class ChatMessage(_Base):
    role: str
    content: Union[None, str, List[TextContentPart]] = None
    name: Optional[str] = None

    @field_validator("role")
    @classmethod
    def _role(cls, v):
        if v not in ("system", "developer", "user", "assistant", "tool"):
            raise ValueError("must be one of system, developer, user, assistant, tool")
        return v

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if isinstance(v, list):
            for part in v:
                if part.type != "text" or part.text is None:
                    raise ValueError(f"content parts of type {part.type!r} are not supported (only 'text' parts "
                                     f"with a 'text' field)")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)

    def as_template_dict(self) -> Dict[str, str]:
        # "developer" is OpenAI's newer name for "system"; chat templates only know the latter
        role = "system" if self.role == "developer" else self.role
        d = {"role": role, "content": self.text()}
        if self.name:
            d["name"] = self.name
        return d


class ResponseFormat(_Base):
    type: str


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""
    messages: List[ChatMessage] = Field(..., min_length=1, max_length=100_000)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=2 ** 31)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[ResponseFormat] = None
    add_generation_prompt: Optional[bool] = None

    @model_validator(mode="after")
    def _chat_checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _param_error("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.tools:
            raise _param_error("tools", "tool calling is not supported by this server")
        if self.tool_choice not in (None, "none", "auto"):
            raise _param_error("tool_choice", "tool calling is not supported by this server")
        if self.response_format is not None and self.response_format.type != "text":
            raise _param_error("response_format", "only response_format {\"type\": \"text\"} is supported")
        return self

    @property
    def effective_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self) -> SamplingParams:
        """max_completion_tokens wins over max_tokens; `top_logprobs` alternatives per token when `logprobs`."""
        return self.sampling_params(max_tokens=self.effective_max_tokens,
                                    logprobs=(self.top_logprobs or 0) if self.logprobs else None)


class TokenizeRequest(_Base):
    """POST /tokenize: either `prompt` or `messages` (chat template applied)."""
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessage]] = None
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: Optional[bool] = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.prompt is None) == (self.messages is None):
            raise _param_error("prompt", "give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Base):
    """POST /detokenize."""
    model: Optional[str] = None
    tokens: List[int] = Field(..., max_length=10_000_000)


# -------------------------------------------------------------------------------------------- parsing + errors
class _ParamError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _param_error(param: str, message: str) -> _ParamError:
    return _ParamError(param, message)


def _d(v, default):
    return default if v is None else v


_TYPE_LABELS = ("str", "int", "float", "bool", "list", "dict", "none", "nullable", "union", "tagged-union",
                "function-after", "function-before", "function-wrap", "function-plain", "lax-or-strict",
                "json-or-python", "literal", "constrained")


def loc_to_param(loc) -> Optional[str]:
    """('messages', 0, 'content', 'str') -> 'messages[0].content' (pydantic's union-branch labels dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        part = str(part)
        if "[" in part or part.split("-")[0] in _TYPE_LABELS or part in _TYPE_LABELS \
                or part in ("TextContentPart", "ChatMessage", "StreamOptions", "ResponseFormat"):
            continue
        out = f"{out}.{part}" if out else part
    return out or None


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


def validation_error_to_api_error(e: ValidationError) -> APIError:
    """The first pydantic error as a 400 with `param` set (OpenAI shape)."""
    errors = e.errors(include_url=False)
    if not errors:
        return APIError(400, "invalid request")
    err = errors[0]
    etype = err.get("type", "")
    if etype == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: "
                             f"{err.get('msg', 'invalid JSON')}. The body must be a JSON object.")
    if etype in ("model_type", "model_attributes_type", "dict_type") and not err.get("loc"):
        return APIError(400, "The request body must be a JSON object.")
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _ParamError):
        return APIError(400, str(ctx_error), param=ctx_error.param)
    param = loc_to_param(err.get("loc", ()))
    if etype == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param)
    msg = str(ctx_error) if isinstance(ctx_error, Exception) else err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = ""
    if "input" in err and etype != "extra_forbidden":
        got = f" (got {_short(err['input'])})"
    return APIError(400, f"Invalid value for '{param}': {msg}{got}.", param=param)


def parse_request(cls, raw: bytes):
    """Validate a raw JSON body against `cls`; `APIError(400)` on any problem."""
    if not raw or not raw.strip():
        raise APIError(400, "The request body is empty; it must be a JSON object.")
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error_to_api_error(e) from None
    except _ParamError as e:          # raised outside pydantic's wrapping (defensive)
        raise APIError(400, str(e), param=e.param) from None


__all__ = ["APIError", "CompletionRequest", "ChatCompletionRequest", "ChatMessage", "TokenizeRequest",
           "DetokenizeRequest", "StreamOptions", "parse_request", "validation_error_to_api_error", "loc_to_param"]
