"""/health (liveness) and /ready (readiness) the way orchestrators probe them; forward-progress detection counted in
/metrics; a client that disconnects mid-upload is a quiet 499."""
from __future__ import annotations

import logging
import socket
import threading
import time

from conftest import live_server
from fake_engine import FakeEngine
from prometheus_client.parser import text_string_to_metric_families

BODY = {"prompt": "hello", "max_tokens": 5, "temperature": 0}


def samples(text: str, name: str) -> dict:
    """{labels tuple: value} of the samples called `name`."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))] = s.value
    return out


def wait_for(pred, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_ready_and_health_when_serving():
    with live_server(FakeEngine()) as srv:
        r = srv.http.get(srv.url + "/ready")
        assert r.status_code == 200 and r.json() == {"ready": True, "reasons": [], "status": "ok",
                                                     "model": "fake-model"}
        h = srv.health().json()
        assert h["ready"] is True and h["stalled"] is False and h["not_ready_reasons"] == []
        assert "gpu_memory" in h and "device_memory" in h          # None on the CPU: JAX reports no statistics
        assert h["last_progress_age_s"] >= 0
        assert samples(srv.metrics(), "yaie:server_ready") == {(): 1.0}


def test_ready_turns_503_the_moment_draining_starts():
    engine = FakeEngine(step_delay_s=0.01)
    with live_server(engine) as srv:
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", srv.post("/v1/completions", json={
            "prompt": "drain", "max_tokens": 30, "temperature": 0})))
        t.start()
        wait_for(lambda: srv.health().json()["num_running"] == 1)
        srv.async_engine.begin_drain()
        r = srv.http.get(srv.url + "/ready")
        assert r.status_code == 503 and r.json()["reasons"] == ["draining"] and "retry-after" in r.headers
        t.join(10)
        assert out["r"].status_code == 200                     # the running request still finishes


def test_not_ready_while_a_startup_program_compiles():
    engine = FakeEngine()
    with live_server(engine) as srv:
        engine.compiling = [{"program": "decode S=8 T=8", "sampling": "greedy", "seconds": 1.0,
                             "reason": "start-up (background): a first chat request's greedy program"}]
        r = srv.http.get(srv.url + "/ready")
        assert r.status_code == 503 and r.json()["reasons"] == ["compiling 1 start-up program(s)"]
        assert srv.health().status_code == 200                  # alive meanwhile
        engine.compiling = [{"program": "prefill T=128", "sampling": "greedy", "seconds": 1.0,
                             "reason": "warm-up (background)"}]   # a later bucket: steps pad meanwhile
        assert srv.http.get(srv.url + "/ready").status_code == 200


def test_stalled_engine_is_not_ready_and_counted():
    engine = FakeEngine()
    with live_server(engine, stall_timeout_s=0.3) as srv:
        assert srv.post("/v1/completions", json=BODY).status_code == 200
        assert samples(srv.metrics(), "yaie:engine_stalls_total") == {(): 0.0}
        engine.hang_steps.set()
        t = threading.Thread(target=lambda: srv.post("/v1/completions", json=BODY))
        t.start()
        wait_for(lambda: srv.http.get(srv.url + "/ready").status_code == 503)
        reasons = srv.http.get(srv.url + "/ready").json()["reasons"]
        assert len(reasons) == 1 and reasons[0].startswith("stalled: no step completed")
        h = srv.health()
        assert h.status_code == 200 and h.json()["stalled"] is True     # liveness: the loop thread is alive
        m = srv.metrics()
        assert samples(m, "yaie:engine_stalled") == {(): 1.0} and samples(m, "yaie:engine_stalls_total") == {(): 1.0}
        engine.hang_steps.clear()
        t.join(10)
        wait_for(lambda: srv.http.get(srv.url + "/ready").status_code == 200)
        m = srv.metrics()
        assert samples(m, "yaie:engine_stalled") == {(): 0.0} and samples(m, "yaie:engine_stalls_total") == {(): 1.0}


def test_idle_server_is_never_stalled():
    with live_server(FakeEngine(), stall_timeout_s=0.2) as srv:
        time.sleep(0.6)                   # nothing to do for longer than the timeout: not a stall
        assert srv.http.get(srv.url + "/ready").status_code == 200
        assert samples(srv.metrics(), "yaie:engine_stalls_total") == {(): 0.0}


def test_client_disconnect_mid_upload_is_a_quiet_499(caplog):
    with live_server(FakeEngine()) as srv:
        with caplog.at_level(logging.INFO):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n" + b'{"prompt":')
            time.sleep(0.2)
            s.close()
            wait_for(lambda: samples(srv.metrics(), "yaie:http_requests_rejected_total"))
        rejected = samples(srv.metrics(), "yaie:http_requests_rejected_total")
        assert rejected == {(("code", "client_disconnected"), ("status", "499")): 1.0}
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        assert "client disconnected before its request body was read" in caplog.text
        totals = samples(srv.metrics(), "yaie:http_requests_total")
        assert totals.get((("endpoint", "/v1/completions"), ("status", "499"))) == 1.0
        assert not any(dict(k)["status"] == "500" for k in totals)
