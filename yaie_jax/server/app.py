"""FastAPI app: OpenAI-compatible completions and chat (streaming and not), models, health, metrics, tokenize.

`create_app(async_engine, settings)` builds an app around an `AsyncEngine` (started on app start-up, drained
on shutdown when `manage_engine`). Contracts:
- Errors always have OpenAI's shape {"error": {"message", "type", "param", "code"}}. Bad input is a 4xx with
  `type: invalid_request_error` and `param` when one parameter is at fault; prompt + max_tokens beyond the
  model length is 400 `code: context_length_exceeded`; an unknown model is 404 `model_not_found`. A 5xx means
  the server is at fault (engine loop dead: 503; a bug: 500), never the input.
- Streaming answers are Server-Sent Events in OpenAI's format: `data: {chunk}` lines, the first chat chunk of
  each choice carries `delta.role`, `finish_reason` is set only on the last chunk of each choice, usage (with
  `stream_options.include_usage`) comes in a final chunk with empty `choices`, then `data: [DONE]`.
  Concatenating the deltas gives exactly the non-streamed text.
- A client that disconnects (streaming or not) aborts its engine requests, which frees their KV blocks.
- Queue full or draining: 503 with `Retry-After`. Rate limited: 429 with `Retry-After` (see auth.py).
- Choices of a multi-prompt completion are numbered prompt_index * n + sample_index (vLLM's convention).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
import uuid
from functools import partial
from typing import Any, AsyncIterator, Callable, List, Optional, Sequence, Tuple, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from ..async_engine import AsyncEngine, EngineDeadError, EngineUnavailableError, RequestStream
from ..outputs import CompletionOutput, RequestOutput
from ..settings import ServerSettings
from .auth import APIKeys, AuthRateLimitMiddleware, RateLimiter
from .logging import RequestLog, fmt_age
from .metrics import ServerMetrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                       parse_request)

logger = logging.getLogger("yaie_jax.server")

LOGPROB_FLOOR = -9999.0      # JSON has no -inf: clamp like vLLM


# ------------------------------------------------------------------------------------------------ helpers
def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def sse(obj: Any) -> str:
    return f"data: {_json(obj)}\n\n"


def _lp(v: Optional[float]) -> float:
    if v is None or v != v:
        return LOGPROB_FLOOR
    return max(float(v), LOGPROB_FLOOR)


class SSEResponse(StreamingResponse):
    """A streaming response that always watches for the client's disconnect and then cancels the body iterator
    (whose `finally` aborts the engine requests), whatever ASGI spec version the server announces."""

    media_type = "text/event-stream"

    def __init__(self, content, *, on_close=None, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close       # runs however the response ends, even if the body never started

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self._serve(scope, receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()

    async def _serve(self, scope, receive, send) -> None:
        async def stream() -> None:
            await self.stream_response(send)

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        tasks = [asyncio.ensure_future(stream()), asyncio.ensure_future(watch())]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
        for t in done:
            if t is tasks[0] and t.exception() is not None and not isinstance(t.exception(), OSError):
                raise t.exception()


def _abort_all(streams: List[RequestStream]) -> None:
    for s in streams:
        s.abort()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientDisconnected(Exception):
    pass


async def run_unless_disconnected(request: Request, coro):
    """Run `coro`; if the client disconnects first, cancel it (its cleanup aborts engine requests)."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientDisconnected()


async def read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"Request body too large (limit {limit} bytes).", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def map_engine_value_error(e: ValueError, prompt_param: str) -> APIError:
    """The engine's ValueError (bad input, nothing queued) as a 400 naming the parameter where we can tell."""
    msg = str(e)
    low = msg.lower()
    if "context length" in low or "maximum context" in low:
        return APIError(400, msg, param=prompt_param, code="context_length_exceeded")
    if msg.startswith("SamplingParams."):
        param, _, why = msg[len("SamplingParams."):].partition(" ")
        return APIError(400, f"Invalid value for '{param}': {why}.", param=param)
    for param in ("stop_token_ids", "max_tokens", "min_tokens", "logprobs", "seed", "priority", "temperature",
                  "top_p", "top_k", "min_p"):
        if param in low:
            return APIError(400, msg, param=param)
    if low.startswith("n=") or " n=" in low or "max_num_seqs" in low:
        return APIError(400, msg, param="n")
    if "prompt" in low or "token id" in low:
        return APIError(400, msg, param=prompt_param)
    return APIError(400, msg)


class _Tracker:
    """Per engine request: turns cumulative outputs into deltas and timing observations."""

    def __init__(self, n: int, arrival: float):
        self.arrival = arrival
        self.text = [""] * n
        self.ntok = [0] * n
        self.done = [False] * n
        self.first_token_at: List[Optional[float]] = [None] * n
        self.last_token_at: List[Optional[float]] = [None] * n
        self.finish_at: List[Optional[float]] = [None] * n
        self.final: Optional[RequestOutput] = None
        self.last: Optional[RequestOutput] = None
        self.ttft: Optional[float] = None


# (prompt index, cumulative output, its tracker, new text) -> the streamed choice, or None: nothing to send yet
ChoiceFn = Callable[[int, CompletionOutput, _Tracker, str], Optional[dict]]


# ------------------------------------------------------------------------------------------------ the app
def create_app(async_engine: AsyncEngine, settings: Optional[ServerSettings] = None, *,
               log_stream=None, manage_engine: bool = True) -> FastAPI:
    """Build the FastAPI app around `async_engine` (see the module docstring for the HTTP contract).

    `manage_engine`: start the engine thread on app start-up and drain it (bounded by
    `settings.shutdown_timeout_s`) on app shutdown. `log_stream`: where request JSON lines go (default stderr).
    """
    settings = settings or ServerSettings()
    engine = async_engine.engine
    tokenizer = engine.tokenizer
    max_model_len = int(engine.max_model_len)
    vocab_size = int(getattr(engine.model_config, "vocab_size", 0) or 0) or None
    model_name = async_engine.model_name
    accepted_models = {model_name}
    root_model = getattr(getattr(engine, "config", None), "model", None)
    if root_model:
        accepted_models.add(str(root_model))
    created = int(time.time())
    metrics = ServerMetrics(model_name, stats_fn=async_engine.stats, health_fn=async_engine.health)
    reqlog = RequestLog(log_stream, settings.log_requests)
    keys = APIKeys(settings.api_keys)
    limiter = RateLimiter(settings.rate_limit_rpm, settings.rate_limit_burst)

    first_answer = []         # set once the first request was answered (start-up log)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            async_engine.start()
        logger.info("start-up: app started, %s", fmt_age())
        try:
            yield
        finally:
            if manage_engine:
                await async_engine.shutdown(settings.shutdown_timeout_s)

    app = FastAPI(title="yaie_jax", version=_version(), lifespan=lifespan)
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    app.state.settings = settings

    def on_reject(status: int, code: Optional[str], path: str) -> None:
        metrics.observe_rejected(status, code)
        reqlog.rejected(endpoint=path, status=status, code=code, model=model_name)

    app.add_middleware(AuthRateLimitMiddleware, keys=keys, limiter=limiter,
                       max_request_bytes=settings.max_request_bytes, on_reject=on_reject)
    if settings.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_allow_origins), allow_methods=["*"],
                           allow_headers=["*"])

    # -------------------------------------------------------------------------------------------- errors
    def _rejected(request: Request, e: APIError) -> JSONResponse:
        on_reject(e.status, e.code or e.type, request.url.path)
        return error_response(e)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _rejected(request, e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        param = ".".join(str(p) for p in errs[0].get("loc", ())[1:]) if errs else None
        return _rejected(request, APIError(400, errs[0].get("msg", "invalid request") if errs else "invalid request",
                                           param=param or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = {404: f"Unknown URL: {request.method} {request.url.path}",
               405: f"Method {request.method} is not allowed for {request.url.path}"}.get(e.status_code, str(e.detail))
        return _rejected(request, APIError(e.status_code, msg, code=code, headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        logger.exception("internal error on %s", request.url.path)
        return _rejected(request, APIError(500, f"Internal server error: {type(e).__name__}", type="server_error",
                                           code="internal_error"))

    def unavailable(e: Exception) -> APIError:
        if isinstance(e, EngineDeadError):
            return APIError(503, f"The engine is not running: {e}", type="server_error", code="engine_dead")
        reason = getattr(e, "reason", "unavailable")
        return APIError(503, str(e), type="server_error", code=reason,
                        headers={"retry-after": str(max(1, settings.retry_after_s))})

    def check_model(name: Optional[str]) -> None:
        if name and name not in accepted_models:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def client_of(request: Request, user: Optional[str]) -> Optional[str]:
        kid = request.scope.get("state", {}).get("api_key_id")
        base = kid or (request.client.host if request.client else None)
        return f"{base}:{user}" if user else base

    async def admit(prompts: Sequence[Union[str, List[int]]], params, rid: str, *, priority: int,
                    client: Optional[str], stream: bool, prompt_param: str) -> List[RequestStream]:
        """Admit every prompt or none: on any failure the ones already admitted are aborted."""
        streams: List[RequestStream] = []
        try:
            for i, p in enumerate(prompts):
                streams.append(await async_engine.add_request(
                    f"{rid}-{i}", p, params, priority=priority, client_id=client, stream=stream,
                    timeout_s=settings.request_timeout_s, queue_timeout_s=settings.queue_timeout_s))
        except BaseException as e:
            for s in streams:
                s.abort()
            if isinstance(e, ValueError):
                raise map_engine_value_error(e, prompt_param) from None
            if isinstance(e, (EngineDeadError, EngineUnavailableError)):
                raise unavailable(e) from None
            raise
        return streams

    async def merged(streams: List[RequestStream]) -> AsyncIterator[Tuple[int, RequestOutput]]:
        """(prompt index, output) from several streams as they come."""
        if len(streams) == 1:
            async for out in streams[0]:
                yield 0, out
            return
        q: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, s: RequestStream) -> None:
            try:
                async for out in s:
                    q.put_nowait((i, out))
            except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                q.put_nowait((i, e))
            finally:
                q.put_nowait((i, done))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                i, item = await q.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    # ------------------------------------------------------------------------------------ observation
    def observe(tr: _Tracker, out: RequestOutput, now: float, streamed: bool) -> None:
        tr.last = out
        for c in out.outputs:
            j = c.index
            if j >= len(tr.ntok):
                continue
            k = len(c.token_ids) - tr.ntok[j]
            if k > 0:
                if tr.first_token_at[j] is None:
                    first = now
                    ftt = (out.metrics or {}).get("first_token_time")
                    if not streamed and isinstance(ftt, float) and tr.arrival <= ftt <= now:
                        # only the final output came back: take the engine's own first-token time
                        # (time.monotonic() of this process, like `now`)
                        first = ftt
                    tr.first_token_at[j] = first
                    if tr.ttft is None or first - tr.arrival < tr.ttft:
                        tr.ttft = first - tr.arrival
                elif streamed and tr.last_token_at[j] is not None:
                    gap = (now - tr.last_token_at[j]) / k
                    for _ in range(k):
                        metrics.observe_itl(gap)
                tr.last_token_at[j] = now
            if c.finish_reason is not None and tr.finish_at[j] is None:
                tr.finish_at[j] = now
                ntok = len(c.token_ids)
                if not streamed and ntok > 1 and tr.first_token_at[j] is not None:
                    metrics.observe_itl((now - tr.first_token_at[j]) / (ntok - 1))
                metrics.observe_sequence_finished(
                    c.finish_reason, ntok,
                    None if tr.first_token_at[j] is None else tr.first_token_at[j] - tr.arrival,
                    now - tr.arrival)
        if out.finished:
            tr.final = out

    def finish_trackers(trackers: List[_Tracker], now: float) -> None:
        for tr in trackers:
            out = tr.final or tr.last
            if out is None:
                continue
            if tr.ttft is not None:
                metrics.observe_ttft(tr.ttft)
            metrics.observe_request_finished(len(out.prompt_token_ids),
                                             sum(len(c.token_ids) for c in out.outputs), now - tr.arrival)

    def usage_of(trackers: List[_Tracker]) -> dict:
        prompt = completion = cached = 0
        for tr in trackers:
            out = tr.final or tr.last
            if out is None:
                continue
            prompt += len(out.prompt_token_ids)
            completion += sum(len(c.token_ids) for c in out.outputs)
            cached += int(out.num_cached_tokens or 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def log_finished(rid: str, endpoint: str, trackers: List[_Tracker], n: int, stream: bool, arrival: float,
                     client: Optional[str], status: int = 200, aborted: bool = False) -> None:
        u = usage_of(trackers)
        reasons = []
        for tr in trackers:
            out = tr.final or tr.last
            for j in range(len(tr.ntok)):
                r = None
                if out is not None and j < len(out.outputs):
                    r = out.outputs[j].finish_reason
                reasons.append(r or ("abort" if aborted else None))
        uniq = sorted(set(str(r) for r in reasons))
        ttfts = [tr.ttft for tr in trackers if tr.ttft is not None]
        if status == 200 and not first_answer:
            first_answer.append(True)
            logger.info("start-up: first request answered, %s (its latency %.3f s)", fmt_age(),
                        time.monotonic() - arrival)
        reqlog.finished(request_id=rid, model=model_name, endpoint=endpoint, prompt_tokens=u["prompt_tokens"],
                        completion_tokens=u["completion_tokens"],
                        cached_tokens=u["prompt_tokens_details"]["cached_tokens"],
                        ttft_s=min(ttfts) if ttfts else None, latency_s=time.monotonic() - arrival,
                        finish_reason=uniq[0] if len(uniq) == 1 else uniq, n=n, stream=stream, status=status,
                        client=client)

    # ------------------------------------------------------------------------------------ logprobs
    def token_text(tid: int, lp=None) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        try:
            return tokenizer.decode([tid], skip_special_tokens=False)
        except Exception:
            return ""

    def completion_logprobs(c: CompletionOutput, start: int, offset0: int) -> Optional[dict]:
        if c.logprobs is None:
            return None
        tokens, token_lps, tops, offsets = [], [], [], []
        off = offset0
        for j in range(start, min(len(c.logprobs), len(c.token_ids))):
            entry = c.logprobs[j]
            tid = c.token_ids[j]
            s = token_text(tid, entry.get(tid))
            tokens.append(s)
            token_lps.append(_lp(entry[tid].logprob) if tid in entry else LOGPROB_FLOOR)
            tops.append({token_text(t, l): _lp(l.logprob) for t, l in entry.items()})
            offsets.append(off)
            off += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(c: CompletionOutput, start: int, top_n: int) -> Optional[dict]:
        if c.logprobs is None:
            return None
        content = []
        for j in range(start, min(len(c.logprobs), len(c.token_ids))):
            entry = c.logprobs[j]
            tid = c.token_ids[j]
            s = token_text(tid, entry.get(tid))
            ranked = sorted(entry.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                           -_lp(kv[1].logprob)))[:top_n]
            content.append({
                "token": s, "logprob": _lp(entry[tid].logprob) if tid in entry else LOGPROB_FLOOR,
                "bytes": list(s.encode("utf-8")),
                "top_logprobs": [{"token": token_text(t, l), "logprob": _lp(l.logprob),
                                  "bytes": list(token_text(t, l).encode("utf-8"))} for t, l in ranked]})
        return {"content": content}

    # ------------------------------------------------------------------------------------ non-streamed
    async def collect_outputs(request: Request, rid: str, endpoint: str, streams: List[RequestStream],
                              trackers: List[_Tracker], n: int, arrival: float, client: Optional[str],
                              input_param: str) -> Optional[Response]:
        """Wait for every output of a non-streamed answer into `trackers` (stream i feeds trackers[i]); the
        requests are aborted however it ends. Returns the 499 response when the client left, else None (the
        trackers are finished). Engine failures become 503, an engine refusal a 400 naming `input_param`."""
        async def collect():
            try:
                async for pi, out in merged(streams):
                    observe(trackers[pi], out, time.monotonic(), False)
            finally:
                for s in streams:
                    s.abort()

        try:
            await run_unless_disconnected(request, collect())
        except ClientDisconnected:
            finish_trackers(trackers, time.monotonic())
            log_finished(rid, endpoint, trackers, n, False, arrival, client, status=499, aborted=True)
            return Response(status_code=499)
        except (EngineDeadError, EngineUnavailableError) as e:
            raise unavailable(e) from None
        except ValueError as e:      # the engine refused it after admission (split admission)
            raise map_engine_value_error(e, input_param) from None
        finish_trackers(trackers, time.monotonic())
        return None

    # ------------------------------------------------------------------------------------ streaming
    def stream_response(rid: str, endpoint: str, streams: List[RequestStream], trackers: List[_Tracker], n: int,
                        arrival: float, client: Optional[str], *, envelope: dict, first_choices: List[dict],
                        choice_of: ChoiceFn, include_usage: bool, continuous_usage: bool,
                        input_param: str = "prompt") -> SSEResponse:
        """The SSE answer shared by completions and chat; only the chunk contents differ per endpoint.

        `envelope`: the fixed fields of every chunk (id, object, ...), before `choices`. `first_choices`: sent one
        per chunk before any output (echoed prompts, chat role deltas). `choice_of(prompt_index, output, tracker,
        text_delta)` builds the choice for one new output, or returns None when there is nothing to send yet (it
        may mark tokens as consumed in `tracker.ntok`). However the stream ends, the engine requests are aborted
        (freeing their blocks), the trackers finished and the request logged."""

        def chunk(choices, usage=None, with_usage=False) -> str:
            obj = {**envelope, "choices": choices}
            if with_usage:
                obj["usage"] = usage
            return sse(obj)

        async def gen():
            aborted = True
            try:
                for ch in first_choices:
                    yield chunk([ch], None, include_usage)
                async for pi, out in merged(streams):
                    tr = trackers[pi]
                    observe(tr, out, time.monotonic(), True)
                    for c in out.outputs:
                        j = c.index
                        if j >= n or tr.done[j]:
                            continue
                        delta = c.text[len(tr.text[j]):] if c.text.startswith(tr.text[j]) else c.text
                        ch = choice_of(pi, c, tr, delta)
                        if ch is None:
                            continue
                        tr.text[j] = c.text if c.text.startswith(tr.text[j]) else tr.text[j] + delta
                        tr.ntok[j] = len(c.token_ids)
                        if c.finish_reason is not None:
                            tr.done[j] = True
                            ch["stop_reason"] = c.stop_reason
                        yield chunk([ch], usage_of(trackers) if continuous_usage else None, include_usage)
                aborted = False
                if include_usage:
                    yield chunk([], usage_of(trackers), True)
                yield "data: [DONE]\n\n"
            except (EngineDeadError, EngineUnavailableError) as e:
                yield sse(unavailable(e).body())
                yield "data: [DONE]\n\n"
            except ValueError as e:     # an engine refusal of the input: name the endpoint's input field
                yield sse(map_engine_value_error(e, input_param).body())
                yield "data: [DONE]\n\n"
            finally:
                for s in streams:
                    s.abort()
                finish_trackers(trackers, time.monotonic())
                log_finished(rid, endpoint, trackers, n, True, arrival, client, aborted=aborted)

        return SSEResponse(gen(), headers={"x-request-id": rid, "cache-control": "no-cache"},
                           on_close=partial(_abort_all, streams))

    # -------------------------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        h = async_engine.health()
        h["model"] = model_name
        h["device_memory"] = device_memory()
        h["kv_cache_usage"] = async_engine.stats().get("kv_cache_usage")
        status = 200 if h["status"] == "ok" else 503
        headers = {"retry-after": str(max(1, settings.retry_after_s))} if status == 503 else None
        return JSONResponse(h, status_code=status, headers=headers)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/version")
    async def version():
        return {"version": _version()}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "yaie_jax",
                "root": str(root_model or model_name), "parent": None, "max_model_len": max_model_len}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = parse_request(TokenizeRequest, await read_body(request, settings.max_request_bytes))
        check_model(body.model)
        try:
            if body.messages is not None:
                text = chat_prompt(body.messages, body.add_generation_prompt)
                add_special = bool(body.add_special_tokens) if body.add_special_tokens is not None else False
            else:
                text = body.prompt
                add_special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=add_special)]
        except APIError:
            raise
        except Exception as e:
            raise APIError(400, f"Could not tokenize the input: {e}", param="prompt") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = parse_request(DetokenizeRequest, await read_body(request, settings.max_request_bytes))
        check_model(body.model)
        if vocab_size is not None and any(t < 0 or t >= vocab_size for t in body.tokens):
            raise APIError(400, f"Token ids must be in [0, {vocab_size}).", param="tokens")
        try:
            text = tokenizer.decode(body.tokens, skip_special_tokens=False)
        except Exception as e:
            raise APIError(400, f"Could not detokenize the input: {e}", param="tokens") from None
        return {"prompt": text}

    def chat_prompt(messages, add_generation_prompt: Optional[bool]) -> str:
        from ..tokenizer import apply_chat_template
        convo = [m.as_template_dict() for m in messages]
        try:
            return apply_chat_template(tokenizer, convo,
                                       add_generation_prompt=True if add_generation_prompt is None
                                       else add_generation_prompt)
        except Exception as e:  # jinja TemplateError (e.g. roles must alternate) is the caller's input
            raise APIError(400, f"The chat template rejected the messages: {e}", param="messages") from None

    # ---------------------------------------------------------------------------------------- completions
    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival = time.monotonic()
        body = parse_request(CompletionRequest, await read_body(request, settings.max_request_bytes))
        check_model(body.model)
        n = body.n or 1
        params = body.sampling_params(max_tokens=body.max_tokens if body.max_tokens is not None else 16,
                                      logprobs=body.logprobs)
        prompts = body.prompts
        rid = f"cmpl-{uuid.uuid4().hex}"
        client = client_of(request, body.user)
        streams = await admit(prompts, params, rid, priority=body.priority or 0, client=client,
                              stream=bool(body.stream), prompt_param="prompt")
        trackers = [_Tracker(n, arrival) for _ in prompts]
        echo_text = [_prompt_text(p) if body.echo else "" for p in prompts]
        resp_model = body.model or model_name
        created_at = int(time.time())

        if body.stream:
            def completion_choice(pi: int, c: CompletionOutput, tr: _Tracker, delta: str) -> Optional[dict]:
                j = c.index
                lp = completion_logprobs(c, tr.ntok[j], len(echo_text[pi]) + len(tr.text[j]))
                if not delta and c.finish_reason is None:
                    if len(c.token_ids) <= tr.ntok[j]:       # nothing new at all
                        return None
                    if lp is None:                            # new tokens, no text yet, no logprobs to send
                        tr.ntok[j] = len(c.token_ids)
                        return None
                return {"index": pi * n + j, "text": delta, "logprobs": lp, "finish_reason": c.finish_reason}

            echo_choices = [{"index": pi * n + j, "text": echo_text[pi], "logprobs": None, "finish_reason": None}
                            for pi in range(len(prompts)) for j in range(n)] if body.echo else []
            return stream_response(
                rid, "/v1/completions", streams, trackers, n, arrival, client,
                envelope={"id": rid, "object": "text_completion", "created": created_at, "model": resp_model},
                first_choices=echo_choices, choice_of=completion_choice, include_usage=body.include_usage,
                continuous_usage=body.continuous_usage)

        left = await collect_outputs(request, rid, "/v1/completions", streams, trackers, n, arrival, client, "prompt")
        if left is not None:
            return left
        choices = []
        for pi, tr in enumerate(trackers):
            out = tr.final or tr.last
            for c in sorted(out.outputs, key=lambda c: c.index):
                choices.append({"index": pi * n + c.index, "text": echo_text[pi] + c.text,
                                "logprobs": completion_logprobs(c, 0, len(echo_text[pi])),
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        log_finished(rid, "/v1/completions", trackers, n, False, arrival, client)
        return JSONResponse({"id": rid, "object": "text_completion", "created": created_at, "model": resp_model,
                             "choices": choices, "usage": usage_of(trackers), "system_fingerprint": None},
                            headers={"x-request-id": rid})

    def _prompt_text(p: Union[str, List[int]]) -> str:
        if isinstance(p, str):
            return p
        try:
            return tokenizer.decode(p, skip_special_tokens=False)
        except Exception:
            return ""

    # --------------------------------------------------------------------------------------------- chat
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.monotonic()
        body = parse_request(ChatCompletionRequest, await read_body(request, settings.max_request_bytes))
        check_model(body.model)
        n = body.n or 1
        top_n = body.top_logprobs or 0
        params = body.sampling_params(max_tokens=body.effective_max_tokens,
                                      logprobs=top_n if body.logprobs else None)
        prompt_text = chat_prompt(body.messages, body.add_generation_prompt)
        try:
            prompt_ids = [int(t) for t in tokenizer.encode(prompt_text, add_special_tokens=False)]
        except Exception as e:
            raise APIError(400, f"Could not tokenize the messages: {e}", param="messages") from None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        client = client_of(request, body.user)
        streams = await admit([prompt_ids], params, rid, priority=body.priority or 0, client=client,
                              stream=bool(body.stream), prompt_param="messages")
        tr = _Tracker(n, arrival)
        trackers = [tr]
        resp_model = body.model or model_name
        created_at = int(time.time())

        if body.stream:
            def chat_choice(pi: int, c: CompletionOutput, tr: _Tracker, delta: str) -> Optional[dict]:
                j = c.index
                lp = chat_logprobs(c, tr.ntok[j], top_n) if body.logprobs else None
                if not delta and c.finish_reason is None and not (lp and lp["content"]):
                    tr.ntok[j] = len(c.token_ids)
                    return None
                return {"index": j, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                        "finish_reason": c.finish_reason}

            role_choices = [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for j in range(n)]
            return stream_response(
                rid, "/v1/chat/completions", streams, trackers, n, arrival, client,
                envelope={"id": rid, "object": "chat.completion.chunk", "created": created_at, "model": resp_model,
                          "system_fingerprint": None},
                first_choices=role_choices, choice_of=chat_choice, include_usage=body.include_usage,
                continuous_usage=body.continuous_usage, input_param="messages")

        left = await collect_outputs(request, rid, "/v1/chat/completions", streams, trackers, n, arrival, client,
                                     "messages")
        if left is not None:
            return left
        out = tr.final or tr.last
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c, 0, top_n) if body.logprobs else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                   for c in sorted(out.outputs, key=lambda c: c.index)]
        log_finished(rid, "/v1/chat/completions", trackers, n, False, arrival, client)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created_at, "model": resp_model,
                             "choices": choices, "usage": usage_of(trackers), "system_fingerprint": None},
                            headers={"x-request-id": rid})

    return app


# ------------------------------------------------------------------------------------------------ device info
def device_memory() -> Optional[List[dict]]:
    """Per-device memory from JAX's `memory_stats()` when JAX is already loaded and reports it, else None."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    try:
        out = []
        for d in jax.local_devices():
            stats = d.memory_stats()
            if not stats:
                continue
            out.append({"device": str(d), "bytes_in_use": stats.get("bytes_in_use"),
                        "bytes_limit": stats.get("bytes_limit"),
                        "peak_bytes_in_use": stats.get("peak_bytes_in_use")})
        return out or None
    except Exception:
        return None


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("yaie_jax")
    except Exception:
        return "0.1.0"


__all__ = ["create_app", "SSEResponse", "device_memory"]
