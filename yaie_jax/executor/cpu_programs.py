"""Which step programs an engine on the CPU compiles, when, and which one runs a step (with `warmup` on; with it
off every program compiles on first use, exactly the variant a step asks for).

On a CPU one step program takes seconds to compile (bench/NOTES.md, "Figures moved out of the code"): the GPU's
warm-up of every bucket would take minutes, and each sampling variant met mid-stream used to compile its own
program while every stream waited. Here:

- prefill steps of fewer than 64 tokens run in the T=64 bucket (`MIN_PREFILL_TOKENS`): a chat prompt of a
  short question (the README's: 37 tokens with the template) and the prompts that follow it share one bucket;
- start-up: the programs of a first short chat request (prefill T=64, then decode S=8; greedy) compile in a
  background thread from the moment the engine is built, then these buckets' superset variants
  (`sampling_superset`); a step that needs one of them waits for that compile, never compiles it twice;
- background compiles run one at a time, in the order asked (start-up first): on 2 cores a second compile
  only slows the first;
- a single-step batch runs in its bucket's greedy program if it is all-greedy without extras, else in the
  superset program (same tokens, logprobs and draws): two programs per bucket whatever the mix of options;
- a bucket met for the first time compiles the program its step needs then (nothing else can run it) and its
  other program in the background; meanwhile greedy steps run in the superset program where that one is ready.
Batches the superset cannot hold (fused multi-step calls, more than SUPPRESS_WIDTH suppressed ids) run in their
own variant, compiled on first use. A superset step costs what the exact non-greedy variant costs, so exact
non-greedy variants are not compiled at all; greedy programs are kept (cheaper than the superset's sort of the
padded rows; both measured in bench/NOTES.md §17).
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import List, Tuple

import jax
import numpy as np

from yaie_jax.executor.sampling_superset import GREEDY, SUPERSET, describe, history_width, to_superset

logger = logging.getLogger("yaie_jax.executor.runner")

MIN_PREFILL_TOKENS = 64       # smallest prefill bucket (the README's question is 37 tokens with the template)


class CpuProgramPlan:
    def __init__(self, runner):
        self.runner = runner
        self.width = history_width(runner.max_model_len)    # the superset's penalty history width
        self.num_superset_steps = 0                          # steps run in a superset program
        self._noted: set = set()
        self._lock = threading.Lock()
        self._queue: collections.deque = collections.deque()  # (kind, batch, sbatch, flags, reason, wait_idle)
        self._queued: set = set()                            # program keys ever queued
        self._worker = None

    # ------------------------------------------------------------------ start-up
    def startup_programs(self) -> List[Tuple[str, int, int, str]]:
        """(kind, T, S, variant) in compile order: a first chat request's prefill and decode, then their
        supersets in the same order (a request with other sampling options needs its prefill program first)."""
        r = self.runner
        T, S = r.token_buckets[0], r.seq_buckets_decode[0]
        prefill, decode = ("prefill", T, min(T, r.seq_buckets_decode[-1])), ("decode", S, S)
        return [prefill + ("greedy",), decode + ("greedy",), prefill + ("superset",), decode + ("superset",)]

    def start(self) -> None:
        """Queue `startup_programs` for the background compiler (started at once, not waiting for idle)."""
        for kind, T, S, variant in self.startup_programs():
            batch, sbatch, _, _ = self.runner.programs.dummy_inputs(kind, T, S)
            if variant == "superset":
                sbatch = to_superset(sbatch, GREEDY, width=self.width)
            self._enqueue(kind, batch, sbatch, GREEDY if variant == "greedy" else SUPERSET,
                          f"start-up (background): a first chat request's {variant} program", wait_idle=False)

    def _enqueue(self, kind, batch, sbatch, flags, reason: str, wait_idle: bool = True) -> None:
        key = self.runner.program_key(kind, batch, sbatch, flags)
        with self._lock:
            if key in self._queued or self.runner.is_compiled(kind, batch, sbatch, flags):
                return
            self._queued.add(key)
            self._queue.append((kind, batch, sbatch, flags, reason, wait_idle))
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="yaie-compile-cpu", daemon=True)
                self.runner.programs.later_threads.append(self._worker)
                self._worker.start()

    def _work(self) -> None:
        """Compile the queued programs one at a time (each after a pause in the steps unless queued at start-up:
        tracing holds the GIL); exits when the queue is empty."""
        programs = self.runner.programs
        while True:
            with self._lock:
                if not self._queue:
                    self._worker = None
                    return
                kind, batch, sbatch, flags, reason, wait_idle = self._queue.popleft()
            if wait_idle:
                programs.wait_for_idle()
            try:
                self.runner.compiled(kind, batch, sbatch, flags, trace_lock=programs.background_trace_lock,
                                     reason=reason)
            except Exception:      # noqa: BLE001 - a step that needs it compiles it (and raises) itself
                logger.exception("background compile of %s failed", kind)

    # ------------------------------------------------------------------ per step
    def choose(self, kind: str, batch, sbatch, flags):
        """(sampling batch, flags) a single-step batch runs with (see the module docstring); asks for the
        bucket's other program in the background where it is missing."""
        r = self.runner
        sup = to_superset(sbatch, flags, width=self.width)
        if sup is None or r.is_compiled(kind, batch, sbatch, flags):
            return sbatch, flags
        sup_ready = r.is_compiled(kind, batch, sup, SUPERSET)
        if flags == GREEDY:
            if not sup_ready:             # the greedy program compiles now (or is compiling): the superset later
                self._later(kind, batch, sup, SUPERSET, "the superset variant, so that other sampling options "
                            "do not compile while streams of this bucket run")
                return sbatch, flags
            self._later(kind, batch, sbatch, GREEDY, "greedy steps of this bucket run in the superset program "
                        "meanwhile")
        else:
            S = np.shape(sbatch.temperature)[0]
            empty_i, empty_b = np.zeros((S, 0), np.int32), np.zeros((S, 0), bool)      # greedy batches' shapes
            greedy = sbatch._replace(suppress_ids=empty_i, prev_tokens=empty_i, prev_is_output=empty_b)
            self._later(kind, batch, greedy, GREEDY, "the bucket's greedy program (cheaper greedy steps)")
        self.num_superset_steps += 1
        key = (kind, describe(flags), batch.num_rows, batch.num_tokens)
        if key not in self._noted:
            self._noted.add(key)
            logger.info("%s S=%d T=%d: a %s step runs in the superset program%s", kind, key[2], key[3], key[1],
                        "" if sup_ready else " (not compiled yet: the step waits for it)")
        return sup, SUPERSET

    def _later(self, kind, batch, sbatch, flags, why: str) -> None:
        if not self.runner.is_compiled(kind, batch, sbatch, flags):
            zeros = jax.tree_util.tree_map(np.zeros_like, (batch, sbatch))     # shapes only: the step's arrays
            self._enqueue(kind, zeros[0], zeros[1], flags, reason=f"background: {why}")
