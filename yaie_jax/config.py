"""Engine configuration: one dataclass, one place that validates.

Engine args use vLLM's names where one exists. Invalid values raise `ValueError` naming the argument.
(Server settings and the YAML file < env vars < CLI flags layering live beside this, in the server's config.)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

SCHEDULING_POLICIES = ("fcfs", "priority", "fair", "latency")
PREEMPTION_MODES = ("swap", "recompute")
ATTENTION_BACKENDS = ("auto", "xla", "pallas")
DTYPES = ("auto", "bfloat16", "float16", "float32")   # auto: yaie_jax/models/dtype_policy.py


def default_compile_cache_dir() -> str:
    return os.environ.get("YAIE_COMPILE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "yaie_jax", "xla"))


@dataclasses.dataclass
class EngineConfig:
    model: Optional[str] = None                 # hub id, directory, .gguf file or orbax dir; None = embedded default
    tokenizer: Optional[str] = None             # defaults to `model`
    skip_tokenizer_init: bool = False           # no tokenizer: prompts are token ids, outputs token ids (text "")
    dtype: str = "auto"                         # auto: float32 on CPU and for the embedded model, else the
                                                # checkpoint's 16-bit dtype (models/dtype_policy.py)
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
    target_itl_ms: Optional[float] = None       # adaptive decode batch to hold this inter-token latency
    num_decode_steps: Optional[int] = None      # decode steps fused in one device call when nothing waits
                                                # (None: 8 on a GPU, 1 on the CPU; defaults.py)
    async_scheduling: bool = True               # dispatch fused call i+1 before reading call i's tokens
    pipelined_prefill: bool = False             # dispatch the next prompt step before reading a prompt-only one
                                                # (off: W4's TTFT ratio 0.35 with it vs 0.30, W3's p99 TTFT
                                                # 28.5 vs 23.5 ms on an H200; bench/NOTES.md §15)
    cascade_attention: bool = True              # decode reads prefixes shared by sequences once (pallas backend)
    deterministic: bool = False                 # batch-invariant steps: a request's tokens and logprobs do not
                                                # depend on the rest of the batch, prefix-cache hits, chunking or
                                                # preemption (yaie_jax/deterministic.py); cascade attention off
    compile_cache_dir: Optional[str] = dataclasses.field(default_factory=default_compile_cache_dir)
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
            raise ValueError(f"invalid engine argument {name}={getattr(self, name)!r}: {why}")

        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {DTYPES}")
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
