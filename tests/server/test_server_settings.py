"""Layered configuration: defaults < YAML file < environment < CLI flags, seed names, errors naming the source."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from yaie_jax.server.settings import ConfigError, ServerSettings, load_settings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SEED_YAML = """
model: {name: gpt2, dtype: float32, tensor_parallel_size: 1}
scheduler: {max_batch_size: 32, max_prefill_batch_size: 4, max_decode_batch_size: 24}
memory: {gpu_blocks: 100, cpu_blocks: 10, block_size: 32}
server: {port: 9000, api_keys: [file-key], rate_limit_rpm: 100}
engine: {seed: 3, scheduling_policy: priority}
"""


@pytest.fixture()
def cfg(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text(SEED_YAML)
    return str(p)


def test_defaults():
    s = load_settings([], {})
    assert s.engine.max_num_seqs is None and s.engine.model is None     # None: chosen by yaie_jax/defaults.py
    assert s.server == ServerSettings()
    assert s.sources == {}


def test_file_layer_and_seed_mapping(cfg):
    s = load_settings(["--config", cfg], {})
    e = s.engine
    assert (e.model, e.dtype, e.tensor_parallel_size) == ("gpt2", "float32", 1)
    assert e.max_num_seqs == 24                      # min(max_batch_size, max_decode_batch_size)
    assert (e.num_gpu_blocks, e.num_cpu_blocks, e.block_size) == (100, 10, 32)
    assert (e.seed, e.scheduling_policy) == (3, "priority")
    assert (s.server.port, s.server.api_keys, s.server.rate_limit_rpm) == (9000, ["file-key"], 100.0)
    assert any("max_prefill_batch_size" in w for w in s.warnings)
    assert s.sources["engine.num_gpu_blocks"].endswith("memory.gpu_blocks")


def test_precedence_file_env_flags(cfg):
    env = {"MAX_BATCH_SIZE": "8", "YAIE_PORT": "9100", "YAIE_DTYPE": "bfloat16", "ENABLE_RADIX_CACHE": "false",
           "MODEL_NAME": "env-model", "GPU_MEMORY_UTIL": "0.5", "YAIE_API_KEY": "env-a,env-b"}
    s = load_settings(["--config", cfg], env)
    assert s.engine.max_num_seqs == 8 and s.server.port == 9100 and s.engine.dtype == "bfloat16"
    assert s.engine.enable_prefix_caching is False and s.engine.model == "env-model"
    assert s.engine.gpu_memory_utilization == 0.5
    assert s.server.api_keys == ["env-a", "env-b"]
    assert s.engine.block_size == 32                 # only in the file: kept
    s = load_settings(["--config", cfg, "--max-batch-size", "4", "--port", "9200", "--enable-radix-cache",
                       "--api-key", "cli-1", "--api-key", "cli-2", "cli-model", "--dtype", "float16"], env)
    assert s.engine.max_num_seqs == 4 and s.server.port == 9200 and s.engine.enable_prefix_caching is True
    assert s.server.api_keys == ["cli-1", "cli-2"] and s.engine.model == "cli-model"
    assert s.engine.dtype == "float16"
    assert s.sources["engine.max_num_seqs"] == "cli:--max-num-seqs"
    assert s.sources["server.api_keys"] == "cli:--api-key"


def test_yaie_names_beat_seed_names_and_generic_fields():
    s = load_settings([], {"MAX_BATCH_SIZE": "8", "YAIE_MAX_NUM_SEQS": "12", "YAIE_MAX_MODEL_LEN": "none",
                           "YAIE_TARGET_ITL_MS": "25", "YAIE_WARMUP": "0", "YAIE_RATE_LIMIT_BURST": "5",
                           "YAIE_CORS_ALLOW_ORIGINS": "http://a, http://b"})
    assert s.engine.max_num_seqs == 12 and s.engine.max_model_len is None
    assert s.engine.target_itl_ms == 25.0 and s.engine.warmup is False
    assert s.server.rate_limit_burst == 5 and s.server.cors_allow_origins == ["http://a", "http://b"]


def test_config_file_from_env(cfg):
    assert load_settings([], {"YAIE_CONFIG": cfg}).engine.model == "gpt2"


@pytest.mark.parametrize("argv,env,needle", [
    ([], {"MAX_BATCH_SIZE": "lots"}, "MAX_BATCH_SIZE"),
    ([], {"YAIE_ENABLE_PREFIX_CACHING": "maybe"}, "YAIE_ENABLE_PREFIX_CACHING"),
    ([], {"YAIE_PORT": "70000"}, "YAIE_PORT"),
    (["--max-num-seqs", "0"], {}, "--max-num-seqs"),
    (["--block-size", "7"], {}, "block_size"),
    (["--gpu-memory-util", "1.5"], {}, "--gpu-memory-util"),
    (["--rate-limit-rpm", "-1"], {}, "--rate-limit-rpm"),
    (["--config", "/nonexistent.yaml"], {}, "not found"),
])
def test_bad_values_name_their_source(argv, env, needle):
    with pytest.raises(ConfigError) as e:
        load_settings(argv, env)
    assert needle in str(e.value)


@pytest.mark.parametrize("text,needle", [
    ("scheduler: {max_batchsize: 3}", "scheduler.max_batchsize"),
    ("bogus: 1", "bogus"),
    ("engine: {nope: 1}", "engine.nope"),
    ("server: {port: [1]}", "server.port"),
    ("memory: {block_size: 16.5}", "memory.block_size"),
    ("- a\n- b", "mapping"),
    ("model: {name: [x]", "YAML"),
])
def test_bad_files(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_settings(["--config", str(p)], {})
    assert needle in str(e.value)


def test_unknown_flag_exits_2():
    with pytest.raises(SystemExit) as e:
        load_settings(["--no-such-flag"], {})
    assert e.value.code == 2


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_example_configs_load(path):
    s = load_settings(["--config", path], {})
    assert s.config_file == path


def test_example_configs_exist():
    assert len(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))) >= 3


def test_print_config_cli_redacts_keys(cfg):
    env = {**os.environ, "YAIE_API_KEY": "super-secret-key", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "yaie_jax.serve", "--config", cfg, "--print-config", "--port", "9301"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "super-secret-key" not in r.stdout
    body = json.loads(r.stdout.split("\n", 1)[1])
    assert body["server"]["port"] == 9301 and body["engine"]["model"] == "gpt2"
    assert body["sources"]["server.port"] == "cli:--port"
    assert "max_prefill_batch_size" in r.stderr
    bad = subprocess.run([sys.executable, "-m", "yaie_jax.serve", "--max-num-seqs", "x"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "--max-num-seqs" in bad.stderr


def test_knobs_that_were_environment_variables(monkeypatch):
    """tp_head_layout, compiled_program_store, log_compiles, hub_timeout_s, compile_cache_dir and the server's
    startup_profile: fields with flags and YAIE_<FIELD> names, the old variable names still read as aliases (the
    new name wins), and only from the `environ` given (never os.environ behind it)."""
    for var in ("YAIE_TP_HEAD", "YAIE_AOT_CACHE", "YAIE_LOG_COMPILE_CACHE", "YAIE_HUB_TIMEOUT_S"):
        monkeypatch.setenv(var, "2")                    # what a leak from os.environ would show
    monkeypatch.setenv("YAIE_COMPILE_CACHE_DIR", "/leaked")
    s = load_settings([], {})
    assert (s.engine.tp_head_layout, s.engine.compiled_program_store, s.engine.log_compiles) == ("replicated", None, 0)
    assert s.engine.hub_timeout_s == 10.0 and s.engine.compile_cache_dir.endswith(os.path.join("yaie_jax", "xla"))
    assert s.server.startup_profile is False and s.sources == {}
    old = {"YAIE_TP_HEAD": "vocab", "YAIE_AOT_CACHE": "off", "YAIE_LOG_COMPILE_CACHE": "true",
           "YAIE_HUB_TIMEOUT_S": "2.5", "YAIE_COMPILE_CACHE_DIR": "", "YAIE_STARTUP_PROFILE": "1"}
    s = load_settings([], old)
    assert (s.engine.tp_head_layout, s.engine.compiled_program_store, s.engine.log_compiles) == ("vocab", False, 1)
    assert (s.engine.hub_timeout_s, s.engine.compile_cache_dir, s.server.startup_profile) == (2.5, "", True)
    assert s.sources["engine.tp_head_layout"] == "env:YAIE_TP_HEAD"
    assert s.sources["engine.compiled_program_store"] == "env:YAIE_AOT_CACHE"
    s = load_settings([], {**old, "YAIE_TP_HEAD_LAYOUT": "replicated", "YAIE_COMPILED_PROGRAM_STORE": "true",
                           "YAIE_LOG_COMPILES": "2", "YAIE_STARTUP_PROFILE": ""})
    assert (s.engine.tp_head_layout, s.engine.compiled_program_store, s.engine.log_compiles) == ("replicated", True, 2)
    assert s.sources["engine.log_compiles"] == "env:YAIE_LOG_COMPILES" and s.server.startup_profile is False
    s = load_settings(["--tp-head-layout", "vocab", "--no-compiled-program-store", "--log-compiles", "1",
                       "--hub-timeout-s", "4", "--startup-profile"], old)
    assert (s.engine.tp_head_layout, s.engine.compiled_program_store, s.engine.log_compiles) == ("vocab", False, 1)
    assert s.engine.hub_timeout_s == 4.0 and s.server.startup_profile is True


@pytest.mark.parametrize("argv,env,needle", [
    ([], {"YAIE_TP_HEAD": "rows"}, "YAIE_TP_HEAD"),
    (["--tp-head-layout", "rows"], {}, "--tp-head-layout"),
    ([], {"YAIE_LOG_COMPILES": "3"}, "YAIE_LOG_COMPILES"),
    ([], {"YAIE_HUB_TIMEOUT_S": "soon"}, "YAIE_HUB_TIMEOUT_S"),
    (["--hub-timeout-s", "0"], {}, "--hub-timeout-s"),
])
def test_bad_former_environment_knobs_name_their_source(argv, env, needle):
    with pytest.raises(ConfigError) as e:
        load_settings(argv, env)
    assert needle in str(e.value)


def test_refused_value_names_its_field_and_layer():
    """An engine argument or server setting that validation refuses: the error names the field (as data) and the
    layer that set it."""
    from yaie_jax.server.settings import ConfigError, load_settings
    with pytest.raises(ConfigError) as e:
        load_settings([], {"YAIE_BLOCK_SIZE": "7"})
    assert e.value.field == "block_size" and "set by env:YAIE_BLOCK_SIZE" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_settings(["--retry-after-s", "-1"], {})
    assert e.value.field == "retry_after_s" and "set by cli:--retry-after-s" in str(e.value)
