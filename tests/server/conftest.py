"""Live-server fixtures: a real uvicorn on a free port in a background thread, around a FakeEngine.

`live_server(engine=None, log_stream=None, **server_settings)` is a context manager yielding a `LiveServer`
(`.url`, `.base_url`, `.client()`, `.aclient()`, `.health()`, `.metrics()`, `.wait_idle()`); the module-scoped
`server` fixture is a default one shared by tests that do not need special settings.

Set YAIE_SERVER_TEST_ENGINE=real to run the engine-agnostic tests (marked `any_engine`) against the real
LLMEngine on a tiny random GPT-2 (tests/support.py) instead of the fake.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from fake_engine import FakeEngine  # noqa: E402

from yaie_jax.engine.async_engine import AsyncEngine  # noqa: E402
from yaie_jax.server.app import create_app  # noqa: E402
from yaie_jax.server.settings import ServerSettings  # noqa: E402

REAL = os.environ.get("YAIE_SERVER_TEST_ENGINE", "fake") == "real"


class LiveServer:
    def __init__(self, engine, settings: ServerSettings, log_stream=None):
        self.engine = engine
        self.settings = settings
        self.async_engine = AsyncEngine(engine, max_waiting_requests=settings.max_waiting_requests)
        self.app = create_app(self.async_engine, settings, log_stream=log_stream)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.http = httpx.Client(timeout=30)      # one client: building one per call costs ~0.3 s (TLS setup)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def model(self) -> str:
        return self.async_engine.model_name

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(15)

    def client(self, api_key: str = "test", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=kw.pop("timeout", 60),
                             **kw)

    def aclient(self, api_key: str = "test", **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0,
                                  timeout=kw.pop("timeout", 60), **kw)

    def health(self) -> httpx.Response:
        return self.http.get(self.url + "/health")

    def metrics(self) -> str:
        r = self.http.get(self.url + "/metrics")
        assert r.status_code == 200
        return r.text

    def post(self, path: str, **kw) -> httpx.Response:
        return self.http.post(self.url + path, **kw)

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Poll /health until nothing is active, running or waiting; returns the last health body."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health().json()
            if h["active_requests"] == 0 and not h["num_running"] and not h["num_waiting"]:
                return h
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout}s: {h}")
            time.sleep(0.02)


def make_real_engine():
    import support
    from yaie_jax.engine.core import LLMEngine
    path = support.make_gpt2_dir(os.path.join(os.environ.get("TMPDIR", "/tmp"), "yaie_server_tiny_gpt2"),
                                 n_positions=256)
    return LLMEngine(model=path, dtype="float32", max_num_seqs=32, num_gpu_blocks=256, block_size=16,
                     warmup=False, served_model_name="tiny-gpt2")


@contextlib.contextmanager
def live_server(engine=None, log_stream=None, **settings_kw):
    engine = engine if engine is not None else FakeEngine()
    srv = LiveServer(engine, ServerSettings(**settings_kw), log_stream=log_stream).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server():
    with live_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def any_server():
    """The fake engine, or the real one on a tiny GPT-2 with YAIE_SERVER_TEST_ENGINE=real."""
    engine = make_real_engine() if REAL else FakeEngine()
    with live_server(engine) as srv:
        yield srv


def pytest_configure(config):
    config.addinivalue_line("markers", "any_engine: engine-independent server test (also runs on the real "
                                       "engine with YAIE_SERVER_TEST_ENGINE=real)")


def pytest_collection_modifyitems(config, items):
    if not REAL:
        return
    skip = pytest.mark.skip(reason="fake-engine specific (YAIE_SERVER_TEST_ENGINE=real)")
    for item in items:
        if "tests/server" in str(item.fspath) and "any_engine" not in item.keywords:
            item.add_marker(skip)
