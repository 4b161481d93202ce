"""A real Prometheus (Debian package `prometheus`) scrapes a running server with deploy/prometheus/alerts.yml loaded,
and YaieEngineStalled fires once a stall is provoked (the fake engine's steps hang while a request waits)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time

import httpx
import pytest
from conftest import live_server
from fake_engine import FakeEngine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALERTS = os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        msg = "`prometheus` not found: install it with `apt-get install -y prometheus` (Debian package prometheus)"
        if os.environ.get("YAIE_REQUIRE_OPS_TOOLS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def firing(prom_url: str) -> set:
    alerts = httpx.get(prom_url + "/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def test_prometheus_scrapes_and_the_stall_alert_fires(tmp_path):
    exe = prometheus_binary()
    engine = FakeEngine()
    with live_server(engine, stall_timeout_s=0.5) as srv:
        shutil.copy(ALERTS, tmp_path / "alerts.yml")
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\nrule_files: [alerts.yml]\n"
            f"scrape_configs:\n  - job_name: yaie\n    static_configs: [{{targets: ['127.0.0.1:{srv.port}']}}]\n")
        port = free_port()
        prom_url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([exe, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 40

            def wait(pred, what):
                while not pred():
                    assert proc.poll() is None, proc.stderr.read()
                    assert time.monotonic() < deadline, what
                    time.sleep(0.25)

            def scraped_up():
                try:
                    r = httpx.get(prom_url + "/api/v1/query", params={"query": "yaie:engine_loop_alive"}, timeout=5)
                except httpx.HTTPError:
                    return False
                return r.status_code == 200 and bool(r.json()["data"]["result"])

            wait(scraped_up, "Prometheus did not scrape the server")
            assert "YaieEngineStalled" not in firing(prom_url)
            engine.hang_steps.set()
            t = threading.Thread(target=lambda: srv.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}))
            t.start()
            wait(lambda: "YaieEngineStalled" in firing(prom_url), "the stall alert did not fire")
            engine.hang_steps.clear()
            t.join(10)
        finally:
            proc.terminate()
            proc.wait(10)
