"""Which step programs are being compiled right now, and why: one compile per program at a time (a second thread
that needs the same program waits for the first one's result instead of compiling it again), and the list that
/health reports ("compiling_programs") and the log names. Thread-safe."""
from __future__ import annotations

import threading
import time
from typing import Dict, Hashable, List, Optional


class CompileTracker:
    def __init__(self):
        self._lock = threading.Lock()
        self._active: Dict[Hashable, tuple] = {}     # key -> (Event set when done, info dict, monotonic start)

    def begin(self, key: Hashable, info: Dict[str, str]) -> Optional[threading.Event]:
        """Register the compile of `key`: None if the caller is to compile it now (then `end(key)` when done,
        failed or not), or the Event of the compile of `key` already under way in another thread."""
        with self._lock:
            if key in self._active:
                return self._active[key][0]
            self._active[key] = (threading.Event(), dict(info), time.monotonic())
            return None

    def end(self, key: Hashable) -> None:
        with self._lock:
            entry = self._active.pop(key, None)
        if entry is not None:
            entry[0].set()

    def snapshot(self) -> List[Dict]:
        """The compiles under way, oldest first: their info ("program", "sampling", "reason") and "seconds" so
        far."""
        now = time.monotonic()
        with self._lock:
            entries = sorted(self._active.values(), key=lambda e: e[2])
        return [dict(info, seconds=round(now - t0, 1)) for _, info, t0 in entries]
