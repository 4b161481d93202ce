"""AsyncEngine: the server's bridge to the synchronous LLMEngine.

The engine steps in ONE background thread. Requests reach it through a thread-safe queue; each request's
outputs come back to the event loop through `loop.call_soon_threadsafe` into that request's asyncio queue.
A consumer that stops listening (client disconnect, cancellation) aborts its request, which frees its blocks.
If the engine loop dies, every waiting consumer gets the error and `alive` turns False (health answers 503).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator, Dict, Optional, Tuple

from .engine import LLMEngine
from .outputs import RequestOutput
from .sequence import Request

logger = logging.getLogger("yaie_jax.async_engine")


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: "queue.Queue[Tuple[str, object]]" = queue.Queue()
        self._streams: Dict[str, Tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self.stats: dict = engine.get_stats()
        self.num_active = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="yaie-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                block = not eng.has_unfinished_requests()
                try:
                    kind, item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
                    self._handle(kind, item)
                    while True:
                        kind, item = self._inbox.get_nowait()
                        self._handle(kind, item)
                except queue.Empty:
                    pass
                if eng.has_unfinished_requests():
                    for out in eng.step():
                        self._deliver(out.request_id, out)
                self.stats = eng.get_stats()
        except BaseException as e:  # the loop died: tell everyone, health turns 503
            logger.exception("engine loop died")
            self.error = e
            with self._lock:
                streams = list(self._streams.items())
            for rid, _ in streams:
                self._deliver(rid, EngineDeadError(f"engine loop died: {e!r}"))

    def _handle(self, kind: str, item) -> None:
        if kind == "add":
            self.engine.add_prepared(item)
        elif kind == "abort":
            self.engine.abort_request(item)

    def _deliver(self, rid: str, item) -> None:
        with self._lock:
            target = self._streams.get(rid)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # loop closed
                pass

    # ------------------------------------------------------------------ API for the server
    def make_request(self, *args, **kwargs) -> Request:
        """Validate/tokenize in the caller's thread (ValueError -> HTTP 400 before anything is queued)."""
        return self.engine.make_request(*args, **kwargs)

    async def generate(self, req: Request) -> AsyncIterator[RequestOutput]:
        """Queue a prepared request and yield its outputs until it finishes. Leaving early aborts it."""
        if not self.alive:
            raise EngineDeadError("the engine loop is not running")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rid = req.request_id
        with self._lock:
            if rid in self._streams:
                raise ValueError(f"request id {rid!r} is already in use")
            self._streams[rid] = (loop, q)
        self.num_active += 1
        finished = False
        try:
            self._inbox.put(("add", req))
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self.num_active -= 1
            with self._lock:
                self._streams.pop(rid, None)
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def queue_length(self) -> int:
        return int(self.stats.get("num_waiting", 0)) + self._inbox.qsize()
