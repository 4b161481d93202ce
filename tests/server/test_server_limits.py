"""API keys (401), rate limit (429), waiting-queue cap and draining (503), dead engine loop (503)."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from conftest import live_server
from fake_engine import FakeEngine
from test_server_errors import assert_openai_error

HTTP = httpx.Client(timeout=30)   # shared: building a client per call costs ~0.3 s

BODY = {"prompt": "ab", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def keyed():
    with live_server(api_keys=["key-one", "key-two"]) as srv:
        yield srv


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": "Bearer"},
                                     {"authorization": "Basic key-one"}, {"x-api-key": "key-on"},
                                     {"x-api-key": "key-one-and-more"}, {"authorization": "key-one"}])
@pytest.mark.parametrize("method,path", [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                         ("GET", "/v1/models"), ("GET", "/v1/models/fake-model"),
                                         ("POST", "/v1/does-not-exist"), ("POST", "/tokenize"),
                                         ("POST", "/detokenize")])
def test_missing_or_wrong_key_is_401(keyed, headers, method, path):
    r = HTTP.request(method, keyed.url + path, json=BODY, headers=headers)
    err = assert_openai_error(r, 401, code="invalid_api_key")
    assert r.headers.get("www-authenticate") == "Bearer"
    assert "key-one" not in err["message"]


@pytest.mark.parametrize("headers", [{"authorization": "Bearer key-one"}, {"Authorization": "bearer key-two"},
                                     {"x-api-key": "key-two"}, {"X-API-Key": "key-one"}])
def test_valid_key_accepted(keyed, headers):
    r = HTTP.post(keyed.base_url + "/completions", json=BODY, headers=headers)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ab"


def test_open_endpoints_and_openai_client_with_keys(keyed):
    assert HTTP.get(keyed.url + "/health").status_code == 200
    assert HTTP.get(keyed.url + "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        keyed.client(api_key="nope").models.list()
    assert keyed.client(api_key="key-two").completions.create(model=keyed.model, prompt="ok", max_tokens=2,
                                                              temperature=0).choices[0].text == "ok"


def test_api_key_from_env_via_settings(monkeypatch):
    from yaie_jax.server.settings import load_settings
    s = load_settings([], {"YAIE_API_KEY": "env-key"})
    assert s.server.api_keys == ["env-key"]
    with live_server(api_keys=s.server.api_keys) as srv:
        r = HTTP.post(srv.base_url + "/completions", json=BODY, headers={"x-api-key": "env-key"})
        assert r.status_code == 200


def test_rate_limit_429_with_retry_after():
    with live_server(api_keys=["k1", "k2"], rate_limit_rpm=60, rate_limit_burst=2) as srv:
        h1 = {"authorization": "Bearer k1"}
        assert HTTP.post(srv.base_url + "/completions", json=BODY, headers=h1).status_code == 200
        assert HTTP.post(srv.base_url + "/completions", json=BODY, headers=h1).status_code == 200
        r = HTTP.post(srv.base_url + "/completions", json=BODY, headers=h1)
        assert_openai_error(r, 429, code="rate_limit_exceeded", type_="requests")
        assert int(r.headers["retry-after"]) >= 1
        # another key has its own bucket
        assert HTTP.post(srv.base_url + "/completions", json=BODY, headers={"x-api-key": "k2"}).status_code == 200
        with pytest.raises(openai.RateLimitError):
            srv.client(api_key="k1").completions.create(model=srv.model, prompt="x", max_tokens=1)
        # the bucket refills at 1 request/s
        time.sleep(1.05)
        assert HTTP.post(srv.base_url + "/completions", json=BODY, headers=h1).status_code == 200
        # health and metrics are never rate limited
        for _ in range(5):
            assert HTTP.get(srv.url + "/health").status_code == 200


def test_rate_limit_per_client_address_without_keys():
    with live_server(rate_limit_rpm=30, rate_limit_burst=1) as srv:
        assert srv.post("/v1/completions", json=BODY).status_code == 200
        assert_openai_error(srv.post("/v1/completions", json=BODY), 429, code="rate_limit_exceeded",
                            type_="requests")


def _wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def test_queue_cap_503_with_retry_after():
    engine = FakeEngine()
    engine.paused = True                      # nothing gets scheduled: requests stay waiting
    with live_server(engine, max_waiting_requests=2, retry_after_s=3) as srv:
        results = []

        def fire():
            results.append(srv.post("/v1/completions", json=BODY, timeout=30))

        threads = [threading.Thread(target=fire) for _ in range(2)]
        for t in threads:
            t.start()
        _wait(lambda: srv.health().json()["queue_length"] >= 2)
        r = srv.post("/v1/completions", json=BODY)
        err = assert_openai_error(r, 503, code="queue_full", type_="server_error")
        assert r.headers["retry-after"] == "3" and "waiting" in err["message"]
        with pytest.raises(openai.InternalServerError):
            srv.client().chat.completions.create(model=srv.model, messages=[{"role": "user", "content": "x"}])
        engine.paused = False
        for t in threads:
            t.join(10)
        assert [r.status_code for r in results] == [200, 200]
        srv.wait_idle()
        assert srv.post("/v1/completions", json=BODY).status_code == 200


def test_draining_refuses_new_requests_but_finishes_running_ones():
    engine = FakeEngine(step_delay_s=0.01)
    with live_server(engine) as srv:
        out = {}

        def long_request():
            out["r"] = srv.post("/v1/completions", json={"prompt": "drain", "max_tokens": 40, "temperature": 0})

        t = threading.Thread(target=long_request)
        t.start()
        _wait(lambda: srv.health().json()["num_running"] == 1)
        srv.async_engine.begin_drain()
        r = srv.post("/v1/completions", json=BODY)
        assert_openai_error(r, 503, code="draining", type_="server_error")
        assert "retry-after" in r.headers
        h = srv.health()
        assert h.status_code == 503 and h.json()["status"] == "draining"
        t.join(10)
        assert out["r"].status_code == 200 and out["r"].json()["usage"]["completion_tokens"] == 40


def test_dead_engine_loop_answers_503():
    engine = FakeEngine(step_delay_s=0.005)
    with live_server(engine) as srv:
        assert srv.post("/v1/completions", json=BODY).status_code == 200
        engine.fail_next_step = True
        r = srv.post("/v1/completions", json=BODY)
        assert_openai_error(r, 503, code="engine_dead", type_="server_error")
        h = srv.health()
        assert h.status_code == 503
        assert h.json()["engine_loop_alive"] is False and h.json()["status"] == "dead"
        assert "injected" in h.json()["error"]
        # new requests, streamed or not, are refused cleanly
        assert_openai_error(srv.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                                   "stream": True}), 503, code="engine_dead",
                            type_="server_error")
        assert 'yaie:engine_loop_alive{model_name="fake-model"} 0.0' in srv.metrics()


def test_dead_engine_mid_stream_sends_error_event():
    engine = FakeEngine(step_delay_s=0.01)
    with live_server(engine) as srv:
        with httpx.stream("POST", srv.base_url + "/completions",
                          json={"prompt": "boom", "max_tokens": 200, "stream": True}, timeout=30) as r:
            lines = []
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    if len(lines) == 2:
                        engine.fail_next_step = True
        assert lines[-1] == "data: [DONE]"
        assert '"engine_dead"' in lines[-2]
