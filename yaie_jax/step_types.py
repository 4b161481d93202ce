"""What crosses from the scheduler to the runner, and from the runner to its step programs: one-way, no JAX here.

The scheduler builds a `SchedulerOutput` and does not change it once `schedule()` returns; the runner reads it
and writes nothing back. Row order is the batch's row order: `scheduled[i]` is row i of the step.

The runner turns it into a `StepBatch` (host numpy), the inputs of one compiled step program; the executor
registers `StepBatch` as a JAX pytree (yaie_jax/executor/programs.py), so that this module imports no JAX.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

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

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def is_decode_only(self) -> bool:
        return all(s.num_new_tokens == 1 for s in self.scheduled)


class PrevTokens(NamedTuple):
    """A fused decode call's sampled tokens still on the device, as the next fused call's inputs (pipelining)."""
    last_tokens: Any                 # [S_max] int32 device array: that call's last step's tokens, padded
    rows: Dict[int, int]             # seq_id -> its row in that call ({}: no input token is taken from it)
    pending_steps: int = 0           # tokens per row that call sampled which `Sequence.token_ids` lacks yet


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """The inputs of one step program (host numpy from the runner; device arrays inside the program).

    S: padded rows, T: padded tokens, K: fused steps, S_max: rows of the largest fused bucket, C: deterministic
    mode's chunk. Which program kind carries which fields (the others are None; a None field is part of the
    pytree's structure, so each kind and variant keeps its own program key, as its own compiled program):
      "decode" / "prefill"   input_ids .. logits_index (+ cascade: decode; prompt_index/prompt_target)
      "multi"                input_ids, positions, block_tables, context_lens, slots, prev_rows, prev_last
                             (+ cascade)
      "det"                  input_ids, positions, block_tables, slot_mapping, logits_index, seg_*, num_*chunks
      "det_multi"            as "multi", plus num_chunks
    Padding rows have context length 0 (attention outputs zeros); padding tokens have slot -1 (written nowhere).
    """
    input_ids: Any                   # [T] int32 (fused: [S], the first step's tokens)
    positions: Any                   # [T] int32 (fused: [S], the first step's positions)
    block_tables: Any                # [S, max_blocks_per_seq] int32 KV block ids of each row
    context_lens: Any = None         # [S] int32 context tokens of the row after this step's; 0 = padding row
    slot_mapping: Any = None         # [T] int32 KV slot of each token, -1 = write nowhere
    query_start: Any = None          # [S+1] int32 row i's tokens are [query_start[i], query_start[i+1])
    logits_index: Any = None         # [S] int32 row i samples from hidden[logits_index[i]]
    prompt_index: Any = None         # [P] int32 tokens whose next prompt token gets a logprob (prompt_logprobs.py)
    prompt_target: Any = None        # [P] int32 those next prompt tokens
    cascade: Optional[Dict[str, Any]] = None   # the decode batch's cascade plan (cascade.py), arrays
    slots: Any = None                # [K, S] int32 KV slot of each fused step's token, -1 = write nowhere
    prev_rows: Any = None            # [S] int32 row's place in prev_last, -1: its input token is input_ids'
    prev_last: Any = None            # [S_max] int32 the previous fused call's last tokens (device if pipelined)
    seg_starts: Any = None           # [T/C, C+1] int32 deterministic chunk segments (deterministic.chunk_segments)
    seg_ctx: Any = None              # [T/C, C] int32 context length at each segment's last token
    seg_rows: Any = None             # [T/C, C] int32 row of each segment
    num_chunks: Any = None           # int32 scalar: token chunks in use ("det"), row chunks ("det_multi")
    num_row_chunks: Any = None       # int32 scalar: row chunks of the LM head and sampler ("det")

    @property
    def num_rows(self) -> int:
        """S, the padded row count."""
        return len(self.block_tables)

    @property
    def num_tokens(self) -> int:
        """T, the padded token count (fused: S)."""
        return len(self.input_ids)

    def replace(self, **fields) -> "StepBatch":
        return dataclasses.replace(self, **fields)


STEP_BATCH_FIELDS = tuple(f.name for f in dataclasses.fields(StepBatch))
