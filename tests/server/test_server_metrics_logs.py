"""/metrics parses with prometheus_client and counts what was served; one JSON log line per finished request."""
from __future__ import annotations

import io
import json

from conftest import live_server
from fake_engine import FakeEngine
from prometheus_client.parser import text_string_to_metric_families

from yaie_jax.server.metrics import ServerMetrics

EXPECTED_FAMILIES = {
    "yaie:time_to_first_token_seconds": "histogram",
    "yaie:inter_token_latency_seconds": "histogram",
    "yaie:time_per_output_token_seconds": "histogram",
    "yaie:e2e_request_latency_seconds": "histogram",
    "yaie:request_prompt_tokens": "histogram",
    "yaie:request_generation_tokens": "histogram",
    "yaie:prompt_tokens": "counter",
    "yaie:generation_tokens": "counter",
    "yaie:request_success": "counter",
    "yaie:num_requests_running": "gauge",
    "yaie:num_requests_waiting": "gauge",
    "yaie:num_requests_swapped": "gauge",
    "yaie:kv_cache_usage_perc": "gauge",
    "yaie:prefix_cache_queries": "counter",
    "yaie:prefix_cache_hits": "counter",
    "yaie:num_preemptions": "counter",
    "yaie:engine_loop_alive": "gauge",
    "yaie:active_requests": "gauge",
}


def parse(text: str) -> dict:
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return fams


def sample(fams, name: str, suffix: str = "", **labels) -> float:
    fam = fams[name]
    total = 0.0
    for s in fam.samples:
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


def test_metrics_parse_and_count(server):
    before = parse(server.metrics())
    for name, kind in EXPECTED_FAMILIES.items():
        assert name in before, name
        assert before[name].type == kind, (name, before[name].type)
    c = server.client()
    prompt = "count my tokens please"                        # 22 bytes, repeated: second one hits the cache
    c.completions.create(model=server.model, prompt=prompt, max_tokens=7, temperature=0)
    c.completions.create(model=server.model, prompt=prompt, max_tokens=7, temperature=0, stream=True)
    list(c.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                   temperature=0, stream=True))
    server.wait_idle()
    after = parse(server.metrics())
    chat_prompt_len = len("user: x\nassistant:")
    assert sample(after, "yaie:prompt_tokens", "_total") - sample(before, "yaie:prompt_tokens", "_total") \
        == 2 * len(prompt) + chat_prompt_len
    assert sample(after, "yaie:generation_tokens", "_total") - sample(before, "yaie:generation_tokens", "_total") \
        == 7 + 7 + 5
    for h in ("yaie:time_to_first_token_seconds", "yaie:e2e_request_latency_seconds"):
        assert sample(after, h, "_count") - sample(before, h, "_count") == 3
    # streamed tokens give inter-token gaps: (7 - 1) + (5 - 1) at least, plus the non-streamed request's mean
    assert sample(after, "yaie:inter_token_latency_seconds", "_count") \
        - sample(before, "yaie:inter_token_latency_seconds", "_count") >= 10
    assert sample(after, "yaie:request_success", "_total", finished_reason="length") \
        - sample(before, "yaie:request_success", "_total", finished_reason="length") == 3
    assert sample(after, "yaie:prefix_cache_hits", "_total") > sample(before, "yaie:prefix_cache_hits", "_total")
    assert sample(after, "yaie:prefix_cache_queries", "_total") \
        >= sample(after, "yaie:prefix_cache_hits", "_total")
    assert sample(after, "yaie:engine_loop_alive") == 1
    assert all(s.labels.get("model_name") == "fake-model" for f in after.values() for s in f.samples
               if f.name.startswith("yaie:"))


def test_rejections_are_counted(server):
    before = parse(server.metrics())
    server.post("/v1/completions", json={"prompt": "x", "temperature": 9})
    after = parse(server.metrics())
    assert sample(after, "yaie:http_requests_rejected", "_total", status="400") \
        - sample(before, "yaie:http_requests_rejected", "_total", status="400") == 1


def test_registry_per_app_allows_many_apps():
    a = ServerMetrics("a", stats_fn=lambda: {"num_running": 3})
    b = ServerMetrics("b", stats_fn=lambda: {"num_running": 5})
    a.observe_request_finished(10, 4, 0.5)
    fa, fb = parse(a.render().decode()), parse(b.render().decode())
    assert sample(fa, "yaie:num_requests_running") == 3 and sample(fb, "yaie:num_requests_running") == 5
    assert sample(fa, "yaie:prompt_tokens", "_total") == 10 and sample(fb, "yaie:prompt_tokens", "_total") == 0


def test_json_request_log_lines():
    buf = io.StringIO()
    with live_server(FakeEngine(), log_stream=buf) as srv:
        c = srv.client()
        c.completions.create(model=srv.model, prompt="log me", max_tokens=3, temperature=0)
        list(c.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": "ab|"}],
                                       max_tokens=50, temperature=0, stream=True, n=2))
        srv.post("/v1/completions", json={"prompt": "x", "n": 0})
        srv.wait_idle()
    lines = [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]
    finished = [x for x in lines if x["event"] == "request_finished"]
    rejected = [x for x in lines if x["event"] == "request_rejected"]
    assert len(finished) == 2 and len(rejected) == 1
    first, second = finished
    for rec in finished:
        for key in ("request_id", "model", "prompt_tokens", "completion_tokens", "ttft_s", "latency_s",
                    "finish_reason", "timestamp", "level"):
            assert key in rec, key
        assert rec["model"] == "fake-model" and rec["ttft_s"] <= rec["latency_s"]
    assert first["request_id"].startswith("cmpl-") and first["prompt_tokens"] == 6
    assert first["completion_tokens"] == 3 and first["finish_reason"] == "length" and first["stream"] is False
    assert second["request_id"].startswith("chatcmpl-") and second["n"] == 2 and second["stream"] is True
    assert second["finish_reason"] == "stop"            # "user: ab|..." is echoed up to the "|" (EOS)
    assert rejected[0]["status"] == 400
