"""`OpenAIServing`: what every route of the app does, one method per endpoint (the routes in app.py only delegate).

Generation (completions and chat) runs one way, whatever the endpoint:
1. `start`: read and validate the body (protocol.py), check the model, map it to `SamplingParams`, build the
   prompts (chat: the chat template, tokenized), then `admit` every prompt or none (engine refusals -> 400 naming
   the field, engine unavailable -> 503) into a `Call` (tracking.py).
2. `answer`: streamed -> `stream` (SSE, streaming.py); else `collect` every output (the client's disconnect
   aborts and answers 499) and `respond` with the endpoint's choices.
Only the choices differ per endpoint: `_completion_chunk`/`_completion_choices` and `_chat_chunk`/`_chat_choices`.
Choices of a multi-prompt completion are numbered prompt_index * n + sample_index (vLLM's convention).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from functools import partial
from typing import Any, Callable, List, Optional, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from yaie_jax.engine.async_engine import AsyncEngine, EngineDeadError, EngineUnavailableError, RequestStream
from yaie_jax.engine.input_processor import PromptType as Prompt
from ..outputs import CompletionOutput
from ..sampling_params import SamplingParams
from .settings import ServerSettings
from .errors import APIError, engine_refusal, engine_unavailable
from .logprobs import chat_logprobs, completion_logprobs, prompt_logprobs_json
from .device_info import device_memory, total_device_memory
from .readiness import ProgressMonitor
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, parse_request
from .streaming import ChoiceFn, ClientDisconnected, SSEResponse, merged, run_unless_disconnected, sse_chunks
from .tracking import Call, OutputTracker, RequestRecorder, usage_of


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """The fixed facts of a generation endpoint."""
    path: str                  # for logs and metrics
    id_prefix: str             # of the answer's id
    input_param: str           # the request field holding the prompt, named by errors about it
    object: str                # "object" of the non-streamed answer
    chunk_object: str          # "object" of each streamed chunk
    chunk_fingerprint: bool    # streamed chunks carry "system_fingerprint": null


COMPLETIONS = Endpoint("/v1/completions", "cmpl", "prompt", "text_completion", "text_completion", False)
CHAT = Endpoint("/v1/chat/completions", "chatcmpl", "messages", "chat.completion", "chat.completion.chunk", True)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 once it exceeds `limit` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"Request body too large (limit {limit} bytes).", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def engine_quantization(engine) -> Optional[str]:
    """What the engine's model weights are quantized to ("int8", "int4", "fp8"), None for unquantized weights."""
    from ..quantization import mode_name
    return mode_name(getattr(getattr(engine, "model", None), "params", None))


class OpenAIServing:
    """The OpenAI-compatible endpoints around one `AsyncEngine`; `recorder` gets every generation's metrics and
    request-log line."""

    def __init__(self, async_engine: AsyncEngine, settings: ServerSettings, recorder: RequestRecorder):
        engine = async_engine.engine
        self.async_engine = async_engine
        self.settings = settings
        self.recorder = recorder
        self.tokenizer = engine.tokenizer
        self.max_model_len = int(engine.max_model_len)
        self.vocab_size = int(getattr(engine.model_config, "vocab_size", 0) or 0) or None
        self.model_name = async_engine.model_name
        self.root_model = getattr(getattr(engine, "config", None), "model", None)
        self.accepted_models = {self.model_name} | ({str(self.root_model)} if self.root_model else set())
        self.created = int(time.time())
        self.progress = ProgressMonitor(async_engine, settings.stall_timeout_s)
        self.quantization = engine_quantization(engine)

    # ------------------------------------------------------------------------------------ shared checks
    async def parse(self, request: Request, cls):
        """The validated body of `request` as `cls`, its model checked."""
        body = parse_request(cls, await read_body(request, self.settings.max_request_bytes))
        self.check_model(body.model)
        return body

    def check_model(self, name: Optional[str]) -> None:
        if name and name not in self.accepted_models:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    @staticmethod
    def client_of(request: Request, user: Optional[str]) -> Optional[str]:
        kid = request.scope.get("state", {}).get("api_key_id")
        base = kid or (request.client.host if request.client else None)
        return f"{base}:{user}" if user else base

    def unavailable(self, e: Exception) -> APIError:
        return engine_unavailable(e, self.settings.retry_after_s)

    # ------------------------------------------------------------------------------------ generation
    @property
    def max_text_chars(self) -> int:
        """The longest text a request may carry: max_model_len * prompt_chars_per_token (32 by default, 8x
        English's ~4 characters per token, and above the longest tokens of common vocabularies). Longer text
        cannot fit in the context, and is refused before it is tokenized."""
        return self.max_model_len * self.settings.prompt_chars_per_token

    def check_text_length(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_text_chars:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens, and the "
                                f"text of `{param}` has {num_chars} characters: more than the "
                                f"{self.max_text_chars} ({self.settings.prompt_chars_per_token} per token) this "
                                f"server tokenizes. Please shorten it.", param=param, code="context_length_exceeded")

    async def off_loop(self, fn: Callable, *args):
        """`fn(*args)` in the engine's prepare thread (tokenizer calls stay serialized there), so a long chat
        template or tokenization never blocks the event loop."""
        executor = getattr(self.async_engine, "prepare_executor", None)
        return await asyncio.get_running_loop().run_in_executor(executor, partial(fn, *args))

    async def start(self, request: Request, cls, ep: Endpoint, prompts_of: Callable[[Any], List[Prompt]]):
        """The shared prologue: (body, admitted `Call`) of a generation request."""
        arrival = time.monotonic()
        body = await self.parse(request, cls)
        params = body.to_sampling_params()
        prompts = await self.off_loop(prompts_of, body)
        rid = f"{ep.id_prefix}-{uuid.uuid4().hex}"
        client = self.client_of(request, body.user)
        streams = await self.admit(prompts, params, rid, priority=body.priority or 0, client=client,
                                   stream=bool(body.stream), input_param=ep.input_param)
        n = body.n or 1
        return body, Call(rid, ep.path, ep.input_param, n, arrival, client, body.model or self.model_name,
                          int(time.time()), streams, [OutputTracker(n, arrival) for _ in prompts])

    async def admit(self, prompts: Sequence[Prompt], params: SamplingParams, rid: str, *, priority: int,
                    client: Optional[str], stream: bool, input_param: str) -> List[RequestStream]:
        """Admit every prompt or none: on any failure the ones already admitted are aborted."""
        streams: List[RequestStream] = []
        try:
            for i, p in enumerate(prompts):
                streams.append(await self.async_engine.add_request(
                    f"{rid}-{i}", p, params, priority=priority, client_id=client, stream=stream,
                    timeout_s=self.settings.request_timeout_s, queue_timeout_s=self.settings.queue_timeout_s))
        except BaseException as e:
            for s in streams:
                s.abort()
            if isinstance(e, ValueError):
                raise engine_refusal(e, input_param) from None
            if isinstance(e, (EngineDeadError, EngineUnavailableError)):
                raise self.unavailable(e) from None
            raise
        return streams

    async def answer(self, request: Request, body, call: Call, ep: Endpoint, *, first_choices: List[dict],
                     choice_of: ChoiceFn, final_choices: Callable[[], List[dict]],
                     final_extra: Optional[Callable[[], dict]] = None) -> Response:
        """The shared epilogue: stream the answer, or collect it and respond with `final_choices()` (and the
        top-level fields of `final_extra()`)."""
        if body.stream:
            return self.stream(call, body, ep, first_choices=first_choices, choice_of=choice_of)
        left = await self.collect(request, call)
        if left is not None:
            return left
        return self.respond(call, ep, final_choices(), final_extra() if final_extra else None)

    def stream(self, call: Call, body, ep: Endpoint, *, first_choices: List[dict],
               choice_of: ChoiceFn) -> SSEResponse:
        envelope = {"id": call.rid, "object": ep.chunk_object, "created": call.created, "model": call.model}
        if ep.chunk_fingerprint:
            envelope["system_fingerprint"] = None
        chunks = sse_chunks(call, self.recorder, envelope=envelope, first_choices=first_choices, choice_of=choice_of,
                            include_usage=body.include_usage, continuous_usage=body.continuous_usage,
                            retry_after_s=self.settings.retry_after_s)
        return SSEResponse(chunks, headers={"x-request-id": call.rid, "cache-control": "no-cache"},
                           on_close=call.abort)

    async def collect(self, request: Request, call: Call) -> Optional[Response]:
        """Wait for every output of a non-streamed answer into `call.trackers`; the requests are aborted however
        it ends. Returns the 499 response when the client left, else None (the call is recorded). Engine failures
        become 503, an engine refusal (after admission) a 400 naming the endpoint's input field."""
        try:
            await run_unless_disconnected(request, self._observe_all(call))
        except ClientDisconnected:
            self.recorder.finish(call, time.monotonic())
            self.recorder.log_finished(call, False, status=499, aborted=True)
            return Response(status_code=499)
        except (EngineDeadError, EngineUnavailableError) as e:
            raise self.unavailable(e) from None
        except ValueError as e:      # the engine refused it after admission (split admission)
            raise engine_refusal(e, call.input_param) from None
        self.recorder.finish(call, time.monotonic())
        return None

    async def _observe_all(self, call: Call) -> None:
        try:
            async for pi, out in merged(call.streams):
                self.recorder.observe(call.trackers[pi], out, time.monotonic(), False)
        finally:
            call.abort()

    def respond(self, call: Call, ep: Endpoint, choices: List[dict], extra: Optional[dict] = None) -> JSONResponse:
        """The non-streamed answer of a collected call (and its request-log line); `extra`: top-level fields."""
        self.recorder.log_finished(call, False)
        return JSONResponse({"id": call.rid, "object": ep.object, "created": call.created, "model": call.model,
                             "choices": choices, "usage": usage_of(call.trackers), "system_fingerprint": None,
                             **(extra or {})}, headers={"x-request-id": call.rid})

    # ------------------------------------------------------------------------------------ completions
    async def completions(self, request: Request) -> Response:
        body, call = await self.start(request, CompletionRequest, COMPLETIONS, self._completion_prompts)
        echo_text = [self._prompt_text(p) if body.echo else "" for p in body.prompts]
        echo_choices = [{"index": pi * call.n + j, "text": echo_text[pi], "logprobs": None, "finish_reason": None}
                        for pi in range(len(body.prompts)) for j in range(call.n)] if body.echo else []
        return await self.answer(request, body, call, COMPLETIONS, first_choices=echo_choices,
                                 choice_of=partial(self._completion_chunk, echo_text, call.n),
                                 final_choices=partial(self._completion_choices, call, echo_text))

    def _completion_prompts(self, body: CompletionRequest) -> List[Prompt]:
        for p in body.prompts:
            if isinstance(p, str):
                self.check_text_length(len(p), "prompt")
        return body.prompts

    def _completion_chunk(self, echo_text: List[str], n: int, pi: int, c: CompletionOutput, tr: OutputTracker,
                          delta: str) -> Optional[dict]:
        j = c.index
        lp = completion_logprobs(self.tokenizer, c, tr.ntok[j], len(echo_text[pi]) + len(tr.text[j]))
        if not delta and c.finish_reason is None:
            if len(c.token_ids) <= tr.ntok[j]:       # nothing new at all
                return None
            if lp is None:                            # new tokens, no text yet, no logprobs to send
                tr.ntok[j] = len(c.token_ids)
                return None
        return {"index": pi * n + j, "text": delta, "logprobs": lp, "finish_reason": c.finish_reason}

    def _completion_choices(self, call: Call, echo_text: List[str]) -> List[dict]:
        choices = []
        for pi, tr in enumerate(call.trackers):
            for c in sorted(tr.latest.outputs, key=lambda c: c.index):
                choices.append({"index": pi * call.n + c.index, "text": echo_text[pi] + c.text,
                                "logprobs": completion_logprobs(self.tokenizer, c, 0, len(echo_text[pi])),
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
                if tr.latest.prompt_logprobs is not None:
                    choices[-1]["prompt_logprobs"] = prompt_logprobs_json(self.tokenizer, tr.latest.prompt_logprobs)
        return choices

    def _prompt_text(self, p: Prompt) -> str:
        if isinstance(p, str):
            return p
        if self.tokenizer is None:
            return ""
        try:
            return self.tokenizer.decode(p, skip_special_tokens=False)
        except Exception:
            return ""

    # ------------------------------------------------------------------------------------ chat
    async def chat(self, request: Request) -> Response:
        body, call = await self.start(request, ChatCompletionRequest, CHAT, self._chat_prompt_ids)
        top_n = body.top_logprobs or 0
        role_choices = [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None} for j in range(call.n)]
        return await self.answer(request, body, call, CHAT, first_choices=role_choices,
                                 choice_of=partial(self._chat_chunk, bool(body.logprobs), top_n),
                                 final_choices=partial(self._chat_choices, call, bool(body.logprobs), top_n),
                                 final_extra=partial(self._chat_prompt_logprobs, call)
                                 if body.prompt_logprobs is not None else None)

    def _chat_prompt_ids(self, body: ChatCompletionRequest) -> List[List[int]]:
        prompt_text = self.chat_prompt(body.messages, body.add_generation_prompt)
        try:
            return [[int(t) for t in self.tokenizer.encode(prompt_text, add_special_tokens=False)]]
        except Exception as e:
            raise APIError(400, f"Could not tokenize the messages: {e}", param="messages") from None

    def _chat_chunk(self, logprobs: bool, top_n: int, pi: int, c: CompletionOutput, tr: OutputTracker,
                    delta: str) -> Optional[dict]:
        j = c.index
        lp = chat_logprobs(self.tokenizer, c, tr.ntok[j], top_n) if logprobs else None
        if not delta and c.finish_reason is None and not (lp and lp["content"]):
            tr.ntok[j] = len(c.token_ids)
            return None
        return {"index": j, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                "finish_reason": c.finish_reason}

    def _chat_prompt_logprobs(self, call: Call) -> dict:
        """vLLM puts chat's prompt logprobs at the top level of the response, not in a choice."""
        return {"prompt_logprobs": prompt_logprobs_json(self.tokenizer, call.trackers[0].latest.prompt_logprobs)}

    def _chat_choices(self, call: Call, logprobs: bool, top_n: int) -> List[dict]:
        return [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                 "logprobs": chat_logprobs(self.tokenizer, c, 0, top_n) if logprobs else None,
                 "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                for c in sorted(call.trackers[0].latest.outputs, key=lambda c: c.index)]

    def require_tokenizer(self, what: str, param: str) -> None:
        """400 when the engine runs without a tokenizer (skip_tokenizer_init) and `what` needs one."""
        if self.tokenizer is None:
            raise APIError(400, f"{what} needs a tokenizer, and this server runs without one "
                                f"(--skip-tokenizer-init): send token ids to /v1/completions", param=param)

    def chat_prompt(self, messages, add_generation_prompt: Optional[bool]) -> str:
        from ..tokenizer import apply_chat_template
        self.require_tokenizer("Chat", "messages")
        self.check_text_length(sum(len(m.text()) for m in messages), "messages")
        convo = [m.as_template_dict() for m in messages]
        try:
            return apply_chat_template(self.tokenizer, convo,
                                       add_generation_prompt=True if add_generation_prompt is None
                                       else add_generation_prompt)
        except Exception as e:  # jinja TemplateError (e.g. roles must alternate) is the caller's input
            raise APIError(400, f"The chat template rejected the messages: {e}", param="messages") from None

    # ------------------------------------------------------------------------------------ tokenization
    async def tokenize(self, request: Request) -> dict:
        body = await self.parse(request, TokenizeRequest)
        self.require_tokenizer("Tokenization", "prompt")
        return await self.off_loop(self._tokenize, body)

    def _tokenize(self, body: TokenizeRequest) -> dict:
        if body.prompt is not None:
            self.check_text_length(len(body.prompt), "prompt")
        try:
            if body.messages is not None:
                text = self.chat_prompt(body.messages, body.add_generation_prompt)
                add_special = bool(body.add_special_tokens) if body.add_special_tokens is not None else False
            else:
                text = body.prompt
                add_special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = [int(t) for t in self.tokenizer.encode(text, add_special_tokens=add_special)]
        except APIError:
            raise
        except Exception as e:
            raise APIError(400, f"Could not tokenize the input: {e}", param="prompt") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    async def detokenize(self, request: Request) -> dict:
        body = await self.parse(request, DetokenizeRequest)
        if self.vocab_size is not None and any(t < 0 or t >= self.vocab_size for t in body.tokens):
            raise APIError(400, f"Token ids must be in [0, {self.vocab_size}).", param="tokens")
        self.require_tokenizer("Detokenization", "tokens")
        try:
            text = self.tokenizer.decode(body.tokens, skip_special_tokens=False)
        except Exception as e:
            raise APIError(400, f"Could not detokenize the input: {e}", param="tokens") from None
        return {"prompt": text}

    # ------------------------------------------------------------------------------------ models, health
    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "yaie_jax",
                "root": str(self.root_model or self.model_name), "parent": None, "max_model_len": self.max_model_len,
                "quantization": self.quantization}

    def list_models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def get_model(self, model_id: str) -> dict:
        self.check_model(model_id)
        return self.model_card()

    def health(self) -> JSONResponse:
        """Liveness (readiness.py): 200 while the engine loop runs and the server is not draining."""
        ready, reasons, h = self.progress.evaluate()
        h["model"] = self.model_name
        h["device_memory"] = device_memory()
        h["gpu_memory"] = total_device_memory(h["device_memory"])
        h["kv_cache_usage"] = self.async_engine.stats().get("kv_cache_usage")
        h["ready"], h["not_ready_reasons"], h["stalled"] = ready, reasons, self.progress.stalled
        return self._probe_answer(h, h["status"] == "ok")

    def ready(self) -> JSONResponse:
        """Readiness (readiness.py): 200 when ready to take traffic, else 503 with the reasons."""
        ready, reasons, h = self.progress.evaluate()
        return self._probe_answer({"ready": ready, "reasons": reasons, "status": h["status"],
                                   "model": self.model_name}, ready)

    def _probe_answer(self, body: dict, ok: bool) -> JSONResponse:
        headers = None if ok else {"retry-after": str(max(1, self.settings.retry_after_s))}
        return JSONResponse(body, status_code=200 if ok else 503, headers=headers)


def package_version() -> str:
    try:
        from importlib.metadata import version
        return version("yaie_jax")
    except Exception:
        return "0.1.0"


__all__ = ["OpenAIServing", "Endpoint", "COMPLETIONS", "CHAT", "read_body", "device_memory", "package_version"]
