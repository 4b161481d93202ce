"""Start-up to serving (issue 10): seconds from launching `python -m yaie_jax.serve` until it has answered a
first completion, cold (empty XLA compile cache) and warm (a restart reusing the cache).

    python scripts/bench_startup.py --model-dir DIR [--runs cold,warm] [-- extra serve flags]

Prints a table, writes JSON (device, JAX version, date) and a PNG to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
import bench_common as bc  # noqa: E402


MARKS = {"listening": '"event": "listening"'}


def first_completion(port: int, timeout_s: float, proc=None, log_path: str = None) -> float:
    """Poll until one completion succeeds; returns the monotonic time it did. Raises if `proc` exits first.
    Also notes (in STAGES) when the server's log first shows each of MARKS."""
    body = json.dumps({"prompt": [1, 2, 3, 4], "max_tokens": 4, "temperature": 0}).encode()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log_path:
            _note_marks(log_path)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before answering")
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                if r.status == 200:
                    return time.monotonic()
        except Exception:
            time.sleep(0.2)
    raise TimeoutError(f"server did not answer within {timeout_s} s")


STAGES: dict = {}


def _note_marks(log_path: str) -> None:
    try:
        with open(log_path, errors="replace") as f:
            text = f.read()
    except OSError:
        return
    for name, needle in MARKS.items():
        if name not in STAGES and needle in text:
            STAGES[name] = time.monotonic()


def one_start(model_dir: str, cache_dir: str, port: int, extra, timeout_s: float, log_path: str,
              xla_flags: str = "") -> float:
    cmd = [sys.executable, "-m", "yaie_jax.serve", model_dir, "--port", str(port),
           "--compile-cache-dir", cache_dir] + list(extra)
    env = dict(os.environ)
    if xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            t1 = first_completion(port, timeout_s, proc, log_path)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    for name in list(STAGES):
        STAGES[name] -= t0
    return t1 - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="default: the random GPT-2 124M benchmark checkpoint")
    ap.add_argument("--model-root", default=os.path.expanduser("~/.cache/yaie_bench"))
    ap.add_argument("--cache-dir", default="/tmp/yaie_startup_cache")
    ap.add_argument("--runs", default="cold,warm", help="comma list of cold, warm, cold-cublas, warm-cublas")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--timeout-s", type=float, default=400)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="flags passed to the server after --")
    args = ap.parse_args()
    extra = [a for a in args.extra if a != "--"]
    model_dir = args.model_dir or bc.gpt2_124m_dir(os.path.join(args.model_root, "gpt2_124m"))
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for i, kind in enumerate(args.runs.split(",")):
        # "cold" / "warm": default XLA flags; "cold-cublas": cold with XLA's Triton GEMM fusions off (cuBLAS
        # GEMMs: no Triton autotuning at compile time), its own cache dir
        cache_dir = args.cache_dir + ("-cublas" if kind.endswith("cublas") else "")
        if kind.startswith("cold"):
            shutil.rmtree(cache_dir, ignore_errors=True)
        flags = "--xla_gpu_enable_triton_gemm=false" if kind.endswith("cublas") else ""
        seconds = one_start(model_dir, cache_dir, args.port + i, extra, args.timeout_s,
                            os.path.join(args.out, f"startup_{kind}.log"), xla_flags=flags)
        rows.append({"run": kind, "startup_to_first_completion_s": seconds,
                     "startup_to_listening_s": STAGES.pop("listening", None)})
        bc.print_table(rows[-1:], list(rows[-1]))
    record = {"config": vars(args), "env": bc.environment(), "results": rows}
    print("wrote", bc.write_result(args.out, "startup", record))
    bc.bar_plot(os.path.join(args.out, "startup.png"), [r["run"] for r in rows],
                [r["startup_to_first_completion_s"] for r in rows], "seconds to first completion",
                "Start-up to serving (GPT-2 124M)")


if __name__ == "__main__":
    main()
