"""Prometheus metrics with vLLM-like names under a `yaie:` prefix, in a `CollectorRegistry` per app.

Request-path metrics (observed by the server as outputs arrive; label `model_name`):
    yaie:time_to_first_token_seconds     histogram  arrival at the server -> first generated token
    yaie:inter_token_latency_seconds     histogram  gap between consecutive streamed tokens of a sequence
                                                    (for a non-streamed request: its mean gap, once)
    yaie:time_per_output_token_seconds   histogram  per finished sequence: (finish - first token) / (tokens - 1)
    yaie:e2e_request_latency_seconds     histogram  arrival -> finish, per engine request (one prompt)
    yaie:request_prompt_tokens / yaie:request_generation_tokens   histograms per engine request
    yaie:prompt_tokens_total, yaie:generation_tokens_total        counters
    yaie:request_success_total{finished_reason}                   counter per finished sequence
    yaie:http_requests_rejected_total{status,code}                counter of 4xx/5xx answers

Engine-state metrics (read from the AsyncEngine's latest `get_stats()` snapshot at scrape time):
    yaie:num_requests_running, yaie:num_requests_waiting, yaie:num_requests_swapped   gauges
    yaie:kv_cache_usage_perc          gauge, fraction in [0, 1] of KV blocks in use (vLLM's name and unit)
    yaie:prefix_cache_queries_total   counter, prompt tokens looked up in the prefix cache
    yaie:prefix_cache_hits_total      counter, of which served from the cache
    yaie:num_preemptions_total        counter
    yaie:engine_loop_alive            gauge, 1 while the engine thread runs
    yaie:active_requests              gauge, requests admitted and not finished (server side)
"""
from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineStatsCollector:
    """Turns the engine stats snapshot into metric families at scrape time (no background updater)."""

    def __init__(self, model_name: str, stats_fn: Callable[[], dict], health_fn: Callable[[], dict],
                 quantization: Optional[str] = None):
        self.model_name = model_name
        self.quantization = quantization or "none"
        self.stats_fn = stats_fn
        self.health_fn = health_fn

    def _gauge(self, name: str, doc: str, value) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=["model_name"])
        g.add_metric([self.model_name], float(value or 0))
        return g

    def _counter(self, name: str, doc: str, value) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=["model_name"])
        c.add_metric([self.model_name], float(value or 0))
        return c

    def collect(self):
        s = self.stats_fn() or {}
        h = self.health_fn() or {}
        total = s.get("kv_blocks_total") or 0
        free = s.get("kv_blocks_free")
        if "kv_cache_usage" in s:
            usage = s["kv_cache_usage"]
        elif total and free is not None:
            usage = 1.0 - free / total
        else:
            usage = 0.0
        yield self._gauge("yaie:num_requests_running", "Sequences in the running batch.", s.get("num_running"))
        yield self._gauge("yaie:num_requests_waiting", "Sequences waiting to be scheduled.", s.get("num_waiting"))
        yield self._gauge("yaie:num_requests_swapped", "Sequences swapped out to host memory.",
                          s.get("num_swapped"))
        yield self._gauge("yaie:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", usage)
        yield self._counter("yaie:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            s.get("prefix_cache_queried_tokens"))
        yield self._counter("yaie:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                            s.get("prefix_cache_hit_tokens"))
        yield self._counter("yaie:num_preemptions", "Sequences preempted (swapped or recomputed).",
                            s.get("num_preemptions"))
        yield self._gauge("yaie:engine_loop_alive", "1 while the engine thread is stepping.",
                          1 if h.get("engine_loop_alive") else 0)
        yield self._gauge("yaie:active_requests", "Requests admitted and not finished.", h.get("active_requests"))
        info = GaugeMetricFamily("yaie:model_quantization_info", "1, labelled with the weights' quantization "
                                 "(int8, int4, fp8 or none).", labels=["model_name", "quantization"])
        info.add_metric([self.model_name, self.quantization], 1.0)
        yield info


class ServerMetrics:
    """All metrics of one app, in their own registry (so tests can build many apps in one process)."""

    def __init__(self, model_name: str, stats_fn: Optional[Callable[[], dict]] = None,
                 health_fn: Optional[Callable[[], dict]] = None, quantization: Optional[str] = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        r, L = self.registry, ["model_name"]
        self.ttft = Histogram("yaie:time_to_first_token_seconds", "Time to first token.", L, registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("yaie:inter_token_latency_seconds", "Time between consecutive output tokens.", L,
                             registry=r, buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("yaie:time_per_output_token_seconds", "Mean time per output token of a sequence.",
                              L, registry=r, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("yaie:e2e_request_latency_seconds", "End-to-end request latency.", L, registry=r,
                             buckets=LATENCY_BUCKETS)
        self.req_prompt_tokens = Histogram("yaie:request_prompt_tokens", "Prompt tokens per request.", L,
                                           registry=r, buckets=TOKEN_BUCKETS)
        self.req_gen_tokens = Histogram("yaie:request_generation_tokens", "Generated tokens per request.", L,
                                        registry=r, buckets=TOKEN_BUCKETS)
        self.prompt_tokens = Counter("yaie:prompt_tokens", "Prompt tokens processed.", L, registry=r)
        self.generation_tokens = Counter("yaie:generation_tokens", "Tokens generated.", L, registry=r)
        self.success = Counter("yaie:request_success", "Finished sequences by finish reason.",
                               L + ["finished_reason"], registry=r)
        self.rejected = Counter("yaie:http_requests_rejected", "Requests answered with an error status.",
                                L + ["status", "code"], registry=r)
        self._lab = {"model_name": model_name}
        if stats_fn is not None:
            r.register(_EngineStatsCollector(model_name, stats_fn, health_fn or (lambda: {}), quantization))

    # -------------------------------------------------------------------------------------------- observers
    def observe_ttft(self, seconds: float) -> None:
        self.ttft.labels(**self._lab).observe(max(0.0, seconds))

    def observe_itl(self, seconds: float) -> None:
        self.itl.labels(**self._lab).observe(max(0.0, seconds))

    def observe_sequence_finished(self, reason: Optional[str], num_tokens: int, first_token_s: Optional[float],
                                  finish_s: Optional[float]) -> None:
        """One finished sequence (choice); times are seconds since the request's arrival."""
        self.success.labels(finished_reason=reason or "unknown", **self._lab).inc()
        if num_tokens > 1 and first_token_s is not None and finish_s is not None:
            self.tpot.labels(**self._lab).observe(max(0.0, finish_s - first_token_s) / (num_tokens - 1))

    def observe_request_finished(self, prompt_tokens: int, generation_tokens: int, e2e_s: float) -> None:
        """One engine request (one prompt, all its choices)."""
        lab = self._lab
        self.prompt_tokens.labels(**lab).inc(prompt_tokens)
        self.generation_tokens.labels(**lab).inc(generation_tokens)
        self.req_prompt_tokens.labels(**lab).observe(prompt_tokens)
        self.req_gen_tokens.labels(**lab).observe(generation_tokens)
        self.e2e.labels(**lab).observe(max(0.0, e2e_s))

    def observe_rejected(self, status: int, code: Optional[str]) -> None:
        self.rejected.labels(status=str(status), code=code or "none", **self._lab).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    content_type = CONTENT_TYPE_LATEST


__all__ = ["ServerMetrics", "LATENCY_BUCKETS", "CONTENT_TYPE_LATEST"]
