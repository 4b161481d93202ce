"""ModelRunner: a SchedulerOutput (host) -> a padded StepBatch (host numpy) -> one compiled step program -> the
sampled token ids (device arrays, read back by the engine).

The only place that turns host data into device arrays. Its parts: kv_pool.py (the device KV pool and host swap
pool), programs.py (compiled programs, warm-up, the compiled-program store), buckets.py (the rounding rule),
launch.py (every device call goes through `launcher`: multi-host leaders publish it first), deterministic.py
(deterministic mode's fixed programs), cpu_programs.py (which programs a CPU compiles when).

Shapes are padded to buckets so XLA compiles a bounded set of programs:
  decode step   (every sequence has exactly one new token): S padded to a power of two (>= 8)
  fused decode  (num_decode_steps tokens per sequence in one call): as decode
  prefill step  (any mix of prefill chunks and decode tokens): T padded to a power of two (>= 16; on the CPU
                with warm-up on >= 64, see cpu_programs.py), S = min(T, S_max)
(one program per T rather than per (T, S) pair: fewer compiles at start-up; see `padded_shape`).
Padding tokens write nowhere (slot -1) and padding sequences have context length 0 (attention outputs zeros).
The runner writes nothing onto the SchedulerOutput: what it decides per step (the padded shape, the fused call's
last tokens, the prompt logprobs) is its own record, returned by `dispatch` as a `DispatchedStep`.
"""
from __future__ import annotations

import time
import weakref
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence as Seq, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from yaie_jax.cache.block_manager import blocks_for
from yaie_jax.config import EngineConfig
from yaie_jax.executor import cascade, deterministic, prompt_logprobs, sampling
from yaie_jax.executor.attention import kv_storage_dtype
from yaie_jax.executor.buckets import bucket_list, next_power_of
from yaie_jax.executor.cpu_programs import MIN_PREFILL_TOKENS, CpuProgramPlan
from yaie_jax.executor.kv_pool import KVPool, auto_num_blocks, kv_bytes_per_block
from yaie_jax.executor.launch import LocalLauncher
from yaie_jax.executor.programs import StepPrograms, shape_key
from yaie_jax.models.base import CausalLM
from yaie_jax.step_types import PrevTokens, SchedulerOutput, StepBatch

JNP_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
CASCADE_MIN_ROWS = 16        # smaller decode buckets never carry a cascade plan (one program variant fewer)


class DispatchedStep(NamedTuple):
    """What `dispatch` enqueued: device arrays, possibly not computed yet."""
    result: sampling.SampleResult              # [S] fields (fused: [num_steps, S])
    last_tokens: Optional[jax.Array]           # fused call: its last step's tokens [S_max], else None
    prompt_logprobs: Optional[tuple]           # (StepRows, device PromptLogprobs) of prompt tokens, or None
    padded_shape: Tuple[int, int]              # (S, T) of the step
    sampling_batch_s: float                    # host seconds building the sampling batch


class ModelRunner:
    """One model on its devices: the KV pool, the compiled step programs, and the step's host -> device path.
    Not thread-safe: `dispatch`, the device calls and `run_first_runs` belong to the thread that runs the steps
    (background compiles run in programs.py's threads)."""

    def __init__(self, model: CausalLM, config: EngineConfig, max_model_len: int, num_gpu_blocks: int,
                 mesh=None, param_shardings=None, kv_sharding=None,
                 eos_token_ids: Callable[[], Seq[int]] = tuple):
        """eos_token_ids: returns the EOS ids the sampler suppresses under min_tokens (asked at each step:
        the engine's tokenizer may load after the runner is built)."""
        self.model = model
        self.config = config
        self.mc = model.config
        self.dtype = JNP_DTYPES[config.dtype]
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = blocks_for(max_model_len, self.block_size)
        self.mesh = mesh
        self.eos_token_ids = eos_token_ids
        self.attention_backend = resolve_attention_backend(config.attention_backend)
        # the pool's arrays: `dtype` values, or their uint16 bit patterns on the CPU (see `kv_storage_dtype`)
        self.kv_storage_dtype = kv_storage_dtype(self.dtype, self.attention_backend)
        self._kv_view = None if self.kv_storage_dtype == jnp.dtype(self.dtype) else self.dtype
        # CPU with warm-up on (cpu_programs.py): what compiles when; not with several processes (each must run
        # the same programs: the choice depends on what compiled when), nor in deterministic mode (fixed programs)
        use_cpu_plan = jax.default_backend() == "cpu" and config.warmup and jax.process_count() == 1 \
            and not config.deterministic
        self._init_buckets(use_cpu_plan)
        self.params = jax.device_put(model.params, param_shardings) if param_shardings is not None \
            else jax.device_put(model.params)
        self.num_gpu_blocks = num_gpu_blocks or self._agreed_auto_num_blocks()
        self.kv = KVPool(self.mc, num_blocks=self.num_gpu_blocks, block_size=self.block_size,
                         storage_dtype=self.kv_storage_dtype, num_cpu_blocks=config.num_cpu_blocks,
                         sharding=kv_sharding)
        self.launcher = LocalLauncher()     # where device calls go (launch.py; the multi-host leader replaces it)
        # a fused decode call's last sampled tokens, padded to the largest decode bucket: the next fused call (sent
        # before these are read back) takes its input tokens from them on the device; see programs.multi_step_body
        self.last_fused_tokens = None
        # (weak reference to the last step's SchedulerOutput, its (S, T)): decided once per step, and holding no
        # reference to the step (its sequences are freed when the engine drops them)
        self._step_shape: Optional[tuple] = None
        # deterministic mode (deterministic.py): every step runs "det" / "det_multi" programs instead
        self.det = deterministic.DeterministicSteps(self) if config.deterministic else None
        # cascade attention (cascade.py, its policy there) for decode buckets of >= CASCADE_MIN_ROWS rows
        self.cascade_group = max(1, self.mc.num_heads // self.mc.num_kv_heads)
        self.cascade_enabled = (config.cascade_attention and self.attention_backend == "pallas"
                                and self.cascade_group <= 32 and self.det is None)
        self.num_cascade_calls = 0          # decode calls that carried a cascade plan
        # host seconds in `dispatch` by part (sampling_batch; prepare_inputs: host arrays and cascade plan;
        # launch: the compiled program's call, host-to-device copies of the inputs included)
        self.host_time_s: Dict[str, float] = {"prepare_inputs": 0.0, "launch": 0.0, "sampling_batch": 0.0}
        self.programs = StepPrograms(self)
        self.cpu_plan = CpuProgramPlan(self) if use_cpu_plan else None

    def _init_buckets(self, use_cpu_plan: bool) -> None:
        """Bucket lists (module docstring): decode rows and prefill tokens."""
        config = self.config
        # decode batches below 8 rows cost the same as 8 on a GPU: one bucket for them (fewer compiles)
        self.seq_buckets_decode = [next_power_of(s, 2, 1) for s in
                                   bucket_list(min(8, config.max_num_seqs), max(config.max_num_seqs, 1), 2)]
        # CPU plan: no prefill bucket below MIN_PREFILL_TOKENS (a compile saved per bucket; padding is cheap there)
        lo = min(MIN_PREFILL_TOKENS, next_power_of(config.max_num_batched_tokens, 2, 16)) if use_cpu_plan else 16
        self.token_buckets = [next_power_of(t, 2, lo) for t in
                              bucket_list(lo, max(config.max_num_batched_tokens, lo), 2)]

    # ------------------------------------------------------------------ the KV pool (kv_pool.py)
    def _agreed_auto_num_blocks(self) -> int:
        n = self.auto_num_blocks()
        if jax.process_count() > 1:    # multi-host: every process allocates the same pool
            from yaie_jax.executor.distributed import agree_min
            n = agree_min("num_gpu_blocks", n)
        return n

    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.mc, self.block_size, self.dtype)

    def auto_num_blocks(self) -> int:
        return auto_num_blocks(self.config, self.max_blocks_per_seq, self.kv_bytes_per_block())

    def kv_shape(self) -> Tuple[int, int, int, int]:
        return self.kv.shape()

    @property
    def kv_caches(self) -> List[tuple]:
        """The device pool: per layer (k_pages, v_pages), each [num_kv_heads, num_blocks, block_size, head_dim]."""
        return self.kv.caches

    @kv_caches.setter
    def kv_caches(self, caches) -> None:
        self.kv.caches = caches

    @property
    def host_kv(self) -> Optional[np.ndarray]:
        return self.kv.host

    def copy_blocks(self, pairs: Seq[Tuple[int, int]]) -> None:
        self.launcher.launch("copy_blocks", self.kv.copy_blocks, pairs)

    def swap_out(self, pairs: Seq[Tuple[int, int]]) -> None:
        self.launcher.launch("swap_out", self.kv.swap_out, pairs)

    def swap_in(self, pairs: Seq[Tuple[int, int]]) -> None:
        self.launcher.launch("swap_in", self.kv.swap_in, pairs)

    # ------------------------------------------------------------------ host side: shapes and batches
    def padded_shape(self, out: SchedulerOutput) -> Tuple[int, int]:
        """(S, T): the padded row and token counts of a step, decided once per step (the runner remembers the
        last step's; `out` is not written).

        Decode: S a power of two >= the rows (>= 8), T = S. Prefill: T a power of two >= the tokens (>= 16), and
        S tied to it, min(T, S_max), so each T compiles one program rather than one per (T, S) pair (padding rows
        cost a few empty work items and logits rows, small next to T tokens). While buckets still compile in the
        background after start-up, a step whose bucket is not ready runs in the next larger ready one."""
        if self._step_shape is not None and self._step_shape[0]() is out:
            return self._step_shape[1]
        if self.det is not None:
            shape = self.det.padded_shape(out)
        elif out.is_decode_only:
            kind = "multi" if out.num_steps > 1 else "decode"
            S = self.programs.ready_bucket(kind, next_power_of(len(out.scheduled), 2, self.seq_buckets_decode[0]),
                                           self.seq_buckets_decode)
            shape = (S, S)
        else:
            T = self.programs.ready_bucket("prefill", next_power_of(sum(s.num_new_tokens for s in out.scheduled),
                                                                    2, self.token_buckets[0]), self.token_buckets)
            shape = (max(min(T, self.seq_buckets_decode[-1]), next_power_of(len(out.scheduled), 2, 4)), T)
        self._step_shape = (weakref.ref(out), shape)
        return shape

    def padding_batch(self, T: int, S: int) -> StepBatch:
        """A single step's StepBatch of T tokens and S rows, all padding."""
        return StepBatch(input_ids=np.zeros(T, np.int32),                         # [T]
                         positions=np.zeros(T, np.int32),                         # [T]
                         block_tables=np.zeros((S, self.max_blocks_per_seq), np.int32),   # [S, max_blocks]
                         context_lens=np.zeros(S, np.int32),                      # [S], 0 = padding row
                         slot_mapping=np.full(T, -1, np.int32),                   # [T], -1 = write nowhere
                         query_start=np.zeros(S + 1, np.int32),                   # [S+1]
                         logits_index=np.zeros(S, np.int32))                      # [S]

    def prepare_inputs(self, out: SchedulerOutput, tokens_on_device: bool = False
                       ) -> Tuple[StepBatch, Optional[prompt_logprobs.StepRows]]:
        """Flatten the scheduled sequences into one padded ragged batch (host numpy), and which prompt tokens
        get logprobs (None: none). tokens_on_device: the input tokens are not on the host yet (a pipelined fused
        decode call): input_ids stay zero, the program takes them from the previous call."""
        sched = out.scheduled
        S, T = self.padded_shape(out)
        b = self.padding_batch(T, S)
        input_ids, positions, slot_mapping = b.input_ids, b.positions, b.slot_mapping
        query_start, context_lens, block_tables, logits_index = (b.query_start, b.context_lens, b.block_tables,
                                                                 b.logits_index)
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
        query_start[len(sched) + 1:] = t
        rows = None
        if out.num_steps == 1:
            index, target, step_rows = prompt_logprobs.rows_of_step(sched, query_start)
            if len(index):
                pi, pt = prompt_logprobs.padded(index, target)                   # [P]
                b, rows = b.replace(prompt_index=pi, prompt_target=pt), step_rows
        if out.is_decode_only:
            plan = self.cascade_plan("multi" if out.num_steps > 1 else "decode", block_tables, context_lens,
                                     len(sched))
            if plan is not None:
                b = b.replace(cascade=plan)
                self.num_cascade_calls += 1
        return b, rows

    def fused_batch(self, input_ids, positions, context_lens, block_tables, slots, plan,
                    prev: Optional[PrevTokens], scheduled: Seq = ()) -> StepBatch:
        """A fused decode call's StepBatch: the first step's input_ids/positions/context_lens [S], block_tables,
        slots [num_steps, S], the cascade plan or None; each row's input token from `prev` where it has one."""
        S = len(context_lens)
        prev_rows = np.full(S, -1, np.int32)                       # [S] row in the previous call, -1: input_ids
        if prev is not None:
            prev_rows[:len(scheduled)] = [prev.rows.get(s.seq.seq_id, -1) for s in scheduled]
            prev_last = prev.last_tokens                           # [S_max] (device)
        else:
            prev_last = np.zeros(self.fused_rows_max, np.int32)    # [S_max], unused
        return StepBatch(input_ids=input_ids, positions=positions, block_tables=block_tables,
                         context_lens=context_lens, cascade=plan, slots=slots, prev_rows=prev_rows,
                         prev_last=prev_last)

    def cascade_plan(self, kind: str, block_tables: np.ndarray, context_lens: np.ndarray, num_seqs: int):
        """The cascade plan of a decode batch (cascade.py), or None: cascade off, a bucket below
        CASCADE_MIN_ROWS, no rows sharing a prefix of >= cascade.MIN_PREFIX_TOKENS, or (while warm-up compiles in
        the background) the bucket's cascade program not compiled yet -- plain decode attention gives the same
        result, only reading the shared pages once per row."""
        S = block_tables.shape[0]
        if not self.cascade_enabled or S < CASCADE_MIN_ROWS:
            return None
        plan = cascade.engine_plan(block_tables, context_lens, block_size=self.block_size, group=self.cascade_group)
        variant = (kind + "+cascade", S)
        if plan is not None and self.programs.warm_started and variant not in self.programs.ready:
            # the first batch that would use it: compile it now, and the batch's own bucket's too (this one may
            # be padded to a larger bucket while its own still compiles)
            own = next_power_of(num_seqs, 2, self.seq_buckets_decode[0])
            for rows in dict.fromkeys((S, own)):
                self.programs.compile_later((variant[0], rows, rows))
            return None
        return plan

    def sampling_batch(self, out: SchedulerOutput, S: int, step_offset: int = 0):
        """(SamplingBatch, SamplingFlags) of the step's rows padded to S (fused: stacked [num_steps, ...], keys
        advancing with the token index). step_offset: tokens each row sampled that its token_ids lack yet."""
        return sampling.build_sampling_batch(
            [(s.seq, s.seq.request.params) for s in out.scheduled], pad_to=S, eos_token_ids=self.eos_token_ids(),
            engine_seed=self.config.seed, vocab_size=self.mc.vocab_size, num_steps=out.num_steps,
            step_offset=step_offset)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, out: SchedulerOutput, prev: Optional[PrevTokens] = None) -> DispatchedStep:
        """Enqueue the swaps, copies and the step on the device; returns the step's device results without
        waiting for them (JAX dispatches asynchronously).

        prev: for a fused decode call scheduled while the previous one is in flight
        (`Scheduler.schedule_continuation`): that call's last tokens and rows. Each row's input token is then
        taken on the device from the previous call's last step (inside the program: no separate device call),
        so the host never waits for it; with empty rows every input token comes from the host. After a fused
        call, `last_fused_tokens` holds its own."""
        if out.swap_out:
            self.swap_out(out.swap_out)
        if out.swap_in:
            self.swap_in(out.swap_in)
        if out.block_copies:
            self.copy_blocks(out.block_copies)
        t0 = time.perf_counter()
        S, T = self.padded_shape(out)
        sbatch, flags = self.sampling_batch(out, S, prev.pending_steps if prev is not None else 0)
        t1 = time.perf_counter()
        batch, rows = self.prepare_inputs(out, tokens_on_device=prev is not None and bool(prev.rows))
        K = out.num_steps
        if K == 1:
            kind = "det" if self.det is not None else "decode" if out.is_decode_only else "prefill"
            if self.det is not None:
                batch, rows = self.det.step_inputs(batch, len(out.scheduled)), None
        else:
            slots = np.full((K, S), -1, np.int32)                  # [num_steps, S] slot of each step's token
            for i, sch in enumerate(out.scheduled):
                slots[:, i] = sch.slots
            batch = self.fused_batch(batch.input_ids, batch.positions, batch.context_lens, batch.block_tables,
                                     slots, batch.cascade, prev, out.scheduled)
            kind = "multi"
            if self.det is not None:
                batch, kind = self.det.fused_inputs(batch, len(out.scheduled)), "det_multi"
        t2 = time.perf_counter()
        self.host_time_s["sampling_batch"] += t1 - t0
        self.host_time_s["prepare_inputs"] += t2 - t1
        result = self.run_program(kind, batch, sbatch, flags, K)
        last, prompt_lp = None, None
        if K > 1:
            result, last = result
        elif batch.prompt_index is not None:
            result, device_lp = result
            prompt_lp = (rows, device_lp)
        return DispatchedStep(result, last, prompt_lp, (S, T), t1 - t0)

    @property
    def fused_rows_max(self) -> int:
        """Rows of the largest fused decode call (the size of `last_fused_tokens`)."""
        return self.det.num_rows if self.det is not None else self.seq_buckets_decode[-1]

    def run_program(self, kind: str, batch: StepBatch, sbatch, flags, num_steps: int = 1):
        """Run one compiled step program ("decode" | "prefill" | "multi", or in deterministic mode "det" |
        "det_multi") on padded inputs, updating the KV pool in place (donated), through the launcher. Returns
        the program's device results: a SampleResult; (SampleResult, PromptLogprobs) where the batch has
        prompt rows; (stacked SampleResult, last tokens [S_max]) for a fused call (the tokens also kept as
        `last_fused_tokens`)."""
        return self.launcher.launch("run_program", self._run_program_here, kind, batch, sbatch, flags, num_steps)

    def _run_program_here(self, kind: str, batch: StepBatch, sbatch, flags, num_steps: int = 1):
        if self.cpu_plan is not None and num_steps == 1:
            sbatch, flags = self.cpu_plan.choose(kind, batch, sbatch, flags)
        fn = self.compiled(kind, batch, sbatch, flags, num_steps, reason="a step needs it, the engine waits")
        t0 = time.perf_counter()
        result, self.kv_caches = fn(self.params, self.kv_caches, batch, sbatch)
        self.host_time_s["launch"] += time.perf_counter() - t0
        self.programs.last_step_t = time.monotonic()
        if kind in ("multi", "det_multi"):
            self.last_fused_tokens = result[1]
        return result

    # ------------------------------------------------------------------ compiled programs (programs.py)
    # the engine's entry points into its programs; `compiled` stays a runner method so that scripts/host_trace.py
    # can time every lookup by wrapping it on the instance
    _shape_key = staticmethod(shape_key)

    def compiled(self, kind: str, batch, sbatch, flags, num_steps: int = 1, trace_lock=None,
                 reason: str = "first use"):
        return self.programs.compiled(kind, batch, sbatch, flags, num_steps, trace_lock=trace_lock, reason=reason)

    def program_key(self, kind: str, batch, sbatch, flags, num_steps: int = 1) -> tuple:
        return self.programs.program_key(kind, batch, sbatch, flags, num_steps)

    def is_compiled(self, kind: str, batch, sbatch, flags, num_steps: int = 1) -> bool:
        return self.programs.is_compiled(kind, batch, sbatch, flags, num_steps)

    def _dummy_inputs(self, kind: str, T: int, S: int):
        return self.programs.dummy_inputs(kind, T, S)

    def warmup(self, background: bool = True) -> None:
        self.programs.warmup(background)

    def warmup_shapes(self) -> list:
        return self.programs.warmup_shapes()

    def coverage_shapes(self, shapes: list) -> list:
        return self.programs.coverage_shapes(shapes)

    def run_first_runs(self) -> int:
        return self.programs.run_first_runs()

    def wait_for_warmup(self) -> None:
        self.programs.wait_for_warmup()

    first_runs_pending = property(lambda self: self.programs.first_runs_pending)
    compiling = property(lambda self: self.programs.compiling)
    num_first_runs = property(lambda self: self.programs.num_first_runs)
    compile_log = property(lambda self: self.programs.compile_log)
    compile_tracker = property(lambda self: self.programs.compile_tracker)
    _aot_store = property(lambda self: self.programs.store)


def resolve_attention_backend(name: str) -> str:
    """"auto": the Pallas kernels on a GPU where they are built for it, else the XLA path."""
    if name == "auto":
        import pallas_kernels
        gpu_ok = getattr(pallas_kernels, "GPU_KERNELS_VALIDATED", False)
        return "pallas" if jax.default_backend() == "gpu" and gpu_ok else "xla"
    return name
