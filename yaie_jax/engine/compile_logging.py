"""Compile logging and JAX's persistent compilation cache, set up once per process by the engine.

`setup_compile_cache(dir, log_compiles)` turns the persistent cache on (restarts skip XLA compiles) and, at
`log_compiles` >= 1, logs every XLA compile and whether the cache had it (`setup_compile_logging`)."""
from __future__ import annotations

import logging
from typing import Optional

from yaie_jax.config import env_default

logger = logging.getLogger("yaie_jax.engine.compile_logging")


class _MessageFilter(logging.Filter):
    """Keeps the records of one logger whose message contains one of `needles` (case-insensitive)."""

    def __init__(self, *needles: str):
        super().__init__()
        self.needles = tuple(n.lower() for n in needles)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:       # warnings and errors always pass
            return True
        msg = record.getMessage().lower()
        return any(n in msg for n in self.needles)


_compile_logging_done = False


def setup_compile_logging(level: Optional[int] = None) -> None:
    """At `level` 1 (the engine argument `log_compiles`; None: its default, config.env_default, whose environment
    alias is YAIE_LOG_COMPILE_CACHE), log through the `logging` handlers every XLA compile
    (jax._src.dispatch "Finished XLA compilation of <name> in <s> sec") and, for each, whether JAX's persistent
    cache had it (jax._src.compiler "Persistent compilation cache hit" / "PERSISTENT COMPILATION CACHE MISS",
    and why a compiled program was not written: "Not writing persistent cache entry ..."). With 2, also the hash
    of each cache-key component (jax._src.cache_key "get_cache_key hash of serialized <component>: <hash>", and
    the XLA flags that enter the key), to tell which component differs between two processes on a miss
    (`scripts/bench_startup.py` summarizes this). Messages are at DEBUG; only those loggers are lowered. Once per
    process: the first call that turns it on decides the level."""
    global _compile_logging_done
    level = env_default("log_compiles") if level is None else int(level)
    if not level or _compile_logging_done:
        return
    _compile_logging_done = True
    wanted = {"jax._src.compiler": ("persistent compilation cache", "persistent cache entry"),
              "jax._src.dispatch": ("finished xla compilation",),
              "jax._src.compilation_cache": ("cache",)}
    if level >= 2:
        wanted["jax._src.cache_key"] = ("get_cache_key hash of serialized", "xla flag in cache key")
    for name, needles in wanted.items():
        lg = logging.getLogger(name)
        lg.setLevel(logging.DEBUG)
        lg.addFilter(_MessageFilter(*needles))
    logger.info("compile logging on (log_compiles=%d): XLA compiles and persistent-cache hits/misses are logged",
                level)


def setup_compile_cache(cache_dir: Optional[str], log_compiles: Optional[int] = None) -> None:
    """Turn on JAX's persistent compilation cache, so restarts skip XLA compiles, and compile logging at
    `log_compiles` (see `setup_compile_logging`, to see which programs hit the cache)."""
    setup_compile_logging(log_compiles)
    if not cache_dir:
        return
    import jax
    try:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        # every program, however quick to compile: a small one compiled while serving (block copies, the first
        # pipelined decode's token gather, the KV pool's zeros) costs more to compile than to read back
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except Exception as e:  # pragma: no cover - depends on the jax build
        logger.warning("persistent compilation cache not enabled: %s", e)
        return
    logger.info("persistent compilation cache: %s", cache_dir)
