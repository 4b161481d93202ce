"""One request's stream of outputs on the asyncio side of `AsyncEngine`, and the errors a stream or an admission
raises, and the hand-off from the engine thread: it puts each `RequestOutput` (cumulative) or a `StreamEnd` on the
stream's queue with `deliver` (through `loop.call_soon_threadsafe`); the stream is consumed on that event loop only."""
from __future__ import annotations

import asyncio
import copy
import dataclasses
from typing import TYPE_CHECKING, Any, List, Optional

from yaie_jax.outputs import CompletionOutput, RequestOutput

if TYPE_CHECKING:
    from yaie_jax.engine.async_engine import AsyncEngine


class EngineDeadError(RuntimeError):
    """The engine loop died (an exception in `step()`); the engine must be restarted."""


class EngineUnavailableError(RuntimeError):
    """The engine does not accept requests right now (draining, stopped, or its waiting queue is full)."""

    def __init__(self, message: str, *, reason: str = "unavailable"):
        super().__init__(message)
        self.reason = reason          # "draining" | "stopped" | "queue_full" | "dead"


class StreamEnd:
    """Put on a stream's queue instead of an output: the stream ends (aborted, the engine died, or admission
    failed in the engine thread)."""

    def __init__(self, kind: str, error: Optional[BaseException] = None):
        self.kind = kind              # "aborted" | "dead" | "error" (admission failed in the engine thread)
        self.error = error


class RequestStream:
    """Async iterator over one request's cumulative `RequestOutput`s; ends after the finished one.

    `abort()` is idempotent and safe to call from the event loop at any time (also after the end). If the
    engine aborts the request from its side (shutdown), the stream ends with a synthetic finished output whose
    unfinished completions have finish_reason "abort".
    """

    def __init__(self, engine: "AsyncEngine", request_id: str, n: int):
        self._engine = engine
        self.request_id = request_id
        self.n = n
        self.queue: "asyncio.Queue[Any]" = asyncio.Queue()
        self.finished = False
        self.aborted = False
        self.last: Optional[RequestOutput] = None

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        # coalesce: outputs are cumulative, so the newest one holds everything the older ones did
        while not self.queue.empty() and isinstance(item, RequestOutput) and not item.finished:
            item = self.queue.get_nowait()
        if isinstance(item, StreamEnd):
            self.finished = True
            if item.kind == "dead":
                raise EngineDeadError(f"the engine loop died: {item.error!r}") from item.error
            if item.kind == "error":
                raise item.error
            return self._synthetic_abort()
        self.last = item
        if item.finished:
            self.finished = True
        return item

    def _synthetic_abort(self) -> RequestOutput:
        self.aborted = True
        if self.last is not None:
            out = copy.copy(self.last)
            out.outputs = [dataclasses.replace(o, finish_reason=o.finish_reason or "abort") for o in out.outputs]
        else:
            out = RequestOutput(request_id=self.request_id, prompt=None, prompt_token_ids=[],
                                outputs=[CompletionOutput(index=i, finish_reason="abort") for i in range(self.n)])
        out.finished = True
        return out

    def abort(self) -> None:
        """Abort the request in the engine unless it already finished. Never raises."""
        if self.finished:
            return
        self.finished = True
        self.aborted = True
        self._engine._abort(self.request_id)


def _put_all(items) -> None:
    for q, item in items:
        q.put_nowait(item)


def deliver(loop: asyncio.AbstractEventLoop, items: List[tuple]) -> None:
    """From any thread: put each (asyncio queue, item) of `items` on its queue, in `loop` (one callback for all).
    Nothing happens if that loop is closed."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:     # that event loop is closed: nobody is listening any more
        pass


def _set_future(fut: "asyncio.Future", error: Optional[BaseException]) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def resolve_future(loop: asyncio.AbstractEventLoop, fut: "asyncio.Future", error: Optional[BaseException]) -> None:
    """From any thread: resolve `fut` (None: a result of None; else that exception) in `loop`, unless it is done
    or the loop is closed."""
    try:
        loop.call_soon_threadsafe(_set_future, fut, error)
    except RuntimeError:
        pass
