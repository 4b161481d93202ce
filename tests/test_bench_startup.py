"""scripts/bench_startup.py's log summary and IR comparison, on synthetic server logs and IR dumps."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import bench_startup as bs  # noqa: E402

COLD = """\
2026-11-27 07:00:00,000 INFO yaie_jax.serve [MainThread]: start-up: building the engine, 1.10 s after the process started (Python start-up, imports, configuration)
2026-11-27 07:00:00,001 DEBUG jax._src.cache_key [T1]: get_cache_key hash of serialized computation: aaaa
2026-11-27 07:00:00,002 DEBUG jax._src.cache_key [T1]: get_cache_key hash of serialized XLA flags: ffff
2026-11-27 07:00:00,003 DEBUG jax._src.compiler [T1]: PERSISTENT COMPILATION CACHE MISS for 'jit__step_impl' with key 'k1'
2026-11-27 07:00:01,000 INFO yaie_jax.executor.runner [T1]: compiled decode S=8 T=8 steps=1: trace+lower 4.00 s, compile 5.00 s
2026-11-27 07:00:02,000 INFO yaie_jax.serve [MainThread]: start-up: engine built in 20.00 s, 21.10 s after the process started; 1 step programs compiled so far: trace+lower 4.00 s, compile 5.00 s (summed over threads)
2026-11-27 07:00:02,100 INFO yaie_jax.server [MainThread]: start-up: app started, 21.30 s after the process started
2026-11-27 07:00:02,300 DEBUG jax._src.compiler [T2]: PERSISTENT COMPILATION CACHE MISS for 'jit__multi_step_impl' with key 'k2'
2026-11-27 07:00:02,500 INFO yaie_jax.server [MainThread]: start-up: first request answered, 21.60 s after the process started (its latency 0.150 s)
"""
WARM = """\
2026-11-27 08:00:00,000 INFO yaie_jax.serve [MainThread]: start-up: building the engine, 1.00 s after the process started (Python start-up, imports, configuration)
2026-11-27 08:00:00,001 DEBUG jax._src.cache_key [T1]: get_cache_key hash of serialized computation: bbbb
2026-11-27 08:00:00,002 DEBUG jax._src.cache_key [T1]: get_cache_key hash of serialized XLA flags: ffff
2026-11-27 08:00:00,003 DEBUG jax._src.compiler [T1]: PERSISTENT COMPILATION CACHE MISS for 'jit__step_impl' with key 'k3'
2026-11-27 08:00:00,004 DEBUG jax._src.compiler [T1]: Persistent compilation cache hit for 'jit__multi_step_impl' with key 'k2'
2026-11-27 08:00:01,000 INFO yaie_jax.serve [MainThread]: start-up profile of the engine build (main thread, cumulative s by function): 8.00 engine.py:__init__; 5.50 runner.py:warmup; 1.20 import jax
2026-11-27 08:00:01,000 INFO yaie_jax.serve [MainThread]: start-up: engine built in 9.00 s, 10.00 s after the process started; 2 step programs compiled so far: trace+lower 7.00 s, compile 1.00 s (summed over threads)
"""


def test_summarize_log_and_key_parts(tmp_path):
    (tmp_path / "cold.log").write_text(COLD)
    (tmp_path / "warm.log").write_text(WARM)
    cold, warm = bs.summarize_log(str(tmp_path / "cold.log")), bs.summarize_log(str(tmp_path / "warm.log"))
    assert cold["engine_build_start_s"] == 1.1 and cold["engine_built_s"] == 21.1
    assert cold["app_started_s"] == 21.3 and cold["first_answer_s"] == 21.6
    assert cold["first_request_latency_s"] == 0.15 and cold["app_started_to_first_answer_s"] == 0.3
    assert cold["programs_before_serving"] == 1 and cold["trace_lower_before_serving_s"] == 4.0
    assert cold["step_programs"] == [{"kind": "decode", "S": 8, "T": 8, "steps": 1, "trace_lower_s": 4.0,
                                      "compile_s": 5.0}]
    assert (cold["cache_misses"], cold["cache_misses_before_serving"], cold["cache_hits"]) == (2, 1, 0)
    assert (warm["cache_misses"], warm["cache_hits"]) == (1, 1)
    assert warm["cache_misses_by_program"] == {"jit__step_impl": 1}
    assert bs.new_key_parts(warm, cold) == {"computation": 1, "XLA flags": 0}
    assert warm["engine_build_profile"] == [[8.0, "engine.py:__init__"], [5.5, "runner.py:warmup"],
                                            [1.2, "import jax"]]


def _dump(d, i, name, args, body):
    os.makedirs(d, exist_ok=True)
    text = (f"module @{name} attributes {{mhlo.num_partitions = 1 : i32}} {{\n"
            f"  func.func public @main({args}) -> (tensor<8xi32>) {{\n{body}\n  }}\n}}\n")
    with open(os.path.join(d, f"jax_ir{i:04d}_{name}_compile.mlir"), "w") as f:
        f.write(text)


def test_ir_differences_pairs_programs_by_signature(tmp_path):
    cold, warm, keep = str(tmp_path / "cold"), str(tmp_path / "warm"), str(tmp_path / "keep")
    a8 = "%arg0: tensor<8xi32> {jax.buffer_donor = true}, %arg1: tensor<8x16xbf16>"
    a16 = "%arg0: tensor<16xi32>, %arg1: tensor<16x16xbf16>"
    _dump(cold, 0, "jit__step_impl", a8, 'backend_config = "kernel_7"')
    _dump(cold, 1, "jit__step_impl", a16, "same")
    _dump(warm, 5, "jit__step_impl", a16, "same")            # other order and dump ids: still paired
    _dump(warm, 6, "jit__step_impl", a8, 'backend_config = "kernel_3"')
    _dump(warm, 7, "jit__copy", a8, "only in the warm run")
    diffs = bs.ir_differences(warm, cold, keep_dir=keep)
    assert len(diffs) == 1
    d = diffs[0]
    assert "tensor<8xi32>" in d["program"] and d["cold_file"] == "jax_ir0000_jit__step_impl_compile.mlir"
    assert "kernel_7" in d["cold"] and "kernel_3" in d["warm"]
    assert sorted(os.listdir(keep)) == ["cold_jax_ir0000_jit__step_impl_compile.mlir",
                                        "warm_jax_ir0006_jit__step_impl_compile.mlir"]
