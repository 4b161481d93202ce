"""Engine configuration: one dataclass, one place that validates, one place that reads the environment.

Engine args use vLLM's names where one exists. Invalid values raise `ValueError` naming the argument.
(Server settings and the YAML file < env vars < CLI flags layering live beside this, in server/settings.py.)

Environment variables. A few knobs were environment variables before they were fields; those variables still
work, as aliases (`ENV_ALIASES`), and are read here only, by `env_default`:
  * the defaults of those `EngineConfig` fields call it, so `LLM(...)` in a process with, say,
    `YAIE_TP_HEAD=vocab` gets `tp_head_layout="vocab"` (an argument passed explicitly wins);
  * the server's settings layering (server/settings.py) reads the same aliases from the environment it is given,
    in its environment layer (a `YAIE_<FIELD>` variable wins over an alias of the same field);
  * library functions that take one of these knobs without an `EngineConfig` (`parallel.make_tp_placement`,
    `models.loader.load_model`, `engine.compile_logging.setup_compile_cache`) default to `env_default` of it as well.
The engine passes its config's values down explicitly; no other module reads these variables.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .errors import InvalidArgumentError

SCHEDULING_POLICIES = ("fcfs", "priority", "fair", "latency")
PREEMPTION_MODES = ("swap", "recompute")
ATTENTION_BACKENDS = ("auto", "xla", "pallas")
DTYPES = ("auto", "bfloat16", "float16", "float32")   # auto: yaie_jax/models/dtype_policy.py
QUANTIZATIONS = ("int8", "int4", "fp8")        # weight quantization at load (yaie_jax/quantization); None: off
TP_HEAD_LAYOUTS = ("replicated", "vocab")      # LM head / token embedding under tensor parallelism (parallel.py)
LOG_COMPILES_LEVELS = (0, 1, 2)                # off, compiles + persistent-cache hits, + cache-key hashes
_OFF_WORDS = ("", "0", "false", "no", "off")


def parse_switch(text: str) -> Optional[bool]:
    """An on/off environment value: empty -> None (unset), 0/false/no/off -> False, anything else -> True."""
    text = text.strip().lower()
    return None if not text else text not in _OFF_WORDS


def _parse_log_compiles(text: str) -> int:
    """YAIE_LOG_COMPILE_CACHE: empty/0/false/no/off -> 0, "2" -> 2, anything else -> 1."""
    text = text.strip().lower()
    return 0 if text in _OFF_WORDS else 2 if text == "2" else 1


def _parse_tp_head_layout(text: str) -> str:
    """YAIE_TP_HEAD: empty -> "replicated"; otherwise one of TP_HEAD_LAYOUTS."""
    name = text.strip() or "replicated"
    if name not in TP_HEAD_LAYOUTS:
        raise ValueError(f"must be one of {TP_HEAD_LAYOUTS}")
    return name


def _builtin_compile_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "yaie_jax", "xla")


# field -> (the environment variable that set it before it was a field, its parser, the built-in default)
ENV_ALIASES: Dict[str, Tuple[str, Callable[[str], Any], Callable[[], Any]]] = {
    "compile_cache_dir": ("YAIE_COMPILE_CACHE_DIR", str, _builtin_compile_cache_dir),
    "tp_head_layout": ("YAIE_TP_HEAD", _parse_tp_head_layout, lambda: "replicated"),
    "compiled_program_store": ("YAIE_AOT_CACHE", parse_switch, lambda: None),
    "log_compiles": ("YAIE_LOG_COMPILE_CACHE", _parse_log_compiles, lambda: 0),
    "hub_timeout_s": ("YAIE_HUB_TIMEOUT_S", float, lambda: 10.0),
}


def builtin_default(field: str) -> Any:
    """The default of an environment-backed field when its variable is not set."""
    return ENV_ALIASES[field][2]()


def env_default(field: str, environ: Optional[Mapping[str, str]] = None) -> Any:
    """The default of an environment-backed field (`ENV_ALIASES`): its variable in `environ` (default:
    os.environ) parsed, or the built-in default where the variable is not set. A value that does not parse
    raises ValueError naming the variable."""
    var, parse, _ = ENV_ALIASES[field]
    environ = os.environ if environ is None else environ
    if var not in environ:
        return builtin_default(field)
    try:
        return parse(environ[var])
    except ValueError as e:
        raise ValueError(f"invalid environment variable {var}={environ[var]!r} (engine argument {field}): {e}") \
            from None


def _from_env(field: str):
    return dataclasses.field(default_factory=lambda: env_default(field))


@dataclasses.dataclass
class EngineConfig:
    model: Optional[str] = None                 # hub id, directory, .gguf file or orbax dir; None = embedded default
    tokenizer: Optional[str] = None             # defaults to `model`
    skip_tokenizer_init: bool = False           # no tokenizer: prompts are token ids, outputs token ids (text "")
    dtype: str = "auto"                         # auto: float32 on CPU and for the embedded model, else the
                                                # checkpoint's 16-bit dtype (models/dtype_policy.py)
    quantization: Optional[str] = None          # None | "int8" | "int4" (weight-only) | "fp8" (W8A8): projection
                                                # kernels quantized at load; embeddings, LM head stay (quantization/)
    quantization_group_size: int = 128          # int4: input rows per scale (must divide every projection's input)
    seed: int = 0
    max_model_len: Optional[int] = None         # default: the model's max positions
    block_size: int = 16
    num_gpu_blocks: Optional[int] = None        # None: sized from gpu_memory_utilization
    gpu_memory_utilization: float = 0.9
    num_cpu_blocks: int = 0
    max_num_seqs: Optional[int] = None          # None: chosen from device, model and memory (defaults.py)
    max_num_batched_tokens: Optional[int] = None  # None: likewise (8192 on a GPU, 2048 on the CPU)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"
    preemption_mode: str = "swap"               # swap when the host pool has room, else recompute
    attention_backend: str = "auto"             # auto: pallas on GPU, xla elsewhere
    tensor_parallel_size: int = 1
    tp_head_layout: str = _from_env("tp_head_layout")   # LM head and token embedding under TP: "replicated"
                                                # or "vocab"-split (parallel.py; YAIE_TP_HEAD)
    target_itl_ms: Optional[float] = None       # adaptive decode batch to hold this inter-token latency
    num_decode_steps: Optional[int] = None      # decode steps fused in one device call when nothing waits
                                                # (None: 8 on a GPU, 1 on the CPU; defaults.py)
    async_scheduling: bool = True               # dispatch fused call i+1 before reading call i's tokens
    pipelined_prefill: bool = False             # dispatch the next prompt step before reading a prompt-only one
                                                # (off: it raised W4's TTFT ratio and W3's p99 TTFT; bench/NOTES.md)
    cascade_attention: bool = True              # decode reads prefixes shared by sequences once (pallas backend)
    deterministic: bool = False                 # batch-invariant steps: a request's tokens and logprobs do not
                                                # depend on the rest of the batch, prefix-cache hits, chunking or
                                                # preemption (yaie_jax/executor/deterministic.py); cascade attention off
    # JAX's persistent compilation cache; None or "": off (default ~/.cache/yaie_jax/xla; YAIE_COMPILE_CACHE_DIR)
    compile_cache_dir: Optional[str] = _from_env("compile_cache_dir")
    # the compiled step programs stored under compile_cache_dir (aot_cache.py); None: on for a GPU backend, off
    # on the CPU (YAIE_AOT_CACHE)
    compiled_program_store: Optional[bool] = _from_env("compiled_program_store")
    # 1: log every XLA compile and whether JAX's persistent cache had it; 2: also each cache-key component's hash
    # (engine.setup_compile_logging; YAIE_LOG_COMPILE_CACHE)
    log_compiles: int = _from_env("log_compiles")
    hub_timeout_s: float = _from_env("hub_timeout_s")   # bound on a load's first HF hub request (models/loader.py)
    warmup: bool = True                         # compile every bucket at start-up
    gc_freeze: bool = True                      # move start-up's objects out of the collector's reach (gc_pause)
    gc_gen0_threshold: int = 20_000             # allocations between young collections while an engine lives
                                                # (Python's default: 700; 0 keeps the process's setting; gc_pause)
    served_model_name: Optional[str] = None
    coordinator_address: Optional[str] = None   # multi-host: host:port of process 0 (jax.distributed)
    num_processes: int = 1                      # multi-host: number of processes (1 = single process)
    process_id: int = 0                         # multi-host: this process (0 serves and schedules)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise InvalidArgumentError(f"invalid engine argument {name}={getattr(self, name)!r}: {why}", field=name)

        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {DTYPES}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            bad("quantization", f"must be None or one of {QUANTIZATIONS}")
        if not isinstance(self.quantization_group_size, int) or isinstance(self.quantization_group_size, bool) \
                or self.quantization_group_size < 1:
            bad("quantization_group_size", "must be a positive integer")
        if not isinstance(self.block_size, int) or self.block_size not in (8, 16, 32, 64, 128):
            bad("block_size", "must be one of 8, 16, 32, 64, 128")
        if self.num_gpu_blocks is not None and (not isinstance(self.num_gpu_blocks, int) or self.num_gpu_blocks < 1):
            bad("num_gpu_blocks", "must be a positive integer or None")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            bad("gpu_memory_utilization", "must be in (0, 1]")
        if not isinstance(self.num_cpu_blocks, int) or self.num_cpu_blocks < 0:
            bad("num_cpu_blocks", "must be a non-negative integer")
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_decode_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                bad(name, "must be a positive integer or None (chosen for the device and model)")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            bad("max_model_len", "must be a positive integer or None")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            bad("scheduling_policy", f"must be one of {SCHEDULING_POLICIES}")
        if self.preemption_mode not in PREEMPTION_MODES:
            bad("preemption_mode", f"must be one of {PREEMPTION_MODES}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            bad("attention_backend", f"must be one of {ATTENTION_BACKENDS}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            bad("tensor_parallel_size", "must be a positive integer")
        if self.target_itl_ms is not None and not self.target_itl_ms > 0:
            bad("target_itl_ms", "must be > 0 or None")
        if not isinstance(self.deterministic, bool):
            bad("deterministic", "must be a boolean")
        if self.tp_head_layout not in TP_HEAD_LAYOUTS:
            bad("tp_head_layout", f"must be one of {TP_HEAD_LAYOUTS}")
        if not (self.compiled_program_store is None or isinstance(self.compiled_program_store, bool)):
            bad("compiled_program_store", "must be True, False or None (on for a GPU backend)")
        if not isinstance(self.log_compiles, int) or isinstance(self.log_compiles, bool) \
                or self.log_compiles not in LOG_COMPILES_LEVELS:
            bad("log_compiles", f"must be one of {LOG_COMPILES_LEVELS}")
        if isinstance(self.hub_timeout_s, bool) or not isinstance(self.hub_timeout_s, (int, float)) \
                or not self.hub_timeout_s > 0:
            bad("hub_timeout_s", "must be a number of seconds > 0")
        if not isinstance(self.gc_gen0_threshold, int) or self.gc_gen0_threshold < 0:
            bad("gc_gen0_threshold", "must be a non-negative integer")
        if not isinstance(self.num_processes, int) or self.num_processes < 1:
            bad("num_processes", "must be a positive integer")
        if not isinstance(self.process_id, int) or not 0 <= self.process_id < self.num_processes:
            bad("process_id", f"must be in [0, num_processes={self.num_processes})")
        if self.num_processes > 1 and not self.coordinator_address:
            bad("coordinator_address", "is required when num_processes > 1 (host:port of process 0)")
        if not self.enable_chunked_prefill and self.max_model_len is not None \
                and self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_model_len:
            bad("max_num_batched_tokens", "must be >= max_model_len when chunked prefill is off")

    @classmethod
    def field_names(cls) -> set:
        return {f.name for f in dataclasses.fields(cls)}
