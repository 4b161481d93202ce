"""Start-up to serving (issue 10): seconds from launching `python -m yaie_jax.serve` until it has answered a
first completion, cold (empty XLA compile cache) and warm (a restart reusing the cache).

    python scripts/bench_startup.py --model-dir DIR [--runs cold,warm] [-- extra serve flags]

Prints a table, writes JSON (device, JAX version, date) and a PNG to --out, and keeps each run's server log there
(`startup_<run>.log`). The servers run with YAIE_LOG_COMPILE_CACHE=2 (`--compile-log`): their logs say, per XLA
program, whether JAX's persistent cache had it, with the hash of each cache-key component. From the logs each
run's record gets the start-up stages (seconds after the process started: engine build begun, engine built, app
started, first request answered), the step programs compiled before serving (trace+lower and compile seconds),
the persistent-cache hits and misses (misses by program name), and, for a warm run, which cache-key components
took values the cold run never had (the reason a program missed: `computation` = the lowered program differs
between the processes; `XLA flags`, `compile_options`, `backend version`, ... likewise).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Dict, Optional

sys.path.insert(0, os.path.dirname(__file__))
import bench_common as bc  # noqa: E402


MARKS = {"listening": '"event": "listening"'}


def first_completion(port: int, timeout_s: float, proc=None, log_path: str = None) -> float:
    """Poll until one completion succeeds; returns the monotonic time it did. Raises if `proc` exits first.
    Also notes (in STAGES) when the server's log first shows each of MARKS. A request the server accepted is
    waited for (up to the deadline) rather than abandoned and sent again."""
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
            with urllib.request.urlopen(req, timeout=max(1.0, deadline - time.monotonic())) as r:
                if r.status == 200:
                    return time.monotonic()
        except urllib.error.HTTPError as e:     # the server answered, but not yet with a completion (e.g. 503)
            print(f"  server answered {e.code}; retrying", flush=True)
            time.sleep(0.2)
        except Exception:                       # not listening yet
            time.sleep(0.05)
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
              xla_flags: str = "", compile_log: str = "2", dump_ir: Optional[str] = None) -> float:
    cmd = [sys.executable, "-m", "yaie_jax.serve", model_dir, "--port", str(port),
           "--compile-cache-dir", cache_dir] + list(extra)
    env = dict(os.environ)
    if xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    if compile_log:
        env.setdefault("YAIE_LOG_COMPILE_CACHE", compile_log)
        env.setdefault("YAIE_STARTUP_PROFILE", "1")       # where the engine build's time goes (one log line)
    if dump_ir:   # every module JAX compiles (or finds in its cache), as hashed for the cache key: no locations
        shutil.rmtree(dump_ir, ignore_errors=True)
        env.update(JAX_DUMP_IR_TO=dump_ir, JAX_DUMP_IR_MODES="stablehlo", JAX_INCLUDE_DEBUG_INFO_IN_DUMPS="false")
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


# ------------------------------------------------------------------------------------------ server log summary
_AGE = r"([0-9.]+) s after the process started"
STAGE_PATTERNS = {
    "engine_build_start_s": re.compile(r"start-up: building the engine, " + _AGE),
    "engine_built_s": re.compile(r"start-up: engine built in [0-9.]+ s, " + _AGE),
    "app_started_s": re.compile(r"start-up: app started, " + _AGE),
    "first_answer_s": re.compile(r"start-up: first request answered, " + _AGE),
}
FIRST_LATENCY = re.compile(r"start-up: first request answered, .*\(its latency ([0-9.]+) s\)")
BUILT = re.compile(r"start-up: engine built in ([0-9.]+) s, .*; (\d+) step programs compiled so far: "
                   r"trace\+lower ([0-9.]+) s, compile ([0-9.]+) s")
COMPILED = re.compile(r"yaie_jax\.executor\.runner.*: compiled (\w+) S=(\d+) T=(\d+) steps=(\d+): "
                      r"trace\+lower ([0-9.]+) s, compile ([0-9.]+) s")
HIT = re.compile(r"Persistent compilation cache hit for '([^']+)'")
MISS = re.compile(r"PERSISTENT COMPILATION CACHE MISS for '([^']+)'")
KEY_PART = re.compile(r"get_cache_key hash of serialized (.+?): ([0-9a-f]+)")
PROFILE = re.compile(r"start-up profile of the engine build \(main thread, cumulative s by function\): (.*)$")
NOT_WRITTEN = re.compile(r"Not writing persistent cache entry|Error (?:reading|writing) persistent compilation "
                         r"cache entry|unable to generate cache key")


def summarize_log(path: str) -> Dict:
    """The start-up stages, compiled step programs and persistent-cache outcomes found in one server log."""
    out: Dict = {}
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    hits, misses = collections.Counter(), collections.Counter()
    misses_before_serving = 0
    key_parts = collections.defaultdict(set)
    programs, problems = [], []
    for line in lines:
        for name, pat in STAGE_PATTERNS.items():
            m = pat.search(line)
            if m and name not in out:
                out[name] = float(m.group(1))
        if (m := FIRST_LATENCY.search(line)) and "first_request_latency_s" not in out:
            out["first_request_latency_s"] = float(m.group(1))
        if (m := BUILT.search(line)) and "engine_build_s" not in out:
            out["engine_build_s"] = float(m.group(1))
            out["programs_before_serving"] = int(m.group(2))
            out["trace_lower_before_serving_s"] = float(m.group(3))
            out["compile_before_serving_s"] = float(m.group(4))
        if (m := PROFILE.search(line)) and "engine_build_profile" not in out:
            out["engine_build_profile"] = [[float(p.split(" ", 1)[0]), p.split(" ", 1)[1]]
                                           for p in m.group(1).split("; ") if " " in p]
        if m := COMPILED.search(line):
            programs.append({"kind": m.group(1), "S": int(m.group(2)), "T": int(m.group(3)),
                             "steps": int(m.group(4)), "trace_lower_s": float(m.group(5)),
                             "compile_s": float(m.group(6))})
        if m := HIT.search(line):
            hits[m.group(1)] += 1
        if m := MISS.search(line):
            misses[m.group(1)] += 1
            misses_before_serving += "engine_built_s" not in out
        if m := KEY_PART.search(line):
            key_parts[m.group(1)].add(m.group(2))
        if NOT_WRITTEN.search(line) and len(problems) < 20:
            problems.append(line[-300:])
    if "first_answer_s" in out and "app_started_s" in out:
        out["app_started_to_first_answer_s"] = round(out["first_answer_s"] - out["app_started_s"], 3)
    out["step_programs"] = programs
    out["cache_hits"] = sum(hits.values())
    out["cache_misses"] = sum(misses.values())
    out["cache_misses_before_serving"] = misses_before_serving
    out["cache_misses_by_program"] = dict(misses)
    out["cache_problems"] = problems
    out["_key_parts"] = {k: sorted(v) for k, v in key_parts.items()}
    return out


_DUMP_NAME = re.compile(r"jax_ir\d+_(.+)_compile\.mlir$")
_MAIN_SIG = re.compile(r"func\.func public @main\((.*?)\)\s*->", re.S)


def _module_index(dump_dir: str) -> Dict[str, list]:
    """{program name + main's argument types: [module texts]} of one run's IR dump."""
    index: Dict[str, list] = collections.defaultdict(list)
    try:
        names = sorted(os.listdir(dump_dir))
    except OSError:
        return index
    for name in names:
        m = _DUMP_NAME.match(name)
        if not m:
            continue
        with open(os.path.join(dump_dir, name), errors="replace") as f:
            text = f.read()
        sig = _MAIN_SIG.search(text)
        args = re.sub(r"\{[^{}]*\}", "", sig.group(1)) if sig else ""      # drop attributes, keep types
        index[m.group(1) + "(" + re.sub(r"%arg\d+: ", "", args)[:4000] + ")"].append((name, text))
    return index


def ir_differences(warm_dir: str, cold_dir: str, keep_dir: Optional[str] = None, keep: int = 2) -> list:
    """Programs compiled in both runs (same name and argument types) whose modules differ: the first difference
    with 150 characters of context from each run. The first `keep` differing pairs are copied to `keep_dir`."""
    warm, cold = _module_index(warm_dir), _module_index(cold_dir)
    out = []
    for sig, mods in sorted(warm.items()):
        if sig not in cold:
            continue
        a_name, a = cold[sig][0]
        for b_name, b in mods:
            if a == b:
                continue
            i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            out.append({"program": sig[:200], "cold_file": a_name, "warm_file": b_name, "offset": i,
                        "len_cold": len(a), "len_warm": len(b), "cold": a[max(0, i - 150):i + 150],
                        "warm": b[max(0, i - 150):i + 150]})
            if keep_dir and len(out) <= keep:
                os.makedirs(keep_dir, exist_ok=True)
                shutil.copy(os.path.join(cold_dir, a_name), os.path.join(keep_dir, "cold_" + a_name))
                shutil.copy(os.path.join(warm_dir, b_name), os.path.join(keep_dir, "warm_" + b_name))
    return out


def new_key_parts(warm: Dict, cold: Dict) -> Dict[str, int]:
    """Per cache-key component: how many of the warm run's values the cold run never produced (non-zero for the
    component that made programs miss; `computation` is expected to be non-zero only for programs the cold run
    never compiled, e.g. buckets its background compile had not reached when it was stopped)."""
    cold_parts = cold.get("_key_parts", {})
    return {k: len(set(v) - set(cold_parts.get(k, ()))) for k, v in warm.get("_key_parts", {}).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="default: the random GPT-2 124M benchmark checkpoint")
    ap.add_argument("--model-root", default=os.path.expanduser("~/.cache/yaie_bench"))
    ap.add_argument("--cache-dir", default="/tmp/yaie_startup_cache")
    ap.add_argument("--runs", default="cold,warm", help="comma list of cold, warm, cold-cublas, warm-cublas")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--timeout-s", type=float, default=400)
    ap.add_argument("--compile-log", default="2", help="YAIE_LOG_COMPILE_CACHE for the servers (0 = off)")
    ap.add_argument("--dump-ir", action="store_true",
                    help="dump every compiled module (JAX_DUMP_IR_TO) and report, for warm runs, the programs whose "
                         "module differs from the cold run's (the first difference in context); two such pairs "
                         "are kept in --out as ir_diff.tar.gz, the dumps themselves are removed")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="flags passed to the server after --")
    args = ap.parse_args()
    extra = [a for a in args.extra if a != "--"]
    model_dir = args.model_dir or bc.gpt2_124m_dir(os.path.join(args.model_root, "gpt2_124m"))
    os.makedirs(args.out, exist_ok=True)
    rows, logs = [], {}
    for i, kind in enumerate(args.runs.split(",")):
        # "cold" / "warm": default XLA flags; "cold-cublas": cold with XLA's Triton GEMM fusions off (cuBLAS
        # GEMMs: no Triton autotuning at compile time), its own cache dir
        cache_dir = args.cache_dir + ("-cublas" if kind.endswith("cublas") else "")
        if kind.startswith("cold"):
            shutil.rmtree(cache_dir, ignore_errors=True)
        flags = "--xla_gpu_enable_triton_gemm=false" if kind.endswith("cublas") else ""
        log_path = os.path.join(args.out, f"startup_{kind}.log")
        dump = os.path.join(args.out, f"ir_{kind}") if args.dump_ir else None
        seconds = one_start(model_dir, cache_dir, args.port + i, extra, args.timeout_s, log_path,
                            xla_flags=flags, compile_log=args.compile_log, dump_ir=dump)
        logs[kind] = summarize_log(log_path)
        row = {"run": kind, "startup_to_first_completion_s": seconds,
               "startup_to_listening_s": STAGES.pop("listening", None)}
        row.update({k: v for k, v in logs[kind].items() if not k.startswith("_")})
        cold = logs.get(kind.replace("warm", "cold"))
        if kind.startswith("warm") and cold:
            row["new_cache_key_values_vs_cold"] = new_key_parts(logs[kind], cold)
            if args.dump_ir:
                row["ir_differences_vs_cold"] = ir_differences(
                    dump, os.path.join(args.out, "ir_" + kind.replace("warm", "cold")),
                    keep_dir=os.path.join(args.out, "ir_diff"))
        rows.append(row)
        print(f"{kind}: {seconds:.2f} s to the first completion (log: {log_path})", flush=True)
    if args.dump_ir:
        if os.path.isdir(os.path.join(args.out, "ir_diff")):
            shutil.make_archive(os.path.join(args.out, "ir_diff"), "gztar", args.out, "ir_diff")
            shutil.rmtree(os.path.join(args.out, "ir_diff"))
        for kind in args.runs.split(","):
            shutil.rmtree(os.path.join(args.out, f"ir_{kind}"), ignore_errors=True)
    record = {"config": vars(args), "env": bc.environment(), "results": rows}
    print("wrote", bc.write_result(args.out, "startup", record))
    bc.bar_plot(os.path.join(args.out, "startup.png"), [r["run"] for r in rows],
                [r["startup_to_first_completion_s"] for r in rows], "seconds to first completion",
                "Start-up to serving (GPT-2 124M)")
    # last lines of the output (a device run shows the tail): one per run
    cols = ["run", "startup_to_first_completion_s", "engine_build_start_s", "engine_built_s", "app_started_s",
            "first_answer_s", "first_request_latency_s", "programs_before_serving", "trace_lower_before_serving_s",
            "compile_before_serving_s", "cache_hits", "cache_misses", "cache_misses_before_serving"]
    short = {c: re.sub(r"_s$", "", c).replace("startup_to_first_completion", "total").replace(
        "engine_build_start", "build0").replace("engine_built", "built").replace("app_started", "app").replace(
        "first_answer", "answer").replace("first_request_latency", "req").replace(
        "programs_before_serving", "progs").replace("trace_lower_before_serving", "trace").replace(
        "compile_before_serving", "compile").replace("cache_misses_before_serving", "miss0").replace(
        "cache_", "") for c in cols}
    bc.print_table([{short[c]: r.get(c) for c in cols} for r in rows], [short[c] for c in cols])
    for r in rows:
        if r["run"].startswith("warm"):
            print(f"{r['run']}: misses {r.get('cache_misses_by_program')} new key values vs cold "
                  f"{r.get('new_cache_key_values_vs_cold')}")
            prof = r.get("engine_build_profile") or []
            print(f"{r['run']}: engine build profile: " + "; ".join(f"{sec:.1f} {w}" for sec, w in prof[:12]))
            for d in (r.get("ir_differences_vs_cold") or [])[:2]:
                print(f"  module differs: {d['program'][:100]} at char {d['offset']}:\n    cold ...{d['cold']!r}"
                      f"\n    warm ...{d['warm']!r}")


if __name__ == "__main__":
    main()
