"""Summarize a jax.profiler trace (the perfetto JSON that `jax.profiler.trace(..., create_perfetto_trace=True)`
writes): device busy fraction, top device ops by total time, and host time in the engine's step phases.

    python scripts/profile_summary.py /path/to/trace_dir [--top 25] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
from typing import Dict, List, Tuple

ENGINE_PHASES = ("engine.py", "scheduler.py", "runner.py", "sampling.py")


def load_events(trace_dir: str) -> Tuple[List[dict], Dict[int, str]]:
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    data = json.load(gzip.open(paths[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    return events, names


def union_length(intervals: List[Tuple[float, float]]) -> float:
    """Total length covered by [start, end) intervals (microseconds)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def summarize(trace_dir: str, top: int = 25) -> dict:
    events, names = load_events(trace_dir)
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device_pids = {pid for pid, n in names.items() if "/device:" in n and "CPU" not in n}
    dev = [e for e in spans if e["pid"] in device_pids]
    host = [e for e in spans if e["pid"] not in device_pids]
    out: dict = {"trace_dir": trace_dir, "num_device_events": len(dev)}
    if spans:
        t0 = min(e["ts"] for e in spans)
        t1 = max(e["ts"] + e["dur"] for e in spans)
        out["wall_us"] = t1 - t0
    if dev:
        busy = union_length([(e["ts"], e["ts"] + e["dur"]) for e in dev])
        d0 = min(e["ts"] for e in dev)
        d1 = max(e["ts"] + e["dur"] for e in dev)
        out["device_span_us"] = d1 - d0
        out["device_busy_us"] = busy
        out["device_busy_fraction"] = busy / max(d1 - d0, 1e-9)
        by_op: Dict[str, List[float]] = collections.defaultdict(lambda: [0.0, 0])
        for e in dev:
            by_op[e["name"]][0] += e["dur"]
            by_op[e["name"]][1] += 1
        ranked = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]
        out["top_device_ops"] = [{"name": n[:120], "total_us": t, "count": c, "share_of_busy": t / busy}
                                 for n, (t, c) in ranked]
    by_fn: Dict[str, float] = collections.defaultdict(float)
    for e in host:
        n = e["name"]
        if n.startswith("$") and any(p in n for p in ENGINE_PHASES):
            by_fn[n[1:]] += e["dur"]
    out["host_python_us"] = dict(sorted(by_fn.items(), key=lambda kv: -kv[1])[:top])
    return out


def print_summary(s: dict) -> None:
    if "device_busy_fraction" in s:
        print(f"device busy {s['device_busy_us'] / 1e3:,.1f} ms of a {s['device_span_us'] / 1e3:,.1f} ms span "
              f"({100 * s['device_busy_fraction']:.1f}%)")
        print(f"{'total ms':>10} {'count':>7} {'share':>6}  device op")
        for r in s["top_device_ops"]:
            print(f"{r['total_us'] / 1e3:10.2f} {r['count']:7d} {100 * r['share_of_busy']:5.1f}%  {r['name']}")
    print(f"{'host ms':>10}  python function (engine modules, inclusive)")
    for n, t in s["host_python_us"].items():
        print(f"{t / 1e3:10.2f}  {n[:110]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace_dir")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    s = summarize(args.trace_dir, args.top)
    print_summary(s)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)


if __name__ == "__main__":
    main()


def trace(trace_dir: str, python: bool = False):
    """jax.profiler.trace writing the perfetto JSON this module reads. python=False leaves out the Python tracer
    (it slows the host several-fold and so distorts how much the device waits on it)."""
    import jax
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 1 if python else 0
    return jax.profiler.trace(trace_dir, create_perfetto_trace=True, profiler_options=options)
