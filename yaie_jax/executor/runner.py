"""ModelRunner: scheduler output (host numpy) -> padded device arrays -> one jitted step -> sampled token ids.

The only place that turns host data into device arrays. Owns the device KV pool (one `(k_pages, v_pages)` pair
per layer, each `[num_kv_heads, num_blocks, block_size, head_dim]`; on the CPU a 16-bit float pool holds the
values' uint16 bit patterns, see `attention.kv_storage_dtype`), donated to every step so XLA updates it in place,
and the host swap pool (same storage dtype).

Shapes are padded to buckets so XLA compiles a bounded set of programs:
  decode step   (every sequence has exactly one new token): S padded to a power of two (>= 8)
  fused decode  (num_decode_steps tokens per sequence in one call): as decode
  prefill step  (any mix of prefill chunks and decode tokens): T padded to a power of two (>= 16; on the CPU
                with warm-up on >= 64, see cpu_programs.py), S = min(T, S_max)
(one program per T rather than per (T, S) pair: fewer compiles at start-up; see `padded_shape`).
Padding tokens write nowhere (slot -1) and padding sequences have context length 0 (attention outputs zeros).
Deterministic mode (yaie_jax/executor/deterministic.py) replaces these programs with one fixed-shape step and one fused one.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import os
import threading
import time
from typing import Dict, List, Optional, Sequence as Seq, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from yaie_jax.executor import prompt_logprobs
from yaie_jax.executor import sampling
from yaie_jax.executor.attention import kv_storage_dtype, make_paged_attention
from yaie_jax.executor import aot_cache
from yaie_jax.executor import cascade
from yaie_jax.executor import deterministic
from yaie_jax.executor.compile_tracker import CompileTracker
from yaie_jax.config import EngineConfig
from yaie_jax.executor.cpu_programs import MIN_PREFILL_TOKENS, CpuProgramPlan
from yaie_jax.models.base import CausalLM
from yaie_jax.executor.sampling_superset import describe
from yaie_jax.step_types import SchedulerOutput

logger = logging.getLogger("yaie_jax.executor.runner")

JNP_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


# after the start-up warm-up, background compiles wait this long: the server starts and answers its first
# requests without competing for the GIL with tracing/lowering (they also wait for a pause in the steps)
BACKGROUND_GRACE_S = 2.0
CASCADE_MIN_ROWS = 16        # smaller decode buckets never carry a cascade plan (one program variant fewer)


def next_power_of(x: int, base: int, lo: int) -> int:
    b = lo
    while b < x:
        b *= base
    return b


def bucket_list(lo: int, hi: int, base: int) -> List[int]:
    out, b = [], lo
    while True:
        out.append(min(b, hi) if b >= hi else b)
        if b >= hi:
            break
        b *= base
    return sorted(set(out))


class ModelRunner:
    def __init__(self, model: CausalLM, config: EngineConfig, max_model_len: int, num_gpu_blocks: int,
                 mesh=None, param_shardings=None, kv_sharding=None):
        self.model = model
        self.config = config
        self.mc = model.config
        self.dtype = JNP_DTYPES[config.dtype]
        self.block_size = config.block_size
        self.num_gpu_blocks = num_gpu_blocks or 0
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = math.ceil(max_model_len / self.block_size)
        self.mesh = mesh
        self.kv_sharding = kv_sharding
        self.attention_backend = resolve_attention_backend(config.attention_backend)
        # the pool's arrays: `dtype` values, or their uint16 bit patterns on the CPU (see `kv_storage_dtype`)
        self.kv_storage_dtype = kv_storage_dtype(self.dtype, self.attention_backend)
        self._kv_view = None if self.kv_storage_dtype == jnp.dtype(self.dtype) else self.dtype

        # Buckets (see module docstring).
        # decode batches below 8 rows cost the same as 8 on a GPU: one bucket for them (fewer compiles)
        self.seq_buckets_decode = [next_power_of(s, 2, 1) for s in
                                   bucket_list(min(8, config.max_num_seqs), max(config.max_num_seqs, 1), 2)]
        # CPU with warm-up on (cpu_programs.py): no prefill bucket below MIN_PREFILL_TOKENS (a compile saved per
        # bucket; padding a short prompt costs little there)
        use_cpu_plan = jax.default_backend() == "cpu" and config.warmup and jax.process_count() == 1 \
            and not config.deterministic     # deterministic mode has its own fixed programs
        lo = min(MIN_PREFILL_TOKENS, next_power_of(config.max_num_batched_tokens, 2, 16)) if use_cpu_plan else 16
        self.token_buckets = [next_power_of(t, 2, lo) for t in
                              bucket_list(lo, max(config.max_num_batched_tokens, lo), 2)]

        if param_shardings is not None:
            self.params = jax.device_put(model.params, param_shardings)
        else:
            self.params = jax.device_put(model.params)
        if not num_gpu_blocks:
            self.num_gpu_blocks = self.auto_num_blocks()
            if jax.process_count() > 1:    # multi-host: every process allocates the same pool
                from yaie_jax.executor.distributed import agree_min
                self.num_gpu_blocks = agree_min("num_gpu_blocks", self.num_gpu_blocks)
        self.kv_caches = self._alloc_kv()
        self.host_kv: Optional[np.ndarray] = None
        if config.num_cpu_blocks > 0:
            # [layers, 2 (k/v), num_kv_heads, num_cpu_blocks, block_size, head_dim] host swap pool
            self.host_kv = np.zeros((self.mc.num_layers, 2, self.mc.num_kv_heads, config.num_cpu_blocks,
                                     self.block_size, self.mc.head_dim), dtype=np.dtype(self.kv_storage_dtype))
        self._rng_seed = config.seed
        self._step_fn = jax.jit(self._step_impl, donate_argnums=(1,),
                                static_argnames=("decode", "flags"))
        self._multi_step_fn = jax.jit(self._multi_step_impl, donate_argnums=(1,),
                                      static_argnames=("flags", "num_steps"))
        self._copy_fn = jax.jit(_copy_blocks, donate_argnums=(0,))
        self._write_blocks_fn = jax.jit(_write_blocks, donate_argnums=(0,))
        self._read_blocks_fn = jax.jit(_read_blocks)
        # a fused decode call's last sampled tokens, padded to the largest decode bucket: the next fused call (sent
        # before these are read back) takes its input tokens from them on the device; see `_multi_step_impl`
        self.last_fused_tokens = None
        # the last step's prompt logprobs (device PromptLogprobs) and which prompt tokens they are (StepRows), or
        # None: read by the engine right after `dispatch` (yaie_jax/executor/prompt_logprobs.py)
        self.last_prompt_logprobs = None
        self.last_prompt_rows = None
        self.compile_log: List[tuple] = []  # one entry per compiled program (see `compiled`)
        self._compiled: dict = {}        # (kind, flags, num_steps, input shapes) -> compiled executable
        self._compile_lock = threading.Lock()
        self._ready: set = set()            # (kind, S or T) bucket programs compiled by warm-up
        self._warm_started = False
        self._warm_thread: Optional[threading.Thread] = None
        self._requested: set = set()        # shapes handed to `_compile_later`
        self._later_threads: List[threading.Thread] = []
        self._last_step_t = 0.0             # monotonic time of the last step dispatched (background compiles wait)
        self._background_not_before = 0.0   # monotonic time before which background compiles do not start
        self._background_trace_lock = threading.Lock()   # one background compile traces/lowers at a time
        # deterministic mode (yaie_jax/executor/deterministic.py): every step runs "det" / "det_multi" programs instead
        self.det = deterministic.DeterministicSteps(self) if config.deterministic else None
        if self.det is not None:
            self._det_step_fn = jax.jit(self.det.step_impl, donate_argnums=(1,), static_argnames=("flags",))
            self._det_multi_step_fn = jax.jit(self.det.multi_step_impl, donate_argnums=(1,),
                                              static_argnames=("flags", "num_steps"))
        # Cascade attention (yaie_jax/executor/cascade.py, its policy there) for decode buckets of >= CASCADE_MIN_ROWS rows
        self.cascade_group = max(1, self.mc.num_heads // self.mc.num_kv_heads)
        self.cascade_enabled = (config.cascade_attention and self.attention_backend == "pallas"
                                and self.cascade_group <= 32 and self.det is None)
        self.num_cascade_calls = 0          # decode calls that carried a cascade plan
        # host seconds in `dispatch` by part (prepare_inputs: host arrays and cascade plan; launch: the
        # compiled program's call, host-to-device copies of the inputs included); the engine reports them
        self.host_time_s: Dict[str, float] = {"prepare_inputs": 0.0, "launch": 0.0}
        # programs compiled or loaded by warm-up / in the background and not run yet: (kind, batch, sbatch, flags,
        # num_steps) all-padding inputs; `run_first_runs` (engine thread) runs each once, so that a program's first
        # real step does not pay its one-time costs (10-24 ms per program on the H200: the first call of an
        # executable, the device's first launch of its kernels)
        self._first_runs: List[tuple] = []
        self.num_first_runs = 0
        # compiled programs of earlier processes with the same fingerprint (None: off, see aot_cache.for_runner)
        self._aot_store = aot_cache.ExecutableStore.for_runner(self)
        self.compile_tracker = CompileTracker()   # the compiles under way (one per program at a time; /health)
        # CPU with warm-up on: what compiles when, greedy/superset programs per bucket (cpu_programs.py); not with
        # several processes (each must run the same programs: the choice depends on what compiled when)
        self.cpu_plan = CpuProgramPlan(self) if use_cpu_plan else None

    # ------------------------------------------------------------------ memory
    def kv_bytes_per_block(self) -> int:
        itemsize = jnp.dtype(self.dtype).itemsize
        return 2 * self.mc.num_layers * self.mc.num_kv_heads * self.block_size * self.mc.head_dim * itemsize

    def auto_num_blocks(self) -> int:
        """Size the KV pool: on a GPU, `gpu_memory_utilization` of device memory minus what is in use (params)
        and a reserve for activations; elsewhere enough for max_num_seqs full-length sequences, capped at 2 GiB."""
        per_seq = self.max_blocks_per_seq
        useful = self.config.max_num_seqs * per_seq + 1
        stats = None
        try:
            stats = jax.local_devices()[0].memory_stats()
        except Exception:
            stats = None
        if stats and "bytes_limit" in stats:
            limit = stats["bytes_limit"] * self.config.gpu_memory_utilization
            reserve = 2 * 1024 ** 3 // max(1, self.config.tensor_parallel_size)
            free = limit - stats.get("bytes_in_use", 0) - reserve
            tp = max(1, self.config.tensor_parallel_size)
            n = int(free * tp // self.kv_bytes_per_block())
            return max(per_seq + 1, min(n, useful * 2))
        cap = (2 * 1024 ** 3) // self.kv_bytes_per_block()
        return max(per_seq + 1, min(useful, cap))

    def kv_shape(self) -> Tuple[int, int, int, int]:
        return (self.mc.num_kv_heads, self.num_gpu_blocks, self.block_size, self.mc.head_dim)

    def _alloc_kv(self):
        shape = self.kv_shape()

        def zeros():
            if self.kv_sharding is not None:
                return jax.jit(lambda: jnp.zeros(shape, self.kv_storage_dtype), out_shardings=self.kv_sharding)()
            return jnp.zeros(shape, self.kv_storage_dtype)         # bits 0 = +0.0 in either storage

        # [num_kv_heads, num_blocks, block_size, head_dim] per layer, K and V
        return [(zeros(), zeros()) for _ in range(self.mc.num_layers)]

    # ------------------------------------------------------------------ the step
    def _step_impl(self, params, kv_caches, batch, sbatch, *, decode: bool, flags):
        attention = make_paged_attention(
            self.attention_backend, decode=decode, slot_mapping=batch["slot_mapping"],
            query_start=batch["query_start"], context_lens=batch["context_lens"],
            block_tables=batch["block_tables"], mesh=self.mesh, cascade=batch.get("cascade"), kv_dtype=self._kv_view)
        hidden, kv_caches = self.model.apply_hidden(params, batch["input_ids"], batch["positions"],
                                                    attention, kv_caches)
        rows = hidden[batch["logits_index"]]                       # [S, hidden]
        logits = self.model.apply_logits(params, rows)             # [S, vocab] float32
        result = sampling.sample(logits, sbatch, flags=flags)
        if "prompt_index" in batch:                                # prompt logprobs (yaie_jax/executor/prompt_logprobs.py)
            prompt_logits = self.model.apply_logits(params, hidden[batch["prompt_index"]])   # [P, vocab] float32
            result = (result, prompt_logprobs.compute(prompt_logits, batch["prompt_target"]))
        return result, kv_caches

    def _multi_step_impl(self, params, kv_caches, batch, sbatch, *, flags, num_steps: int):
        """`num_steps` decode steps in one device call: each step's sampled tokens are the next step's inputs.
        batch: input_ids/positions/context_lens [S] for the first step, slots [num_steps, S], block_tables,
        prev_last [S_max] (the previous fused call's last tokens, padded) and prev_rows [S] (each row's place in
        prev_last, -1: its input token is input_ids'), optionally a cascade plan (the shared prefixes stay the same
        over the call's steps). sbatch: the sampling batch of every step stacked on a leading [num_steps] axis.
        Returns (SampleResult fields stacked on a leading [num_steps] axis, the last step's tokens padded to
        [S_max]) and the KV pool."""
        S = batch["input_ids"].shape[0]
        live = batch["context_lens"] > 0                                   # padding rows stay inert
        prev_rows = batch["prev_rows"]
        first_tokens = jnp.where(prev_rows >= 0, batch["prev_last"][jnp.maximum(prev_rows, 0)],
                                 batch["input_ids"])                       # [S]

        def body(j, carry):
            kv, tokens, acc = carry
            attention = make_paged_attention(
                self.attention_backend, decode=True, slot_mapping=batch["slots"][j],
                query_start=jnp.arange(S + 1, dtype=jnp.int32),
                context_lens=jnp.where(live, batch["context_lens"] + j, 0),
                block_tables=batch["block_tables"], mesh=self.mesh, cascade=batch.get("cascade"),
                kv_dtype=self._kv_view)
            hidden, kv = self.model.apply_hidden(params, tokens, batch["positions"] + j, attention, kv)
            logits = self.model.apply_logits(params, hidden)               # [S, vocab] float32
            step_batch = jax.tree_util.tree_map(lambda a: a[j], sbatch)     # this step's rows (keys, ...)
            res = sampling.sample(logits, step_batch, flags=flags)
            acc = jax.tree_util.tree_map(lambda a, r: a.at[j].set(r), acc, res)
            return kv, res.token_ids, acc

        first = jax.tree_util.tree_map(lambda a: a[0], sbatch)
        proto = jax.eval_shape(lambda: sampling.sample(jnp.zeros((S, self.mc.vocab_size), jnp.float32), first,
                                                       flags=flags))
        acc = jax.tree_util.tree_map(lambda x: jnp.zeros((num_steps,) + x.shape, x.dtype), proto)
        kv, last, acc = jax.lax.fori_loop(0, num_steps, body, (kv_caches, first_tokens, acc))
        last_padded = jnp.zeros(batch["prev_last"].shape, last.dtype).at[:S].set(last)   # [S_max]
        return (acc, last_padded), kv

    def padded_shape(self, out: SchedulerOutput) -> Tuple[int, int]:
        """(S, T): the padded row and token counts of a step, decided once per step (cached on `out`).

        Decode: S a power of two >= the rows (>= 8), T = S. Prefill: T a power of two >= the tokens (>= 16), and
        S tied to it, min(T, S_max), so each T compiles one program rather than one per (T, S) pair (padding rows
        cost a few empty work items and logits rows, small next to T tokens). While buckets still compile in the
        background after start-up, a step whose bucket is not ready runs in the next larger ready one."""
        if out.padded_shape is not None:
            return out.padded_shape
        if self.det is not None:
            out.padded_shape = self.det.padded_shape(out)
            return out.padded_shape
        n = len(out.scheduled)
        if out.is_decode_only:
            kind = "multi" if out.num_steps > 1 else "decode"
            S = self._ready_bucket(kind, next_power_of(n, 2, self.seq_buckets_decode[0]), self.seq_buckets_decode)
            shape = (S, S)
        else:
            T = self._ready_bucket("prefill", next_power_of(sum(s.num_new_tokens for s in out.scheduled), 2,
                                                            self.token_buckets[0]), self.token_buckets)
            shape = (max(min(T, self.seq_buckets_decode[-1]), next_power_of(n, 2, 4)), T)
        out.padded_shape = shape
        return shape

    def padded_num_seqs(self, out: SchedulerOutput) -> int:
        return self.padded_shape(out)[0]

    def _ready_bucket(self, kind: str, exact: int, buckets: List[int]) -> int:
        """`exact`, or while warm-up runs in the background and its program is not compiled yet, the smallest
        larger bucket that is (exact again if none is: it then compiles on first use)."""
        if not self._warm_started or (kind, exact) in self._ready:
            return exact
        with self._compile_lock:
            ready = [b for b in buckets if b > exact and (kind, b) in self._ready]
        return ready[0] if ready else exact

    def prepare_inputs(self, out: SchedulerOutput, tokens_on_device: bool = False
                       ) -> Tuple[Dict[str, np.ndarray], bool, int]:
        """Flatten the scheduled sequences into one padded ragged batch (host numpy). tokens_on_device: the input
        tokens are not on the host yet (a pipelined fused decode call): input_ids stay zero, the caller fills them."""
        sched = out.scheduled
        decode = out.is_decode_only
        num_seqs = len(sched)
        S, T = self.padded_shape(out)
        input_ids = np.zeros(T, np.int32)                          # [T]
        positions = np.zeros(T, np.int32)                          # [T]
        slot_mapping = np.full(T, -1, np.int32)                    # [T], -1 = write nowhere
        query_start = np.zeros(S + 1, np.int32)                    # [S+1]
        context_lens = np.zeros(S, np.int32)                       # [S], 0 = padding row
        block_tables = np.zeros((S, self.max_blocks_per_seq), np.int32)  # [S, max_blocks]
        logits_index = np.zeros(S, np.int32)                       # [S]
        t = 0
        for i, s in enumerate(sched):
            seq = s.seq
            n = s.num_new_tokens
            start = seq.num_computed_tokens
            if s.logits_row_of is not None:
                # fork child: no query tokens; samples from its parent's last token
                logits_index[i] = logits_index[s.logits_row_of]
                query_start[i + 1] = t
                continue
            if not tokens_on_device:
                input_ids[t:t + n] = seq.token_ids[start:start + n]
            positions[t:t + n] = np.arange(start, start + n)
            slot_mapping[t:t + n] = s.slots[:n]
            block_tables[i, :len(s.block_table)] = s.block_table
            context_lens[i] = start + n
            t += n
            query_start[i + 1] = t
            logits_index[i] = t - 1
        query_start[num_seqs + 1:] = t
        batch = dict(input_ids=input_ids, positions=positions, slot_mapping=slot_mapping,
                     query_start=query_start, context_lens=context_lens, block_tables=block_tables,
                     logits_index=logits_index)
        self.last_prompt_rows = None
        if out.num_steps == 1:
            index, target, rows = prompt_logprobs.rows_of_step(sched, query_start)
            if len(index):
                batch["prompt_index"], batch["prompt_target"] = prompt_logprobs.padded(index, target)  # [P]
                self.last_prompt_rows = rows
        if decode:
            plan = self.cascade_plan("multi" if out.num_steps > 1 else "decode", block_tables, context_lens,
                                     num_seqs)
            if plan is not None:
                batch["cascade"] = plan
                self.num_cascade_calls += 1
        return batch, decode, S

    def cascade_plan(self, kind: str, block_tables: np.ndarray, context_lens: np.ndarray, num_seqs: int):
        """The cascade plan of a decode batch (yaie_jax/executor/cascade.py), or None: cascade off, a bucket below
        CASCADE_MIN_ROWS, no rows sharing a prefix of >= cascade.MIN_PREFIX_TOKENS, or (while warm-up compiles in
        the background) the bucket's cascade program not compiled yet -- plain decode attention gives the same
        result, only reading the shared pages once per row."""
        S = block_tables.shape[0]
        if not self.cascade_enabled or S < CASCADE_MIN_ROWS:
            return None
        plan = cascade.engine_plan(block_tables, context_lens, block_size=self.block_size, group=self.cascade_group)
        variant = (kind + "+cascade", S)
        if plan is not None and self._warm_started and variant not in self._ready:
            # the first batch that would use it: compile it now, and the batch's own bucket's too (this one may
            # be padded to a larger bucket while its own still compiles)
            own = next_power_of(num_seqs, 2, self.seq_buckets_decode[0])
            for rows in dict.fromkeys((S, own)):
                self._compile_later((variant[0], rows, rows))
            return None
        return plan

    def _compile_later(self, shape) -> None:
        """Compile one more bucket program in the background (once), after start-up warm-up: programs that only
        some workloads need (the cascade variants) are not compiled before serving."""
        with self._compile_lock:
            if shape in self._requested:
                return
            self._requested.add(shape)
        thread = threading.Thread(target=self._compile_when_idle, args=(shape,), name="yaie-compile-later",
                                  daemon=True)
        self._later_threads.append(thread)
        thread.start()

    def execute(self, out: SchedulerOutput, sampling_batch, flags) -> sampling.SampleResult:
        """Run the swaps and copies the scheduler asked for, then the step; returns host sample results."""
        return jax.device_get(self.dispatch(out, sampling_batch, flags))

    def dispatch(self, out: SchedulerOutput, sampling_batch, flags, prev_tokens=None):
        """Enqueue the swaps, copies and the step on the device and return its SampleResult as device arrays
        without waiting for them (JAX dispatches asynchronously).

        prev_tokens: for a fused decode call scheduled while the previous one is in flight
        (`Scheduler.schedule_continuation`): (that call's `last_fused_tokens` [S_max], on the device, {seq_id: its
        row there}). Each row's input token is then taken on the device from the previous call's last step (inside
        the program: no separate device call), so the host never waits for it; with an empty dict every input
        token comes from the host. After a fused call, `last_fused_tokens` holds its own."""
        if out.swap_out:
            self.swap_out(out.swap_out)
        if out.swap_in:
            self.swap_in(out.swap_in)
        if out.block_copies:
            self.copy_blocks(out.block_copies)
        t0 = time.perf_counter()
        on_device = prev_tokens is not None and bool(prev_tokens[1])     # input tokens still on the device
        batch, decode, S = self.prepare_inputs(out, tokens_on_device=on_device)
        if self.det is not None and out.num_steps == 1:
            batch = self.det.step_inputs(batch, len(out.scheduled))
        self.host_time_s["prepare_inputs"] += time.perf_counter() - t0
        if out.num_steps == 1:
            kind = "det" if self.det is not None else "decode" if decode else "prefill"
            return self.run_program(kind, batch, sampling_batch, flags)
        K = out.num_steps
        slots = np.full((K, S), -1, np.int32)                      # [num_steps, S] slot of each step's token
        for i, sch in enumerate(out.scheduled):
            slots[:, i] = sch.slots
        mbatch = dict(input_ids=batch["input_ids"], positions=batch["positions"],
                      context_lens=batch["context_lens"], block_tables=batch["block_tables"], slots=slots)
        if "cascade" in batch:
            mbatch["cascade"] = batch["cascade"]
        prev_rows = np.full(S, -1, np.int32)                       # [S] row in the previous call, -1: input_ids
        if prev_tokens is not None:
            prev_last, prev_row = prev_tokens
            prev_rows[:len(out.scheduled)] = [prev_row.get(s.seq.seq_id, -1) for s in out.scheduled]
            mbatch["prev_last"] = prev_last
        else:
            mbatch["prev_last"] = np.zeros(self.fused_rows_max, np.int32)    # [S_max], unused
        mbatch["prev_rows"] = prev_rows
        if self.det is not None:
            return self.run_program("det_multi", self.det.fused_inputs(mbatch, len(out.scheduled)), sampling_batch,
                                    flags, K)
        return self.run_program("multi", mbatch, sampling_batch, flags, K)

    @property
    def fused_rows_max(self) -> int:
        """Rows of the largest fused decode call (the size of `last_fused_tokens`)."""
        return self.det.num_rows if self.det is not None else self.seq_buckets_decode[-1]

    def run_program(self, kind: str, batch, sbatch, flags, num_steps: int = 1):
        """Run one compiled step program ("decode" | "prefill" | "multi", or in deterministic mode "det" |
        "det_multi") on padded inputs, updating the KV pool
        in place (donated). The one place the engine's steps reach the device. Returns device arrays."""
        if self.cpu_plan is not None and num_steps == 1:
            sbatch, flags = self.cpu_plan.choose(kind, batch, sbatch, flags)
        fn = self.compiled(kind, batch, sbatch, flags, num_steps, reason="a step needs it, the engine waits")
        t0 = time.perf_counter()
        result, self.kv_caches = fn(self.params, self.kv_caches, batch, sbatch)
        self.host_time_s["launch"] += time.perf_counter() - t0
        self._last_step_t = time.monotonic()
        self.last_prompt_logprobs = None
        if kind in ("multi", "det_multi"):
            result, self.last_fused_tokens = result
        elif "prompt_index" in batch:
            result, self.last_prompt_logprobs = result
        return result

    # ------------------------------------------------------------------ compiled programs
    @staticmethod
    def _shape_key(tree) -> tuple:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return (str(treedef),) + tuple((tuple(np.shape(x)), str(np.asarray(x).dtype) if not hasattr(x, "dtype")
                                         else str(x.dtype)) for x in leaves)

    def program_key(self, kind: str, batch, sbatch, flags, num_steps: int = 1) -> tuple:
        return (kind, flags, num_steps, self._shape_key(batch), self._shape_key(sbatch))

    def is_compiled(self, kind: str, batch, sbatch, flags, num_steps: int = 1) -> bool:
        return self.program_key(kind, batch, sbatch, flags, num_steps) in self._compiled

    def compiled(self, kind: str, batch, sbatch, flags, num_steps: int = 1, trace_lock=None,
                 reason: str = "first use") -> "jax.stages.Compiled":
        """The compiled program for these input shapes (ahead-of-time: lower + compile once, then reuse). With
        the compiled-program store (yaie_jax/executor/aot_cache.py) a program compiled by an earlier process with the same
        fingerprint is loaded instead (no tracing, lowering or XLA compile), and new ones are saved to it. A
        program another thread is compiling is waited for, not compiled twice; `reason` (why it is needed) goes
        to the log and to `compile_tracker` (/health) while it compiles."""
        key = self.program_key(kind, batch, sbatch, flags, num_steps)
        fn = self._compiled.get(key)
        while fn is None:
            rows = np.shape(batch["logits_index" if kind == "det" else "context_lens"])[0]
            tokens = np.shape(batch["input_ids"])[0]
            program = f"{kind} S={rows} T={tokens}" + (f" steps={num_steps}" if num_steps > 1 else "")
            info = {"program": program, "sampling": describe(flags), "reason": reason}
            other = self.compile_tracker.begin(key, info)
            if other is not None:           # under way in another thread: its result (or, if it failed, ours)
                logger.info("%s (%s sampling) is needed (%s): waiting for the compile under way", program,
                            info["sampling"], reason)
                other.wait()
                fn = self._compiled.get(key)
                continue
            try:
                fn = self._compile_program(key, kind, batch, sbatch, flags, num_steps, trace_lock, info)
            finally:
                self.compile_tracker.end(key)
        return fn

    def _compile_program(self, key, kind, batch, sbatch, flags, num_steps, trace_lock, info):
        rows = np.shape(batch["logits_index" if kind == "det" else "context_lens"])[0]
        tokens = np.shape(batch["input_ids"])[0]
        fn, load_s = aot_cache.timed_load(self._aot_store, key)
        if fn is not None:
            logger.info("loaded %s S=%d T=%d steps=%d from the compiled-program store in %.2f s", kind, rows,
                        tokens, num_steps, load_s)
            with self._compile_lock:
                self._compiled[key] = fn
                self.compile_log.append((kind, rows, tokens, num_steps, 0.0, load_s))
            return fn
        logger.info("compiling %s (%s sampling): %s", info["program"], info["sampling"], info["reason"])
        t0 = time.perf_counter()
        with trace_lock or contextlib.nullcontext():     # background: one thread holds the GIL tracing
            if kind == "multi":
                lowered = self._multi_step_fn.lower(self.params, self.kv_caches, batch, sbatch, flags=flags,
                                                    num_steps=num_steps)
            elif kind == "det":
                lowered = self._det_step_fn.lower(self.params, self.kv_caches, batch, sbatch, flags=flags)
            elif kind == "det_multi":
                lowered = self._det_multi_step_fn.lower(self.params, self.kv_caches, batch, sbatch, flags=flags,
                                                        num_steps=num_steps)
            else:
                lowered = self._step_fn.lower(self.params, self.kv_caches, batch, sbatch,
                                              decode=(kind == "decode"), flags=flags)
        t1 = time.perf_counter()
        hits0 = aot_cache.persistent_cache_hits() if self._aot_store is not None else 0
        fn = (lowered.compile(compiler_options=self.det.compiler_options) if kind in deterministic.KINDS
              else lowered.compile())
        t2 = time.perf_counter()
        with self._compile_lock:
            self._compiled[key] = fn
            # (kind, S, T, steps, trace+lower s, compile s); a compile of ~0.1 s is a persistent-cache hit
            self.compile_log.append((kind, rows, tokens, num_steps, t1 - t0, t2 - t1))
        logger.info("compiled %s S=%d T=%d steps=%d: trace+lower %.2f s, compile %.2f s (%s sampling; %s)", kind,
                    rows, tokens, num_steps, t1 - t0, t2 - t1, info["sampling"], info["reason"])
        if self._aot_store is not None and aot_cache.may_save(aot_cache.persistent_cache_hits() > hits0):
            self._aot_store.save(key, fn)
        return fn

    # ------------------------------------------------------------------ block copies / swap
    def _pad_pairs(self, pairs: Seq[Tuple[int, int]]) -> Tuple[np.ndarray, np.ndarray]:
        n = next_power_of(len(pairs), 2, 8)
        src = np.zeros(n, np.int32)
        dst = np.full(n, self.num_gpu_blocks, np.int32)  # out of range: dropped by the scatter
        for i, (a, b) in enumerate(pairs):
            src[i], dst[i] = a, b
        return src, dst

    def copy_blocks(self, pairs: Seq[Tuple[int, int]]) -> None:
        src, dst = self._pad_pairs(pairs)
        self.kv_caches = self._copy_fn(self.kv_caches, src, dst)

    def swap_out(self, pairs: Seq[Tuple[int, int]]) -> None:
        assert self.host_kv is not None, "swap_out without a host pool"
        gpu = np.array([g for g, _ in pairs], np.int32)
        cpu = np.array([c for _, c in pairs], np.int32)
        padded = np.zeros(next_power_of(len(gpu), 2, 8), np.int32)
        padded[:len(gpu)] = gpu
        data = np.asarray(jax.device_get(self._read_blocks_fn(self.kv_caches, padded)))
        # data: [layers, 2, num_kv_heads, n_padded, block_size, head_dim]
        self.host_kv[:, :, :, cpu] = data[:, :, :, :len(gpu)]

    def swap_in(self, pairs: Seq[Tuple[int, int]]) -> None:
        assert self.host_kv is not None, "swap_in without a host pool"
        cpu = np.array([c for c, _ in pairs], np.int32)
        n = next_power_of(len(pairs), 2, 8)
        dst = np.full(n, self.num_gpu_blocks, np.int32)
        dst[:len(pairs)] = [g for _, g in pairs]
        data = np.zeros(self.host_kv.shape[:3] + (n,) + self.host_kv.shape[4:], self.host_kv.dtype)
        data[:, :, :, :len(pairs)] = self.host_kv[:, :, :, cpu]
        self.kv_caches = self._write_blocks_fn(self.kv_caches, data, dst)

    # ------------------------------------------------------------------ warm-up
    def warmup_shapes(self) -> list:
        """Every bucket program the engine may run with greedy sampling: (kind, T, S)."""
        if self.det is not None:
            rows = self.det.num_rows
            return [("det", self.det.num_tokens, rows)] + \
                ([("det_multi", rows, rows)] if self.config.num_decode_steps > 1 else [])
        shapes = [("decode", s, s) for s in self.seq_buckets_decode]
        if self.config.num_decode_steps > 1:
            shapes += [("multi", s, s) for s in self.seq_buckets_decode]
        shapes += [("prefill", t, min(t, self.seq_buckets_decode[-1])) for t in self.token_buckets]
        return shapes

    def coverage_shapes(self, shapes: list) -> list:
        """The few programs that let every step run at once: the largest bucket of each kind (any step fits it,
        padded) and the smallest decode buckets and a prompt-sized prefill bucket (single-request latency)."""
        first = []
        for kind in ("decode", "multi", "prefill") + deterministic.KINDS:
            mine = [sh for sh in shapes if sh[0] == kind]
            if mine:
                first += [mine[-1], mine[0]] if kind != "prefill" else \
                    [mine[-1]] + [sh for sh in mine if sh[1] == min(512, mine[-1][1])]
        return list(dict.fromkeys(first))

    def _dummy_inputs(self, kind: str, T: int, S: int):
        """All-padding inputs of one bucket: slots -1 (nothing written), context 0 (nothing read). kind
        "decode+cascade" / "multi+cascade": with an empty cascade plan."""
        kind, _, variant = kind.partition("+")
        det_kind = kind if kind in deterministic.KINDS else None
        kind = {"det": "prefill", "det_multi": "multi"}.get(kind, kind)
        batch = dict(input_ids=np.zeros(T, np.int32), positions=np.zeros(T, np.int32),
                     slot_mapping=np.full(T, -1, np.int32), query_start=np.zeros(S + 1, np.int32),
                     context_lens=np.zeros(S, np.int32),
                     block_tables=np.zeros((S, self.max_blocks_per_seq), np.int32),
                     logits_index=np.zeros(S, np.int32))
        K = self.config.num_decode_steps if kind == "multi" else 1
        sbatch, flags = sampling.build_sampling_batch([], pad_to=S, eos_token_ids=[], engine_seed=0,
                                                      vocab_size=self.mc.vocab_size, num_steps=K)
        if kind == "multi":
            batch = dict(input_ids=batch["input_ids"], positions=batch["positions"],
                         context_lens=batch["context_lens"], block_tables=batch["block_tables"],
                         slots=np.full((K, S), -1, np.int32), prev_rows=np.full(S, -1, np.int32),
                         prev_last=np.zeros(self.fused_rows_max, np.int32))
        if variant == "cascade":
            batch["cascade"] = cascade.empty_plan(S, self.max_blocks_per_seq, max_items=cascade.max_items(S),
                                                  members_per_item=cascade.members_per_item(self.cascade_group))
        if det_kind == "det":
            batch = self.det.step_inputs(batch, 0)
        elif det_kind == "det_multi":
            batch = self.det.fused_inputs(batch, 0)
        return batch, sbatch, flags, K

    def _compile_shape(self, shape, trace_lock=None, reason: str = "warm-up") -> None:
        kind, T, S = shape
        batch, sbatch, flags, K = self._dummy_inputs(kind, T, S)
        base, _, variant = kind.partition("+")
        if variant:
            reason = f"background: the {variant} variant, first wanted by a step"
        self.compiled(base, batch, sbatch, flags, K, trace_lock=trace_lock, reason=reason)
        with self._compile_lock:
            self._first_runs.append((base, batch, sbatch, flags, K))
            self._ready.add((kind, T if kind == "prefill" else S))

    @property
    def compiling(self) -> bool:
        """Whether a background compile (warm-up's rest or a later bucket) may still be running."""
        threads = [self._warm_thread] + list(self._later_threads)
        return any(t is not None and t.is_alive() for t in threads)

    @property
    def first_runs_pending(self) -> bool:
        return bool(self._first_runs)

    def run_first_runs(self) -> int:
        """Run each program that warm-up or a background compile made and nothing has run yet, once, on all-padding
        inputs (nothing is written or read in the KV pool). Call it from the thread that runs the steps (it
        updates the donated KV pool like a step). Returns how many ran."""
        with self._compile_lock:
            pending, self._first_runs = self._first_runs, []
        if jax.process_count() > 1:
            return 0        # every process must launch the same programs in the same order: only real steps
        for kind, batch, sbatch, flags, K in pending:
            self.run_program(kind, batch, sbatch, flags, K)
        self.num_first_runs += len(pending)
        return len(pending)

    def warmup(self, background: bool = True) -> None:
        """Compile the bucket programs (greedy sampling variant) several at a time in threads (XLA compiles in
        C++ without the GIL), behind a progress bar. The coverage set (`coverage_shapes`) is compiled before this
        returns; with background=True the other buckets compile in a daemon thread while the engine serves (each
        waits for a pause in the steps, at most 5 s, see `_compile_when_idle`), and until a step's own bucket is
        ready it runs padded to the next larger ready one (`wait_for_warmup` joins)."""
        shapes = self.warmup_shapes()
        first = self.coverage_shapes(shapes)
        rest = [sh for sh in shapes if sh not in first]
        workers = max(1, min(8, (os.cpu_count() or 2) // 2))
        self._warm_started = True
        bar = tqdm(total=len(first) if background else len(shapes), desc="compiling step buckets", unit="shape")

        def one(shape):
            self._compile_shape(shape)
            bar.update(1)

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, first if background else first + rest))
        bar.close()
        if background and rest:
            self._background_not_before = time.monotonic() + BACKGROUND_GRACE_S

            def compile_rest():
                t0 = time.monotonic()
                with concurrent.futures.ThreadPoolExecutor(max(1, workers // 2)) as pool:
                    list(pool.map(self._compile_when_idle, rest))
                logger.info("background compiles done: %d more step programs in %.1f s", len(rest),
                            time.monotonic() - t0)
            self._warm_thread = threading.Thread(target=compile_rest, name="yaie-compile", daemon=True)
            self._warm_thread.start()

    def _compile_when_idle(self, shape, idle_s: float = 0.25, max_defer_s: float = 5.0) -> None:
        """Background compile of one bucket, started once no step has run for `idle_s` and the start-up grace
        (BACKGROUND_GRACE_S after the warm-up) is over (tracing and lowering hold the GIL, which the serving loop
        needs), or after `max_defer_s` at the latest; one background compile traces/lowers at a time (their XLA
        compiles, which release the GIL, still overlap)."""
        self._wait_for_idle(idle_s, max_defer_s)
        self._compile_shape(shape, trace_lock=self._background_trace_lock, reason="warm-up (background)")

    def _wait_for_idle(self, idle_s: float = 0.25, max_defer_s: float = 5.0) -> None:
        deadline = time.monotonic() + max_defer_s
        while time.monotonic() < deadline and (time.monotonic() - self._last_step_t < idle_s
                                               or time.monotonic() < self._background_not_before):
            time.sleep(0.02)

    def wait_for_warmup(self) -> None:
        """Block until background bucket compilation (if any) has finished."""
        if self._warm_thread is not None:
            self._warm_thread.join()
        for thread in list(self._later_threads):
            thread.join()


def _copy_blocks(kv_caches, src, dst):
    out = []
    for k, v in kv_caches:
        out.append((k.at[:, dst].set(k[:, src], mode="drop"), v.at[:, dst].set(v[:, src], mode="drop")))
    return out


def _read_blocks(kv_caches, ids):
    # -> [layers, 2, num_kv_heads, n, block_size, head_dim]
    return jnp.stack([jnp.stack([k[:, ids], v[:, ids]]) for k, v in kv_caches])


def _write_blocks(kv_caches, data, dst):
    out = []
    for i, (k, v) in enumerate(kv_caches):
        out.append((k.at[:, dst].set(data[i, 0].astype(k.dtype), mode="drop"),
                    v.at[:, dst].set(data[i, 1].astype(v.dtype), mode="drop")))
    return out


def resolve_attention_backend(name: str) -> str:
    """"auto": the Pallas kernels on a GPU where they are built for it, else the XLA path."""
    if name == "auto":
        import pallas_kernels
        gpu_ok = getattr(pallas_kernels, "GPU_KERNELS_VALIDATED", False)
        return "pallas" if jax.default_backend() == "gpu" and gpu_ok else "xla"
    return name
