"""A client that goes away (streaming or not, running or still waiting) aborts its request and frees its blocks."""
from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
from conftest import live_server
from fake_engine import FakeEngine
from prometheus_client.parser import text_string_to_metric_families


def metric_value(text: str, name: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


@pytest.fixture()
def slow():
    engine = FakeEngine(step_delay_s=0.01)
    with live_server(engine) as srv:
        yield srv


def assert_all_freed(srv, engine) -> None:
    h = srv.wait_idle(timeout=5)
    assert h["kv_blocks_free"] == h["kv_blocks_total"]
    m = srv.metrics()
    assert metric_value(m, "yaie:num_requests_running") == 0
    assert metric_value(m, "yaie:num_requests_waiting") == 0
    assert metric_value(m, "yaie:kv_cache_usage_perc") == 0
    assert metric_value(m, "yaie:active_requests") == 0


@pytest.mark.parametrize("endpoint,body", [
    ("/completions", {"prompt": "long answer", "max_tokens": 400, "stream": True}),
    ("/chat/completions", {"messages": [{"role": "user", "content": "long"}], "max_tokens": 400, "stream": True,
                           "n": 2}),
])
def test_stream_disconnect_aborts(slow, endpoint, body):
    engine = slow.engine
    aborted_before = engine.num_aborted
    with httpx.stream("POST", slow.base_url + endpoint, json=body, timeout=30) as r:
        lines = r.iter_lines()          # (breaking out of a `for` over it would already close the connection)
        seen = 0
        while seen < 3:
            seen += next(lines).startswith("data: ")
        assert slow.health().json()["active_requests"] == 1
    # leaving the context closes the connection mid-stream
    assert_all_freed(slow, engine)
    assert engine.num_aborted == aborted_before + 1
    assert engine.num_steps < 300               # it did not run to max_tokens


def test_non_stream_disconnect_aborts(slow):
    engine = slow.engine
    aborted_before = engine.num_aborted
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow.base_url + "/completions", json={"prompt": "x", "max_tokens": 400}, timeout=0.3)
    assert_all_freed(slow, engine)
    assert engine.num_aborted == aborted_before + 1


def test_raw_socket_reset_while_waiting_in_queue():
    engine = FakeEngine()
    engine.paused = True                      # the request never leaves the waiting queue
    with live_server(engine) as srv:
        body = b'{"prompt": "queued", "max_tokens": 5, "stream": true}'
        req = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(req)
        deadline = time.monotonic() + 5
        while srv.health().json()["num_waiting"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        s.close()
        assert_all_freed(srv, engine)
        assert engine.num_aborted == 1
        engine.paused = False


async def _cancel_async_streams(srv, k: int):
    c = srv.aclient()

    async def one(i):
        stream = await c.completions.create(model=srv.model, prompt=f"p{i}", max_tokens=400, stream=True)
        n = 0
        async for _ in stream:
            n += 1
            if n == 2 + i % 3:
                await stream.close()
                return n

    out = await asyncio.gather(*(one(i) for i in range(k)))
    await c.close()
    return out


def test_many_async_clients_closing_early(slow):
    engine = slow.engine
    before = engine.num_aborted
    asyncio.run(_cancel_async_streams(slow, 8))
    assert_all_freed(slow, engine)
    assert engine.num_aborted == before + 8


@pytest.mark.any_engine
def test_stream_disconnect_frees_blocks_any_engine(any_server):
    """Engine-agnostic: after a client leaves mid-stream nothing runs, waits or holds KV blocks."""
    body = {"prompt": "a few words to start", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", any_server.base_url + "/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        seen = 0
        while seen < 2:
            seen += next(lines).startswith("data: ")
    assert_all_freed(any_server, any_server.engine)
