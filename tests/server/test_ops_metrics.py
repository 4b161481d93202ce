"""The operations metrics (ops_metrics.py): device memory and GPU utilization per device (JAX memory_stats, NVML;
"unavailable" samples where nothing reports), step time and batch size histograms, answers by status and errors
by status and code."""
from __future__ import annotations

import sys
import types

import jax
from conftest import live_server
from fake_engine import FakeEngine
from test_readiness import samples

BODY = {"prompt": "count me", "max_tokens": 6, "temperature": 0}


def test_step_histograms_and_status_counters():
    with live_server(FakeEngine(step_delay_s=0.003)) as srv:
        for _ in range(3):
            assert srv.post("/v1/completions", json=BODY).status_code == 200
        assert srv.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}).status_code == 400
        assert srv.http.get(srv.url + "/nope").status_code == 404
        m = srv.metrics()
        steps = samples(m, "yaie:engine_step_duration_seconds_count")[()]
        assert steps >= 6                                        # each request needs >= 6 steps, one at a time
        assert samples(m, "yaie:engine_step_duration_seconds_sum")[()] >= steps * 0.003
        assert samples(m, "yaie:engine_step_batch_size_count")[()] == steps
        assert samples(m, "yaie:engine_step_batch_size_bucket")[(("le", "1.0"),)] >= 1
        totals = samples(m, "yaie:http_requests_total")
        assert totals[(("endpoint", "/v1/completions"), ("status", "200"))] == 3
        assert totals[(("endpoint", "/v1/completions"), ("status", "400"))] == 1
        assert totals[(("endpoint", "other"), ("status", "404"))] == 1
        rejected = samples(m, "yaie:http_requests_rejected_total")
        assert rejected[(("code", "not_found"), ("status", "404"))] == 1
        assert sum(v for k, v in rejected.items() if dict(k)["status"] == "400") == 1


def test_device_metrics_unavailable_on_cpu():
    with live_server(FakeEngine()) as srv:
        m = srv.metrics()
        for name in ("yaie:device_memory_used_bytes", "yaie:device_memory_total_bytes", "yaie:gpu_utilization_perc"):
            assert samples(m, name) == {(("device", "none"), ("source", "unavailable")): 0.0}, name


class _Dev:
    def __init__(self, name, used, limit):
        self.name, self.stats = name, {"bytes_in_use": used, "bytes_limit": limit, "peak_bytes_in_use": used}

    def memory_stats(self):
        return self.stats

    def __str__(self):
        return self.name


def test_device_memory_and_nvml_utilization(monkeypatch):
    monkeypatch.setattr(jax, "local_devices", lambda: [_Dev("cuda:0", 10, 100), _Dev("cuda:1", 97, 100)])
    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetCount = lambda: 2
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=[35, 80][h], memory=0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with live_server(FakeEngine()) as srv:
        m = srv.metrics()
        assert samples(m, "yaie:device_memory_used_bytes") == {(("device", "cuda:0"), ("source", "jax")): 10.0,
                                                                (("device", "cuda:1"), ("source", "jax")): 97.0}
        assert samples(m, "yaie:device_memory_total_bytes")[(("device", "cuda:1"), ("source", "jax"))] == 100.0
        assert samples(m, "yaie:gpu_utilization_perc") == {(("device", "gpu0"), ("source", "nvml")): 0.35,
                                                           (("device", "gpu1"), ("source", "nvml")): 0.8}
        h = srv.health().json()
        assert h["gpu_memory"] == {"bytes_in_use": 107, "bytes_limit": 200, "num_devices": 2}
        assert [d["device"] for d in h["device_memory"]] == ["cuda:0", "cuda:1"]


def test_an_error_sent_mid_stream_is_counted_and_ends_each_sample():
    import httpx
    engine = FakeEngine(step_delay_s=0.01)
    with live_server(engine) as srv:
        with httpx.stream("POST", srv.base_url + "/completions", timeout=30,
                          json={"prompt": "boom", "max_tokens": 200, "stream": True, "n": 2}) as r:
            lines = []
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    if len(lines) == 3:
                        engine.fail_next_step = True
        assert lines[-1] == "data: [DONE]" and '"engine_dead"' in lines[-2]
        ends = [line for line in lines if '"finish_reason":"abort"' in line]
        assert len(ends) == 2                                     # one last chunk per sample, then the error
        assert samples(srv.metrics(), "yaie:http_requests_rejected_total") == {
            (("code", "engine_dead"), ("status", "503")): 1.0}
