"""A real server process (`python -m yaie_jax.serve`, the real engine on a tiny random GPT-2, CPU) drained by SIGTERM:
/ready turns 503 at once while the listener stays open, new requests get 503, and at the drain deadline every
stream still open gets finish_reason "abort", an OpenAI-shaped error event and `data: [DONE]`, every non-streamed
request a 503; the process exits 0."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

import support
from test_server_serve_cli import ROOT, free_port

NUM_STREAMS = 6
DRAIN_S = 1.5
MAX_TOKENS = 4000       # far more than a CPU decodes during the drain: every request is still running


def start_real_server(model_dir: str, cache_dir: str):
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "yaie_jax.serve", model_dir, "--port", str(port),
                             "--log-level", "warning", "--dtype", "float32", "--no-warmup",
                             "--attention-backend", "xla", "--compile-cache-dir", cache_dir, "--max-num-seqs", "16",
                             "--num-gpu-blocks", "2048", "--block-size", "16",
                             "--shutdown-timeout-s", str(DRAIN_S)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate(timeout=10)
            raise RuntimeError(f"server did not start: rc={proc.returncode}\n{out}\n{err}")
        time.sleep(0.1)


def test_sigterm_drain_deadline_ends_every_request_cleanly(tmp_path):
    model = support.make_gpt2_dir(str(tmp_path / "gpt2"), n_positions=4096)
    proc, url = start_real_server(model, str(tmp_path / "compile_cache"))
    body = {"prompt": "a b c", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    try:
        # compile the prefill and decode programs first, so the streams below are generating at SIGTERM
        assert httpx.post(url + "/v1/completions", json={**body, "max_tokens": 4}, timeout=300).status_code == 200
        streams = [[] for _ in range(NUM_STREAMS)]
        unstreamed = {}

        def stream(lines):
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                lines.extend(line for line in r.iter_lines() if line)

        def collect():
            unstreamed["r"] = httpx.post(url + "/v1/completions", json=body, timeout=60)

        threads = [threading.Thread(target=stream, args=(lines,)) for lines in streams]
        threads.append(threading.Thread(target=collect))
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while not all(len(lines) >= 2 for lines in streams):
            assert time.monotonic() < deadline, [len(x) for x in streams]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        while httpx.get(url + "/ready", timeout=5).status_code == 200:      # the listener stays open
            assert time.monotonic() - t0 < 1.0
            time.sleep(0.01)
        r = httpx.get(url + "/ready", timeout=5)
        assert r.status_code == 503 and r.json()["reasons"] == ["draining"]
        refused = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        for t in threads:
            t.join(60)
        rc = proc.wait(timeout=60)
        assert rc == 0
        assert time.monotonic() - t0 < DRAIN_S + 8
    finally:
        if proc.poll() is None:
            proc.kill()
    for lines in streams:
        assert lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][len("data: "):])["error"]
        assert err["code"] == "drain_timeout" and err["type"] == "server_error" and "drain deadline" in err["message"]
        last = json.loads(lines[-3][len("data: "):])["choices"][0]
        assert last["finish_reason"] == "abort"
        texts = [json.loads(x[len("data: "):])["choices"][0]["text"] for x in lines[:-2]]
        assert 2 <= len(texts) < MAX_TOKENS
    print("chunks per stream at the deadline:", [len(x) - 2 for x in streams])
    r = unstreamed["r"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "drain_timeout" and "retry-after" in r.headers
