"""`python -m yaie_jax.serve` as a process (SIGTERM drains, bounded), and the `yaie` CLI (serve, chat)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from yaie_jax import cli

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*flags, step_delay_s: float = 0.01):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "FAKE_STEP_DELAY_S": str(step_delay_s), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "yaie_jax.serve", "--engine-factory", "fake_engine:make_engine",
                             "--port", str(port), "--log-level", "warning", *flags],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except (OSError, httpx.HTTPError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate(timeout=5)
            raise RuntimeError(f"server did not start: rc={proc.returncode}\n{out}\n{err}")
        time.sleep(0.05)


def test_sigterm_drains_in_flight_stream_then_exits_0():
    proc, url = start_server("--shutdown-timeout-s", "10", "--served-model-name", "served-fake")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert client.models.list().data[0].id == "served-fake"
        stream = client.completions.create(model="served-fake", prompt="drain me", max_tokens=60, temperature=0,
                                           stream=True)
        it = iter(stream)
        text = next(it).choices[0].text
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        finish = None
        for chunk in it:                     # the in-flight stream runs to its end
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
        assert finish == "length" and len(text) == 60
        rc = proc.wait(timeout=15)
        assert rc == 0, proc.stderr.read()
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert '"effective configuration"' not in out and "yaie_jax effective configuration" in out
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=1)


def test_sigterm_drain_is_bounded():
    proc, url = start_server("--shutdown-timeout-s", "1")
    try:
        got = []

        def long_stream():
            try:
                with httpx.stream("POST", url + "/v1/completions", timeout=30,
                                  json={"prompt": "forever", "max_tokens": 3000, "stream": True}) as r:
                    for line in r.iter_lines():
                        got.append(line)
            except httpx.HTTPError as e:
                got.append(repr(e))

        t = threading.Thread(target=long_stream)
        t.start()
        while not got:
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
        elapsed = time.monotonic() - t0
        t.join(10)
        assert rc == 0
        assert elapsed < 6, elapsed                  # 1 s drain bound + shutdown overhead, not 30 s of tokens
        assert "data: [DONE]" not in got[-3:] or any('"abort"' in g for g in got)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_usage_and_print_config(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["serve", "some/model", "--max-batch-size", "3", "--print-config"]) == 0
    out = capsys.readouterr().out.split("yaie_jax effective configuration:\n", 1)[1]
    cfg = json.loads(out[:out.rindex("}") + 1])
    assert cfg["engine"]["model"] == "some/model" and cfg["engine"]["max_num_seqs"] == 3
    assert cli.main(["chat", "--help"]) == 0


def test_chat_loop_with_local_engine():
    from fake_engine import FakeEngine

    from yaie_jax.sampling_params import SamplingParams
    inputs = iter(["hello", "", "/reset", "again", "/exit"])
    written = []
    respond = cli.local_responder(FakeEngine(), SamplingParams(temperature=0.0, max_tokens=12))
    turns = cli.chat_loop(respond, read_line=lambda prompt: next(inputs), write=written.append, system="sys")
    assert turns == 2
    out = "".join(written)
    # the echo model answers with the start of the templated conversation
    assert out.count("system: sys") == 2 and "(conversation cleared)" in out


def test_chat_subprocess_in_process_engine():
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "yaie_jax.cli", "chat", "--engine-factory", "fake_engine:make_engine",
                        "--temperature", "0", "--max-tokens", "8"], input="hello\n/exit\n", capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "user: he" in r.stdout


def test_chat_loop_against_server(server):
    from yaie_jax.sampling_params import SamplingParams
    inputs = iter(["hi there"])

    def read_line(prompt):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError

    written = []
    respond = cli.remote_responder(server.base_url, "x", None, SamplingParams(temperature=0.0, max_tokens=10))
    assert cli.chat_loop(respond, read_line=read_line, write=written.append) == 1
    assert "".join(written).startswith("user: hi t")
