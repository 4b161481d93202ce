"""Continuous batching: which sequences run this step, with how many tokens, and who gets preempted.

Plain Python (no JAX). Each `schedule()` call returns a `SchedulerOutput` describing one flattened ragged step:
running sequences first (decode tokens and unfinished prefill chunks), then swapped-out sequences coming back,
then new admissions, all within `max_num_batched_tokens` tokens and `max_num_seqs` sequences. KV slots come
from the `BlockManager`, which the scheduler builds and owns: nothing else in the engine changes it, and only
the scheduler inserts into the prefix cache (the engine reports a computed prompt through `cache_computed`). When
the pool runs out, the least important running sequence (by policy) is preempted: swapped to the host pool when it
has room and `preemption_mode == "swap"`, otherwise dropped and recomputed later (its computed blocks go to the
prefix cache first, so the recompute is mostly hits). The policy (scheduling_policy.py) orders both admission
and preemption.
"""
from __future__ import annotations

import collections
import time
from typing import Dict, List, Optional

from .cache import BlockManager
from .config import EngineConfig
from .scheduling_policy import SchedulingPolicy
from .sequence import Request, Sequence, SeqStatus
from .step_types import ScheduledSeq, SchedulerOutput


class _Step:
    """The step `Scheduler.schedule` is building: its output, the token budget left, its start time, the
    sequences it must neither schedule nor preempt, and whether it preempted any."""

    __slots__ = ("out", "budget", "now", "pinned", "preempted")

    def __init__(self, out: SchedulerOutput, budget: int, now: float, pinned: frozenset):
        self.out, self.budget, self.now, self.pinned = out, budget, now, pinned
        self.preempted = False


class Scheduler:
    """Continuous batching for one engine. `num_gpu_blocks`: the device KV pool's blocks (None: the config's
    `num_gpu_blocks`); the block manager is built from it and the config's `block_size`, `num_cpu_blocks` and
    `enable_prefix_caching`."""

    def __init__(self, config: EngineConfig, max_model_len: int, num_gpu_blocks: Optional[int] = None):
        num_gpu_blocks = config.num_gpu_blocks if num_gpu_blocks is None else num_gpu_blocks
        if num_gpu_blocks is None:
            raise ValueError("Scheduler needs num_gpu_blocks (the config's is None)")
        self.config = config
        self.block_manager = BlockManager(num_gpu_blocks, config.block_size, config.num_cpu_blocks,
                                          config.enable_prefix_caching)
        self.max_model_len = max_model_len
        self.requests: Dict[str, Request] = {}
        self._with_timeout: Dict[str, Request] = {}    # the requests with a timeout_s or queue_timeout_s
        self.waiting: List[Sequence] = []
        self.running: List[Sequence] = []
        self.swapped: List[Sequence] = []
        self.num_preemptions = 0
        self.policy = SchedulingPolicy(config.scheduling_policy)
        # Adaptive decode batch (target_itl_ms): a cap on running sequences, adjusted from measured step times.
        self.decode_cap = config.max_num_seqs
        self._step_time_ema_ms: Optional[float] = None

    # ------------------------------------------------------------------ requests
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        if request.timeout_s is not None or request.queue_timeout_s is not None:
            self._with_timeout[request.request_id] = request
        self.policy.arrived(request.request_id)
        self.waiting.extend(request.seqs)

    def abort_request(self, request_id: str) -> Optional[Request]:
        """Finish every sequence of the request with "abort" and free its memory. Unknown ids are ignored."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._finish_request(req, "abort")
        return req

    def finish_seq(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        """Mark a sequence finished and release its KV (its computed full blocks go to the prefix cache)."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is SeqStatus.SWAPPED:
            self.swapped.remove(seq)
            self.block_manager.free_sequence(seq.seq_id)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        req = seq.request
        if req.finished and req.finished_time is None:
            req.finished_time = time.monotonic()

    def _finish_request(self, req: Request, reason: str) -> None:
        req.forked = True  # no children will be made any more
        for seq in req.seqs:
            self.finish_seq(seq, reason)

    def pop_finished(self, req: Request) -> None:
        """Forget a finished request (its outputs are made). It also forgets its sequences: a request and its
        sequences reference each other, a cycle that only the garbage collector frees otherwise, so finished
        requests and their token lists piled up between young collections and made collections long (bench/NOTES.md,
        "Figures moved out of the code"). Without the cycle they are freed as the last reference goes (a sequence
        still in a call in flight keeps its own fields)."""
        self.requests.pop(req.request_id, None)
        self._with_timeout.pop(req.request_id, None)
        self.policy.forget(req.request_id)
        req.seqs = []

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def cache_computed(self, seq: Sequence) -> None:
        """Put the full blocks of `seq`'s computed tokens into the prefix cache (nothing with prefix caching off).
        The engine calls it when a prompt is computed (its first output token is appended), so that requests
        admitted from then on share it; the scheduler, when it releases a sequence's memory."""
        if self.config.enable_prefix_caching and seq.num_computed_tokens > 0:
            self.block_manager.cache_sequence(seq.seq_id, seq.token_ids[:seq.num_computed_tokens])

    def _release(self, seq: Sequence) -> None:
        """Free `seq`'s device blocks, its computed full ones cached first."""
        self.cache_computed(seq)
        self.block_manager.free_sequence(seq.seq_id)

    # ------------------------------------------------------------------ adaptive decode batch
    def record_step_time(self, step_ms: float, num_decode_seqs: int) -> None:
        """Adaptive decode batch: shrink the running cap when steps exceed target_itl_ms, grow it back slowly."""
        target = self.config.target_itl_ms
        if target is None or num_decode_seqs == 0:
            return
        ema = step_ms if self._step_time_ema_ms is None else 0.7 * self._step_time_ema_ms + 0.3 * step_ms
        self._step_time_ema_ms = ema
        if ema > target:
            self.decode_cap = max(1, min(self.decode_cap, num_decode_seqs) * 3 // 4)
        elif ema < 0.8 * target:
            self.decode_cap = min(self.config.max_num_seqs, self.decode_cap + 1)

    # ------------------------------------------------------------------ timeouts
    def _expire(self, now: float) -> List[Request]:
        expired = []
        if not self._with_timeout:
            return expired
        for req in list(self._with_timeout.values()):
            if req.finished:
                continue
            started = req.first_scheduled_time is not None
            over_total = req.timeout_s is not None and now - req.arrival_time > req.timeout_s
            over_queue = (not started and req.queue_timeout_s is not None
                          and now - req.arrival_time > req.queue_timeout_s)
            if over_total or over_queue:
                self._finish_request(req, "timeout")
                expired.append(req)
        return expired

    # ------------------------------------------------------------------ preemption
    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.num_preemptions += 1
        if (self.config.preemption_mode == "swap" and self.block_manager.num_cpu_blocks > 0
                and self.block_manager.can_swap_out(seq.seq_id)):
            out.swap_out.extend(self.block_manager.swap_out(seq.seq_id))
            seq.status = SeqStatus.SWAPPED
            self.swapped.append(seq)
        else:
            self._release(seq)
            seq.num_computed_tokens = 0
            seq.status = SeqStatus.WAITING
            self.waiting.append(seq)

    # ------------------------------------------------------------------ the step
    def schedule(self, pinned: frozenset = frozenset()) -> SchedulerOutput:
        """The next step. pinned: ids of sequences whose sampled token is still on the device (a step in flight,
        see `LLMEngine._step_pipelined`); they have no uncomputed token, so they are not scheduled, and they
        are never chosen to be preempted (a swapped-out sequence would lose that token and never run again).

        Phases, in order: expire timeouts; a fused multi-step decode call if nothing else could use the step
        (`_try_multi_step`); else running sequences (`_schedule_running`), then swapped ones back
        (`_swap_in`, when nothing was preempted), then waiting ones (`_admit_waiting`, when nothing was preempted
        and nobody is swapped out)."""
        now = time.monotonic()
        out = SchedulerOutput(scheduled=[], block_copies=[], swap_out=[], swap_in=[], timed_out=self._expire(now))
        multi = self._try_multi_step(out, now)
        if multi is not None:
            return multi
        step = _Step(out, self.config.max_num_batched_tokens, now, pinned)
        self._schedule_running(step)
        if not step.preempted:
            self._swap_in(step)
        if not step.preempted and not self.swapped:
            self._admit_waiting(step)
        out.num_batched_tokens = self.config.max_num_batched_tokens - step.budget
        return out

    def _schedule_seq(self, step: _Step, seq: Sequence, n: int) -> None:
        """Give `seq` `n` new tokens' slots in the step (room checked by the caller) and charge the budget."""
        out = step.out
        slots, copies = self.block_manager.append_slots(seq.seq_id, n)
        out.block_copies.extend(copies)
        if self.config.enable_prefix_caching and seq.num_output_tokens == 0:
            # the prompt's full blocks this step computes go into the prefix cache now, so that sequences
            # admitted after this one (this step included) reuse them: inside a step every layer writes all
            # new K/V before attention reads any, and later steps run after this one. The prompt's last token
            # is left out, as matching leaves it to compute (no duplicate of a block this step writes).
            upto = min(seq.num_computed_tokens + n, seq.num_prompt_tokens - 1)
            self.block_manager.cache_sequence(seq.seq_id, seq.token_ids[:upto], switch=False)
        sample = seq.num_computed_tokens + n == len(seq.token_ids)
        out.scheduled.append(ScheduledSeq(seq, n, slots, sample, self.block_manager.get_block_table(seq.seq_id)))
        step.budget -= n
        self.policy.served(seq.request.client_id, n)
        if seq.request.first_scheduled_time is None:
            seq.request.first_scheduled_time = step.now
        if sample and not seq.request.forked:
            self._fork_children(seq, len(out.scheduled) - 1, out)

    def _schedule_running(self, step: _Step) -> None:
        """Running sequences, most important first; when memory is short, preempt from the least important end
        (never a pinned one; the sequence itself when no other is left)."""
        chunked = self.config.enable_chunked_prefill
        queue = collections.deque(sorted(self.running, key=self.policy.key))
        while queue:
            seq = queue.popleft()
            n = seq.num_uncomputed_tokens
            if n > step.budget:
                if not chunked or step.budget == 0:
                    continue
                n = step.budget
            if n == 0:
                continue
            while not self.block_manager.can_append_slots(seq.seq_id, n):
                step.preempted = True
                victim = next((q for q in reversed(queue) if q.seq_id not in step.pinned), None)
                if victim is not None:
                    queue.remove(victim)
                    self._preempt(victim, step.out)
                else:
                    self._preempt(seq, step.out)
                    break
            else:
                self._schedule_seq(step, seq, n)

    def _swap_in(self, step: _Step) -> None:
        """Swapped-out sequences come back, most important first, while budget, max_num_seqs and the pool allow."""
        bm = self.block_manager
        for seq in sorted(self.swapped, key=self.policy.key):
            if step.budget < 1 or len(self.running) >= self.config.max_num_seqs:
                break
            if not bm.can_swap_in(seq.seq_id):
                break
            step.out.swap_in.extend(bm.swap_in(seq.seq_id))
            self.swapped.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, step.budget)
            if n > 0 and bm.can_append_slots(seq.seq_id, n):
                self._schedule_seq(step, seq, n)

    def _admit_waiting(self, step: _Step) -> None:
        """New admissions (and recompute-preempted sequences), most important first, until one does not fit.

        In-batch prefix sharing: prompt blocks enter the prefix cache when scheduled (`_schedule_seq`), so a
        burst of requests sharing a system prompt reuses the first one's blocks from the same step on. Only a
        prompt whose first block is being computed and not cached yet (a first chunk shorter than a block) makes
        others with the same first block wait, rather than compute it again."""
        cap = min(self.config.max_num_seqs, self.decode_cap)
        bs = self.block_manager.block_size
        computing = {self._first_block(s) for s in self.running
                     if s.num_computed_tokens < min(bs, s.num_prompt_tokens)} \
            if self.config.enable_prefix_caching else None
        for seq in sorted(self.waiting, key=self.policy.key):
            need_seqs = 1 if seq.request.forked else seq.request.params.n
            if step.budget <= 0 or len(self.running) + need_seqs > cap:
                break
            first = self._first_block(seq) if computing is not None else None
            if first is not None and first in computing:
                continue
            if not self.config.enable_chunked_prefill and seq.num_uncomputed_tokens > step.budget:
                break                               # (counted before prefix matching)
            computed = self._admit(step, seq)
            if computed is None:
                break
            if first is not None and computed < bs:
                computing.add(first)

    def _admit(self, step: _Step, seq: Sequence) -> Optional[int]:
        """Match `seq`'s prompt in the prefix cache and schedule what is left of it (or the budget's worth, with
        chunked prefill). Returns its tokens computed once the step runs (cached + scheduled), or None (nothing
        changed) when it does not fit."""
        bm = self.block_manager
        # prompt logprobs need every prompt token's logits: no prefix-cache reuse (vLLM does the same)
        cached = bm.add_sequence(seq.seq_id, seq.token_ids, match=not seq.wants_prompt_logprobs)
        seq.num_computed_tokens = cached
        if seq.index == 0 and seq.num_output_tokens == 0:
            seq.num_cached_tokens = cached
        n = seq.num_uncomputed_tokens
        if n > step.budget:
            n = step.budget if self.config.enable_chunked_prefill else 0
        if n <= 0 or not bm.can_append_slots(seq.seq_id, n):
            bm.free_sequence(seq.seq_id)
            seq.num_computed_tokens = 0
            return None
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        self._schedule_seq(step, seq, n)
        return cached + n

    def _first_block(self, seq: Sequence) -> Optional[tuple]:
        """The prompt's first full block of tokens (None if the prompt is shorter than a block)."""
        bs = self.block_manager.block_size
        return tuple(seq.token_ids[:bs]) if seq.num_prompt_tokens > bs else None

    def _try_multi_step(self, out: SchedulerOutput, now: float, pending: int = 0) -> Optional[SchedulerOutput]:
        """Several decode steps in one device call (no host round trip between them), when nothing else could use
        the step: no sequence is swapped out, no waiting sequence could be admitted (the running set is below its
        cap), every running sequence is decoding, and the pool has room for `num_decode_steps` more tokens of each.
        A sequence with fewer tokens left to generate than `num_decode_steps` still joins (its extra tokens are
        dropped by the engine). Otherwise None (the caller schedules a normal step).

        pending: tokens every running sequence already has in flight (a dispatched fused call whose tokens are not
        yet appended; see `schedule_continuation`). Sequences certain to finish inside that call are left out."""
        k = self.config.num_decode_steps
        cap = min(self.config.max_num_seqs, self.decode_cap)
        if (k <= 1 or self.swapped or not self.running or len(self.running) > cap
                or (self.waiting and len(self.running) < cap)):
            return None
        rows = []
        for seq in self.running:
            if pending and seq.request.max_tokens - (seq.num_output_tokens + pending) <= 0:
                continue                  # finishes in the call in flight
            if not self._fusible(seq, k, pending):
                return None
            rows.append(seq)
        if not rows:
            return None
        need = sum(self.block_manager.num_blocks_needed(seq.seq_id, k) for seq in rows)
        if need > self.block_manager.num_available_gpu_blocks:
            return None
        for seq in sorted(rows, key=self.policy.key):
            slots, copies = self.block_manager.append_slots(seq.seq_id, k)
            out.block_copies.extend(copies)
            out.scheduled.append(ScheduledSeq(seq, 1, slots, True, self.block_manager.get_block_table(seq.seq_id)))
            self.policy.served(seq.request.client_id, k)
        out.num_steps = k
        out.num_batched_tokens = len(out.scheduled) * k
        return out

    def _fusible(self, seq: Sequence, k: int, pending: int) -> bool:
        """Whether running `seq` may take `k` decode steps in one device call after `pending` tokens in flight:
        it decodes (one uncomputed token), its request's children are forked, it has tokens left to generate, k
        more fit in max_model_len, min_tokens is reached (stop tokens count from then on) and it uses no penalty
        (penalties read the previous steps' tokens on the host)."""
        p = seq.request.params
        n_tokens = len(seq.token_ids) + pending
        left = seq.request.max_tokens - (seq.num_output_tokens + pending)
        return not (n_tokens - seq.num_computed_tokens != 1 or not seq.request.forked or left < 1
                    or n_tokens + k > self.max_model_len
                    or seq.num_output_tokens + pending < p.min_tokens or p.uses_penalties)

    def schedule_continuation(self, pending: int) -> SchedulerOutput:
        """The next fused decode call, scheduled while the previous one (`pending` tokens per sequence, already
        committed) is still on the device and its tokens are not yet appended: the engine dispatches it first and
        reads the previous call's tokens afterwards, so the device never waits on the host. Each row's first input
        token is the previous call's last sampled token for that sequence (the runner takes it on the device).
        Nothing scheduled (only `timed_out`, if any) when a normal step is due (see `_try_multi_step`); the
        caller then drains the pipeline."""
        now = time.monotonic()
        out = SchedulerOutput(scheduled=[], block_copies=[], swap_out=[], swap_in=[], timed_out=self._expire(now))
        return self._try_multi_step(out, now, pending=pending) or out

    def _fork_children(self, parent: Sequence, parent_row: int, out: SchedulerOutput) -> None:
        """At the step that completes the prompt of an n > 1 request: make n-1 sequences sharing its blocks.

        Children start with the parent's (pre-step) state and sample from the parent's last-token logits.
        """
        req = parent.request
        req.forked = True
        n_after = parent.num_computed_tokens + out.scheduled[parent_row].num_new_tokens
        for k in range(1, req.params.n):
            child = Sequence(req, k, parent.token_ids)
            child.num_cached_tokens = parent.num_cached_tokens
            self.block_manager.fork(parent.seq_id, child.seq_id)
            child.num_computed_tokens = n_after
            child.status = SeqStatus.RUNNING
            req.seqs.append(child)
            self.running.append(child)
            out.scheduled.append(ScheduledSeq(child, 0, [], True, logits_row_of=parent_row))
            # (a child's block table is its parent's; the runner needs none for a row without query tokens)

    def commit_step(self, out: SchedulerOutput) -> None:
        """After the device ran the step: advance computed-token counts (fork children were set at fork time)."""
        for s in out.scheduled:
            if s.logits_row_of is None:
                s.seq.num_computed_tokens += s.num_new_tokens * out.num_steps

    def get_stats(self) -> dict:
        return {
            "num_preemptions": self.num_preemptions,
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "num_swapped": len(self.swapped),
            "decode_cap": self.decode_cap,
        }
