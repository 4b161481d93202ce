"""Where an engine pass spends host time, without a profiler's overhead (benchmarks' --host-trace).

    with HostTrace(llm.engine) as trace:
        llm.generate(...)
    record["host_trace"] = trace.summary()

For the pass: wall and main-thread CPU seconds (CPU well below wall in a host-bound loop = the thread waits:
on the device, on the GIL, or on a blocking call), garbage-collector pauses by generation, the threads alive,
step programs compiled during the pass, and wall/CPU seconds of the runner's parts (`prepare_inputs`, the
compiled-program lookup, the program call, the cascade plan, the sampling batch), of the scheduler's and the
engine's phases and of the engine's device reads, and a timeline of the device calls (when each was dispatched and
read back, its rows, tokens and fused steps, and the parts' milliseconds inside its dispatch).
Benchmark-only: it wraps methods of one engine instance and restores them on exit.
"""
from __future__ import annotations

import collections
import gc
import threading
import time
from typing import Dict

from yaie_jax.engine.gc_pause import GcPauseMeter


class HostTrace:
    def __init__(self, engine):
        self.engine = engine
        self.parts: Dict[str, list] = collections.defaultdict(lambda: [0, 0.0, 0.0])   # name: [calls, wall, cpu]
        self.gc = GcPauseMeter()                  # collections during the trace only
        self._restore = []

    # ------------------------------------------------------------------ wrapping
    def _timed(self, name: str, fn):
        parts = self.parts

        def wrapper(*args, **kwargs):
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                p = parts[name]
                p[0] += 1
                p[1] += time.perf_counter() - w0
                p[2] += time.thread_time() - c0
        return wrapper

    def _wrap(self, obj, attr: str, name: str) -> None:
        original = getattr(obj, attr)
        self._restore.append((obj, attr, obj.__dict__.get(attr)))
        setattr(obj, attr, self._timed(name, original))

    def __enter__(self):
        runner = self.engine.runner
        self._wrap(runner, "prepare_inputs", "runner.prepare_inputs")
        self._wrap(runner, "cascade_plan", "runner.cascade_plan")
        self._wrap(self.engine.scheduler, "schedule", "scheduler.schedule")
        self._wrap(self.engine.scheduler, "schedule_continuation", "scheduler.schedule_continuation")
        self._wrap(self.engine.scheduler, "commit_step", "scheduler.commit_step")
        self._wrap(self.engine.output_processor, "process", "engine.process")
        self._wrap(self.engine.output_processor, "outputs", "engine.outputs")
        from yaie_jax.executor import sampling
        self._wrap(sampling, "build_sampling_batch", "sampling.build_sampling_batch")
        self._wrap(self.engine, "_fetch", "engine.fetch (device read)")
        dispatch = self.engine._dispatch
        self.timeline = []                    # one row per device call: what it held, when it was dispatched/read
        self._rows = {}                       # id(SchedulerOutput) -> its timeline row

        def dispatch_logged(out, *args, **kwargs):
            t0 = time.perf_counter() - self._w0
            before = {k: v[1] for k, v in self.parts.items()}
            inflight = dispatch(out, *args, **kwargs)
            parts_ms = {k: round(1e3 * (v[1] - before.get(k, 0.0)), 2) for k, v in self.parts.items()
                        if v[1] > before.get(k, 0.0)}
            self.timeline.append({"dispatch_ms": round(1e3 * t0, 2),
                                  "dispatched_ms": round(1e3 * (time.perf_counter() - self._w0), 2),
                                  "rows": len(out.scheduled), "tokens": out.num_batched_tokens,
                                  "steps": out.num_steps, "decode": out.is_decode_only, "parts_ms": parts_ms})
            self._rows[id(out)] = len(self.timeline) - 1
            return inflight
        fetch = self.engine._fetch

        def fetch_logged(inflight):
            result = fetch(inflight)
            row = self._rows.get(id(inflight.out))
            if row is not None:
                self.timeline[row]["read_ms"] = round(1e3 * (time.perf_counter() - self._w0), 2)
            return result
        self._restore.append((self.engine, "_dispatch", self.engine.__dict__.get("_dispatch")))
        self._restore.append((self.engine, "_fetch", self.engine.__dict__.get("_fetch")))
        self.engine._dispatch = dispatch_logged
        self.engine._fetch = fetch_logged
        compiled = runner.compiled

        def compiled_timed(*args, **kwargs):
            fn = self._timed("runner.compiled (lookup)", compiled)(*args, **kwargs)
            return self._timed("runner.program call", fn)
        self._restore.append((runner, "compiled", runner.__dict__.get("compiled")))
        runner.compiled = compiled_timed
        self._programs0 = len(runner.compile_log)
        self._threads = sorted(t.name for t in threading.enumerate())
        gc.callbacks.append(self.gc)
        self._w0, self._c0 = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self._w0
        self.cpu_s = time.thread_time() - self._c0
        gc.callbacks.remove(self.gc)
        for obj, attr, own in reversed(self._restore):
            if own is None:
                delattr(obj, attr)            # the wrapper hid the class's method
            else:
                setattr(obj, attr, own)       # an instance attribute (a jitted function)
        self.programs_compiled = len(self.engine.runner.compile_log) - self._programs0
        return False

    def summary(self) -> dict:
        return {"wall_s": self.wall_s, "main_thread_cpu_s": self.cpu_s,
                "gc_pauses": {str(g): {"count": n, "total_s": self.gc.pause_s[g], "max_s": self.gc.max_pause_s[g]}
                              for g, n in sorted(self.gc.collections.items()) if n},
                "threads_at_start": self._threads, "programs_compiled_during_pass": self.programs_compiled,
                "parts": {k: {"calls": v[0], "wall_s": v[1], "cpu_s": v[2]} for k, v in sorted(self.parts.items())},
                "timeline": self.timeline}
