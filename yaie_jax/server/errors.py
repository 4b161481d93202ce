"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}.

- `APIError`: raised anywhere in the server for an answer that is an error; `error_response` renders it.
- `engine_refusal`: the engine's `InvalidRequestError` (yaie_jax/errors.py) as a 400, from its typed fields
  (`param`, `code`, `client_message`); an untyped `ValueError` is a 400 without `param`.
- `engine_unavailable`: engine dead (503 `engine_dead`) or not accepting (503 with `Retry-After`).
- `install_error_handlers`: FastAPI handlers so that validation errors, unknown routes and bugs (500) are
  answered in the same shape, each reported to `on_reject`; a client that disconnects before its body is read is
  a 499 `client_disconnected`, logged at INFO.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from yaie_jax.engine.async_engine import EngineDeadError
from ..errors import InvalidRequestError

logger = logging.getLogger("yaie_jax.server")

CLIENT_CLOSED_REQUEST = 499       # nginx's status for a client that went away before the answer

# (HTTP status, OpenAI code or type, URL path) of every rejected request
OnReject = Callable[[int, Optional[str], str], None]


class APIError(Exception):
    """An error answered in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def engine_refusal(e: ValueError, input_param: str) -> APIError:
    """The engine's refusal of a request (nothing queued) as a 400. The engine calls the prompt "prompt"; the
    answer names the endpoint's own input field `input_param` instead (chat: "messages")."""
    if not isinstance(e, InvalidRequestError):
        return APIError(400, str(e))
    param = input_param if e.param == "prompt" else e.param
    return APIError(400, e.client_message, param=param, code=e.code)


def engine_unavailable(e: Exception, retry_after_s: float) -> APIError:
    """`EngineDeadError` or `EngineUnavailableError` (draining, stopped, queue full) as a 503."""
    if isinstance(e, EngineDeadError):
        return APIError(503, f"The engine is not running: {e}", type="server_error", code="engine_dead")
    reason = getattr(e, "reason", "unavailable")
    return APIError(503, str(e), type="server_error", code=reason,
                    headers={"retry-after": str(max(1, retry_after_s))})


def install_error_handlers(app: FastAPI, on_reject: OnReject) -> None:
    """Answer every error of `app` in OpenAI's shape and report it to `on_reject`."""

    def rejected(request: Request, e: APIError) -> JSONResponse:
        on_reject(e.status, e.code or e.type, request.url.path)
        return error_response(e)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return rejected(request, e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        param = ".".join(str(p) for p in errs[0].get("loc", ())[1:]) if errs else None
        return rejected(request, APIError(400, errs[0].get("msg", "invalid request") if errs else "invalid request",
                                          param=param or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = {404: f"Unknown URL: {request.method} {request.url.path}",
               405: f"Method {request.method} is not allowed for {request.url.path}"}.get(e.status_code, str(e.detail))
        return rejected(request, APIError(e.status_code, msg, code=code, headers=getattr(e, "headers", None)))

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnect(request: Request, e: ClientDisconnect):
        # the client left before its body was read (e.g. mid-upload): its fault, nobody to answer, no traceback
        logger.info("client disconnected before its request body was read: %s %s", request.method,
                    request.url.path)
        on_reject(CLIENT_CLOSED_REQUEST, "client_disconnected", request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        logger.exception("internal error on %s", request.url.path)
        return rejected(request, APIError(500, f"Internal server error: {type(e).__name__}", type="server_error",
                                          code="internal_error"))


__all__ = ["APIError", "error_response", "engine_refusal", "engine_unavailable", "install_error_handlers"]
