"""FastAPI app: OpenAI-compatible completions and chat (streaming and not), models, health, metrics, tokenize.

`create_app(async_engine, settings)` builds the app around a running AsyncEngine. Errors always have OpenAI's
shape {"error": {"message", "type", "param", "code"}}; bad input is a 4xx, never a 500.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Dict, List, Optional, Tuple

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..async_engine import AsyncEngine, EngineDeadError
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from ..tokenizer import apply_chat_template
from .auth import ApiKeys, RateLimiter, extract_key
from .metrics import Metrics
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SamplingFields,
                       TokenizeRequest)

log = structlog.get_logger("yaie_jax.requests")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = \
            status, message, type_, param, code, headers


def error_json(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def sampling_params_from(body: SamplingFields, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
    try:
        seed = body.seed
        if seed is not None:
            seed = seed & 0xFFFFFFFF
        return SamplingParams(
            n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
            repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, seed=seed, max_tokens=max_tokens,
            min_tokens=body.min_tokens, stop=body.stop, stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos, logprobs=logprobs, skip_special_tokens=body.skip_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output)
    except ValueError as e:
        msg = str(e)
        param = msg.split(".", 1)[1].split(" ", 1)[0] if msg.startswith("SamplingParams.") else None
        raise APIError(400, msg, param=param)


def create_app(engine: AsyncEngine, settings) -> FastAPI:
    app = FastAPI(title="yaie_jax", version="0.1.0")
    model_name = settings.served_model_name or engine.engine.served_model_name
    keys = ApiKeys(settings.api_keys or [])
    limiter = RateLimiter(settings.rate_limit_rpm, settings.rate_limit_burst)
    metrics = Metrics(model_name)
    tokenizer = engine.engine.tokenizer
    max_model_len = engine.engine.max_model_len
    app.state.engine = engine
    app.state.metrics = metrics

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_json(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_json(400, f"malformed JSON body: {first.get('msg', '')}", "invalid_request_error")
        param = ".".join(loc) or None
        return error_json(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", "invalid_request_error",
                          param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_json(e.status_code, str(e.detail), kind)

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, e: EngineDeadError):
        return error_json(503, str(e), "service_unavailable", headers={"Retry-After": "5"})

    # ------------------------------------------------------------------ guard for /v1 routes
    def guard(request: Request) -> str:
        key = extract_key(request.headers)
        if not keys.check(key):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY' or 'X-API-Key')",
                           "authentication_error", code="invalid_api_key")
        client = key or (request.client.host if request.client else "anonymous")
        ok, retry = limiter.try_acquire(client)
        if not ok:
            raise APIError(429, "rate limit exceeded", "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, int(retry + 0.999)))})
        if not engine.alive:
            raise EngineDeadError("the engine loop is not running")
        cap = settings.max_waiting_requests
        if cap is not None and engine.queue_length() >= cap:
            raise APIError(503, "server busy: too many waiting requests", "service_unavailable",
                           code="queue_full", headers={"Retry-After": "1"})
        return client

    def check_model(name: Optional[str]) -> None:
        if name and name != model_name:
            raise APIError(404, f"model {name!r} not found (serving {model_name!r})", "not_found_error",
                           param="model", code="model_not_found")

    def make_requests(prompts, params, body: SamplingFields, client: str, prefix: str):
        reqs = []
        base = f"{prefix}-{uuid.uuid4().hex}"
        for i, p in enumerate(prompts):
            try:
                if isinstance(p, str):
                    r = engine.make_request(f"{base}-{i}", p, params, priority=body.priority, client_id=client)
                else:
                    r = engine.make_request(f"{base}-{i}", None, params, prompt_token_ids=p,
                                            priority=body.priority, client_id=client)
            except ValueError as e:
                msg = str(e)
                if "context length" in msg:
                    raise APIError(400, msg, param="max_tokens", code="context_length_exceeded")
                raise APIError(400, msg, param="prompt" if "prompt" in msg else None)
            reqs.append(r)
        return base, reqs

    def finish_log(out: RequestOutput, route: str) -> None:
        m = out.metrics or {}
        ttft = (m["first_token_time"] - m["arrival_time"]) if m.get("first_token_time") else None
        e2e = (m["finished_time"] - m["arrival_time"]) if m.get("finished_time") else None
        n_out = sum(len(c.token_ids) for c in out.outputs)
        reason = out.outputs[0].finish_reason if out.outputs else None
        metrics.observe_finished(len(out.prompt_token_ids), n_out, ttft, e2e, reason)
        if settings.log_requests:
            log.info("request_finished", request_id=out.request_id, model=model_name, route=route,
                     prompt_tokens=len(out.prompt_token_ids), completion_tokens=n_out,
                     ttft_s=None if ttft is None else round(ttft, 4), latency_s=None if e2e is None else round(e2e, 4),
                     finish_reason=reason, cached_tokens=out.num_cached_tokens)

    async def merged(reqs) -> AsyncIterator[Tuple[int, RequestOutput]]:
        """Outputs of several requests as they come: (request index, output). Closing it aborts the rest."""
        q: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i, r):
            try:
                async for out in engine.generate(r):
                    await q.put((i, out))
            except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                await q.put((i, e))
            finally:
                await q.put((i, done))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
        remaining = len(tasks)
        try:
            while remaining:
                i, item = await q.get()
                if item is done:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def run_to_completion(request: Request, reqs) -> List[RequestOutput]:
        finals: Dict[int, RequestOutput] = {}

        async def consume():
            async for i, out in merged(reqs):
                if out.finished:
                    finals[i] = out

        task = asyncio.create_task(consume())
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                try:
                    await task
                except BaseException:  # noqa: BLE001
                    pass
                raise APIError(499, "client disconnected", "invalid_request_error")
        task.result()
        return [finals[i] for i in range(len(reqs))]

    def usage(outs: List[RequestOutput]) -> dict:
        p = sum(len(o.prompt_token_ids) for o in outs)
        c = sum(len(x.token_ids) for o in outs for x in o.outputs)
        cached = sum(o.num_cached_tokens for o in outs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def completion_logprobs(c, start: int, text_offset0: int) -> Optional[dict]:
        if c.logprobs is None:
            return None
        toks, lps, tops, offs = [], [], [], []
        off = text_offset0
        for tid, entry in zip(c.token_ids[start:], c.logprobs[start:]):
            lp = entry[tid]
            s = lp.decoded_token or ""
            toks.append(s)
            lps.append(lp.logprob)
            tops.append({(v.decoded_token or str(k)): v.logprob for k, v in entry.items() if k != tid or v.rank})
            offs.append(off)
            off += len(s)
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    def chat_logprobs(c, start: int, top_n: int) -> Optional[dict]:
        if c.logprobs is None:
            return None
        content = []
        for tid, entry in zip(c.token_ids[start:], c.logprobs[start:]):
            lp = entry[tid]
            s = lp.decoded_token or ""
            alts = sorted(((k, v) for k, v in entry.items() if v.rank is not None and v.rank <= top_n
                           and (k != tid or True)), key=lambda kv: -kv[1].logprob)[:top_n]
            content.append({"token": s, "logprob": lp.logprob, "bytes": list(s.encode()),
                            "top_logprobs": [{"token": v.decoded_token or "", "logprob": v.logprob,
                                              "bytes": list((v.decoded_token or "").encode())} for _, v in alts]})
        return {"content": content}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream_choices(reqs, n: int, make_chunk, usage_requested: bool, route: str, first_chunk=None):
        """SSE generator shared by completions and chat. make_chunk(index, delta_text, choice, start, finish)."""
        sent_text: Dict[int, int] = {}
        sent_tokens: Dict[int, int] = {}
        finals: Dict[int, RequestOutput] = {}
        if first_chunk is not None:
            for i in range(len(reqs)):
                for k in range(n):
                    yield sse(first_chunk(i * n + k))
        try:
            async for i, out in merged(reqs):
                for c in out.outputs:
                    idx = i * n + c.index
                    t0, k0 = sent_text.get(idx, 0), sent_tokens.get(idx, 0)
                    delta = c.text[t0:]
                    finish = c.finish_reason
                    if delta or finish or len(c.token_ids) > k0:
                        if delta or finish:
                            yield sse(make_chunk(idx, delta, c, k0, finish))
                            sent_text[idx] = len(c.text)
                            sent_tokens[idx] = len(c.token_ids)
                if out.finished:
                    finals[i] = out
                    finish_log(out, route)
        except EngineDeadError as e:
            yield sse({"error": {"message": str(e), "type": "service_unavailable", "param": None, "code": None}})
            return
        if usage_requested:
            yield sse(make_chunk(None, None, None, None, None, usage=usage([finals[i] for i in sorted(finals)])))
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        dev_mem = None
        try:
            import jax
            st = jax.devices()[0].memory_stats()
            if st:
                dev_mem = {"bytes_in_use": st.get("bytes_in_use"), "bytes_limit": st.get("bytes_limit")}
        except Exception:
            dev_mem = None
        stats = engine.stats
        body = {"status": "ok" if engine.alive else "dead", "model": model_name,
                "active_requests": engine.num_active, "queue_length": engine.queue_length(),
                "num_running": stats.get("num_running", 0), "num_waiting": stats.get("num_waiting", 0),
                "kv_blocks_total": stats.get("kv_blocks_total"), "kv_blocks_free": stats.get("kv_blocks_free"),
                "kv_blocks_cached": stats.get("kv_blocks_cached"), "device_memory": dev_mem}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def prom():
        metrics.update_from_stats(engine.stats)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        guard(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                             "owned_by": "yaie_jax", "max_model_len": max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if body.messages is not None:
            text = apply_chat_template(tokenizer, [m.model_dump() for m in body.messages])
            ids = tokenizer.encode(text, add_special_tokens=False)
        elif body.prompt is not None:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise APIError(400, "give either prompt or messages", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if any(t < 0 or t >= engine.engine.vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {engine.engine.vocab_size})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        client = guard(request)
        check_model(body.model)
        p = body.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = list(p)
        if not prompts or any((isinstance(x, (str, list)) and len(x) == 0) for x in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        params = sampling_params_from(body, body.max_tokens, body.logprobs)
        base, reqs = make_requests(prompts, params, body, client, "cmpl")
        created = int(time.time())

        if body.stream:
            def chunk(idx, delta, c, start, finish, usage=None):
                obj = {"id": base, "object": "text_completion", "created": created, "model": model_name,
                       "choices": []}
                if usage is not None:
                    obj["usage"] = usage
                    return obj
                obj["choices"].append({"index": idx, "text": delta, "finish_reason": finish,
                                       "logprobs": completion_logprobs(c, start, 0)})
                return obj
            inc = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_choices(reqs, body.n, chunk, inc, "completions"),
                                     media_type="text/event-stream")

        outs = await run_to_completion(request, reqs)
        choices = []
        for i, out in enumerate(outs):
            finish_log(out, "completions")
            for c in out.outputs:
                text = (out.prompt or "") + c.text if body.echo and out.prompt else c.text
                choices.append({"index": i * body.n + c.index, "text": text, "finish_reason": c.finish_reason,
                                "logprobs": completion_logprobs(c, 0, 0)})
        return {"id": base, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(outs)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        client = guard(request)
        check_model(body.model)
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            messages.append({"role": m.role, "content": content or ""})
        try:
            prompt_text = apply_chat_template(tokenizer, messages, add_generation_prompt=body.add_generation_prompt)
        except Exception as e:  # a template that rejects the conversation (e.g. role order)
            raise APIError(400, f"chat template rejected the messages: {e}", param="messages")
        ids = tokenizer.encode(prompt_text, add_special_tokens=False)
        max_tokens = body.max_completion_tokens or body.max_tokens
        top_n = body.top_logprobs or 0
        params = sampling_params_from(body, max_tokens, top_n if body.logprobs else None)
        base, reqs = make_requests([ids], params, body, client, "chatcmpl")
        created = int(time.time())

        if body.stream:
            def first(idx):
                return {"id": base, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "choices": [{"index": idx, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]}

            def chunk(idx, delta, c, start, finish, usage=None):
                obj = {"id": base, "object": "chat.completion.chunk", "created": created, "model": model_name,
                       "choices": []}
                if usage is not None:
                    obj["usage"] = usage
                    return obj
                obj["choices"].append({"index": idx, "delta": {"content": delta} if delta else {},
                                       "logprobs": chat_logprobs(c, start, top_n), "finish_reason": finish})
                return obj
            inc = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_choices(reqs, body.n, chunk, inc, "chat", first_chunk=first),
                                     media_type="text/event-stream")

        outs = await run_to_completion(request, reqs)
        out = outs[0]
        finish_log(out, "chat")
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c, 0, top_n), "finish_reason": c.finish_reason}
                   for c in out.outputs]
        return {"id": base, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(outs)}

    return app
