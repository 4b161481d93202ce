"""Deterministic (batch-invariant) steps: `EngineConfig.deterministic=True`.

Contract: with the same model, dtype, block size, max_model_len, attention backend and device kind, a request's
tokens and logprobs are bit-identical whatever else is batched with it, whether its prefix came from the prefix
cache, how its prompt was chunked (any max_num_batched_tokens), and whether it was preempted (swap or recompute).
The sampler already draws each row with its own key (sampling.py); what varies with the batch is numerics, and
this module removes every source of it:

- matmul shapes: XLA (cuBLAS/Triton on GPUs, Eigen on CPUs) picks its algorithm, tiling and split-K by shape, so a
  row's result depends on the row count M. Here every step runs the model over fixed chunks of `chunk` tokens, in
  a loop whose trip count is a device value (so one program, whatever the step's size): every matmul of the model
  has M = chunk. A row's result does not depend on where it sits among the M rows of one fixed-shape matmul
  (checked on the CPU: tests/engine/test_deterministic.py; on the GPU by scripts/gpu/determinism_check.py).
- attention: decode tokens and prompt chunks go through one kernel, the ragged prefill one ("xla": the jnp
  reference, "pallas": Mosaic GPU). Its reduction for a query at position p walks keys 0..p in fixed tiles from
  key 0 (Pallas: 64-key tiles; XLA: one reduction over the whole padded context, masked keys exactly 0), so it
  depends on p and the keys only, not on the chunk start, the item layout or the decode/prefill split (fully
  masked trailing tiles leave a row's running max, sum and accumulator exactly unchanged). The decode kernel is
  not used: its flash-decoding splits are chosen from the batch size. Cascade attention is off: it merges a
  shared prefix's partial softmax into the row's, an order that depends on which other rows share it.
- the LM head and the sampler run on fixed blocks of `chunk` rows too; the sampler's log-normalizer is fenced
  by optimization barriers (sampling.sample(fence=True)), since the sampling flags depend on the other rows.
- compilation: excess precision is off (bf16 values are rounded where the program says, whatever XLA fuses), and
  on the GPU autotuning is off (GEMM algorithms chosen by shape, the same in every program and process, not by a
  timing race). `xla_gpu_deterministic_ops` is not set: nothing here is nondeterministic run to run (no float
  scatter-add; the only scatters with repeated indices are the dropped padding writes), and the flag turns every
  scatter that is not marked unique, the K/V writes included, into a serial loop.

Within a step, chunk c runs every layer before chunk c+1, so a token's keys must be in its own or an earlier
chunk: tokens are laid out in row order and a row that shares another's prompt blocks in the same step
(in-batch prefix sharing) is always scheduled after it.

Fused multi-step decode (num_decode_steps > 1) and async scheduling stay on: the fused program runs the same
chunk loop and sampler per step.
"""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from yaie_jax.executor import sampling
from yaie_jax.executor.attention import make_paged_attention
from yaie_jax.executor.buckets import round_up
from yaie_jax.step_types import StepBatch

KINDS = ("det", "det_multi")          # the runner's program kinds in this mode (single step, fused decode)
# tokens per model call and rows per LM-head/sampler call; one value per platform (a GPU wants big matmuls, a
# CPU's small ones keep single-request decode cheap). Results are invariant for one value, not across values.
CHUNK_TOKENS = {"gpu": 512}
DEFAULT_CHUNK_TOKENS = 64


def chunk_tokens(platform: str) -> int:
    return CHUNK_TOKENS.get(platform, DEFAULT_CHUNK_TOKENS)


def compiler_options(platform: str) -> Dict[str, object]:
    """XLA options for this mode's programs (see the module docstring)."""
    opts: Dict[str, object] = {"xla_allow_excess_precision": False}
    if platform == "gpu":
        opts["xla_gpu_autotune_level"] = 0
    return opts


def chunk_segments(query_start: np.ndarray, context_lens: np.ndarray, chunk: int, num_chunks: int):
    """Cut a flat ragged batch into chunks of `chunk` tokens (host numpy).

    query_start [S+1] / context_lens [S]: row i's tokens are [query_start[i], query_start[i+1]), the last of them
    at position context_lens[i] - 1; tokens are packed from 0. Returns (seg_starts [num_chunks, chunk+1],
    seg_ctx [num_chunks, chunk], seg_rows [num_chunks, chunk], n): chunk c holds segments k (the pieces of rows
    inside it, in order) with tokens [seg_starts[c, k], seg_starts[c, k+1]) relative to the chunk start, the
    last at position seg_ctx[c, k] - 1, of row seg_rows[c, k]; unused segments are empty (context 0, row 0).
    n: the chunks holding tokens."""
    qs = np.asarray(query_start, np.int64)
    lo, hi = qs[:-1], qs[1:]
    rows = np.nonzero(hi > lo)[0]
    total = int(qs[-1])
    n = -(-total // chunk)
    if n > num_chunks:
        raise ValueError(f"{total} tokens do not fit {num_chunks} chunks of {chunk}")
    lo, hi = lo[rows], hi[rows]
    c0, c1 = lo // chunk, (hi - 1) // chunk
    pieces = (c1 - c0 + 1).astype(np.int64)                                    # [rows with tokens]
    row = np.repeat(rows, pieces)
    k = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    c = np.repeat(c0, pieces) + k                                              # [pieces] chunk of each piece
    p_lo = np.maximum(np.repeat(lo, pieces), c * chunk)
    p_hi = np.minimum(np.repeat(hi, pieces), (c + 1) * chunk)
    p_ctx = np.asarray(context_lens, np.int64)[row] - (np.repeat(hi, pieces) - p_hi)
    rank = np.arange(len(c)) - np.searchsorted(c, c, side="left")             # segment index inside its chunk
    in_chunk = np.clip(total - np.arange(num_chunks) * chunk, 0, chunk)        # [num_chunks] tokens per chunk
    seg_starts = np.repeat(in_chunk[:, None], chunk + 1, axis=1).astype(np.int32)   # [num_chunks, chunk+1]
    seg_ctx = np.zeros((num_chunks, chunk), np.int32)                          # [num_chunks, chunk]
    seg_rows = np.zeros((num_chunks, chunk), np.int32)                         # [num_chunks, chunk]
    seg_starts[c, rank] = p_lo - c * chunk
    seg_ctx[c, rank] = p_ctx
    seg_rows[c, rank] = row
    return seg_starts, seg_ctx, seg_rows, n


class DeterministicSteps:
    """The step programs of deterministic mode for one ModelRunner: shapes, host inputs, device functions."""

    def __init__(self, runner):
        self.runner = runner
        self.platform = jax.default_backend()
        self.chunk = chunk_tokens(self.platform)
        C = self.chunk
        cfg = runner.config
        self.num_tokens = round_up(cfg.max_num_batched_tokens, C)     # T of every single step
        self.num_rows = round_up(cfg.max_num_seqs, C)                 # S of every step (and fused decode's T)
        self.compiler_options = compiler_options(self.platform)

    # ------------------------------------------------------------------ host side
    def padded_shape(self, out) -> tuple:
        """(S, T) of a step (not written onto `out`): the same for every single step; fused decode calls carry
        one token per row."""
        return (self.num_rows, self.num_rows if out.num_steps > 1 else self.num_tokens)

    def step_inputs(self, batch: StepBatch, num_rows: int) -> StepBatch:
        """The single-step program's inputs from the runner's padded ragged batch (`prepare_inputs`): its chunk
        segments replace query_start and context_lens (no prompt logprobs, no cascade plan in this mode)."""
        seg_starts, seg_ctx, seg_rows, n = chunk_segments(batch.query_start, batch.context_lens, self.chunk,
                                                          self.num_tokens // self.chunk)
        return StepBatch(input_ids=batch.input_ids, positions=batch.positions, block_tables=batch.block_tables,
                         slot_mapping=batch.slot_mapping, logits_index=batch.logits_index, seg_starts=seg_starts,
                         seg_ctx=seg_ctx, seg_rows=seg_rows, num_chunks=np.int32(n),
                         num_row_chunks=np.int32(-(-num_rows // self.chunk)))

    def fused_inputs(self, mbatch: StepBatch, num_rows: int) -> StepBatch:
        """The fused decode program's inputs: the runner's fused batch plus the number of row chunks in use."""
        return mbatch.replace(num_chunks=np.int32(-(-num_rows // self.chunk)))

    # ------------------------------------------------------------------ device side
    def _forward(self, params, kv, input_ids, positions, slot_mapping, seg_starts, seg_ctx, seg_rows, block_tables,
                 num_chunks):
        """The model over tokens [0, num_chunks * chunk) of the flat batch, one chunk per loop iteration (every
        layer of chunk c before chunk c+1). Returns (kv, final-norm hidden [T, D])."""
        r = self.runner
        C = self.chunk
        T = input_ids.shape[0]

        def chunk_hidden(c, kv):
            off = c * C
            attention = make_paged_attention(
                r.attention_backend, decode=False, slot_mapping=lax.dynamic_slice_in_dim(slot_mapping, off, C),
                query_start=seg_starts[c], context_lens=seg_ctx[c], block_tables=block_tables[seg_rows[c]],
                mesh=r.mesh)
            return r.model.apply_hidden(params, lax.dynamic_slice_in_dim(input_ids, off, C),
                                        lax.dynamic_slice_in_dim(positions, off, C), attention, kv)

        proto = jax.eval_shape(lambda: r.model.apply_hidden(params, input_ids[:C], positions[:C],
                                                            lambda i, q, k, v, cache: (q, cache), None)[0])

        def body(c, carry):
            kv, hidden = carry
            h, kv = chunk_hidden(c, kv)
            return kv, lax.dynamic_update_slice_in_dim(hidden, h.astype(hidden.dtype), c * C, axis=0)

        hidden = jnp.zeros((T,) + proto.shape[1:], proto.dtype)                  # [T, D]
        return lax.fori_loop(0, num_chunks, body, (kv, hidden))

    def _sample(self, params, hidden, logits_index, sbatch, flags, num_row_chunks) -> sampling.SampleResult:
        """LM head and sampler on blocks of `chunk` rows: row i samples from hidden[logits_index[i]]."""
        r = self.runner
        C = self.chunk
        S = logits_index.shape[0]
        block = lambda a, off: lax.dynamic_slice_in_dim(a, off, C, axis=0)        # noqa: E731
        first = jax.tree_util.tree_map(lambda a: a[:C], sbatch)
        proto = jax.eval_shape(lambda: sampling.sample(jnp.zeros((C, r.mc.vocab_size), jnp.float32), first,
                                                       flags=flags))
        res = jax.tree_util.tree_map(lambda x: jnp.zeros((S,) + x.shape[1:], x.dtype), proto)

        def body(i, res):
            off = i * C
            logits = r.model.apply_logits(params, hidden[block(logits_index, off)])      # [C, V] float32
            out = sampling.sample(logits, jax.tree_util.tree_map(lambda a: block(a, off), sbatch), flags=flags,
                                  fence=True)
            return jax.tree_util.tree_map(lambda a, o: lax.dynamic_update_slice_in_dim(a, o, off, axis=0), res, out)

        return lax.fori_loop(0, num_row_chunks, body, res)

    def step_impl(self, params, kv_caches, batch: StepBatch, sbatch, *, flags):
        """One step (any mix of prompt chunks and decode tokens): see `step_inputs` for `batch`."""
        kv, hidden = self._forward(params, kv_caches, batch.input_ids, batch.positions, batch.slot_mapping,
                                   batch.seg_starts, batch.seg_ctx, batch.seg_rows, batch.block_tables,
                                   batch.num_chunks)
        result = self._sample(params, hidden, batch.logits_index, sbatch, flags, batch.num_row_chunks)
        return result, kv

    def multi_step_impl(self, params, kv_caches, batch: StepBatch, sbatch, *, flags, num_steps: int):
        """`num_steps` decode steps in one call, each as `step_impl` would run it (the same chunk loop and
        sampler): batch as the runner's fused batch (one token per row, slots [num_steps, S], prev_last [S],
        prev_rows [S]) plus num_chunks. Returns ((SampleResult stacked [num_steps, ...], last tokens [S]), kv)."""
        C = self.chunk
        S = batch.input_ids.shape[0]
        live = batch.context_lens > 0                                            # [S] rows in use (a prefix)
        prev_rows = batch.prev_rows
        first_tokens = jnp.where(prev_rows >= 0, batch.prev_last[jnp.maximum(prev_rows, 0)], batch.input_ids)
        lens = live.astype(jnp.int32).reshape(S // C, C)
        seg_starts = jnp.concatenate([jnp.zeros((S // C, 1), jnp.int32), jnp.cumsum(lens, axis=1)], axis=1)
        seg_rows = jnp.arange(S, dtype=jnp.int32).reshape(S // C, C)             # row k of a chunk: its token k
        rows = jnp.arange(S, dtype=jnp.int32)
        n = batch.num_chunks

        def body(j, carry):
            kv, tokens, acc = carry
            seg_ctx = jnp.where(live, batch.context_lens + j, 0).reshape(S // C, C)
            kv, hidden = self._forward(params, kv, tokens, batch.positions + j, batch.slots[j], seg_starts,
                                       seg_ctx, seg_rows, batch.block_tables, n)
            res = self._sample(params, hidden, rows, jax.tree_util.tree_map(lambda a: a[j], sbatch), flags, n)
            acc = jax.tree_util.tree_map(lambda a, x: a.at[j].set(x), acc, res)
            return kv, res.token_ids, acc

        first = jax.tree_util.tree_map(lambda a: a[0], sbatch)
        proto = jax.eval_shape(lambda: sampling.sample(jnp.zeros((S, self.runner.mc.vocab_size), jnp.float32),
                                                       first, flags=flags))
        acc = jax.tree_util.tree_map(lambda x: jnp.zeros((num_steps,) + x.shape, x.dtype), proto)
        kv, last, acc = lax.fori_loop(0, num_steps, body, (kv_caches, first_tokens, acc))
        return (acc, last), kv

