"""The compiled step programs of one ModelRunner: ahead-of-time compiles keyed by input shapes, the start-up
warm-up, background compiles, the compiled-program store (aot_cache.py) and each new program's first run.

A program key is (kind, sampling flags, fused steps, the StepBatch's and SamplingBatch's pytree structure and leaf
shapes/dtypes): one compiled executable per key, compiled once (a second thread asking for it waits) and reused.
Kinds: "decode" | "prefill" (one step), "multi" (fused decode), and in deterministic mode "det" | "det_multi";
warm-up shapes may carry a "+cascade" variant (decode with a cascade plan).

Threads: warm-up compiles several programs at once (XLA compiles in C++ without the GIL); background compiles
(the rest of warm-up, `compile_later`, the CPU plan's worker) wait for a pause in the steps and trace one at a
time (`background_trace_lock`: tracing holds the GIL the serving loop needs). `lock` guards the program table,
`compile_log`, `ready` and the pending first runs; `run_first_runs` belongs to the thread that runs the steps.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import time
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from yaie_jax.executor import aot_cache, cascade, deterministic, prompt_logprobs, sampling
from yaie_jax.executor.attention import make_paged_attention
from yaie_jax.executor.compile_tracker import CompileTracker
from yaie_jax.executor.sampling_superset import describe
from yaie_jax.step_types import STEP_BATCH_FIELDS, StepBatch

logger = logging.getLogger("yaie_jax.executor.runner")

# StepBatch is a pytree here, on the JAX side (step_types.py imports no JAX); None fields are structure
jax.tree_util.register_dataclass(StepBatch, data_fields=list(STEP_BATCH_FIELDS), meta_fields=[])

# after the start-up warm-up, background compiles wait this long: the server starts and answers its first
# requests without competing for the GIL with tracing/lowering (they also wait for a pause in the steps)
BACKGROUND_GRACE_S = 2.0


def shape_key(tree) -> tuple:
    """(pytree structure, (shape, dtype) per leaf) of host or device arrays."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (str(treedef),) + tuple((tuple(np.shape(x)), str(np.asarray(x).dtype) if not hasattr(x, "dtype")
                                     else str(x.dtype)) for x in leaves)


def program_name(kind: str, batch: StepBatch, num_steps: int) -> str:
    return f"{kind} S={batch.num_rows} T={batch.num_tokens}" + (f" steps={num_steps}" if num_steps > 1 else "")


# ---------------------------------------------------------------------------------- the step programs' bodies
def step_body(runner, params, kv_caches, batch: StepBatch, sbatch, *, decode: bool, flags):
    """One step ("decode" | "prefill"): the model over the ragged batch, logits of each row's
    `logits_index` token, sampling; with prompt rows, their logprobs too. Returns (result, kv_caches)."""
    attention = make_paged_attention(
        runner.attention_backend, decode=decode, slot_mapping=batch.slot_mapping, query_start=batch.query_start,
        context_lens=batch.context_lens, block_tables=batch.block_tables, mesh=runner.mesh,
        cascade=batch.cascade, kv_dtype=runner._kv_view)
    hidden, kv_caches = runner.model.apply_hidden(params, batch.input_ids, batch.positions, attention, kv_caches)
    rows = hidden[batch.logits_index]                                # [S, hidden]
    logits = runner.model.apply_logits(params, rows)                 # [S, vocab] float32
    result = sampling.sample(logits, sbatch, flags=flags)
    if batch.prompt_index is not None:                               # prompt logprobs (prompt_logprobs.py)
        prompt_logits = runner.model.apply_logits(params, hidden[batch.prompt_index])   # [P, vocab] float32
        result = (result, prompt_logprobs.compute(prompt_logits, batch.prompt_target))
    return result, kv_caches


def multi_step_body(runner, params, kv_caches, batch: StepBatch, sbatch, *, flags, num_steps: int):
    """`num_steps` decode steps in one device call: each step's sampled tokens are the next step's inputs
    (a fused StepBatch; its cascade plan, if any, serves every step: the shared prefixes stay the same).
    sbatch: every step's sampling batch stacked on a leading [num_steps] axis. Returns ((SampleResult
    stacked on a leading [num_steps] axis, the last step's tokens padded to [S_max]), kv_caches)."""
    S = batch.input_ids.shape[0]
    live = batch.context_lens > 0                                     # padding rows stay inert
    first_tokens = jnp.where(batch.prev_rows >= 0, batch.prev_last[jnp.maximum(batch.prev_rows, 0)],
                             batch.input_ids)                         # [S]

    def body(j, carry):
        kv, tokens, acc = carry
        attention = make_paged_attention(
            runner.attention_backend, decode=True, slot_mapping=batch.slots[j],
            query_start=jnp.arange(S + 1, dtype=jnp.int32),
            context_lens=jnp.where(live, batch.context_lens + j, 0),
            block_tables=batch.block_tables, mesh=runner.mesh, cascade=batch.cascade, kv_dtype=runner._kv_view)
        hidden, kv = runner.model.apply_hidden(params, tokens, batch.positions + j, attention, kv)
        logits = runner.model.apply_logits(params, hidden)               # [S, vocab] float32
        res = sampling.sample(logits, jax.tree_util.tree_map(lambda a: a[j], sbatch), flags=flags)
        acc = jax.tree_util.tree_map(lambda a, r: a.at[j].set(r), acc, res)
        return kv, res.token_ids, acc

    first = jax.tree_util.tree_map(lambda a: a[0], sbatch)
    proto = jax.eval_shape(lambda: sampling.sample(jnp.zeros((S, runner.mc.vocab_size), jnp.float32), first,
                                                   flags=flags))
    acc = jax.tree_util.tree_map(lambda x: jnp.zeros((num_steps,) + x.shape, x.dtype), proto)
    kv, last, acc = jax.lax.fori_loop(0, num_steps, body, (kv_caches, first_tokens, acc))
    last_padded = jnp.zeros(batch.prev_last.shape, last.dtype).at[:S].set(last)   # [S_max]
    return (acc, last_padded), kv


class StepPrograms:
    """Compiled step programs of `runner` (`step_body`, `multi_step_body`, deterministic mode's bodies)."""

    def __init__(self, runner):
        self.runner = runner
        self._jitted = {"step": jax.jit(functools.partial(step_body, runner), donate_argnums=(1,),
                                        static_argnames=("decode", "flags")),
                        "multi": jax.jit(functools.partial(multi_step_body, runner), donate_argnums=(1,),
                                         static_argnames=("flags", "num_steps"))}
        if runner.det is not None:
            self._jitted["det"] = jax.jit(runner.det.step_impl, donate_argnums=(1,), static_argnames=("flags",))
            self._jitted["det_multi"] = jax.jit(runner.det.multi_step_impl, donate_argnums=(1,),
                                                static_argnames=("flags", "num_steps"))
        self.compile_log: List[tuple] = []  # (kind, S, T, steps, trace+lower s, compile s) per program
        self._compiled: dict = {}           # program key -> jax.stages.Compiled
        self.lock = threading.Lock()
        self.ready: set = set()             # (kind, S or T) bucket programs compiled by warm-up
        self.warm_started = False
        self._warm_thread: Optional[threading.Thread] = None
        self.requested: set = set()         # shapes handed to `compile_later`
        self.later_threads: List[threading.Thread] = []
        self.last_step_t = 0.0              # monotonic time of the last step run (background compiles wait)
        self._background_not_before = 0.0   # monotonic time before which background compiles do not start
        self.background_trace_lock = threading.Lock()   # one background compile traces/lowers at a time
        # programs compiled or loaded by warm-up / in the background and not run yet: (kind, batch, sbatch,
        # flags, num_steps) all-padding inputs; `run_first_runs` runs each once, so that a program's first real
        # step does not pay its one-time costs (an executable's first call, its kernels' first launch)
        self._first_runs: List[tuple] = []
        self.num_first_runs = 0
        # compiled programs of earlier processes with the same fingerprint (None: off, see aot_cache.for_runner)
        self.store = aot_cache.ExecutableStore.for_runner(runner)
        self.compile_tracker = CompileTracker()   # the compiles under way (one per program at a time; /health)

    # ------------------------------------------------------------------ keys and lookup
    def program_key(self, kind: str, batch, sbatch, flags, num_steps: int = 1) -> tuple:
        return (kind, flags, num_steps, shape_key(batch), shape_key(sbatch))

    def is_compiled(self, kind: str, batch, sbatch, flags, num_steps: int = 1) -> bool:
        return self.program_key(kind, batch, sbatch, flags, num_steps) in self._compiled

    def compiled(self, kind: str, batch, sbatch, flags, num_steps: int = 1, trace_lock=None,
                 reason: str = "first use") -> "jax.stages.Compiled":
        """The compiled program for these input shapes (lower + compile once, then reuse). With the store
        (aot_cache.py) a program compiled by an earlier process with the same fingerprint is loaded instead (no
        tracing, lowering or XLA compile), and new ones are saved to it. A program another thread is compiling
        is waited for, not compiled twice; `reason` (why it is needed) goes to the log and to `compile_tracker`
        (/health) while it compiles."""
        key = self.program_key(kind, batch, sbatch, flags, num_steps)
        fn = self._compiled.get(key)
        while fn is None:
            info = {"program": program_name(kind, batch, num_steps), "sampling": describe(flags), "reason": reason}
            other = self.compile_tracker.begin(key, info)
            if other is not None:           # under way in another thread: its result (or, if it failed, ours)
                logger.info("%s (%s sampling) is needed (%s): waiting for the compile under way", info["program"],
                            info["sampling"], reason)
                other.wait()
                fn = self._compiled.get(key)
                continue
            try:
                fn = self._compile(key, kind, batch, sbatch, flags, num_steps, trace_lock, info)
            finally:
                self.compile_tracker.end(key)
        return fn

    def _lower(self, kind: str, batch, sbatch, flags, num_steps: int):
        r = self.runner
        args = (r.params, r.kv_caches, batch, sbatch)
        if kind in ("multi", "det_multi"):
            return self._jitted[kind].lower(*args, flags=flags, num_steps=num_steps)
        if kind == "det":
            return self._jitted["det"].lower(*args, flags=flags)
        return self._jitted["step"].lower(*args, decode=(kind == "decode"), flags=flags)

    def _compile(self, key, kind, batch, sbatch, flags, num_steps, trace_lock, info):
        rows, tokens = batch.num_rows, batch.num_tokens
        fn, load_s = aot_cache.timed_load(self.store, key)
        if fn is not None:
            logger.info("loaded %s S=%d T=%d steps=%d from the compiled-program store in %.2f s", kind, rows,
                        tokens, num_steps, load_s)
            with self.lock:
                self._compiled[key] = fn
                self.compile_log.append((kind, rows, tokens, num_steps, 0.0, load_s))
            return fn
        logger.info("compiling %s (%s sampling): %s", info["program"], info["sampling"], info["reason"])
        t0 = time.perf_counter()
        with trace_lock or contextlib.nullcontext():     # background: one thread holds the GIL tracing
            lowered = self._lower(kind, batch, sbatch, flags, num_steps)
        t1 = time.perf_counter()
        hits0 = aot_cache.persistent_cache_hits() if self.store is not None else 0
        fn = (lowered.compile(compiler_options=self.runner.det.compiler_options) if kind in deterministic.KINDS
              else lowered.compile())
        t2 = time.perf_counter()
        with self.lock:
            self._compiled[key] = fn
            # (kind, S, T, steps, trace+lower s, compile s); a compile of ~0.1 s is a persistent-cache hit
            self.compile_log.append((kind, rows, tokens, num_steps, t1 - t0, t2 - t1))
        logger.info("compiled %s S=%d T=%d steps=%d: trace+lower %.2f s, compile %.2f s (%s sampling; %s)", kind,
                    rows, tokens, num_steps, t1 - t0, t2 - t1, info["sampling"], info["reason"])
        if self.store is not None and aot_cache.may_save(aot_cache.persistent_cache_hits() > hits0):
            self.store.save(key, fn)
        return fn

    # ------------------------------------------------------------------ warm-up shapes
    def warmup_shapes(self) -> list:
        """Every bucket program the engine may run with greedy sampling: (kind, T, S)."""
        r = self.runner
        if r.det is not None:
            rows = r.det.num_rows
            return [("det", r.det.num_tokens, rows)] + \
                ([("det_multi", rows, rows)] if r.config.num_decode_steps > 1 else [])
        shapes = [("decode", s, s) for s in r.seq_buckets_decode]
        if r.config.num_decode_steps > 1:
            shapes += [("multi", s, s) for s in r.seq_buckets_decode]
        shapes += [("prefill", t, min(t, r.seq_buckets_decode[-1])) for t in r.token_buckets]
        return shapes

    @staticmethod
    def coverage_shapes(shapes: list) -> list:
        """The few programs that let every step run at once: the largest bucket of each kind (any step fits it,
        padded) and the smallest decode buckets and a prompt-sized prefill bucket (single-request latency)."""
        first = []
        for kind in ("decode", "multi", "prefill") + deterministic.KINDS:
            mine = [sh for sh in shapes if sh[0] == kind]
            if mine:
                first += [mine[-1], mine[0]] if kind != "prefill" else \
                    [mine[-1]] + [sh for sh in mine if sh[1] == min(512, mine[-1][1])]
        return list(dict.fromkeys(first))

    def dummy_inputs(self, kind: str, T: int, S: int):
        """(StepBatch, SamplingBatch, flags, num_steps) of one bucket, all padding: slots -1 (nothing written),
        context 0 (nothing read). kind "decode+cascade" / "multi+cascade": with an empty cascade plan."""
        r = self.runner
        kind, _, variant = kind.partition("+")
        det_kind = kind if kind in deterministic.KINDS else None
        kind = {"det": "prefill", "det_multi": "multi"}.get(kind, kind)
        K = r.config.num_decode_steps if kind == "multi" else 1
        sbatch, flags = sampling.build_sampling_batch([], pad_to=S, eos_token_ids=[], engine_seed=0,
                                                      vocab_size=r.mc.vocab_size, num_steps=K)
        plan = None
        if variant == "cascade":
            plan = cascade.empty_plan(S, r.max_blocks_per_seq, max_items=cascade.max_items(S),
                                      members_per_item=cascade.members_per_item(r.cascade_group))
        if kind == "multi":
            batch = r.fused_batch(np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(S, np.int32),
                                  np.zeros((S, r.max_blocks_per_seq), np.int32), np.full((K, S), -1, np.int32),
                                  plan, None)
        else:
            batch = r.padding_batch(T, S).replace(cascade=plan)
        if det_kind == "det":
            batch = r.det.step_inputs(batch, 0)
        elif det_kind == "det_multi":
            batch = r.det.fused_inputs(batch, 0)
        return batch, sbatch, flags, K

    def _compile_shape(self, shape, trace_lock=None, reason: str = "warm-up") -> None:
        kind, T, S = shape
        batch, sbatch, flags, K = self.dummy_inputs(kind, T, S)
        base, _, variant = kind.partition("+")
        if variant:
            reason = f"background: the {variant} variant, first wanted by a step"
        self.runner.compiled(base, batch, sbatch, flags, K, trace_lock=trace_lock, reason=reason)
        with self.lock:
            self._first_runs.append((base, batch, sbatch, flags, K))
            self.ready.add((kind, T if kind == "prefill" else S))

    def ready_bucket(self, kind: str, exact: int, buckets: List[int]) -> int:
        """`exact`, or while warm-up runs in the background and its program is not compiled yet, the smallest
        larger bucket that is (exact again if none is: it then compiles on first use)."""
        if not self.warm_started or (kind, exact) in self.ready:
            return exact
        with self.lock:
            ready = [b for b in buckets if b > exact and (kind, b) in self.ready]
        return ready[0] if ready else exact

    # ------------------------------------------------------------------ first runs
    @property
    def first_runs_pending(self) -> bool:
        return bool(self._first_runs)

    def run_first_runs(self) -> int:
        """Run each program that warm-up or a background compile made and nothing has run yet, once, on all-padding
        inputs (nothing is written or read in the KV pool), through the runner's `run_program`. Call it from the
        thread that runs the steps (it updates the donated KV pool like a step). Returns how many ran."""
        with self.lock:
            pending, self._first_runs = self._first_runs, []
        if jax.process_count() > 1:
            return 0        # every process must launch the same programs in the same order: only real steps
        for kind, batch, sbatch, flags, K in pending:
            self.runner.run_program(kind, batch, sbatch, flags, K)
        self.num_first_runs += len(pending)
        return len(pending)

    # ------------------------------------------------------------------ warm-up and background compiles
    @property
    def compiling(self) -> bool:
        """Whether a background compile (warm-up's rest or a later bucket) may still be running."""
        threads = [self._warm_thread] + list(self.later_threads)
        return any(t is not None and t.is_alive() for t in threads)

    def warmup(self, background: bool = True) -> None:
        """Compile the bucket programs (greedy sampling variant) several at a time in threads, behind a progress
        bar. The coverage set (`coverage_shapes`) is compiled before this returns; with background=True the other
        buckets compile in a daemon thread while the engine serves (each waits for a pause in the steps, at most
        5 s, see `compile_when_idle`), and until a step's own bucket is ready it runs padded to the next larger
        ready one (`ready_bucket`; `wait_for_warmup` joins)."""
        shapes = self.warmup_shapes()
        first = self.coverage_shapes(shapes)
        rest = [sh for sh in shapes if sh not in first]
        workers = max(1, min(8, (os.cpu_count() or 2) // 2))
        self.warm_started = True
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
                    list(pool.map(self.compile_when_idle, rest))
                logger.info("background compiles done: %d more step programs in %.1f s", len(rest),
                            time.monotonic() - t0)
            self._warm_thread = threading.Thread(target=compile_rest, name="yaie-compile", daemon=True)
            self._warm_thread.start()

    def compile_later(self, shape) -> None:
        """Compile one more bucket program in the background (once), after start-up warm-up: programs that only
        some workloads need (the cascade variants) are not compiled before serving."""
        with self.lock:
            if shape in self.requested:
                return
            self.requested.add(shape)
        thread = threading.Thread(target=self.compile_when_idle, args=(shape,), name="yaie-compile-later",
                                  daemon=True)
        self.later_threads.append(thread)
        thread.start()

    def compile_when_idle(self, shape, idle_s: float = 0.25, max_defer_s: float = 5.0) -> None:
        """Background compile of one bucket, started once no step has run for `idle_s` and the start-up grace
        (BACKGROUND_GRACE_S after the warm-up) is over, or after `max_defer_s` at the latest; one background
        compile traces/lowers at a time (their XLA compiles, which release the GIL, still overlap)."""
        self.wait_for_idle(idle_s, max_defer_s)
        self._compile_shape(shape, trace_lock=self.background_trace_lock, reason="warm-up (background)")

    def wait_for_idle(self, idle_s: float = 0.25, max_defer_s: float = 5.0) -> None:
        deadline = time.monotonic() + max_defer_s
        while time.monotonic() < deadline and (time.monotonic() - self.last_step_t < idle_s
                                               or time.monotonic() < self._background_not_before):
            time.sleep(0.02)

    def wait_for_warmup(self) -> None:
        """Block until background bucket compilation (if any) has finished."""
        if self._warm_thread is not None:
            self._warm_thread.join()
        for thread in list(self.later_threads):
            thread.join()


__all__ = ["StepPrograms", "shape_key", "program_name", "BACKGROUND_GRACE_S"]
