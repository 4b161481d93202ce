"""Prometheus metrics with vLLM-like names under a `yaie:` prefix, in a registry per app."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                   40.0, 80.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, L = self.registry, ["model_name"]
        self.labels = {"model_name": model_name}
        self.ttft = Histogram("yaie:time_to_first_token_seconds", "Time to first token", L, registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("yaie:inter_token_latency_seconds", "Time between output tokens", L, registry=r,
                             buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("yaie:e2e_request_latency_seconds", "End-to-end request latency", L, registry=r,
                             buckets=LATENCY_BUCKETS)
        self.prompt_tokens = Counter("yaie:prompt_tokens", "Prompt tokens processed", L, registry=r)
        self.generation_tokens = Counter("yaie:generation_tokens", "Tokens generated", L, registry=r)
        self.requests = Counter("yaie:request_success", "Finished requests", L + ["finished_reason"], registry=r)
        self.running = Gauge("yaie:num_requests_running", "Sequences running", L, registry=r)
        self.waiting = Gauge("yaie:num_requests_waiting", "Sequences waiting", L, registry=r)
        self.swapped = Gauge("yaie:num_requests_swapped", "Sequences swapped to host", L, registry=r)
        self.kv_usage = Gauge("yaie:kv_cache_usage_perc", "KV cache usage (0-1)", L, registry=r)
        self.prefix_queries = Gauge("yaie:prefix_cache_queries", "Prefix cache queried tokens (total)", L, registry=r)
        self.prefix_hits = Gauge("yaie:prefix_cache_hits", "Prefix cache hit tokens (total)", L, registry=r)
        self.preemptions = Gauge("yaie:num_preemptions", "Preemptions (total)", L, registry=r)

    def update_from_stats(self, stats: dict) -> None:
        lab = self.labels
        self.running.labels(**lab).set(stats.get("num_running", 0))
        self.waiting.labels(**lab).set(stats.get("num_waiting", 0))
        self.swapped.labels(**lab).set(stats.get("num_swapped", 0))
        self.kv_usage.labels(**lab).set(stats.get("kv_cache_usage", 0.0))
        self.prefix_queries.labels(**lab).set(stats.get("prefix_cache_queried_tokens", 0))
        self.prefix_hits.labels(**lab).set(stats.get("prefix_cache_hit_tokens", 0))
        self.preemptions.labels(**lab).set(stats.get("num_preemptions", 0))

    def observe_finished(self, prompt_tokens: int, completion_tokens: int, ttft_s, e2e_s, reason: str) -> None:
        lab = self.labels
        self.prompt_tokens.labels(**lab).inc(prompt_tokens)
        self.generation_tokens.labels(**lab).inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.labels(**lab).observe(ttft_s)
            if completion_tokens > 1 and e2e_s is not None:
                self.itl.labels(**lab).observe(max(0.0, e2e_s - ttft_s) / (completion_tokens - 1))
        if e2e_s is not None:
            self.e2e.labels(**lab).observe(e2e_s)
        self.requests.labels(finished_reason=reason or "unknown", **lab).inc()
