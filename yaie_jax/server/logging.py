"""Structured request logs: one JSON line per finished (or rejected) HTTP request, through structlog.

Each app gets its own bound logger (no global structlog configuration), writing to `stream` (default stderr):

    {"event": "request_finished", "request_id": "cmpl-...", "model": "...", "endpoint": "/v1/completions",
     "prompt_tokens": 12, "completion_tokens": 16, "cached_tokens": 0, "ttft_s": 0.012, "latency_s": 0.31,
     "finish_reason": "length", "n": 1, "stream": false, "status": 200, "client": "key-1a2b3c...",
     "level": "info", "timestamp": "2026-11-27T01:02:03.456Z"}

`finish_reason` is the single reason when all choices agree, else the list; "abort" when the client left.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional, TextIO, Tuple

import structlog


def make_request_logger(stream: Optional[TextIO] = None, enabled: bool = True):
    """A structlog logger rendering JSON lines to `stream` (or a no-op logger when disabled)."""
    if not enabled:
        return None
    return structlog.wrap_logger(
        structlog.PrintLogger(file=stream if stream is not None else sys.stderr),
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.JSONRenderer(sort_keys=False)],
        cache_logger_on_first_use=False)


class RequestLog:
    """Writes the per-request lines; never raises into the request path."""

    def __init__(self, stream: Optional[TextIO] = None, enabled: bool = True):
        self._log = make_request_logger(stream, enabled)

    def finished(self, **fields: Any) -> None:
        if self._log is None:
            return
        try:
            self._log.info("request_finished", **_round(fields))
        except Exception:  # a broken log sink must not break serving
            pass

    def rejected(self, **fields: Any) -> None:
        if self._log is None:
            return
        try:
            self._log.warning("request_rejected", **_round(fields))
        except Exception:
            pass


def process_age_s() -> Optional[float]:
    """Seconds since this process started (Linux /proc; None elsewhere): start-up logs measure from the launch,
    Python's own start-up and imports included."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])   # field 22: starttime, in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def fmt_age(age: Optional[float] = None) -> str:
    """"12.34 s after the process started" (or "at <monotonic>" where the process age is unknown)."""
    age = process_age_s() if age is None else age
    return f"{age:.2f} s after the process started" if age is not None else f"at monotonic {time.monotonic():.2f}"


class StackSampler:
    """Where one thread spends a stretch of time (start-up), by sampling its Python stack every `interval_s` from
    a daemon thread: `stop()` returns [(seconds, "file.py:function")] by cumulative time (a sample counts once
    for each distinct function on the stack), the frames under `roots` (package directory names) only, plus
    the import of each top-level package (as "import <name>"). Cheap (one stack walk per sample); the sampled
    thread is never paused."""

    def __init__(self, thread: Optional[threading.Thread] = None, interval_s: float = 0.02,
                 roots: Tuple[str, ...] = ("yaie_jax", "pallas_kernels"),
                 skip_files: Tuple[str, ...] = ("serve.py",)):
        self.ident = (thread or threading.current_thread()).ident
        self.interval_s = interval_s
        self.roots = tuple(os.sep + r + os.sep for r in roots)
        self.skip_files = tuple(os.sep + f for f in skip_files)     # the caller's own frames
        self.counts: Dict[str, int] = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="yaie-startup-profile", daemon=True)

    def start(self) -> "StackSampler":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            frame = sys._current_frames().get(self.ident)
            seen = set()
            while frame is not None:
                code = frame.f_code
                fname = code.co_filename
                key = None
                if any(r in fname for r in self.roots):
                    if not fname.endswith(self.skip_files):
                        key = f"{os.path.basename(fname)}:{code.co_name}"
                elif code.co_name == "<module>" and "importlib" not in fname:
                    top = frame.f_globals.get("__name__", "?").split(".")[0]
                    key = f"import {top}"
                if key is not None:
                    seen.add(key)
                frame = frame.f_back
            self.counts.update(seen)
            self.samples += 1

    def stop(self, top: int = 25) -> List[Tuple[float, str]]:
        self._stop.set()
        self._thread.join(1.0)
        return [(n * self.interval_s, k) for k, n in self.counts.most_common(top)]


def _round(fields: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in fields.items()}


__all__ = ["RequestLog", "make_request_logger", "process_age_s", "fmt_age", "StackSampler"]
