"""The first answer of a fresh server (issue 19 part 5): seconds from launching `python -m yaie_jax.serve` until
/health says ok ("ready"), then until the README's chat request is answered, then a stream with a second and a
third request of other sampling options sent while it runs (how long the stream stalls, how long they wait).

    python scripts/bench_cpu_first_answer.py [--out DIR] [--port 8571] [--tag NAME] [--settle] [-- serve flags]

A fresh clone has no compiled programs: the server gets an empty compile cache (`--compile-cache-dir`, a new
temporary directory) unless --cache-dir is given. While it runs, /health is polled (what it says about compiles)
and the server's resident memory sampled (min/max per phase); the server's CPU seconds per phase are
recorded too (on a shared machine they vary less than wall seconds). Prints a table, writes JSON to --out
(`cpu_first_answer_<tag>.json`) and keeps the server's log there (`cpu_first_answer_<tag>.log`, its "compiled"
lines are in the record).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(__file__))
import bench_common as bc  # noqa: E402

README_CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32,
               "temperature": 0}
STREAM = {"messages": [{"role": "user", "content": "Tell me a short story about a cat."}], "max_tokens": 48,
          "temperature": 0, "stream": True}
SECOND = {"messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 16, "temperature": 0.7,
          "top_p": 0.9, "seed": 1}
THIRD = {"messages": [{"role": "user", "content": "Name three animals."}], "max_tokens": 16, "temperature": 0,
         "presence_penalty": 0.5}
COMPILE_LINE = re.compile(r"yaie_jax\.executor\.runner \[[^\]]*\]: (.*(?:compil|superset program).*)$")


def post(port: int, body: dict, timeout: float = 900.0) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process (all its threads) has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get_health(port: int) -> Optional[dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read() or b"{}")
    except Exception:
        return None


class Sampler(threading.Thread):
    """Every 0.25 s: the server's resident memory (GB) and /health's compile fields, with the time."""

    def __init__(self, pid: int, port: int):
        super().__init__(daemon=True)
        self.pid, self.port, self.rows, self.stop = pid, port, [], threading.Event()

    def rss_gb(self) -> float:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
            return kb / 1e6
        except (OSError, StopIteration):
            return 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            h = get_health(self.port) or {}
            self.rows.append((time.monotonic(), self.rss_gb(), h.get("status"), h.get("compiling"),
                              h.get("compiling_programs")))
            time.sleep(0.25)

    def between(self, t0: float, t1: float) -> List[tuple]:
        return [r for r in self.rows if t0 <= r[0] <= t1]


def run_stream_with_others(port: int) -> Dict:
    """A greedy stream; after its 4th chunk the second request (temperature+top_p), after its 8th the third
    (presence penalty), each from its own thread. Returns chunk gaps and the others' latencies."""
    times, others, threads = [], {}, []

    def other(name, body):
        t = time.monotonic()
        out = post(port, body)
        others[name] = {"latency_s": round(time.monotonic() - t, 2),
                        "text": out["choices"][0]["message"]["content"]}

    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(STREAM).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=900) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            times.append(time.monotonic())
            for at, name, body in ((4, "second", SECOND), (8, "third", THIRD)):
                if len(times) == at:
                    threads.append(threading.Thread(target=other, args=(name, body)))
                    threads[-1].start()
    for t in threads:
        t.join()
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"stream_s": round(times[-1] - t0, 2), "stream_chunks": len(times),
            "stream_first_chunk_s": round(times[0] - t0, 2),
            "stream_max_gap_s": round(max(gaps), 2) if gaps else None,
            "stream_median_gap_s": round(sorted(gaps)[len(gaps) // 2], 3) if gaps else None, **{
                f"{k}_{f}": v[f] for k, v in others.items() for f in ("latency_s", "text")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--port", type=int, default=8571)
    ap.add_argument("--tag", default="run")
    ap.add_argument("--cache-dir", default=None, help="compile cache to use (default: a new empty one)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--settle", action="store_true",
                    help="before the stream, wait until /health says nothing compiles (start-up compiles done)")
    ap.add_argument("serve_args", nargs="*")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="yaie_cpu_first_")
    log_path = os.path.join(args.out, f"cpu_first_answer_{args.tag}.log")
    cmd = [sys.executable, "-m", "yaie_jax.serve", "--port", str(args.port), "--compile-cache-dir", cache,
           *args.serve_args]
    rec: Dict = {"tag": args.tag, "serve_args": args.serve_args, "fresh_cache": args.cache_dir is None}
    t_launch = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid, args.port)
        try:
            while (get_health(args.port) or {}).get("status") != "ok":
                if proc.poll() is not None or time.monotonic() - t_launch > args.timeout:
                    raise RuntimeError(f"server not ready (exit status {proc.returncode}); see {log_path}")
                time.sleep(0.1)
            t_ready, c_ready = time.monotonic(), cpu_seconds(proc.pid)
            sampler.start()
            out = post(args.port, README_CHAT)
            t_first, c_first = time.monotonic(), cpu_seconds(proc.pid)
            rec.update(ready_s=round(t_ready - t_launch, 2), first_answer_after_ready_s=round(t_first - t_ready, 2),
                       first_answer=out["choices"][0]["message"]["content"],
                       first_answer_tokens=out["usage"]["completion_tokens"])
            if args.settle:
                while (get_health(args.port) or {}).get("compiling"):
                    time.sleep(0.2)
                rec["settled_after_ready_s"] = round(time.monotonic() - t_ready, 2)
            t2, c2 = time.monotonic(), cpu_seconds(proc.pid)
            rec.update(run_stream_with_others(args.port))
            t3, c3 = time.monotonic(), cpu_seconds(proc.pid)
            rec.update(cpu_s_to_ready=round(c_ready, 1), cpu_s_first_answer=round(c_first - c_ready, 1),
                       cpu_s_stream_phase=round(c3 - c2, 1), stream_phase_s=round(t3 - t2, 2),
                       load_average=os.getloadavg())
            time.sleep(1.0)
            for name, (a, b) in {"first": (t_ready, t_first), "stream": (t2, t3)}.items():
                rows = sampler.between(a, b)
                rec[f"rss_{name}_min_gb"] = round(min(r[1] for r in rows), 2) if rows else None
                rec[f"rss_{name}_max_gb"] = round(max(r[1] for r in rows), 2) if rows else None
            rec["health_compiling_seen"] = sorted({json.dumps(r[4]) for r in sampler.rows if r[3]})[:20]
        finally:
            sampler.stop.set()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    with open(log_path) as f:
        rec["compile_lines"] = [m.group(1).strip()[:220] for line in f for m in [COMPILE_LINE.search(line)] if m]
    if args.cache_dir is None:
        shutil.rmtree(cache, ignore_errors=True)
    rec["env"] = bc.environment()           # imported after the run: no competition for the CPU during it
    bc.print_table([rec], ["tag", "ready_s", "first_answer_after_ready_s", "cpu_s_first_answer", "first_answer_tokens",
                           "stream_max_gap_s", "stream_median_gap_s", "second_latency_s", "third_latency_s",
                           "cpu_s_stream_phase", "rss_stream_min_gb", "rss_stream_max_gb"])
    for line in rec["compile_lines"]:
        print("  ", line)
    print(bc.write_result(args.out, f"cpu_first_answer_{args.tag}", rec))


if __name__ == "__main__":
    main()
