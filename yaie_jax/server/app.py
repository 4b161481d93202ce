"""FastAPI app: OpenAI-compatible completions and chat (streaming and not), models, health, metrics, tokenize.

`create_app(async_engine, settings)` builds an app around an `AsyncEngine` (started on app start-up, drained
on shutdown when `manage_engine`); every route delegates to `OpenAIServing` (serving.py). Contracts:
- Errors always have OpenAI's shape {"error": {"message", "type", "param", "code"}} (errors.py). Bad input is a
  4xx with `type: invalid_request_error` and `param` when one parameter is at fault; prompt + max_tokens beyond
  the model length is 400 `code: context_length_exceeded`; an unknown model is 404 `model_not_found`. A 5xx
  means the server is at fault (engine loop dead: 503; a bug: 500), never the input.
- Streaming answers are Server-Sent Events in OpenAI's format (streaming.py): `data: {chunk}` lines, the first
  chat chunk of each choice carries `delta.role`, `finish_reason` is set only on the last chunk of each choice,
  usage (with `stream_options.include_usage`) comes in a final chunk with empty `choices`, then `data: [DONE]`.
  Concatenating the deltas gives exactly the non-streamed text.
- A client that disconnects (streaming or not) aborts its engine requests, which frees their KV blocks.
- Queue full or draining: 503 with `Retry-After`. Rate limited: 429 with `Retry-After` (see auth.py).
- Choices of a multi-prompt completion are numbered prompt_index * n + sample_index (vLLM's convention).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.middleware.cors import CORSMiddleware

from yaie_jax.engine.async_engine import AsyncEngine
from .settings import ServerSettings
from .auth import APIKeys, AuthRateLimitMiddleware, RateLimiter
from .errors import install_error_handlers
from .logging import RequestLog, fmt_age
from .metrics import ServerMetrics
from .ops_metrics import StatusCountMiddleware, register_ops_metrics
from .serving import OpenAIServing, device_memory, engine_quantization, package_version
from .streaming import SSEResponse
from .tracking import RequestRecorder

logger = logging.getLogger("yaie_jax.server")


def _lifespan(async_engine: AsyncEngine, manage_engine: bool, shutdown_timeout_s: float, watch):
    """With `manage_engine`: start the engine thread on app start-up, drain it (bounded) on shutdown. `watch`: a
    coroutine function run as a task while the app runs (the forward-progress watch)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            async_engine.start()
        watcher = asyncio.ensure_future(watch())
        logger.info("start-up: app started, %s", fmt_age())
        try:
            yield
        finally:
            watcher.cancel()
            if manage_engine:
                await async_engine.shutdown(shutdown_timeout_s)

    return lifespan


def _add_middleware(app: FastAPI, settings: ServerSettings, on_reject) -> None:
    """API keys, rate limit and body-size limit (auth.py); CORS when origins are configured."""
    app.add_middleware(AuthRateLimitMiddleware, keys=APIKeys(settings.api_keys),
                       limiter=RateLimiter(settings.rate_limit_rpm, settings.rate_limit_burst),
                       max_request_bytes=settings.max_request_bytes, on_reject=on_reject)
    if settings.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_allow_origins), allow_methods=["*"],
                           allow_headers=["*"])


def create_app(async_engine: AsyncEngine, settings: Optional[ServerSettings] = None, *,
               log_stream=None, manage_engine: bool = True) -> FastAPI:
    """Build the FastAPI app around `async_engine` (see the module docstring for the HTTP contract).

    `manage_engine`: start the engine thread on app start-up and drain it (bounded by
    `settings.shutdown_timeout_s`) on app shutdown. `log_stream`: where request JSON lines go (default stderr).
    """
    settings = settings or ServerSettings()
    model_name = async_engine.model_name
    metrics = ServerMetrics(model_name, stats_fn=async_engine.stats, health_fn=async_engine.health,
                            quantization=engine_quantization(async_engine.engine))
    reqlog = RequestLog(log_stream, settings.log_requests)
    serving = OpenAIServing(async_engine, settings, RequestRecorder(metrics, reqlog, model_name))
    requests_total = register_ops_metrics(metrics, async_engine, serving.progress)

    app = FastAPI(title="yaie_jax", version=package_version(),
                  lifespan=_lifespan(async_engine, manage_engine, settings.shutdown_timeout_s,
                                     serving.progress.watch))
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.serving = serving

    def on_reject(status: int, code: Optional[str], path: str) -> None:
        metrics.observe_rejected(status, code)
        reqlog.rejected(endpoint=path, status=status, code=code, model=model_name)

    _add_middleware(app, settings, on_reject)
    app.add_middleware(StatusCountMiddleware, counter=requests_total, model_name=model_name)   # outermost
    install_error_handlers(app, on_reject)

    @app.get("/health")
    async def health():
        return serving.health()

    @app.get("/ready")
    async def ready():
        return serving.ready()

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/version")
    async def version():
        return {"version": package_version()}

    @app.get("/v1/models")
    async def list_models():
        return serving.list_models()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        return serving.get_model(model_id)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await serving.tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await serving.detokenize(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serving.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serving.chat(request)

    return app


__all__ = ["create_app", "SSEResponse", "device_memory"]
