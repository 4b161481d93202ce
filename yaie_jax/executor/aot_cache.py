"""A store of compiled step programs on disk, so a restart loads them instead of tracing and lowering them again.

JAX's persistent compilation cache skips XLA's compile on a restart, but it is keyed by the lowered program: every
program is still traced and lowered first, in Python, holding the GIL (for GPT-2 124M with the Pallas kernels,
most of a warm start-up's compile phase). `ExecutableStore` keeps the compiled executable itself
(`jax.experimental.serialize_executable`), keyed by everything that decides the program, so a warm restart goes
straight to `deserialize_and_load`:

    store = ExecutableStore.for_runner(runner)         # None where off (see `for_runner`)
    fn = store.load(key)                               # a jax.stages.Compiled, or None (then compile and...)
    store.save(key, fn)

The fingerprint (one directory per fingerprint under `<compile_cache_dir>/yaie_aot/`) covers: the jax and jaxlib
versions, the backend, device kind, platform version and device count, every jax.config value (cache and logging
settings aside), the JAX_*/XLA_*/LIBTPU_* environment variables, the source of the yaie_jax and pallas_kernels
packages (any code change starts a new directory), the model config, the engine config (its fields that reach a
program: `tp_head_layout` among them, not the cache, logging or hub settings), the resolved attention backend and
mesh, and the shapes, dtypes and shardings of the params and the KV pool. The program key adds the
runner's own key (kind, sampling flags, fused steps, input shapes). A loaded program also checks its arguments'
shapes and dtypes on every call (jax.stages.Compiled). Entries are pickles: load them only from a directory you
trust, as JAX's own cache.

On by default on a GPU wherever the engine has a compile cache directory (off on the CPU, see `default_on`); the
engine argument `compiled_program_store` (True / False; None: that default; environment alias YAIE_AOT_CACHE)
turns it on or off. Multi-process (jax.distributed) runs never use it. A process loads programs holding Mosaic GPU
kernels only after `prepare_backend` has pointed the Mosaic GPU custom call at its runtime library.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import threading
import time
from typing import Any, Iterable, Optional

logger = logging.getLogger("yaie_jax.executor.aot_cache")

SUBDIR = "yaie_aot"
KEEP_FINGERPRINTS = 4          # older fingerprint directories are removed when a new one is created
ENV_PREFIXES = ("JAX_", "XLA_", "LIBTPU_")
# jax.config values that do not change what a program computes or how it is compiled
VOLATILE_JAX_CONFIG = {"jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                       "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size",
                       "jax_enable_compilation_cache", "jax_log_compiles", "jax_explain_cache_misses",
                       "jax_logging_level", "jax_debug_log_modules", "jax_dump_ir_to", "jax_dump_ir_modes",
                       "jax_include_debug_info_in_dumps"}
VOLATILE_ENV = {"JAX_COMPILATION_CACHE_DIR", "JAX_LOG_COMPILES", "JAX_EXPLAIN_CACHE_MISSES", "JAX_LOGGING_LEVEL",
                "JAX_DEBUG_LOG_MODULES", "JAX_DUMP_IR_TO", "JAX_DUMP_IR_MODES", "JAX_INCLUDE_DEBUG_INFO_IN_DUMPS"}
# EngineConfig fields that do not reach a compiled program
VOLATILE_ENGINE_FIELDS = {"compile_cache_dir", "compiled_program_store", "log_compiles", "hub_timeout_s",
                          "served_model_name", "warmup"}
PACKAGES = ("yaie_jax", "pallas_kernels")


def default_on() -> bool:
    """The store's default where `compiled_program_store` is None: on for a GPU backend only. On the CPU a
    program loaded in a fresh process can fail on its first call ("NOT_FOUND: Function wrapped_iota not found":
    see `may_save`), and the CPU backend compiles lazily anyway."""
    import jax
    return jax.default_backend() == "gpu"


_PERSISTENT_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_thread_hits = threading.local()
_listener_lock = threading.Lock()
_listener_on = False


def _on_jax_event(event: str, *args, **kwargs) -> None:
    if event == _PERSISTENT_HIT_EVENT:
        _thread_hits.count = getattr(_thread_hits, "count", 0) + 1


def persistent_cache_hits() -> int:
    """How many compiles on the calling thread JAX's persistent compilation cache has answered so far (a JAX
    monitoring event, recorded on the compiling thread; counted from the first call of this function on)."""
    global _listener_on
    with _listener_lock:
        if not _listener_on:
            import jax
            jax.monitoring.register_event_listener(_on_jax_event)
            _listener_on = True
    return getattr(_thread_hits, "count", 0)


def may_save(from_persistent_cache: bool) -> bool:
    """Whether a program just compiled may go into the store. Not on the CPU when JAX's persistent compilation
    cache answered its compile: an XLA:CPU executable loaded from that cache and serialized again lacks its
    functions' code, so a fresh process that loads it fails on its first call ("NOT_FOUND: Function wrapped_iota
    not found", jax 0.10.2; reproduced by tests/test_aot_cache.py with three processes). On the GPU such programs
    load and run (bench/NOTES.md), and storing them is what keeps a restart after a code change fast."""
    if not from_persistent_cache:
        return True
    import jax
    return jax.default_backend() != "cpu"


def enabled(setting: Optional[bool]) -> bool:
    """Whether the store is on for the engine argument `compiled_program_store`: True / False, or None for
    `default_on()`."""
    return default_on() if setting is None else bool(setting)


_backend_prepared = False
_backend_lock = threading.Lock()
RUNTIME_LIB_ENV = "MOSAIC_GPU_RUNTIME_LIB_PATH"


def prepare_backend() -> None:
    """What a process must have done before it can load a stored program that it did not lower itself (once;
    threads calling it meanwhile wait until it is done). On a GPU: point the Mosaic GPU custom call at its runtime
    library (MOSAIC_GPU_RUNTIME_LIB_PATH, which importing `jax.experimental.mosaic.gpu` sets): loading a program
    JIT-links each kernel's host code, and without the library the link fails ("Symbols not found:
    mosaic_gpu_init_tma_desc, mosaic_gpu_launch_kernel"). A Mosaic compile in the process sets it too, but warm-up
    threads that load programs must not race the first import: hence once, under a lock, before they start."""
    global _backend_prepared
    with _backend_lock:
        if _backend_prepared:
            return
        import jax
        if jax.default_backend() == "gpu":
            try:
                import jax.experimental.mosaic.gpu  # noqa: F401  (sets MOSAIC_GPU_RUNTIME_LIB_PATH)
            except Exception as e:  # no Mosaic GPU in this jaxlib: programs without Mosaic kernels still load
                logger.info("compiled-program store: jax.experimental.mosaic.gpu not importable (%s: %s)",
                            type(e).__name__, e)
            if not os.environ.get(RUNTIME_LIB_ENV):
                lib = _mosaic_runtime_lib()
                if lib:
                    os.environ[RUNTIME_LIB_ENV] = lib
            logger.info("compiled-program store: %s=%s", RUNTIME_LIB_ENV, os.environ.get(RUNTIME_LIB_ENV))
        _backend_prepared = True


def _mosaic_runtime_lib() -> Optional[str]:
    """The Mosaic GPU runtime library beside jaxlib's Mosaic GPU extension, or None."""
    try:
        from jax._src.lib import mosaic_gpu as mosaic_gpu_lib
        path = os.path.join(os.path.dirname(mosaic_gpu_lib._mosaic_gpu_ext.__file__), "libmosaic_gpu_runtime.so")
    except Exception:
        return None
    return path if os.path.exists(path) else None


def _no_addresses(text: str) -> str:
    return re.sub(r"0x[0-9a-fA-F]+", "0x", text)


def source_digest(packages: Iterable[str] = PACKAGES) -> str:
    """sha256 over the .py files (relative path and bytes) of the given importable packages."""
    import importlib.util
    h = hashlib.sha256()
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            h.update(f"missing:{pkg}".encode())
            continue
        root = list(spec.submodule_search_locations)[0]
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    h.update(os.path.relpath(path, root).encode() + b"\0")
                    with open(path, "rb") as f:
                        h.update(f.read())
    return h.hexdigest()


def environment_fingerprint() -> dict:
    """What, outside the model and engine, decides a compiled program: versions, devices, JAX settings, env."""
    import jax
    from jax._src.lib import version_str as jaxlib_version
    devices = jax.devices()
    config = {k: _no_addresses(repr(v)) for k, v in sorted(jax.config.values.items())
              if k not in VOLATILE_JAX_CONFIG}
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES) and k not in VOLATILE_ENV}
    return {"jax": jax.__version__, "jaxlib": jaxlib_version, "backend": jax.default_backend(),
            "device_kind": devices[0].device_kind, "platform_version": devices[0].client.platform_version,
            "device_count": len(devices), "process_count": jax.process_count(), "jax_config": config, "env": env,
            "source": source_digest()}


def tree_signature(tree) -> list:
    """[treedef, (shape, dtype, sharding) per leaf] of a pytree of arrays."""
    import jax
    import numpy as np
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sig = [str(treedef)]
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype    # (never copies a device array)
        sig.append([list(np.shape(x)), str(dtype),
                    _no_addresses(str(sharding)) if sharding is not None else None])
    return sig


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class ExecutableStore:
    """Compiled programs of one fingerprint, one file per program key, under `root`/<fingerprint>/."""

    def __init__(self, root: str, fingerprint: dict):
        self.root = root
        self.fingerprint = fingerprint
        self.digest = _digest(fingerprint)[:32]
        self.dir = os.path.join(root, self.digest)
        self.loaded = 0
        self.saved = 0

    @classmethod
    def for_runner(cls, runner, cache_dir: Optional[str] = None) -> Optional["ExecutableStore"]:
        """The store of a ModelRunner's programs (call it once the params and KV pool are placed), under
        `cache_dir` (default: the engine's compile_cache_dir), or None when off: no directory, the engine argument
        `compiled_program_store` False (or None on the CPU: `default_on`), several processes, or a failure to
        build the fingerprint."""
        cache_dir = cache_dir or getattr(runner.config, "compile_cache_dir", None)
        if not cache_dir or not enabled(getattr(runner.config, "compiled_program_store", None)):
            return None
        try:
            import jax
            if jax.process_count() > 1:
                return None
            engine_cfg = {k: v for k, v in dataclasses.asdict(runner.config).items()
                          if k not in VOLATILE_ENGINE_FIELDS}
            fp = {"environment": environment_fingerprint(),
                  "model_config": json.loads(runner.mc.to_json()) if hasattr(runner.mc, "to_json")
                  else _no_addresses(repr(runner.mc)),
                  "model_class": f"{type(runner.model).__module__}.{type(runner.model).__qualname__}",
                  "engine_config": engine_cfg, "max_model_len": runner.max_model_len,
                  "num_gpu_blocks": runner.num_gpu_blocks, "attention_backend": runner.attention_backend,
                  "mesh": _no_addresses(repr(getattr(runner, "mesh", None))),
                  "params": tree_signature(runner.params), "kv_caches": tree_signature(runner.kv_caches)}
        except Exception as e:  # never let the store break start-up
            logger.warning("compiled-program store off: cannot fingerprint the runner (%s: %s)",
                           type(e).__name__, e)
            return None
        prepare_backend()      # now, on the thread building the engine, before warm-up threads load programs
        return cls(os.path.join(os.path.expanduser(str(cache_dir)), SUBDIR), fp)

    # ------------------------------------------------------------------------------------------------ entries
    def path_of(self, key) -> str:
        return os.path.join(self.dir, _digest(_no_addresses(repr(key)))[:40] + ".pkl")

    def load(self, key):
        """The stored program for `key` as a jax.stages.Compiled, or None (absent, or unreadable: then removed)."""
        path = self.path_of(key)
        if not os.path.exists(path):
            return None
        try:
            from jax.experimental.serialize_executable import deserialize_and_load
            prepare_backend()
            with open(path, "rb") as f:
                payload, in_tree, out_tree = pickle.load(f)
            fn = deserialize_and_load(payload, in_tree, out_tree)
        except Exception as e:
            logger.warning("compiled-program store: could not load %s (%s: %s); compiling instead", path,
                           type(e).__name__, e)
            try:
                os.remove(path)
            except OSError:
                pass
            return None
        self.loaded += 1
        return fn

    def save(self, key, compiled) -> bool:
        """Store `compiled` (a jax.stages.Compiled) under `key`; False where it cannot be serialized or written."""
        try:
            from jax.experimental.serialize_executable import serialize
            payload, in_tree, out_tree = serialize(compiled)
            data = pickle.dumps((payload, in_tree, out_tree), protocol=pickle.HIGHEST_PROTOCOL)
            new_dir = not os.path.isdir(self.dir)
            os.makedirs(self.dir, exist_ok=True)
            if new_dir:
                self._write_fingerprint()
                self._prune()
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path_of(key))
        except Exception as e:
            logger.warning("compiled-program store: could not save a program (%s: %s)", type(e).__name__, e)
            return False
        self.saved += 1
        return True

    def _write_fingerprint(self) -> None:
        with open(os.path.join(self.dir, "fingerprint.json"), "w") as f:
            json.dump(self.fingerprint, f, indent=1, sort_keys=True, default=str)

    def _prune(self, keep: int = KEEP_FINGERPRINTS) -> None:
        """Remove all but the `keep` most recently modified fingerprint directories (code or settings changed)."""
        try:
            dirs = [os.path.join(self.root, d) for d in os.listdir(self.root)]
            dirs = sorted((d for d in dirs if os.path.isdir(d)), key=os.path.getmtime, reverse=True)
        except OSError:
            return
        for d in dirs[keep:]:
            if os.path.abspath(d) != os.path.abspath(self.dir):
                shutil.rmtree(d, ignore_errors=True)


def timed_load(store: Optional[ExecutableStore], key):
    """(compiled or None, seconds): `store.load(key)` timed; (None, 0.0) without a store."""
    if store is None:
        return None, 0.0
    t0 = time.perf_counter()
    fn = store.load(key)
    return fn, time.perf_counter() - t0
