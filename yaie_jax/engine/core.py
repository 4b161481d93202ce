"""LLMEngine (add / step / abort) and LLM (the offline, vLLM-shaped API).

One `step()`: the scheduler picks the batch (plain Python), the runner executes it on the device and brings
back only the sampled ids, and the engine appends tokens, detokenizes where someone reads text, applies stop
conditions and frees finished sequences' memory (their computed blocks go to the prefix cache).
"""
from __future__ import annotations

import array
import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import operator
import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence as Seq, Union

import jax
import numpy as np

from yaie_jax.executor import distributed
from yaie_jax.engine import gc_pause
from yaie_jax.executor import prompt_logprobs
from yaie_jax.executor import sampling
from yaie_jax.cache import BlockManager
from yaie_jax.config import EngineConfig, env_default
from yaie_jax.engine.detokenizer import CONTEXT_TOKENS, IncrementalDetokenizer, decode_token, final_texts
from yaie_jax.errors import ContextLengthError, InvalidRequestError
from yaie_jax.outputs import CompletionOutput, Logprob, RequestOutput
from yaie_jax.executor.runner import ModelRunner
from yaie_jax.sampling_params import SamplingParams
from yaie_jax.scheduler import Scheduler
from yaie_jax.step_types import SchedulerOutput
from yaie_jax.sequence import Request, Sequence, SeqStatus

logger = logging.getLogger("yaie_jax.engine.core")

PromptType = Union[str, List[int]]


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


def resolve_model_source(model: Optional[str]) -> str:
    if model:
        return model
    from yaie_jax.models.default_model import default_model_path
    return str(default_model_path())


class LLMEngine:
    """Synchronous engine; not thread-safe (the server steps it from one thread)."""

    def __init__(self, config: Optional[EngineConfig] = None, **engine_args):
        if config is None:
            unknown = set(engine_args) - EngineConfig.field_names()
            if unknown:
                raise ValueError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
            config = EngineConfig(**engine_args)
        elif engine_args:
            raise ValueError("pass either an EngineConfig or engine arguments, not both")
        setup_compile_cache(config.compile_cache_dir, config.log_compiles)
        gc_pause.install_pause_meter()        # process-wide collector-pause meter (get_stats()["gc"]); idempotent
        distributed.initialize_for(config)     # multi-host: jax.distributed before any device use

        from yaie_jax.models.dtype_policy import resolve_dtype
        from yaie_jax.models.loader import load_model
        from yaie_jax.tokenizer import load_tokenizer
        source = resolve_model_source(config.model)
        self.requested_dtype = config.dtype
        dtype, why = resolve_dtype(config.dtype, config.model)
        if dtype != config.dtype:
            config = dataclasses.replace(config, dtype=dtype)
        logger.info("dtype %s (%s: %s)", dtype, self.requested_dtype, why)
        if dtype == "float32" and jax.default_backend() != "cpu":
            # GPUs run float32 matmuls in TF32 by default (10-bit mantissa): fp32 logits then differed from HF's
            # fp32 by up to 5e-2 on an H200 (bench/NOTES.md §17). float32 means float32: full-precision products
            jax.config.update("jax_default_matmul_precision", "highest")
            logger.info("float32 on %s: jax_default_matmul_precision=highest (no TF32)", jax.default_backend())
        self.config = config
        self.model_source = source
        # the tokenizer loads in a thread while the weights load and go to the device (its imports take
        # seconds of a server start-up; the weights' reads and copies mostly run without the GIL)
        tokenizer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="yaie-tokenizer")
        if config.skip_tokenizer_init:                 # token ids only: no tokenizer at all
            tokenizer_future = tokenizer_pool.submit(lambda: None)
        else:
            tokenizer_future = tokenizer_pool.submit(load_tokenizer, config.tokenizer or source,
                                                     hub_timeout_s=config.hub_timeout_s)
        tokenizer_pool.shutdown(wait=False)
        try:
            self.model = load_model(source, dtype=config.dtype, hub_timeout_s=config.hub_timeout_s,
                                    quantization=config.quantization,
                                    quantization_group_size=config.quantization_group_size)
        except BaseException:
            tokenizer_future.cancel()
            raise
        self.model_config = self.model.config
        max_pos = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > max_pos:
            raise ValueError(f"invalid engine argument max_model_len={config.max_model_len}: "
                             f"the model supports at most {max_pos} positions")
        self.max_model_len = config.max_model_len or max_pos
        config, self.auto_args = self._resolve_batch_defaults(config)
        self.config = config
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"invalid engine argument max_num_batched_tokens={config.max_num_batched_tokens}: "
                             f"must be >= max_model_len ({self.max_model_len}) when chunked prefill is off")
        if config.tensor_parallel_size > 1:
            from yaie_jax.executor.parallel import group_fused_qkv, make_tp_placement
            self.model = group_fused_qkv(self.model, config.tensor_parallel_size)
            placement = make_tp_placement(self.model, config.tensor_parallel_size, head=config.tp_head_layout)
        else:
            placement = {}
        t0 = time.perf_counter()
        self.runner = ModelRunner(self.model, config, self.max_model_len, num_gpu_blocks=config.num_gpu_blocks,
                                  **placement)
        logger.info("model runner ready in %.2f s (weights on the device, KV pool of %d blocks)",
                    time.perf_counter() - t0, self.runner.num_gpu_blocks)
        self.block_manager = BlockManager(self.runner.num_gpu_blocks, config.block_size, config.num_cpu_blocks,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, self.max_model_len)
        self.vocab_size = self.model_config.vocab_size
        self._request_counter = itertools.count()
        self._step_counter = 0
        self._inflight: Optional[_InFlight] = None        # a dispatched call not yet read back (fused or prompt)
        self._last_pipelined_t: Optional[float] = None
        # host seconds per phase of step() (schedule, sampling_batch, dispatch, commit, wait_device, process):
        # where the host's time goes; wait_device near 0 means the device waits on the host
        self.host_time_s: Dict[str, float] = collections.defaultdict(float)
        self._num_pipelined_calls = 0                     # fused calls dispatched before the previous was read
        # pipelining needs the previous call's tokens on this process's devices: single-process only
        self._async_scheduling = config.async_scheduling and jax.process_count() == 1
        self._pipelined_prefill = config.pipelined_prefill and self._async_scheduling
        self._num_pipelined_prefill_calls = 0             # prompt steps dispatched before the previous was read
        # host work to do while a dispatched call runs (`_fetch`); `LLM.generate` adds its requests there
        self.on_device_wait: Optional[Callable[[Callable[[], bool]], None]] = None
        self.served_model_name = config.served_model_name or (config.model or "default")
        if config.warmup:
            if self.runner.cpu_plan is not None:
                # CPU compiles are slow (4-15 s per program): no warm-up of every bucket; a first chat request's
                # programs compile in the background from now on, the rest on first use (cpu_programs.py)
                self.runner.cpu_plan.start()
                logger.info("CPU backend: no bucket warm-up; compiling in the background: %s; other programs "
                            "compile on first use", ", ".join(f"{k} T={t} S={s} {v}" for k, t, s, v in
                                                            self.runner.cpu_plan.startup_programs()))
            elif jax.default_backend() != "cpu":
                self.warmup()
            else:
                logger.info("CPU backend with several processes: no warm-up; programs compile on first use")
        # joined last: the warm-up does not need it (its imports took ~2 s of the GPU warm start when joined before)
        self.tokenizer = tokenizer_future.result()
        self.eos_token_ids = self._eos_ids()
        distributed.setup(self)   # multi-host: process 0 publishes its runner calls; the others follow, then exit
        gc_pause.raise_gen0_threshold(config.gc_gen0_threshold)
        self._gc_frozen_programs = -1      # len(runner.compile_log) at the last gc freeze
        self._freeze_gc_objects()

    def _resolve_batch_defaults(self, config: EngineConfig):
        """Fill the batch-shape arguments the user left unset (yaie_jax/defaults.py has the rule)."""
        from yaie_jax import defaults
        from yaie_jax.executor.runner import JNP_DTYPES
        mc, tp = self.model_config, max(1, config.tensor_parallel_size)
        itemsize = np.dtype(JNP_DTYPES[config.dtype]).itemsize
        per_token = defaults.kv_bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, itemsize) // tp
        stats = None
        if jax.default_backend() != "cpu":
            try:
                stats = jax.local_devices()[0].memory_stats()
            except Exception:
                stats = None
        on_gpu = bool(stats and "bytes_limit" in stats)
        weights = sum(np.asarray(a).size for a in jax.tree_util.tree_leaves(self.model.params)) * itemsize // tp
        config, filled = defaults.resolve_batch_defaults(
            config, on_gpu=on_gpu, max_model_len=self.max_model_len, bytes_per_token=per_token,
            memory_limit_bytes=stats["bytes_limit"] if on_gpu else None,
            bytes_in_use=(stats.get("bytes_in_use", 0) if on_gpu else 0) + weights)
        if filled:
            logger.info("engine arguments chosen for this %s and model (yaie_jax/defaults.py): %s",
                        "GPU" if on_gpu else "CPU", ", ".join(f"{k}={v}" for k, v in filled.items()))
        return config, filled

    def _eos_ids(self) -> List[int]:
        ids = set()
        for v in (getattr(self.tokenizer, "eos_token_id", None), self.model_config.eos_token_id):
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)
        return sorted(ids)

    # ------------------------------------------------------------------ requests
    def make_request(self, request_id: Optional[str], prompt: PromptType, params: Optional[SamplingParams] = None,
                     *, prompt_token_ids: Optional[List[int]] = None, priority: int = 0,
                     client_id: Optional[str] = None, queue_timeout_s: Optional[float] = None,
                     timeout_s: Optional[float] = None, arrival_time: Optional[float] = None,
                     stream: bool = True) -> Request:
        """Validate and tokenize a request without queueing it (reads engine state only, so the server may call
        it from its own thread). Raises `InvalidRequestError` (a ValueError with the field at fault as `param`;
        `ContextLengthError` for an over-long prompt + max_tokens) for an empty prompt or out-of-range ids."""
        params = params or SamplingParams()
        if request_id is None:
            request_id = f"req-{next(self._request_counter)}"
        if self.tokenizer is None and (isinstance(prompt, str) and prompt_token_ids is None or params.stop):
            raise InvalidRequestError("this engine has no tokenizer (skip_tokenizer_init): prompts must be token "
                                      "ids and stop must be empty (use stop_token_ids)",
                                      param="stop" if params.stop else "prompt")
        if prompt_token_ids is None:
            if isinstance(prompt, str):
                prompt_token_ids = self.tokenizer.encode(prompt, add_special_tokens=self._add_special_tokens())
                text = prompt
            else:
                prompt_token_ids = prompt
                text = None
        else:
            text = prompt if isinstance(prompt, str) else None
        prompt_token_ids = self._checked_token_ids(prompt_token_ids)
        n_prompt = len(prompt_token_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n_prompt
        if n_prompt + max_tokens > self.max_model_len or max_tokens < 1:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n_prompt + max(max_tokens, 1)} tokens ({n_prompt} in the prompt, {max(max_tokens, 1)} for the "
                f"completion). Please reduce the prompt or max_tokens (context length exceeded).")
        if params.n > self.config.max_num_seqs:
            raise InvalidRequestError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}", param="n")
        for t in params.stop_token_ids:
            if not 0 <= t < self.vocab_size:
                raise InvalidRequestError(f"stop_token_ids must be in [0, {self.vocab_size})",
                                          param="stop_token_ids")
        req = Request(request_id, text, prompt_token_ids, params, priority=priority, client_id=client_id,
                      arrival_time=arrival_time, queue_timeout_s=queue_timeout_s, timeout_s=timeout_s,
                      max_tokens=max_tokens)
        req.stream = stream
        return req

    def _checked_token_ids(self, ids) -> List[int]:
        """`ids` (a sequence of integers: ints, numpy integers or bools, or a 1-D integer array) as a new list of
        Python ints, or ValueError: empty, not integers, or outside [0, vocab_size). A list of ints goes through
        a C array, cheaper than numpy's type inference (a 576-token prompt's make_request: 77 instead of 115 us
        on the development CPU); this runs once per request, before its first schedule."""
        try:
            arr = array.array("q", ids.tolist() if isinstance(ids, np.ndarray) and ids.ndim == 1 else ids)
        except (TypeError, OverflowError, ValueError):
            arr = None                                   # floats, strings, nested lists, huge ints: checked below
        if arr is None:
            try:
                out = [operator.index(t) for t in ids]
            except TypeError:
                raise InvalidRequestError("prompt token ids must be integers", param="prompt") from None
            if out and (min(out) < 0 or max(out) >= self.vocab_size):
                raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        else:
            out = arr.tolist()
            if out:
                view = np.frombuffer(arr, np.int64)      # [n] no copy
                if view.min() < 0 or view.max() >= self.vocab_size:
                    raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        if not out:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return out

    def add_request(self, request_id: Optional[str], prompt: PromptType, params: Optional[SamplingParams] = None,
                    **kwargs) -> str:
        """Queue a request (see `make_request` for arguments and errors). Returns its id.

        `stream=False` means nobody reads partial outputs: text is decoded once at the end (cheaper), and
        `step()` returns this request only when it finishes.
        """
        req = self.make_request(request_id, prompt, params, **kwargs)
        self.add_prepared(req)
        return req.request_id

    def add_prepared(self, req: Request) -> None:
        self.scheduler.add_request(req)

    def _add_special_tokens(self) -> bool:
        return True

    def abort_request(self, request_id: Union[str, Iterable[str]]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            req = self.scheduler.abort_request(rid)
            if req is not None:
                self.scheduler.pop_finished(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    # ------------------------------------------------------------------ the step
    def step(self) -> List[RequestOutput]:
        """One scheduling step: returns the outputs of requests that advanced (streaming) or finished.

        Fused decode calls are pipelined (`async_scheduling`): the next fused call is scheduled and dispatched
        before the tokens of the one in flight are read back, so the host's bookkeeping for call i overlaps the
        device's work on call i+1. A step() then returns call i's outputs while call i+1 runs. With
        `pipelined_prefill`, prompt-only steps pipeline the same way (`_step_pipelined`)."""
        if self.runner.first_runs_pending:
            self.runner.run_first_runs()           # programs compiled in the background since the last step
        if self._inflight is not None:
            return self._step_pipelined()
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        self.host_time_s["schedule"] += time.perf_counter() - t0
        if out.scheduled and ((out.num_steps > 1 and self._async_scheduling) or self._pipelines_after(out)):
            self._inflight = self._dispatch(out)
            return self._step_pipelined(timed_out=out.timed_out)
        finished_now: Dict[str, Request] = {r.request_id: r for r in out.timed_out}
        touched: Dict[str, Request] = {}
        if out.scheduled:
            t0 = time.perf_counter()
            inflight = self._dispatch(out)
            result = self._fetch(inflight)
            self._process(out, result, finished_now, touched)
            self.scheduler.record_step_time((time.perf_counter() - t0) * 1e3,
                                            len(out.scheduled) if out.is_decode_only else 0)
        return self._outputs(finished_now, touched)

    def _fetch(self, inflight: "_InFlight"):
        """Wait for a dispatched call and bring its sampled ids to the host (the only device -> host copy). Before
        waiting, `on_device_wait` (if set) may do host work while the call runs: it gets a function telling
        whether the call is done, and must return soon after that turns true, and must not raise."""
        if self.on_device_wait is not None:
            t0 = time.perf_counter()
            self.on_device_wait(inflight.result.token_ids.is_ready)
            self.host_time_s["on_device_wait"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        result = jax.device_get(inflight.result)
        self.host_time_s["wait_device"] += time.perf_counter() - t0
        if inflight.prompt_logprobs is not None:
            rows, device_result = inflight.prompt_logprobs
            prompt_logprobs.record(rows, jax.device_get(device_result),
                                   lambda t: decode_token(self.tokenizer, t))
        return result

    def _dispatch(self, out: SchedulerOutput, prev: Optional["_InFlight"] = None) -> "_InFlight":
        """Build the step's sampling batch, enqueue the step on the device and commit it in the scheduler.
        prev: the fused call still in flight whose last tokens are this call's inputs (pipelined decode)."""
        t0 = time.perf_counter()
        rows = out.scheduled
        pending = prev.out.num_steps if prev is not None else 0
        # one call builds every fused step's rows (keys advance with the token index), stacked [num_steps, ...]
        sbatch, flags = sampling.build_sampling_batch(
            [(s.seq, s.seq.request.params) for s in rows], pad_to=self.runner.padded_num_seqs(out),
            eos_token_ids=self.eos_token_ids, engine_seed=self.config.seed, vocab_size=self.vocab_size,
            num_steps=out.num_steps, step_offset=pending)
        if prev is not None:
            prev_tokens = (prev.last_tokens, prev.rows)
        elif out.num_steps > 1 and self._async_scheduling and self.runner.last_fused_tokens is not None:
            # nothing in flight: every input token is on the host, but the argument stays a device array (any
            # earlier call's tokens, no row taken from them): a numpy/device switch costs the call's fast path
            prev_tokens = (self.runner.last_fused_tokens, {})
        else:
            prev_tokens = None
        t1 = time.perf_counter()
        result = self.runner.dispatch(out, sbatch, flags, prev_tokens=prev_tokens)
        t2 = time.perf_counter()
        self._step_counter += 1
        self.scheduler.commit_step(out)
        self.host_time_s["commit"] += time.perf_counter() - t2
        self.host_time_s["sampling_batch"] += t1 - t0
        self.host_time_s["dispatch"] += t2 - t1
        last = self.runner.last_fused_tokens if out.num_steps > 1 else None
        prompt_lp = None
        if self.runner.last_prompt_logprobs is not None:
            prompt_lp = (self.runner.last_prompt_rows, self.runner.last_prompt_logprobs)
        return _InFlight(out, result, {s.seq.seq_id: i for i, s in enumerate(rows)}, last, prompt_lp)

    def _step_pipelined(self, timed_out: Iterable[Request] = ()) -> List[RequestOutput]:
        """With a call in flight: schedule and dispatch the next one first, then read back and process the call in
        flight, so the host's scheduling and dispatch of call i+1 overlap the device's call i. After a fused call
        the next is its continuation (`Scheduler.schedule_continuation`: input tokens taken on the device); after
        a prompt step (`pipelined_prefill`, if `_pipelines_after` allows) it is a normal step, the in-flight step's
        sampling rows pinned (not scheduled, not preempted). Nothing is dispatched when neither applies."""
        cur = self._inflight
        fused = cur.out.num_steps > 1
        nxt_out = None
        t0 = time.perf_counter()
        if fused:
            nxt_out = self.scheduler.schedule_continuation(pending=cur.out.num_steps)
        elif self._pipelines_after(cur.out):
            nxt_out = self.scheduler.schedule(pinned=frozenset(s.seq.seq_id for s in cur.out.scheduled if s.sample))
        self.host_time_s["schedule"] += time.perf_counter() - t0
        self._inflight = None
        if nxt_out is not None and nxt_out.scheduled:
            self._inflight = self._dispatch(nxt_out, prev=cur if fused else None)
            if fused:
                self._num_pipelined_calls += 1
            else:
                self._num_pipelined_prefill_calls += 1
        finished_now: Dict[str, Request] = {r.request_id: r for r in timed_out}
        if nxt_out is not None:
            finished_now.update((r.request_id, r) for r in nxt_out.timed_out)
        touched: Dict[str, Request] = {}
        result = self._fetch(cur)
        self._process(cur.out, result, finished_now, touched)
        if fused:
            now = time.perf_counter()
            if self._last_pipelined_t is not None and self._inflight is not None:
                self.scheduler.record_step_time((now - self._last_pipelined_t) * 1e3, len(cur.out.scheduled))
            self._last_pipelined_t = now if self._inflight is not None else None
        return self._outputs(finished_now, touched)

    def _pipelines_after(self, out: SchedulerOutput) -> bool:
        """Whether the step after `out` may be scheduled and dispatched before `out`'s tokens are read back
        (`pipelined_prefill`): `out` is a single step of prompt tokens only (no row decodes), and prompts wait.
        The next step then holds only rows whose input tokens are on the host (prompt tokens): the rows sampling in
        `out` sit it out, which is why a step with decode rows does not pipeline (they would decode every other
        step)."""
        return (self._pipelined_prefill and out.num_steps == 1 and bool(self.scheduler.waiting)
                and all(s.seq.num_output_tokens == 0 for s in out.scheduled))

    def _process(self, out: SchedulerOutput, result, finished_now: Dict[str, Request],
                 touched: Dict[str, Request]) -> None:
        """Append the sampled tokens of a finished device call (host arrays), apply stop conditions, note which
        requests advanced or finished. Rows whose sequence is no longer running (finished or aborted while the
        call was in flight) are skipped, and so are tokens sampled after a sequence stopped."""
        t0 = time.perf_counter()
        now = time.monotonic()
        K = out.num_steps
        tokens = result.token_ids.tolist() if K == 1 else None     # [S]
        rows = result.token_ids.T.tolist() if K > 1 else None      # [S][num_steps]
        views = [result] if K == 1 else [_StepView(result, j) for j in range(K)]
        for i, s in enumerate(out.scheduled):
            seq = s.seq
            req = seq.request
            if not s.sample or seq.status is not SeqStatus.RUNNING:
                continue
            if rows is None or not self._append_row(seq, rows[i], now):
                for j in range(K):
                    token = tokens[i] if K == 1 else rows[i][j]
                    self._append_token(seq, token, views[j], i)
                    if req.first_token_time is None:
                        req.first_token_time = now
                    if seq.num_output_tokens == 1 and self.config.enable_prefix_caching:
                        # the prompt is computed: share it with requests admitted from now on
                        self.block_manager.cache_sequence(seq.seq_id, seq.token_ids[:seq.num_computed_tokens])
                    self._check_stop(seq)
                    if seq.status is not SeqStatus.RUNNING:
                        break       # tokens sampled after a stop in a fused multi-step call are dropped
            if req.finished:
                finished_now[req.request_id] = req
            elif req.stream:
                touched[req.request_id] = req
        self.host_time_s["process"] += time.perf_counter() - t0

    def _outputs(self, finished_now: Dict[str, Request], touched: Dict[str, Request]) -> List[RequestOutput]:
        if finished_now:
            self._decode_final_texts(finished_now.values())
        outputs = [self._make_output(r) for r in touched.values() if r.request_id not in finished_now]
        for req in finished_now.values():
            outputs.append(self._make_output(req))
            self.scheduler.pop_finished(req)
        return outputs

    def _append_row(self, seq: Sequence, row: List[int], now: float) -> bool:
        """The tokens of one sequence from a fused call, appended in one go; the same result as appending them one
        at a time (`_append_token` + `_check_stop`), for a sequence that needs nothing per token (no logprobs, no
        incremental text: not streamed, no stop strings). False (nothing done) for any other sequence."""
        req = seq.request
        p = req.params
        if seq.logprobs is not None or seq.detokenizer is not None or req.stream or p.stop:
            return False
        n0 = seq.num_output_tokens
        limit = min(len(row), req.max_tokens - n0, self.max_model_len - len(seq.token_ids))   # to a length stop
        if limit < 1:
            return False
        stop_ids = p.stop_token_ids
        take, stop_token = limit, None
        if stop_ids or not p.ignore_eos:
            for j in range(max(0, p.min_tokens - n0 - 1), limit):      # a stop token counts from min_tokens on
                t = row[j]
                if t in stop_ids or (not p.ignore_eos and t in self.eos_token_ids):
                    take, stop_token = j + 1, t
                    break
        seq.token_ids.extend(row[:take])
        seq.rng_counter += take
        if req.first_token_time is None:
            req.first_token_time = now
        if n0 == 0 and self.config.enable_prefix_caching:
            # the prompt is computed: share it with requests admitted from now on
            self.block_manager.cache_sequence(seq.seq_id, seq.token_ids[:seq.num_computed_tokens])
        if stop_token is not None:
            seq.text_excludes_last = True          # the stop token itself is not part of the text
            self.scheduler.finish_seq(seq, "stop", stop_reason=stop_token if stop_token in stop_ids else None)
        elif n0 + take >= req.max_tokens or len(seq.token_ids) >= self.max_model_len:
            self.scheduler.finish_seq(seq, "length")
        return True

    def _append_token(self, seq: Sequence, token: int, result, row: int) -> None:
        seq.token_ids.append(token)
        seq.rng_counter += 1
        if seq.logprobs is not None:
            lp = float(result.sampled_logprob[row])
            seq.cumulative_logprob += lp
            entry = {token: Logprob(lp, rank=int(result.sampled_rank[row]) if result.sampled_rank is not None else None,
                                    decoded_token=self._token_text(token))}
            k = seq.request.params.logprobs
            for j in range(k):
                tid = int(result.top_ids[row, j])
                if tid not in entry:
                    entry[tid] = Logprob(float(result.top_logprobs[row, j]), rank=j + 1,
                                         decoded_token=self._token_text(tid))
            seq.logprobs.append(entry)
        if seq.detokenizer is None and (seq.request.stream or seq.request.params.stop) and self.tokenizer is not None:
            self._new_detokenizer(seq)

    def _token_text(self, token: int) -> Optional[str]:
        return None if self.tokenizer is None else decode_token(self.tokenizer, token)

    def _new_detokenizer(self, seq: Sequence) -> None:
        """Give `seq` a detokenizer (nothing fed yet) with its request's text and stop-string options; stop strings
        count only when completed after the first min_tokens output tokens, as stop tokens do."""
        p = seq.request.params
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer, seq.token_ids[:seq.num_prompt_tokens], skip_special_tokens=p.skip_special_tokens,
            stop=p.stop, include_stop_str_in_output=p.include_stop_str_in_output, min_tokens=p.min_tokens)
        seq.detok_fed = 0

    def _check_stop(self, seq: Sequence) -> None:
        p = seq.request.params
        token = seq.token_ids[-1]
        n_out = seq.num_output_tokens
        is_stop_token = (token in p.stop_token_ids) or (not p.ignore_eos and token in self.eos_token_ids)
        if is_stop_token and n_out >= p.min_tokens:
            seq.text_excludes_last = True          # the stop token itself is not part of the text
            self._feed_detok(seq, exclude_last=True)
            self._finish_at_end_of_text(seq, "stop", token if token in p.stop_token_ids else None)
            return
        self._feed_detok(seq)
        det = seq.detokenizer
        if det is not None and det.stopped and n_out >= p.min_tokens:
            self.scheduler.finish_seq(seq, "stop", stop_reason=det.stop_reason)
            return
        if n_out >= seq.request.max_tokens or len(seq.token_ids) >= self.max_model_len:
            self._finish_at_end_of_text(seq, "length", None)

    def _finish_at_end_of_text(self, seq: Sequence, reason: str, stop_reason) -> None:
        """Finish `seq` for a token-level reason (a stop token, the length limit) once its tokens are fed.

        Its text is final now, so the detokenizer releases what it held back (a trailing run of U+FFFD that more
        bytes could have completed, a tail that could have begun a stop string). If that text completes a stop
        string, the text is cut there and the sequence finishes as stopped by that string (vLLM's rule: a stop
        string found in the last step's text wins over the length or stop-token reason); otherwise with `reason`.
        """
        det = seq.detokenizer
        if det is not None and not seq.detok_flushed:
            det.flush()
            seq.detok_flushed = True
            if det.stopped:
                reason, stop_reason = "stop", det.stop_reason
        self.scheduler.finish_seq(seq, reason, stop_reason=stop_reason)

    def _feed_detok(self, seq: Sequence, exclude_last: bool = False) -> None:
        det = seq.detokenizer
        if det is None:
            return
        end = len(seq.token_ids) - (1 if exclude_last else 0)
        start = seq.num_prompt_tokens + seq.detok_fed
        if end > start:
            det.add_tokens(seq.token_ids[start:end])
            seq.detok_fed = end - seq.num_prompt_tokens

    def _decode_final_texts(self, reqs: Iterable[Request]) -> None:
        """Set `final_text` of every finished sequence of `reqs` whose text nobody read while it grew (no
        detokenizer: not streamed, no stop strings), decoding them together (`detokenizer.final_texts`: two
        batched decodes per skip_special_tokens setting, where one detokenizer per sequence made two decodes
        each). A sequence the batch cannot decode is left to `_final_text`."""
        groups: Dict[bool, List[Sequence]] = {}
        for req in reqs if self.tokenizer is not None else ():
            if req.params.stop:
                continue
            for seq in req.seqs:
                if seq.detokenizer is None and seq.final_text is None and seq.is_finished():
                    groups.setdefault(req.params.skip_special_tokens, []).append(seq)
        for skip, seqs in groups.items():
            items = []
            for seq in seqs:
                p = seq.num_prompt_tokens
                end = len(seq.token_ids) - (1 if seq.text_excludes_last else 0)
                items.append((seq.token_ids[max(0, p - CONTEXT_TOKENS):p], seq.token_ids[p:end]))
            for seq, text in zip(seqs, final_texts(self.tokenizer, items, skip)):
                seq.final_text = text

    def _final_text(self, seq: Sequence) -> str:
        """Text of a sequence; decodes now if nobody needed it incrementally."""
        if seq.final_text is not None:
            return seq.final_text
        if self.tokenizer is None:         # skip_tokenizer_init: token ids only
            return ""
        if seq.detokenizer is None:
            self._new_detokenizer(seq)
            if seq.is_finished():          # all tokens at once: one decode (add + flush)
                end = len(seq.token_ids) - (1 if seq.text_excludes_last else 0)
                seq.detokenizer.finish(seq.token_ids[seq.num_prompt_tokens:end])
                seq.detok_fed = end - seq.num_prompt_tokens
                seq.detok_flushed = True
            else:
                self._feed_detok(seq, exclude_last=seq.text_excludes_last)
        if seq.is_finished() and not seq.detok_flushed:
            seq.detokenizer.flush()
            seq.detok_flushed = True
        return seq.detokenizer.text

    def _make_output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in sorted(req.seqs, key=lambda s: s.index):
            if seq.is_finished():
                text = self._final_text(seq)
            elif req.stream and seq.detokenizer is not None:
                text = seq.detokenizer.released_text
            else:
                text = ""
            outs.append(CompletionOutput(
                index=seq.index, text=text,
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        metrics = {"arrival_time": req.arrival_time, "first_scheduled_time": req.first_scheduled_time,
                   "first_token_time": req.first_token_time, "finished_time": req.finished_time}
        return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                             outputs=outs, finished=req.finished, num_cached_tokens=req.seqs[0].num_cached_tokens,
                             metrics=metrics, prompt_logprobs=prompt_logprobs.finished_list(req))

    # ------------------------------------------------------------------ stats / warm-up
    def get_stats(self) -> dict:
        stats = dict(self.block_manager.get_stats())
        stats.update(self.scheduler.get_stats())
        stats["kv_blocks_total"] = self.runner.num_gpu_blocks
        stats.setdefault("kv_blocks_free", self.block_manager.num_free_gpu_blocks
                         + self.block_manager.num_evictable_gpu_blocks)
        stats["kv_cache_usage"] = 1.0 - stats["kv_blocks_free"] / max(1, stats["kv_blocks_total"])
        stats["num_steps"] = self._step_counter
        stats["dtype"] = self.config.dtype                 # resolved (`requested_dtype` may be "auto")
        stats["num_pipelined_calls"] = self._num_pipelined_calls
        stats["num_pipelined_prefill_calls"] = self._num_pipelined_prefill_calls
        stats["host_time_s"] = dict(self.host_time_s)
        stats["gc"] = gc_pause.PAUSES.snapshot()           # process-wide collector pauses since the first engine
        stats["host_time_s"].update({f"dispatch.{k}": v for k, v in self.runner.host_time_s.items()})
        log = list(self.runner.compile_log)
        stats["num_compiled_programs"] = len(log)
        stats["compile_s"] = {"trace_lower": sum(e[4] for e in log), "compile": sum(e[5] for e in log)}
        return stats

    def compiling_programs(self) -> List[dict]:
        """The step programs being compiled now (oldest first): program, sampling variant, why, seconds so far.
        Thread-safe (the server's /health reads it)."""
        return self.runner.compile_tracker.snapshot()

    def warmup(self, background: bool = True) -> None:
        """Compile the step programs (see `ModelRunner.warmup`) and run each once; `wait_for_warmup` joins
        background compiles."""
        t0 = time.perf_counter()
        self.runner.warmup(background=background)
        t1 = time.perf_counter()
        n = self.runner.run_first_runs()
        logger.info("warm-up: %d step programs ready in %.2f s; their first runs dispatched in %.2f s", n, t1 - t0,
                    time.perf_counter() - t1)

    def idle_work(self) -> None:
        """What the engine's thread may do while no request is waiting: run the programs compiled in the
        background once (`ModelRunner.run_first_runs`), so that no step pays for it later, and once no compile
        is under way, freeze what the compiles left alive (`_freeze_gc_objects`)."""
        if self.runner.first_runs_pending:
            self.runner.run_first_runs()
        if not self.runner.compiling:
            self._freeze_gc_objects()

    def wait_for_warmup(self) -> None:
        """Join background compiles, run each new program once (`ModelRunner.run_first_runs`), then freeze
        what they left alive (`_freeze_gc_objects`). Call it from the thread that steps the engine."""
        self.runner.wait_for_warmup()
        self.runner.run_first_runs()
        self._freeze_gc_objects()

    def _freeze_gc_objects(self) -> None:
        """With `gc_freeze`, move every live object out of the collector's walks (`gc_pause`) if programs were
        compiled since the last freeze (and at start-up). A compile leaves its traces alive in JAX's caches:
        unfrozen, they made each full collection in a W1 pass on an H200 take 170-230 ms of host time while the
        device waited (bench/NOTES.md §13). Costs one full collection of the unfrozen objects."""
        num_programs = len(self.runner.compile_log)
        if not self.config.gc_freeze or num_programs == self._gc_frozen_programs:
            return
        self._gc_frozen_programs = num_programs
        t0 = time.perf_counter()
        n = gc_pause.freeze_live_objects()
        logger.info("froze %d objects out of the garbage collector's walks (%.2f s)", n, time.perf_counter() - t0)


class _InFlight(NamedTuple):
    out: SchedulerOutput
    result: "sampling.SampleResult"       # device arrays, possibly not computed yet
    rows: Dict[int, int]                  # seq_id -> its row in the call
    last_tokens: Optional[jax.Array] = None   # a fused call's last tokens [S_max] (device), for the next call
    prompt_logprobs: Optional[tuple] = None   # (StepRows, device PromptLogprobs) of a step computing prompt tokens


class _StepView:
    """Step j of a fused multi-step result (fields stacked on a leading [num_steps] axis)."""

    def __init__(self, result, j: int):
        self._r, self._j = result, j

    def __getattr__(self, name):
        v = getattr(self._r, name)
        return None if v is None else v[self._j]


class LLM:
    """Offline generation, vLLM-shaped: `LLM(model, **engine_args).generate(prompts, sampling_params)`."""

    def __init__(self, model: Optional[str] = None, **engine_args):
        self.engine = LLMEngine(model=model, **engine_args)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_stats(self) -> dict:
        return self.engine.get_stats()

    def generate(self, prompts: Union[PromptType, Seq[PromptType]],
                 sampling_params: Union[None, SamplingParams, Seq[SamplingParams]] = None, *,
                 use_tqdm: bool = True, priority: Optional[Seq[int]] = None) -> List[RequestOutput]:
        """Generate for every prompt (strings, token-id lists, or a mix); outputs come back in input order.

        Requests are added as the engine runs (`_RequestFeeder`): a first chunk, then the rest while the device
        works. A prompt that fails validation raises ValueError after every request this call added is aborted."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        feeder = _RequestFeeder(self, prompts, params_list, priority)
        engine = self.engine
        try:
            feeder.add_first_chunk()
            engine.on_device_wait = feeder.add_while
            return self._run(feeder, use_tqdm)
        except BaseException:
            feeder.abort_all()
            raise
        finally:
            engine.on_device_wait = None

    def chat(self, messages, sampling_params: Union[None, SamplingParams, Seq[SamplingParams]] = None, *,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> List[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation (a list of {role, content}) or a list of them."""
        from yaie_jax.tokenizer import apply_chat_template
        if self.engine.tokenizer is None:
            raise ValueError("chat needs a tokenizer; this engine was built with skip_tokenizer_init")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [apply_chat_template(self.engine.tokenizer, c, add_generation_prompt=add_generation_prompt)
                   for c in convs]
        token_prompts = [self.engine.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outs = self.generate(token_prompts, sampling_params, use_tqdm=use_tqdm)
        for o, p in zip(outs, prompts):
            o.prompt = p
        return outs

    def _run(self, feeder: "_RequestFeeder", use_tqdm: bool) -> List[RequestOutput]:
        from tqdm.auto import tqdm
        results: Dict[str, RequestOutput] = {}
        bar = tqdm(total=feeder.num_prompts, desc="generating", unit="req", disable=not use_tqdm)
        try:
            while len(results) < feeder.num_prompts:
                feeder.raise_error()
                if not self.engine.has_unfinished_requests():
                    if not feeder.add_chunk():
                        break
                    continue
                for out in self.engine.step():
                    if out.finished and out.request_id in feeder.ids and out.request_id not in results:
                        results[out.request_id] = out
                        bar.update(1)
            feeder.raise_error()
        finally:
            bar.close()
        return [results[i] for i in feeder.id_list]


class _RequestFeeder:
    """Adds an `LLM.generate` call's requests to the engine: enough to fill the first steps before the first one,
    the rest while the device runs (`LLMEngine.on_device_wait`), or in chunks whenever the engine runs dry. Making
    a request (validating its token ids) costs ~35 us of host time on an H200 host, so adding 256 before the
    first step kept the device idle ~9-14 ms (W4); vLLM's engine process likewise starts on the first requests
    while the rest are still being added. Each request's arrival time is when it is added.

    A prompt that fails validation stops the feeding; the error is raised from `generate` once the step under
    way returns, after every request it added is aborted (vLLM's `generate` also aborts what it added)."""

    FIRST_CHUNK_STEPS = 2     # prompt tokens of this many full steps before the first step (hits not counted)

    def __init__(self, llm: "LLM", prompts: list, params: list, priority):
        self.engine = llm.engine
        self.prompts, self.params, self.priority = prompts, params, priority
        self.num_prompts = len(prompts)
        self.id_list: List[str] = []
        self.ids: set = set()
        self.next = 0
        self.error: Optional[BaseException] = None
        self._prefix = f"offline-{id(llm)}-"
        # admission order depends on the whole queue with priorities or a policy other than fcfs: add all first
        self.all_first = priority is not None or self.engine.config.scheduling_policy != "fcfs"

    def _add_one(self) -> int:
        """Add the next prompt; returns its number of tokens."""
        i = self.next
        rid = self._prefix + str(next(self.engine._request_counter))
        req = self.engine.make_request(rid, self.prompts[i], self.params[i],
                                       priority=self.priority[i] if self.priority else 0, stream=False)
        self.engine.add_prepared(req)
        self.next = i + 1
        self.id_list.append(rid)
        self.ids.add(rid)
        return len(req.prompt_token_ids)

    def add_first_chunk(self) -> None:
        """Add prompts until they hold FIRST_CHUNK_STEPS steps of prompt tokens or number max_num_seqs, or all of
        them (raises at once on a bad prompt). All of them where the order of admission depends on the whole
        queue (priorities given, or a policy other than fcfs)."""
        cfg = self.engine.config
        if self.all_first:
            budget, cap = float("inf"), self.num_prompts
        else:
            budget, cap = self.FIRST_CHUNK_STEPS * cfg.max_num_batched_tokens, cfg.max_num_seqs
        tokens, added = 0, 0
        while self.next < self.num_prompts and tokens < budget and added < cap:
            tokens += self._add_one()
            added += 1

    def add_chunk(self) -> bool:
        """The engine has nothing to do: add the next chunk (as the first). False when every prompt is added."""
        if self.next >= self.num_prompts or self.error is not None:
            return False
        self.add_first_chunk()
        return True

    def add_while(self, busy_done) -> None:
        """`LLMEngine.on_device_wait`: add prompts until the call in flight is done. Never raises: a bad prompt's
        error is kept for `raise_error`."""
        if self.all_first:
            return                      # all were added up front
        try:
            while self.next < self.num_prompts and self.error is None and not busy_done():
                self._add_one()
        except Exception as e:          # noqa: BLE001 - re-raised by raise_error, outside the engine's step
            self.error = e

    def raise_error(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def abort_all(self) -> None:
        """Abort every request this call added and run the engine until nothing is left in flight."""
        engine = self.engine
        engine.on_device_wait = None
        engine.abort_request(list(self.id_list))
        while engine.has_unfinished_requests():
            engine.step()
