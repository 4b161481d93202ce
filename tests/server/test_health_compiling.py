"""/health says whether step programs are compiling and which (program, sampling variant, why, seconds), next to
its other fields: for a real engine with a compile held under way, and for an engine without the method."""
import threading
import time

from conftest import live_server, make_real_engine
from fake_engine import FakeEngine

KEYS = ("status", "engine_loop_alive", "active_requests", "queue_length", "num_running", "num_waiting",
        "kv_blocks_total", "num_steps", "uptime_s", "device_memory", "kv_cache_usage", "model")


def test_health_lists_a_compile_under_way():
    eng = make_real_engine()
    runner = eng.runner
    batch, sbatch, flags, _ = runner._dummy_inputs("decode", 8, 8)
    hold = threading.Lock()
    hold.acquire()                  # the compile registers, then waits for this lock before tracing
    thread = threading.Thread(target=runner.compiled, args=("decode", batch, sbatch, flags),
                              kwargs=dict(trace_lock=hold, reason="a test holds it"), daemon=True)
    with live_server(engine=eng) as srv:
        h = srv.health().json()
        assert h["compiling"] is False and h["compiling_programs"] == []
        thread.start()
        deadline = time.monotonic() + 20
        while not runner.compile_tracker.snapshot() and time.monotonic() < deadline:
            time.sleep(0.01)
        r = srv.health()
        assert r.status_code == 200
        h = r.json()
        assert all(k in h for k in KEYS) and h["status"] == "ok"
        assert h["compiling"] is True
        (entry,) = h["compiling_programs"]
        assert entry["program"] == "decode S=8 T=8" and entry["sampling"] == "greedy"
        assert entry["reason"] == "a test holds it" and entry["seconds"] >= 0
        hold.release()
        thread.join(120)
        h = srv.health().json()
        assert h["compiling"] is False and h["compiling_programs"] == []


def test_health_without_compile_reports():
    with live_server(engine=FakeEngine()) as srv:
        h = srv.health().json()
        assert all(k in h for k in KEYS)
        assert h["compiling"] is False and h["compiling_programs"] == []
