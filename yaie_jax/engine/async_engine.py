"""AsyncEngine: the asyncio face of the synchronous, single-threaded `LLMEngine`.

Threading contract (DESIGN.md, Server):
- The `LLMEngine` is touched by exactly ONE thread, the engine thread started by `start()`: every
  `add_request`, `abort_request`, `step`, `has_unfinished_requests` and `get_stats` call happens there.
- Asyncio code talks to it through a thread-safe inbox (`queue.Queue` of commands). Results go back per request
  through `loop.call_soon_threadsafe` into that request's `asyncio.Queue` (one call per event loop per step).
- Bad input surfaces from `await add_request(...)` as `ValueError` (the engine's typed `InvalidRequestError`,
  e.g. `ContextLengthError`: yaie_jax/errors.py) before any HTTP response is started: an engine with
  `make_request`/`add_prepared` validates and tokenizes in one prepare thread (`prepare_executor`; it only reads
  engine state), so a long prompt never blocks the event loop; for
  an engine with only `add_request`, the engine thread adds it and the caller awaits the verdict.
- A consumer that goes away (HTTP client disconnect = task cancellation) calls `RequestStream.abort()` (the
  `generate()` helper does it in `finally`), which aborts the request in the engine and frees its blocks.
- If `step()` raises, the loop is dead: every open stream raises `EngineDeadError`, new requests are refused,
  and `health()["engine_loop_alive"]` is False (the server answers /health with 503).
- `shutdown(timeout_s)` drains: new requests are refused (`EngineUnavailableError`), in-flight requests get up
  to `timeout_s` to finish, the rest are aborted (their streams end with finish_reason "abort"), then the thread
  stops. `expire_requests(error)` ends every admitted request at once, each stream raising `error` (the server's
  drain deadline).

Outputs are cumulative (vLLM semantics): a stream may coalesce several engine outputs into the latest one when
its consumer is slower than the engine, which loses nothing.

Why this file is over 400 lines: it is one class, and every method is one side of the threading contract above
(the event loop's or the engine thread's); the per-request side lives in request_stream.py.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import itertools
import logging
import queue
import threading
import time
from functools import partial
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

from yaie_jax.engine.input_processor import PromptType
from yaie_jax.engine.request_stream import (EngineDeadError, EngineUnavailableError, RequestStream, StreamEnd, deliver,
                                           resolve_future)
from yaie_jax.outputs import RequestOutput
from yaie_jax.sampling_params import SamplingParams

logger = logging.getLogger("yaie_jax.engine.async_engine")


@dataclasses.dataclass
class _AddCommand:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    kwargs: Dict[str, Any]
    stream: "RequestStream"
    loop: asyncio.AbstractEventLoop
    accepted: Optional["asyncio.Future"]       # None when the request was prepared by `make_request`
    prepared: Any = None                        # the engine's prepared request (split admission)


class AsyncEngine:
    """Owns an `LLMEngine` and steps it in one background thread (see the module docstring for the contract).

    Attributes read by the server: `engine` (for `tokenizer`, `max_model_len`, `model_config`, `config`),
    `model_name`, `health()`, `stats()` (the latest `get_stats()` snapshot, refreshed by the engine thread).
    """

    def __init__(self, engine, *, max_waiting_requests: Optional[int] = None, model_name: Optional[str] = None,
                 stats_interval_s: float = 0.05, idle_poll_s: float = 0.1):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        cfg = getattr(engine, "config", None)
        self.model_name = model_name or getattr(engine, "served_model_name", None) \
            or getattr(cfg, "served_model_name", None) or getattr(cfg, "model", None) or "default"
        self._inbox: "queue.Queue[Any]" = queue.Queue()
        self._streams: Dict[str, RequestStream] = {}          # engine thread only (len() read elsewhere)
        self._stream_loops: Dict[str, asyncio.AbstractEventLoop] = {}
        self._pending_adds = 0                                 # submitted, not yet seen by the engine thread
        self._added_since_stats = 0                            # handed to the engine after the last snapshot
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._draining = False
        self._closed = False                                   # the thread has done its final sweep
        self._dead_error: Optional[BaseException] = None
        self._stats: Dict[str, Any] = {}
        self._stats_time = 0.0
        self._stats_interval_s = stats_interval_s
        self._idle_poll_s = idle_poll_s
        self._last_step_time: Optional[float] = None
        self._num_steps = 0
        self._started_at = time.monotonic()
        # last time the engine thread completed a step or found nothing to do (forward-progress detection)
        self._last_progress_time = self._started_at
        # called on the engine thread after each step with its wall seconds (the server's step-time metrics)
        self.step_observer: Optional[Callable[[float], None]] = None
        # one thread validates and tokenizes prompts (`make_request`) so a long one never blocks the event loop;
        # one, so tokenizer calls stay serialized as they were on the loop
        self.prepare_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="yaie-prepare")
        self._ids = itertools.count()
        # Split admission: an engine with `make_request` (validate/tokenize, reads state only) and
        # `add_prepared` (queue it) lets bad input fail in the caller's thread; otherwise the engine thread calls
        # `add_request` and the caller awaits the answer.
        self._split_admission = callable(getattr(engine, "make_request", None)) \
            and callable(getattr(engine, "add_prepared", None))
        params = inspect.signature(engine.add_request).parameters
        self._engine_kwargs = set(params) if not any(p.kind is p.VAR_KEYWORD for p in params.values()) else None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="yaie-engine-loop", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead_error is None

    @property
    def is_draining(self) -> bool:
        return self._draining

    @property
    def dead_error(self) -> Optional[BaseException]:
        return self._dead_error

    def begin_drain(self) -> None:
        """Refuse new requests from now on (in-flight ones continue). Thread-safe."""
        self._draining = True

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Drain for at most `timeout_s`, abort what is left, stop the thread. Safe to call twice."""
        self.begin_drain()
        deadline = time.monotonic() + max(0.0, timeout_s)
        while self.num_active_requests() > 0 and self.is_running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self.stop()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
        self.prepare_executor.shutdown(wait=False)

    def stop(self) -> None:
        """Ask the engine thread to abort everything and exit (non-blocking)."""
        self._draining = True
        self._stop.set()
        self._inbox.put(("stop",))

    # ------------------------------------------------------------------ requests (event loop side)
    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    def num_active_requests(self) -> int:
        """Requests admitted or being admitted and not yet finished."""
        return len(self._streams) + self._pending_adds

    def num_waiting_requests(self) -> int:
        """The engine's waiting queue (latest snapshot), plus requests handed to the engine since that snapshot,
        plus requests not yet handed to it. Never undercounts: a request leaves one term only as it enters the
        next (it may be counted as waiting a little after it started running, until the next snapshot)."""
        with self._lock:
            return int(self._stats.get("num_waiting", 0) or 0) + self._added_since_stats + self._pending_adds

    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams, *,
                          priority: int = 0, client_id: Optional[str] = None,
                          queue_timeout_s: Optional[float] = None, timeout_s: Optional[float] = None,
                          stream: bool = True) -> RequestStream:
        """Admit a request and return its stream (after validation; with the add_request fallback, after the
        engine thread accepted it).

        Raises `ValueError` (bad input, from the engine, nothing queued), `EngineUnavailableError` (draining,
        stopped, queue full) or `EngineDeadError`. `stream=False` tells an engine that supports it that only the
        final output is wanted.
        """
        self._check_accepting()
        if self.max_waiting_requests is not None and self.num_waiting_requests() >= self.max_waiting_requests:
            raise EngineUnavailableError(
                f"the server is overloaded: {self.num_waiting_requests()} requests are waiting "
                f"(max_waiting_requests={self.max_waiting_requests}); retry later", reason="queue_full")
        loop = asyncio.get_running_loop()
        rs = RequestStream(self, request_id, params.n)
        kwargs: Dict[str, Any] = {"priority": priority, "client_id": client_id,
                                  "queue_timeout_s": queue_timeout_s, "timeout_s": timeout_s, "stream": stream}
        if self._split_admission:
            # validate + tokenize here (engine state is only read): errors need no trip to the engine thread,
            # and tokenizing a long prompt does not stall the step loop
            prepared = await loop.run_in_executor(
                self.prepare_executor, partial(self.engine.make_request, request_id, prompt, params, **kwargs))
            self._check_accepting()
            self._enqueue_add(_AddCommand(request_id, prompt, params, kwargs, rs, loop, None, prepared))
            return rs
        if self._engine_kwargs is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self._engine_kwargs}
        fut = loop.create_future()
        self._enqueue_add(_AddCommand(request_id, prompt, params, kwargs, rs, loop, fut))
        try:
            await fut
        except asyncio.CancelledError:
            # the caller went away while admission was in flight: abort it whether or not it got in
            rs.finished = True
            self._abort(request_id)
            raise
        return rs

    async def generate(self, prompt: PromptType, params: SamplingParams, request_id: Optional[str] = None,
                       **kwargs) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its cumulative outputs; aborts it if the iteration is abandoned or cancelled."""
        rs = await self.add_request(request_id or self.new_request_id(), prompt, params, **kwargs)
        try:
            async for out in rs:
                yield out
        finally:
            rs.abort()

    def _enqueue_add(self, cmd: _AddCommand) -> None:
        # under the lock, so an add either reaches the inbox before the thread's final sweep or is refused
        with self._lock:
            if self._closed:
                raise EngineDeadError(f"the engine loop died: {self._dead_error!r}") if self._dead_error \
                    else EngineUnavailableError("the engine is stopped", reason="stopped")
            self._pending_adds += 1
            self._inbox.put(cmd)

    def _check_accepting(self) -> None:
        if self._dead_error is not None:
            raise EngineDeadError(f"the engine loop died: {self._dead_error!r}")
        if self._thread is None or not self._thread.is_alive():
            if self._thread is not None:
                raise EngineUnavailableError("the engine is stopped", reason="stopped")
            self.start()
        if self._draining:
            raise EngineUnavailableError("the server is shutting down", reason="draining")

    def _abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def expire_requests(self, error: BaseException) -> None:
        """End every request admitted so far: each is aborted in the engine and its stream raises `error` (e.g. an
        `EngineUnavailableError` at a drain deadline). Non-blocking; the engine thread does it between steps."""
        self._inbox.put(("expire", error))

    # ------------------------------------------------------------------ health / stats
    def stats(self) -> Dict[str, Any]:
        """The latest engine `get_stats()` snapshot (at most ~stats_interval_s + one step old)."""
        return dict(self._stats)

    def health(self) -> Dict[str, Any]:
        alive = self.is_running
        now = time.monotonic()
        if self._dead_error is not None:
            status = "dead"
        elif self._thread is None:
            status = "not_started"
        elif not self._thread.is_alive():
            status = "stopped"
        elif self._draining:
            status = "draining"
        else:
            status = "ok"
        s = self._stats
        programs = getattr(self.engine, "compiling_programs", None)
        compiling = programs() if callable(programs) else []
        return {
            "status": status,
            "engine_loop_alive": alive,
            "error": repr(self._dead_error) if self._dead_error is not None else None,
            "active_requests": self.num_active_requests(),
            "queue_length": self.num_waiting_requests(),
            "num_running": s.get("num_running"),
            "num_waiting": s.get("num_waiting"),
            "kv_blocks_total": s.get("kv_blocks_total"),
            "kv_blocks_free": s.get("kv_blocks_free"),
            "num_steps": self._num_steps,
            "last_step_age_s": None if self._last_step_time is None else round(now - self._last_step_time, 3),
            # seconds since the engine thread last completed a step or was idle: grows only while work is stuck
            "last_progress_age_s": round(now - self._last_progress_time, 3),
            "uptime_s": round(now - self._started_at, 3),
            # step programs compiling now ({program, sampling, reason, seconds}); a request needing one waits
            "compiling": bool(compiling),
            "compiling_programs": compiling,
        }

    def _refresh_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._stats_time < self._stats_interval_s:
            return
        try:
            stats = dict(self.engine.get_stats())
            with self._lock:
                self._stats = stats
                self._added_since_stats = 0    # the snapshot (taken on this thread, after those adds) has them
        except Exception:  # stats are best effort; never kill the loop for them
            logger.exception("engine.get_stats() failed")
        self._stats_time = now

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        engine = self.engine
        try:
            self._refresh_stats(force=True)
            while not self._stop.is_set():
                busy = engine.has_unfinished_requests()
                self._drain_inbox(block=not busy)
                if self._stop.is_set():
                    break
                if engine.has_unfinished_requests():
                    t0 = time.monotonic()
                    outputs = engine.step()
                    self._num_steps += 1
                    self._last_step_time = self._last_progress_time = time.monotonic()
                    if self.step_observer is not None:
                        self._observe_step(self._last_step_time - t0)
                    if not engine.has_unfinished_requests():
                        self._refresh_stats(force=True)    # idle now: the snapshot says so before outputs go out
                    self._dispatch(outputs)
                    self._refresh_stats()
                else:
                    idle_work = getattr(engine, "idle_work", None)
                    if idle_work is not None:
                        idle_work()            # e.g. first runs of programs compiled in the background
                    self._last_progress_time = time.monotonic()
                    self._refresh_stats(force=True)
        except BaseException as e:  # noqa: BLE001 - any failure in the loop kills it; report, don't hang clients
            logger.exception("engine loop died")
            self._dead_error = e
            with self._lock:
                self._closed = True
            self._fail_all(StreamEnd("dead", e))
            return
        # stopped: abort whatever is left, end its streams with finish_reason "abort"
        self._drain_inbox(block=False)
        for rid in list(self._streams):
            try:
                engine.abort_request(rid)
            except Exception:
                logger.exception("abort_request(%s) failed during shutdown", rid)
        with self._lock:
            self._closed = True
        self._fail_all(StreamEnd("aborted"))
        self._refresh_stats(force=True)

    def _observe_step(self, seconds: float) -> None:
        try:
            self.step_observer(seconds)
        except Exception:  # metrics are best effort; never kill the loop for them
            logger.exception("step_observer failed")

    def _drain_inbox(self, block: bool) -> None:
        try:
            cmd = self._inbox.get(timeout=self._idle_poll_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd: Any) -> None:
        if isinstance(cmd, _AddCommand):
            if cmd.stream.finished:        # cancelled/aborted before it reached us: never add it
                with self._lock:
                    self._pending_adds -= 1
                if cmd.accepted is not None:
                    resolve_future(cmd.loop, cmd.accepted, None)
                return
            try:
                if cmd.prepared is not None:
                    self.engine.add_prepared(cmd.prepared)
                else:
                    self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params, **cmd.kwargs)
            except Exception as e:  # ValueError = bad input; anything else is reported to that caller only
                with self._lock:
                    self._pending_adds -= 1
                if cmd.accepted is not None:
                    resolve_future(cmd.loop, cmd.accepted, e)
                else:
                    deliver(cmd.loop, [(cmd.stream.queue, StreamEnd("error", e))])
                return
            with self._lock:               # from "not handed over" to "in the engine, maybe not in the snapshot"
                self._pending_adds -= 1
                self._added_since_stats += 1
            self._streams[cmd.request_id] = cmd.stream
            self._stream_loops[cmd.request_id] = cmd.loop
            if cmd.accepted is not None:
                resolve_future(cmd.loop, cmd.accepted, None)
        elif cmd[0] == "abort":
            rid = cmd[1]
            if rid in self._streams:
                self._streams.pop(rid, None)
                self._stream_loops.pop(rid, None)
                self.engine.abort_request(rid)
                self._refresh_stats(force=True)
        elif cmd[0] == "expire":
            items = []
            for rid, rs in list(self._streams.items()):
                self.engine.abort_request(rid)
                items.append((self._stream_loops[rid], rs.queue))
            self._streams.clear()
            self._stream_loops.clear()
            for loop, q in items:
                deliver(loop, [(q, StreamEnd("error", cmd[1]))])
            self._refresh_stats(force=True)
        elif cmd[0] == "stop":
            self._stop.set()

    def _dispatch(self, outputs: List[RequestOutput]) -> None:
        by_loop: Dict[asyncio.AbstractEventLoop, List[tuple]] = {}
        for out in outputs:
            rs = self._streams.get(out.request_id)
            if rs is None:
                continue
            loop = self._stream_loops[out.request_id]
            if out.finished:
                self._streams.pop(out.request_id, None)
                self._stream_loops.pop(out.request_id, None)
            by_loop.setdefault(loop, []).append((rs.queue, out))
        for loop, items in by_loop.items():
            deliver(loop, items)

    def _fail_all(self, sentinel: StreamEnd) -> None:
        by_loop: Dict[asyncio.AbstractEventLoop, List[tuple]] = {}
        for rid, rs in list(self._streams.items()):
            by_loop.setdefault(self._stream_loops[rid], []).append((rs.queue, sentinel))
        self._streams.clear()
        self._stream_loops.clear()
        # admissions still in the inbox
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _AddCommand):
                with self._lock:
                    self._pending_adds -= 1
                if cmd.accepted is not None:
                    err = EngineDeadError(f"the engine loop died: {sentinel.error!r}") if sentinel.kind == "dead" \
                        else EngineUnavailableError("the engine is stopped", reason="stopped")
                    resolve_future(cmd.loop, cmd.accepted, err)
                else:
                    deliver(cmd.loop, [(cmd.stream.queue, sentinel)])
        for loop, items in by_loop.items():
            deliver(loop, items)


__all__ = ["AsyncEngine", "RequestStream", "EngineDeadError", "EngineUnavailableError"]
