"""What crosses from the scheduler to the runner each step: one-way, plain host data (no JAX).

The scheduler builds a `SchedulerOutput` and does not change it once `schedule()` returns; the runner reads it
and writes nothing back. Row order is the batch's row order: `scheduled[i]` is row i of the step.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from .sequence import Request, Sequence


@dataclasses.dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int           # query tokens this step (0 for a fork child, which only samples)
    slots: List[int]              # KV slot of each new token
    sample: bool                  # a token is sampled for this sequence after the step
    block_table: List[int] = dataclasses.field(default_factory=list)
    logits_row_of: Optional[int] = None  # fork child: index (in `scheduled`) of the parent whose last token it samples from


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: List[ScheduledSeq]
    block_copies: List[Tuple[int, int]]      # device block copies (copy-on-write), before the step
    swap_out: List[Tuple[int, int]]          # (gpu_block, cpu_block), device -> host, executed first
    swap_in: List[Tuple[int, int]]           # (cpu_block, gpu_block), host -> device, after swap_out
    timed_out: List[Request]                 # requests finished with "timeout" during scheduling
    num_batched_tokens: int = 0
    num_steps: int = 1                       # > 1: a fused multi-step decode (every row decodes num_steps tokens)
    padded_shape: Optional[Tuple[int, int]] = None   # (S, T) the runner chose for this step (set once by it)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def is_decode_only(self) -> bool:
        return all(s.num_new_tokens == 1 for s in self.scheduled)
