"""Liveness, readiness and forward-progress detection, the way orchestrators probe a server.

- Liveness (`/health`, 200 or 503): the engine loop runs (503 once it died or stopped, and while draining, as
  before). A Kubernetes liveness probe stops once a pod is being deleted, so draining does not get it killed.
- Readiness (`/ready`, 200 or 503 with `reasons`): the model is loaded and the engine loop runs, no start-up
  program is still compiling (a request would wait for it), the server is not draining, and the engine is not
  stalled. A balancer stops sending to a server that is not ready.
- Stalled: requests are waiting or running but the engine thread has neither completed a step nor been idle for
  `stall_timeout_s` (`AsyncEngine.health()["last_progress_age_s"]`). Each entry into that state is counted
  (`yaie:engine_stalls_total`); `yaie:engine_stalled` is 1 while it lasts. A step waiting on a compile counts:
  no step completes meanwhile. `ProgressMonitor.watch` re-evaluates it every second so a stall is counted even
  when nothing probes the server.
"""
from __future__ import annotations

import asyncio
import threading
from typing import List, Optional, Tuple

STARTUP_REASON_PREFIX = "start-up"      # compile_tracker "reason" of the programs an engine compiles at start-up


class ProgressMonitor:
    """Evaluates readiness from `async_engine.health()`; counts stalls. Thread-safe."""

    def __init__(self, async_engine, stall_timeout_s: Optional[float]):
        self.async_engine = async_engine
        self.stall_timeout_s = stall_timeout_s
        self.num_stalls = 0
        self.stalled = False
        self._lock = threading.Lock()

    def is_stalled(self, h: dict) -> bool:
        """Work is waiting or running and the engine made no progress for `stall_timeout_s`; counts entries."""
        work = (h.get("active_requests") or 0) > 0 or (h.get("num_running") or 0) > 0 \
            or (h.get("num_waiting") or 0) > 0
        age = h.get("last_progress_age_s")
        stalled = bool(self.stall_timeout_s is not None and h.get("engine_loop_alive") and work
                       and age is not None and age > self.stall_timeout_s)
        with self._lock:
            if stalled and not self.stalled:
                self.num_stalls += 1
            self.stalled = stalled
        return stalled

    def evaluate(self, h: Optional[dict] = None) -> Tuple[bool, List[str], dict]:
        """(ready, reasons it is not, the health snapshot used)."""
        h = self.async_engine.health() if h is None else h
        reasons = []
        if h["status"] == "draining":
            reasons.append("draining")
        elif h["status"] != "ok":
            reasons.append(f"engine {h['status']}")
        startup = [p for p in h.get("compiling_programs") or []
                   if str(p.get("reason", "")).startswith(STARTUP_REASON_PREFIX)]
        if startup:
            reasons.append(f"compiling {len(startup)} start-up program(s)")
        if self.is_stalled(h):
            reasons.append(f"stalled: no step completed for {h['last_progress_age_s']:.1f} s with work waiting "
                           f"(stall_timeout_s={self.stall_timeout_s:g})")
        return not reasons, reasons, h

    async def watch(self, period_s: float = 1.0) -> None:
        """Re-evaluate forever (cancel to stop), so stalls are counted without probes."""
        while True:
            await asyncio.sleep(period_s)
            self.is_stalled(self.async_engine.health())


__all__ = ["ProgressMonitor", "STARTUP_REASON_PREFIX"]
