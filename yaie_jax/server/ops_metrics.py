"""Operations metrics (vLLM-style names under `yaie:`), registered into an app's `ServerMetrics` registry.

At scrape time:
    yaie:device_memory_used_bytes{device,source}    gauge, JAX `memory_stats()["bytes_in_use"]` per device
    yaie:device_memory_total_bytes{device,source}   gauge, JAX `memory_stats()["bytes_limit"]` (the allocator's
                                                    pool, what the process may use) per device
    yaie:gpu_utilization_perc{device,source}        gauge, fraction in [0, 1] of time a kernel ran (NVML, over
                                                    the driver's sample period), per NVIDIA GPU
        source="jax" / "nvml" where measured; where nothing reports (a CPU, no NVML: the optional extra
        `[nvml]`, PyPI nvidia-ml-py), one sample device="none", source="unavailable", value 0.
    yaie:server_ready                               gauge, 1 when /ready would answer 200
    yaie:engine_stalled                             gauge, 1 while work waits and no step completes
    yaie:engine_stalls_total                        counter, entries into that state (readiness.py)
Observed:
    yaie:engine_step_duration_seconds               histogram, wall time of each engine step (engine thread)
    yaie:engine_step_batch_size                     histogram, sequences running at each step (the engine's
                                                    stats snapshot, at most ~50 ms old)
    yaie:http_requests_total{endpoint,status}       counter, every HTTP answer by status (unknown paths:
                                                    endpoint="other"); errors by status and code:
                                                    yaie:http_requests_rejected_total (metrics.py), which
                                                    also counts errors sent as a stream's error event
"""
from __future__ import annotations

import logging
import threading
from typing import List, Optional, Tuple

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .metrics import LATENCY_BUCKETS, ServerMetrics
from .readiness import ProgressMonitor
from .device_info import device_memory

logger = logging.getLogger("yaie_jax.server")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
KNOWN_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics",
                   "/version", "/tokenize", "/detokenize")
UNAVAILABLE = (("none", "unavailable", 0.0),)


class _NVML:
    """GPU utilization through NVML when `pynvml` (PyPI nvidia-ml-py) imports and a driver answers; else none."""

    def __init__(self):
        self._lock = threading.Lock()
        self._handles: Optional[list] = None
        self._nvml = None

    def _init(self) -> list:
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as e:      # no package, no driver, no GPU: the metric says "unavailable"
            logger.debug("NVML unavailable: %s", e)
            return []

    def utilization(self) -> List[Tuple[str, float]]:
        with self._lock:
            if self._handles is None:
                self._handles = self._init()
            out = []
            for i, h in enumerate(self._handles):
                try:
                    out.append((f"gpu{i}", self._nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0))
                except Exception:
                    continue
            return out


class _OpsCollector:
    def __init__(self, model_name: str, progress: ProgressMonitor):
        self.model_name = model_name
        self.progress = progress
        self.nvml = _NVML()

    def _per_device(self, name: str, doc: str, rows) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=["model_name", "device", "source"])
        for device, source, value in rows or UNAVAILABLE:
            g.add_metric([self.model_name, device, source], float(value or 0))
        return g

    def _one(self, cls, name: str, doc: str, value: float):
        m = cls(name, doc, labels=["model_name"])
        m.add_metric([self.model_name], float(value))
        return m

    def collect(self):
        mem = device_memory() or []
        yield self._per_device("yaie:device_memory_used_bytes", "Device memory in use (JAX allocator).",
                               [(d["device"], "jax", d.get("bytes_in_use")) for d in mem])
        yield self._per_device("yaie:device_memory_total_bytes", "Device memory the JAX allocator may use.",
                               [(d["device"], "jax", d.get("bytes_limit")) for d in mem])
        yield self._per_device("yaie:gpu_utilization_perc", "Fraction of time a GPU kernel ran (NVML).",
                               [(dev, "nvml", u) for dev, u in self.nvml.utilization()])
        ready, _, _ = self.progress.evaluate()
        yield self._one(GaugeMetricFamily, "yaie:server_ready", "1 when /ready answers 200.", 1 if ready else 0)
        yield self._one(GaugeMetricFamily, "yaie:engine_stalled", "1 while work waits and no engine step completes.",
                        1 if self.progress.stalled else 0)
        yield self._one(CounterMetricFamily, "yaie:engine_stalls", "Times the engine stalled (work waiting, no "
                                                                   "step for stall_timeout_s).",
                        self.progress.num_stalls)


class StatusCountMiddleware:
    """Pure ASGI: counts every HTTP answer by endpoint and status into `yaie:http_requests_total`."""

    def __init__(self, app, *, counter: Counter, model_name: str):
        self.app = app
        self.counter = counter
        self.model_name = model_name

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_ENDPOINTS or path.startswith("/v1/models/") else "other"
        endpoint = "/v1/models" if endpoint.startswith("/v1/models/") else endpoint
        counted = False

        async def counting_send(message):
            nonlocal counted
            if message["type"] == "http.response.start" and not counted:
                counted = True
                self.counter.labels(model_name=self.model_name, endpoint=endpoint,
                                    status=str(message["status"])).inc()
            await send(message)

        try:
            return await self.app(scope, receive, counting_send)
        except BaseException:
            if not counted:      # answered 500 by Starlette's outermost error middleware
                self.counter.labels(model_name=self.model_name, endpoint=endpoint, status="500").inc()
            raise


def register_ops_metrics(metrics: ServerMetrics, async_engine, progress: ProgressMonitor) -> Counter:
    """Add this module's metrics to `metrics.registry`; hooks the step observer of `async_engine`. Returns the
    `yaie:http_requests_total` counter (for `StatusCountMiddleware`)."""
    r, lab = metrics.registry, {"model_name": metrics.model_name}
    r.register(_OpsCollector(metrics.model_name, progress))
    step_s = Histogram("yaie:engine_step_duration_seconds", "Wall time of an engine step.", ["model_name"],
                       registry=r, buckets=LATENCY_BUCKETS)
    batch = Histogram("yaie:engine_step_batch_size", "Sequences running at an engine step.", ["model_name"],
                      registry=r, buckets=BATCH_BUCKETS)
    step_child, batch_child = step_s.labels(**lab), batch.labels(**lab)

    def observe_step(seconds: float) -> None:
        step_child.observe(seconds)
        batch_child.observe(int(async_engine.stats().get("num_running") or 0))

    async_engine.step_observer = observe_step
    return Counter("yaie:http_requests", "HTTP answers by endpoint and status.", ["model_name", "endpoint", "status"],
                   registry=r)


__all__ = ["register_ops_metrics", "StatusCountMiddleware", "KNOWN_ENDPOINTS"]
