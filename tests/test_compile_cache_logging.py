"""log_compiles (engine argument; environment alias YAIE_LOG_COMPILE_CACHE): the persistent compilation cache's
hits and misses (and, at 2, the cache-key component hashes) reach the `logging` handlers, so a server log tells
which programs a restart compiled again."""
import os
import subprocess
import sys

SCRIPT = """
import logging, sys
import numpy as np
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(name)s: %(message)s")
from yaie_jax.engine.compile_logging import setup_compile_cache
setup_compile_cache(sys.argv[1], *[int(a) for a in sys.argv[2:]])   # (log_compiles given, or its default)
import jax
print("RESULT", jax.jit(lambda x: x * 3 + 1)(np.arange(4.0)).tolist())
"""


def _run(cache_dir, level, log_compiles=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("YAIE_LOG_COMPILE_CACHE", None)
    if level is not None:
        env["YAIE_LOG_COMPILE_CACHE"] = level
    args = [] if log_compiles is None else [str(log_compiles)]
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(cache_dir), *args], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "RESULT [1.0, 4.0, 7.0, 10.0]" in r.stdout
    return r.stdout


def test_hits_and_misses_are_logged(tmp_path):
    first = _run(tmp_path, "2")
    assert "PERSISTENT COMPILATION CACHE MISS for 'jit__lambda'" in first
    assert "Finished XLA compilation of jit(<lambda>)" in first
    assert "get_cache_key hash of serialized computation:" in first
    assert "Not writing persistent cache entry" not in first       # every program is written, however quick
    second = _run(tmp_path, "1")
    assert "Persistent compilation cache hit for 'jit__lambda'" in second
    assert "get_cache_key hash" not in second                      # component hashes only at 2
    assert "get_compile_options" not in second                     # the loggers' other debug lines stay out


def test_quiet_without_the_variable(tmp_path):
    _run(tmp_path, None)
    out = _run(tmp_path, None)
    assert "persistent compilation cache: " in out
    assert "cache hit" not in out.lower() and "Finished XLA compilation" not in out


def test_the_engine_argument_beats_the_variable(tmp_path):
    """setup_compile_cache(dir, log_compiles) as the engine calls it with its config's log_compiles."""
    first = _run(tmp_path, None, log_compiles=2)
    assert "PERSISTENT COMPILATION CACHE MISS for 'jit__lambda'" in first
    assert "get_cache_key hash of serialized computation:" in first
    quiet = _run(tmp_path, "2", log_compiles=0)
    assert "cache hit" not in quiet.lower() and "get_cache_key hash" not in quiet
