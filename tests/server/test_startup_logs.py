"""Start-up logs of `python -m yaie_jax.serve` (engine build begun / built, app started, first answer, each with
the seconds since the process started; the engine build's profile with YAIE_STARTUP_PROFILE=1), and the stack
sampler behind the profile."""
from __future__ import annotations

import os
import re
import signal
import sys
import time

import httpx

from yaie_jax.server.logging import StackSampler, process_age_s

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_server_serve_cli import start_server  # noqa: E402


def test_stage_lines_and_profile(monkeypatch):
    monkeypatch.setenv("YAIE_STARTUP_PROFILE", "1")
    proc, url = start_server("--log-level", "info")
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    log = out + err
    ages = {}
    for stage in ("building the engine,", "engine built in [0-9.]+ s,", "app started,", "first request answered,"):
        m = re.search(r"start-up: " + stage + r" ([0-9.]+) s after the process started", log)
        assert m, (stage, log[-3000:])
        ages[stage] = float(m.group(1))
    assert list(ages.values()) == sorted(ages.values()), ages
    assert "start-up profile of the engine build (main thread, cumulative s by function)" in log


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_stack_sampler_attributes_time_to_functions():
    sampler = StackSampler(interval_s=0.01, roots=("server",), skip_files=()).start()
    _busy(0.4)
    profile = dict((where, sec) for sec, where in sampler.stop())
    assert 0.2 <= profile.get("test_startup_logs.py:_busy", 0) <= 0.6, profile
    assert sampler.samples > 10


def test_process_age():
    age = process_age_s()
    assert age is None or 0 <= age < 24 * 3600
