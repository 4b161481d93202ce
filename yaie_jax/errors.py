"""Typed errors for bad input to the engine: what is wrong and which request field is at fault, as data.

Every class here subclasses `ValueError` (callers that catch `ValueError` keep working). A raiser names the
field in OpenAI's vocabulary (`param`: "prompt", "n", "max_tokens", "stop_token_ids", a `SamplingParams` field)
and may give OpenAI's error `code`; the HTTP server turns these fields into its JSON error without reading the
message. `str(e)` is the message for logs and Python callers; `client_message` is what an API client is shown.
"""
from __future__ import annotations

from typing import Any, Optional


class InvalidRequestError(ValueError):
    """A request the engine refuses before queueing anything. `param`: the request field at fault, or None.
    `code`: OpenAI's error code, or None."""

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    @property
    def client_message(self) -> str:
        return self.message


class InvalidParameterError(InvalidRequestError):
    """One parameter's value is out of its range. `str(e)`: "SamplingParams.top_p must be in (0, 1] (got 2.0)";
    `client_message`: "Invalid value for 'top_p': must be in (0, 1] (got 2.0)."."""

    def __init__(self, owner: str, param: str, reason: str, value: Any):
        self.reason = f"{reason} (got {value!r})"
        super().__init__(f"{owner}.{param} {self.reason}", param=param)

    @property
    def client_message(self) -> str:
        return f"Invalid value for '{self.param}': {self.reason}."


class ContextLengthError(InvalidRequestError):
    """The prompt plus the tokens asked for do not fit the model's context (`param` "prompt")."""

    def __init__(self, message: str):
        super().__init__(message, param="prompt", code="context_length_exceeded")


class InvalidArgumentError(ValueError):
    """An engine argument (an `EngineConfig` field) whose value cannot be used. `field`: the argument's name."""

    def __init__(self, message: str, *, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


__all__ = ["InvalidRequestError", "InvalidParameterError", "ContextLengthError", "InvalidArgumentError"]
