"""Python garbage-collector pauses on the engine's thread: measure them, and keep long-lived objects out of them.

A full (generation 2) collection walks every tracked object of the process. After jax, flax, transformers and a
model are loaded, and the step programs traced, that is millions of objects, so one collection that lands between
two device calls leaves the device idle for the length of the walk. `freeze_live_objects` collects once and then
moves every live object into the collector's permanent generation (`gc.freeze`), so later collections walk only
what was allocated after it (sequences, token lists, outputs). The engine calls it after start-up and again once
programs compiled later are done (`LLMEngine._freeze_gc_objects`); vLLM and SGLang freeze after start-up too.

`raise_gen0_threshold` spaces the young collections out. Python collects generation 0 every 700 net allocations of
tracked objects; an engine step allocates more than that (rows, slot lists, outputs), so collections landed inside
every step and walked objects the step was about to free anyway (bench/NOTES.md). With a threshold of 20,000 most
of those objects die by reference count before any collection sees them.

`PAUSES` is the process-wide meter: collections per generation and the seconds they took. Importing this module
changes nothing; `install_pause_meter()` hooks `PAUSES` into `gc.callbacks` (the engine calls it when it starts;
a second call does nothing).
"""
from __future__ import annotations

import gc
import threading
import time
from typing import Dict


class GcPauseMeter:
    """Counts collections per generation, sums their wall-clock seconds and keeps the longest (process-wide, every
    thread). Call it from `gc.callbacks`: `PAUSES` below, for the whole process (`install_pause_meter`); a tool
    measuring one window may install its own (`scripts/host_trace.py`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._start_s = 0.0
        self.collections: Dict[int, int] = {0: 0, 1: 0, 2: 0}
        self.pause_s: Dict[int, float] = {0: 0.0, 1: 0.0, 2: 0.0}
        self.max_pause_s: Dict[int, float] = {0: 0.0, 1: 0.0, 2: 0.0}

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start_s = time.perf_counter()
            return
        gen = int(info.get("generation", 2))
        pause = time.perf_counter() - self._start_s
        with self._lock:
            self.collections[gen] = self.collections.get(gen, 0) + 1
            self.pause_s[gen] = self.pause_s.get(gen, 0.0) + pause
            self.max_pause_s[gen] = max(self.max_pause_s.get(gen, 0.0), pause)

    def snapshot(self) -> dict:
        """{"collections": {gen: count}, "pause_s": {gen: seconds}, "total_pause_s": seconds} since installed."""
        with self._lock:
            return {"collections": dict(self.collections), "pause_s": dict(self.pause_s),
                    "total_pause_s": sum(self.pause_s.values())}

    @staticmethod
    def delta(after: dict, before: dict) -> dict:
        """`after - before` of two snapshots, in the snapshot's layout."""
        return {"collections": {g: n - before["collections"].get(g, 0) for g, n in after["collections"].items()},
                "pause_s": {g: s - before["pause_s"].get(g, 0.0) for g, s in after["pause_s"].items()},
                "total_pause_s": after["total_pause_s"] - before["total_pause_s"]}


PAUSES = GcPauseMeter()
_install_lock = threading.Lock()


def install_pause_meter() -> GcPauseMeter:
    """Hook `PAUSES` into `gc.callbacks` for the rest of the process (once: later calls change nothing) and
    return it."""
    with _install_lock:
        if PAUSES not in gc.callbacks:
            gc.callbacks.append(PAUSES)
    return PAUSES


def freeze_live_objects() -> int:
    """Collect once, then freeze every object alive now (`gc.freeze`): later collections skip them. Returns the
    number of objects frozen.

    An earlier freeze is undone first (`gc.unfreeze`), so a process that builds several engines (tests, a
    notebook) reclaims the cyclic garbage of the earlier ones here; between two calls, frozen objects that die in
    reference cycles are not reclaimed (those freed by reference counts are). What is frozen is mostly what lives
    as long as the engine anyway (modules, the model, traced and compiled programs)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def raise_gen0_threshold(threshold: int) -> int:
    """Make the collector's generation-0 threshold at least `threshold` (a higher one set by the application is
    kept; 0 changes nothing). Process-wide, like `gc.set_threshold`. Returns the threshold now in force."""
    gen0, gen1, gen2 = gc.get_threshold()
    if threshold > gen0:
        gc.set_threshold(threshold, gen1, gen2)
        return threshold
    return gen0
