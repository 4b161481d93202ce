"""LLMEngine: add / step / abort.

One `step()`: the scheduler picks the batch (plain Python), the runner executes it on the device and brings
back only the sampled ids, and the output processor appends tokens, detokenizes where someone reads text, applies
stop conditions and finishes sequences (the scheduler frees their memory; computed blocks go to the prefix cache).
Around it: input_processor.py (prompts -> requests), output_processor.py (tokens -> outputs), llm.py (the
offline `LLM`), compile_logging.py (persistent compilation cache and compile logs).
"""
from __future__ import annotations

import collections
import itertools
import logging
import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Union

import jax

from yaie_jax.executor import distributed
from yaie_jax.engine import gc_pause, loading
from yaie_jax.executor import prompt_logprobs
from yaie_jax.executor import sampling
from yaie_jax.cache import BlockManager
from yaie_jax.config import EngineConfig
from yaie_jax.engine.compile_logging import setup_compile_cache
from yaie_jax.engine.detokenizer import decode_token
from yaie_jax.engine.input_processor import InputProcessor, PromptType
from yaie_jax.engine.output_processor import OutputProcessor
from yaie_jax.outputs import RequestOutput
from yaie_jax.executor.runner import ModelRunner
from yaie_jax.sampling_params import SamplingParams
from yaie_jax.scheduler import Scheduler
from yaie_jax.step_types import PrevTokens, SchedulerOutput
from yaie_jax.sequence import Request

logger = logging.getLogger("yaie_jax.engine.core")


class LLMEngine:
    """Synchronous engine; not thread-safe (the server steps it from one thread), except `make_request`, which
    only reads engine state."""

    def __init__(self, config: Optional[EngineConfig] = None, **engine_args):
        config = loading.config_of(config, engine_args)
        setup_compile_cache(config.compile_cache_dir, config.log_compiles)
        gc_pause.install_pause_meter()        # process-wide collector-pause meter (get_stats()["gc"]); idempotent
        distributed.initialize_for(config)     # multi-host: jax.distributed before any device use
        config, tokenizer_future = self._load_model(config)
        if config.tensor_parallel_size > 1:
            from yaie_jax.executor.parallel import group_fused_qkv, make_tp_placement
            self.model = group_fused_qkv(self.model, config.tensor_parallel_size)
            placement = make_tp_placement(self.model, config.tensor_parallel_size, head=config.tp_head_layout)
        else:
            placement = {}
        t0 = time.perf_counter()
        self.runner = ModelRunner(self.model, config, self.max_model_len, num_gpu_blocks=config.num_gpu_blocks,
                                  eos_token_ids=lambda: self.eos_token_ids, **placement)
        logger.info("model runner ready in %.2f s (weights on the device, KV pool of %d blocks)",
                    time.perf_counter() - t0, self.runner.num_gpu_blocks)
        self.scheduler = Scheduler(config, self.max_model_len, num_gpu_blocks=self.runner.num_gpu_blocks)
        self._init_step_state(config)
        if config.warmup:
            self._start_warmup()
        # joined last: the warm-up does not need it (joined before, its imports delayed the GPU warm start)
        self.tokenizer = tokenizer_future.result()
        self.eos_token_ids = loading.eos_token_ids(self.tokenizer, self.model_config)
        self.input_processor = InputProcessor(self.tokenizer, self.vocab_size, self.max_model_len,
                                              config.max_num_seqs)
        self.output_processor = OutputProcessor(self.scheduler, self.tokenizer, self.eos_token_ids,
                                                self.max_model_len, _StepView, self.host_time_s)
        distributed.setup(self)   # multi-host: process 0 publishes its runner calls; the others follow, then exit
        gc_pause.raise_gen0_threshold(config.gc_gen0_threshold)
        self._gc_frozen_programs = -1      # len(runner.compile_log) at the last gc freeze
        self._freeze_gc_objects()

    def _load_model(self, config: EngineConfig):
        """Load the weights (to the device) while the tokenizer loads in a thread; resolve the dtype,
        max_model_len and the batch-shape defaults. Sets model, model_config, model_source, requested_dtype,
        max_model_len, auto_args and config; returns (the resolved config, the tokenizer's future). ValueError
        for a max_model_len over the model's positions, or a token budget under it without chunked prefill."""
        from yaie_jax.models.loader import load_model
        source = loading.resolve_model_source(config.model)
        self.requested_dtype = config.dtype
        config = loading.resolve_dtype(config)
        self.config = config
        self.model_source = source
        tokenizer_future = loading.start_tokenizer(config, source)
        try:
            self.model = load_model(source, dtype=config.dtype, hub_timeout_s=config.hub_timeout_s,
                                    quantization=config.quantization,
                                    quantization_group_size=config.quantization_group_size)
        except BaseException:
            tokenizer_future.cancel()
            raise
        self.model_config = self.model.config
        self.vocab_size = self.model_config.vocab_size
        max_pos = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > max_pos:
            raise ValueError(f"invalid engine argument max_model_len={config.max_model_len}: "
                             f"the model supports at most {max_pos} positions")
        self.max_model_len = config.max_model_len or max_pos
        config, self.auto_args = loading.resolve_batch_defaults(config, self.model, self.max_model_len)
        self.config = config
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"invalid engine argument max_num_batched_tokens={config.max_num_batched_tokens}: "
                             f"must be >= max_model_len ({self.max_model_len}) when chunked prefill is off")
        return config, tokenizer_future

    def _init_step_state(self, config: EngineConfig) -> None:
        """The step loop's counters, timers and pipelining switches (and the name the server reports)."""
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

    def _start_warmup(self) -> None:
        """`warmup` on a GPU; on the CPU (slow compiles) only the CPU plan's background compiles of a first chat
        request's programs (cpu_programs.py); with several CPU processes nothing (programs compile on first use)."""
        if self.runner.cpu_plan is not None:
            self.runner.cpu_plan.start()
            logger.info("CPU backend: no bucket warm-up; compiling in the background: %s; other programs "
                        "compile on first use", ", ".join(f"{k} T={t} S={s} {v}" for k, t, s, v in
                                                        self.runner.cpu_plan.startup_programs()))
        elif jax.default_backend() != "cpu":
            self.warmup()
        else:
            logger.info("CPU backend with several processes: no warm-up; programs compile on first use")

    @property
    def block_manager(self) -> BlockManager:
        """The KV block manager, which the scheduler owns (stats, tests and benchmarks read it here)."""
        return self.scheduler.block_manager

    # ------------------------------------------------------------------ requests
    def make_request(self, request_id: Optional[str], prompt: PromptType, params: Optional[SamplingParams] = None,
                     **kwargs) -> Request:
        """Validate and tokenize a request without queueing it (reads engine state only, so the server may call
        it from its own thread): `InputProcessor.make_request` has the keyword arguments and the errors
        (`InvalidRequestError`, `ContextLengthError`). request_id None: a fresh "req-N"."""
        if request_id is None:
            request_id = f"req-{next(self._request_counter)}"
        return self.input_processor.make_request(request_id, prompt, params, **kwargs)

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
        if out.scheduled and self._pipelines_after(out):
            self._inflight = self._dispatch(out)
            return self._step_pipelined(timed_out=out.timed_out)
        finished_now: Dict[str, Request] = {r.request_id: r for r in out.timed_out}
        touched: Dict[str, Request] = {}
        if out.scheduled:
            t0 = time.perf_counter()
            inflight = self._dispatch(out)
            result = self._fetch(inflight)
            self.output_processor.process(out, result, finished_now, touched)
            self.scheduler.record_step_time((time.perf_counter() - t0) * 1e3,
                                            len(out.scheduled) if out.is_decode_only else 0)
        return self.output_processor.outputs(finished_now, touched)

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
        """Enqueue the step on the device (the runner builds its inputs and sampling batch) and commit it in the
        scheduler. prev: the fused call still in flight whose last tokens are this call's inputs (pipelined)."""
        if prev is not None:
            prev_tokens = PrevTokens(prev.last_tokens, prev.rows, prev.out.num_steps)
        elif out.num_steps > 1 and self._async_scheduling and self.runner.last_fused_tokens is not None:
            # nothing in flight: every input token is on the host, but the argument stays a device array (any
            # earlier call's tokens, no row taken from them): a numpy/device switch costs the call's fast path
            prev_tokens = PrevTokens(self.runner.last_fused_tokens, {})
        else:
            prev_tokens = None
        t1 = time.perf_counter()
        step = self.runner.dispatch(out, prev_tokens)
        t2 = time.perf_counter()
        self._step_counter += 1
        self.scheduler.commit_step(out)
        self.host_time_s["commit"] += time.perf_counter() - t2
        self.host_time_s["sampling_batch"] += step.sampling_batch_s
        self.host_time_s["dispatch"] += t2 - t1 - step.sampling_batch_s
        rows = {s.seq.seq_id: i for i, s in enumerate(out.scheduled)}
        return _InFlight(out, step.result, rows, step.last_tokens, step.prompt_logprobs)

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
        self.output_processor.process(cur.out, result, finished_now, touched)
        if fused:
            now = time.perf_counter()
            if self._last_pipelined_t is not None and self._inflight is not None:
                self.scheduler.record_step_time((now - self._last_pipelined_t) * 1e3, len(cur.out.scheduled))
            self._last_pipelined_t = now if self._inflight is not None else None
        return self.output_processor.outputs(finished_now, touched)

    def _pipelines_after(self, out: SchedulerOutput) -> bool:
        """Whether the call after `out` may be scheduled and dispatched before `out`'s tokens are read back:
        a fused decode call with `async_scheduling` (its continuation takes its last tokens on the device), or,
        with `pipelined_prefill`, a single step of prompt tokens only (no row decodes) while prompts wait. That
        next step then holds only rows whose input tokens are on the host (prompt tokens): the rows sampling in
        `out` sit it out, which is why a step with decode rows does not pipeline (they would decode every other
        step)."""
        if out.num_steps > 1:
            return self._async_scheduling
        return (self._pipelined_prefill and bool(self.scheduler.waiting)
                and all(s.seq.num_output_tokens == 0 for s in out.scheduled))

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
        unfrozen, they made each full collection in a serving pass take long host pauses while the device waited
        (bench/NOTES.md §13). Costs one full collection of the unfrozen objects."""
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

