"""Server-Sent Events and waiting on engine streams while watching the client.

- `sse_chunks(call, ...)`: the SSE body shared by completions and chat (OpenAI's format): `data: {chunk}` lines,
  first the endpoint's opening choices (echoed prompts, chat role deltas), then one chunk per new output of a
  sample, `finish_reason` only on each sample's last chunk, the usage chunk (empty `choices`) when asked for,
  then `data: [DONE]`. An engine failure mid-stream (or the drain deadline) ends every unfinished sample with
  finish_reason "abort", then sends an error event before `[DONE]`. However it ends,
  the engine requests are aborted, the request is recorded and logged.
- `SSEResponse`: a streaming response that cancels its body when the client disconnects.
- `merged(streams)`: (prompt index, output) from several engine streams as they come.
- `run_unless_disconnected(request, coro)`: a non-streamed wait that the client's disconnect cancels.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from typing import Any, AsyncIterator, Callable, List, Optional, Tuple

from fastapi import Request
from fastapi.responses import StreamingResponse

from yaie_jax.engine.async_engine import EngineDeadError, EngineUnavailableError, RequestStream
from ..outputs import CompletionOutput, RequestOutput
from .errors import engine_refusal, engine_unavailable
from .tracking import Call, OutputTracker, RequestRecorder, usage_of

# (prompt index, cumulative output, its tracker, new text) -> the streamed choice, or None: nothing to send yet
# (it may then mark tokens as consumed in `tracker.ntok`)
ChoiceFn = Callable[[int, CompletionOutput, OutputTracker, str], Optional[dict]]

DONE = "data: [DONE]\n\n"


def to_json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def sse(obj: Any) -> str:
    return f"data: {to_json(obj)}\n\n"


async def sse_chunks(call: Call, recorder: RequestRecorder, *, envelope: dict, first_choices: List[dict],
                     choice_of: ChoiceFn, include_usage: bool, continuous_usage: bool,
                     retry_after_s: float) -> AsyncIterator[str]:
    """The SSE events of `call` (see the module docstring). `envelope`: the fixed fields of every chunk (id,
    object, ...), before `choices`; `first_choices`: sent one per chunk before any output."""

    def chunk(choices: List[dict], usage: Optional[dict] = None, with_usage: bool = False) -> str:
        obj = {**envelope, "choices": choices}
        if with_usage:
            obj["usage"] = usage
        return sse(obj)

    aborted = True
    try:
        for ch in first_choices:
            yield chunk([ch], None, include_usage)
        async for pi, out in merged(call.streams):
            tr = call.trackers[pi]
            recorder.observe(tr, out, time.monotonic(), True)
            for c in out.outputs:
                if c.index >= call.n or tr.done[c.index]:
                    continue
                delta = tr.text_delta(c)
                ch = choice_of(pi, c, tr, delta)
                if ch is None:
                    continue
                tr.mark_sent(c, delta)
                if c.finish_reason is not None:
                    ch["stop_reason"] = c.stop_reason
                yield chunk([ch], usage_of(call.trackers) if continuous_usage else None, include_usage)
        aborted = False
        if include_usage:
            yield chunk([], usage_of(call.trackers), True)
        yield DONE
    except (EngineDeadError, EngineUnavailableError) as e:
        for ch in _abort_choices(call, choice_of):
            yield chunk([ch], None, include_usage)
        err = engine_unavailable(e, retry_after_s)
        recorder.metrics.observe_rejected(err.status, err.code)     # an error answered mid-stream counts too
        yield sse(err.body())
        yield DONE
    except ValueError as e:     # an engine refusal of the input: name the endpoint's input field
        err = engine_refusal(e, call.input_param)
        recorder.metrics.observe_rejected(err.status, err.code or err.type)
        yield sse(err.body())
        yield DONE
    finally:
        call.abort()
        recorder.finish(call, time.monotonic())
        recorder.log_finished(call, True, aborted=aborted)


def _abort_choices(call: Call, choice_of: ChoiceFn) -> List[dict]:
    """The last chunk's choice (finish_reason "abort", with any text not yet sent) of every sample that had not
    finished when the engine stopped serving the call."""
    out = []
    for pi, tr in enumerate(call.trackers):
        latest = {c.index: c for c in (tr.latest.outputs if tr.latest is not None else [])}
        for j in range(call.n):
            if tr.done[j]:
                continue
            c = latest.get(j)
            c = dataclasses.replace(c, finish_reason="abort") if c is not None \
                else CompletionOutput(index=j, finish_reason="abort")
            delta = tr.text_delta(c)
            ch = choice_of(pi, c, tr, delta)
            if ch is not None:
                tr.mark_sent(c, delta)
                ch["stop_reason"] = None
                out.append(ch)
    return out


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


async def merged(streams: List[RequestStream]) -> AsyncIterator[Tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams as they come; an error of any stream is raised."""
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


class ClientDisconnected(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(request: Request, coro):
    """Run `coro`; if the client disconnects first, cancel it (its cleanup aborts engine requests) and raise
    `ClientDisconnected`."""
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


__all__ = ["ChoiceFn", "sse", "sse_chunks", "SSEResponse", "merged", "ClientDisconnected",
           "run_unless_disconnected"]
