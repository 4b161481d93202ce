"""Paged attention kernels (Pallas / Mosaic GPU) with plain-jnp references of the same signatures.

Public API (the references in `pallas_kernels.reference` have the same signatures):
- `paged_attention(q, k_pages, v_pages, block_tables, context_lens, *, scale=None, interpret=None)`: decode.
- `ragged_prefill_attention(q, k_pages, v_pages, query_start, context_lens, block_tables, *, scale=None,
  interpret=None)`: query chunks of many sequences back to back, causal, over their cached prefix too.
- `write_kv(k_pages, v_pages, k, v, slot_mapping)`: put new K/V at their slots (in place under donation).

`interpret=None` picks by platform: Mosaic GPU on a GPU, GPU interpret mode elsewhere (slow: for tests).
On the GPU the kernels need 16-bit K/V (bf16/f16), head_dim a multiple of 64 (bf16: 64, 128, ...), block_size
dividing 64 and at most 64 query heads per KV head; other cases (fp32 pools) run the XLA reference there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import reference
from .reference import write_kv

__all__ = ["paged_attention", "ragged_prefill_attention", "write_kv", "reference", "GPU_KERNELS_VALIDATED"]

# True: tests/gpu/test_kernels_gpu.py passed on the GPU (H100, jax 0.11.2, 2026-11-27) with this kernel code;
# the engine's "auto" backend then picks these kernels there. Set False to force the XLA path.
GPU_KERNELS_VALIDATED = True

_NUM_SMS_GUESS = 132     # H100/H200; only steers how many decode splits to make


def _on_gpu():
    return jax.default_backend() == "gpu"


def _resolve_interpret(interpret):
    """None -> by platform; True/False; or an InterpretGPUParams instance (e.g. detect_races=True)."""
    if interpret is None:
        return not _on_gpu()
    return interpret


def _kernel_supported(k_pages, num_q_heads):
    Hkv, _, BS, D = k_pages.shape
    G = num_q_heads // Hkv
    return (k_pages.dtype in (jnp.bfloat16, jnp.float16) and 64 % BS == 0 and BS % 8 == 0 and D % 64 == 0
            and G <= 64)


def _round_up(x, m):
    return -(-x // m) * m


def _decode_plan(num_seqs, num_kv_heads, max_blocks, block_size, num_splits=None):
    """(num_splits, pages_per_split): enough programs to fill the GPU, each at least one 64-key tile."""
    from .mosaic import TILE_K
    P = TILE_K // block_size
    max_tiles = max(1, -(-max_blocks // P))
    if num_splits is None:
        want = -(-2 * _NUM_SMS_GUESS // max(1, num_seqs * num_kv_heads))
        num_splits = max(1, min(want, max_tiles // 4 if max_tiles >= 8 else 1, 32))
    num_splits = max(1, min(num_splits, max_tiles))
    tiles_per_split = -(-max_tiles // num_splits)
    num_splits = -(-max_tiles // tiles_per_split)
    return num_splits, tiles_per_split * P


def _paged_attention(q, k_pages, v_pages, block_tables, context_lens, *, scale=None, interpret=None,
                     num_splits=None, stages=None):
    """Decode attention over paged K/V. q [S, Hq, D] -> [S, Hq, D] in q.dtype (zeros where context_lens == 0).

    `num_splits` (flash-decoding splits of each sequence's pages) and `stages` (K/V buffers in flight) are
    tuning knobs; by default chosen from the shapes."""
    from . import mosaic
    interpret = _resolve_interpret(interpret)
    S, Hq, D = q.shape
    Hkv, NB, BS, _ = k_pages.shape
    if not interpret and not _kernel_supported(k_pages, Hq):
        return reference.paged_attention(q, k_pages, v_pages, block_tables, context_lens, scale=scale)
    G = Hq // Hkv
    Gp = _round_up(G, 8)
    sm_scale = (1.0 / D ** 0.5) if scale is None else float(scale)
    MB = block_tables.shape[1]
    splits, pages_per_split = _decode_plan(S, Hkv, MB, BS, num_splits)
    if stages is None:
        # D=128: 2 stages (q 16 KB + ring 64 KB -> 2 programs per SM); 3 stages (112 KB) was 13-37% slower at
        # batch >= 64 on the H200 (bench/notes_kernels.md, run 3). D=64: 4 stages (72 KB).
        stages = 4 if D <= 64 else 2
    qg = q.reshape(S, Hkv, G, D).astype(k_pages.dtype)
    if Gp != G:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    bt = jnp.clip(block_tables.astype(jnp.int32), 0, NB - 1)
    bt = jnp.pad(bt, ((0, 0), (0, splits * pages_per_split - MB)))
    cl = context_lens.astype(jnp.int32)
    acc, m, l = mosaic.decode_partials(qg, k_pages, v_pages, bt, cl, sm_scale=sm_scale, num_splits=splits,
                                       pages_per_split=pages_per_split, stages=stages, interpret=interpret)
    out = mosaic.combine_splits(acc[..., :G, :], m[..., :G], l[..., :G])          # [S, Hkv, G, D]
    out = jnp.where((cl > 0)[:, None, None, None], out, 0.0)
    return out.reshape(S, Hq, D).astype(q.dtype)


def _ragged_prefill_attention(q, k_pages, v_pages, query_start, context_lens, block_tables, *, scale=None,
                              interpret=None, stages=None):
    """Causal attention for the query tokens of many sequences laid back to back (see the module docstring).

    q [T, Hq, D]; query_start [S+1]; sequence i's queries are the last query_start[i+1]-query_start[i]
    positions of its context_lens[i] tokens. Tokens past query_start[-1] output zeros."""
    from . import mosaic
    interpret = _resolve_interpret(interpret)
    T, Hq, D = q.shape
    Hkv, NB, BS, _ = k_pages.shape
    if not interpret and not _kernel_supported(k_pages, Hq):
        return reference.ragged_prefill_attention(q, k_pages, v_pages, query_start, context_lens, block_tables,
                                                  scale=scale)
    G = Hq // Hkv
    R = mosaic.TILE_M
    sm_scale = (1.0 / D ** 0.5) if scale is None else float(scale)
    if stages is None:
        stages = 3 if D <= 64 else 2
    query_start = query_start.astype(jnp.int32)
    context_lens = context_lens.astype(jnp.int32)
    W, seq, row0, nrows, pos0 = mosaic.prefill_items(query_start, context_lens, T, R)
    rows = row0[:, None] + jnp.arange(R, dtype=jnp.int32)[None, :]                # [W, R]
    q_items = q.astype(k_pages.dtype)[jnp.clip(rows, 0, T - 1)]                   # [W, R, Hq, D]
    q_items = jnp.swapaxes(q_items, 1, 2)                                         # [W, Hq, R, D]
    P = mosaic.TILE_K // BS
    MB = block_tables.shape[1]
    bt = jnp.clip(block_tables.astype(jnp.int32), 0, NB - 1)
    bt = jnp.pad(bt, ((0, 0), (0, _round_up(MB, P) - MB)))
    o_items = mosaic.prefill_items_attention(q_items, k_pages, v_pages, bt, seq, nrows, pos0, sm_scale=sm_scale,
                                             group=G, stages=stages, interpret=interpret)
    dst = jnp.where(jnp.arange(R)[None, :] < nrows[:, None], rows, T)            # padding rows -> dropped
    out = jnp.zeros((T, Hq, D), q.dtype)
    out = out.at[dst.reshape(-1)].set(jnp.swapaxes(o_items, 1, 2).reshape(W * R, Hq, D).astype(q.dtype),
                                      mode="drop")
    return out


# Each kernel call is traced and lowered once per shape and reused, not once per call site: a model calls the
# kernel from every layer, and lowering a Mosaic GPU kernel costs ~0.4 s of Python (holding the GIL), so a
# 12-layer step program took ~5 s to lower with inlined calls and ~0.4 s with this wrapping (CPU cross-lowering
# for "cuda", jax 0.10.2), and its module is ~12x smaller. Inside a jitted step these become one private function
# called from every layer; XLA inlines it, so the compiled program is the same.
_KERNEL_STATICS = ("scale", "interpret", "num_splits", "stages")
_paged_attention_jit = jax.jit(_paged_attention, static_argnames=_KERNEL_STATICS)
_ragged_prefill_attention_jit = jax.jit(_ragged_prefill_attention, static_argnames=_KERNEL_STATICS[:2] + ("stages",))


def paged_attention(q, k_pages, v_pages, block_tables, context_lens, *, scale=None, interpret=None,
                    num_splits=None, stages=None):
    """Decode attention over paged K/V. q [S, Hq, D] -> [S, Hq, D] in q.dtype (zeros where context_lens == 0).

    `num_splits` (flash-decoding splits of each sequence's pages) and `stages` (K/V buffers in flight) are
    tuning knobs; by default chosen from the shapes."""
    interpret = _resolve_interpret(interpret)
    fn = _paged_attention_jit if isinstance(interpret, bool) else _paged_attention
    return fn(q, k_pages, v_pages, block_tables, context_lens, scale=scale, interpret=interpret,
              num_splits=num_splits, stages=stages)


def ragged_prefill_attention(q, k_pages, v_pages, query_start, context_lens, block_tables, *, scale=None,
                             interpret=None, stages=None):
    """Causal attention for the query tokens of many sequences laid back to back (see the module docstring).

    q [T, Hq, D]; query_start [S+1]; sequence i's queries are the last query_start[i+1]-query_start[i]
    positions of its context_lens[i] tokens. Tokens past query_start[-1] output zeros."""
    interpret = _resolve_interpret(interpret)
    fn = _ragged_prefill_attention_jit if isinstance(interpret, bool) else _ragged_prefill_attention
    return fn(q, k_pages, v_pages, query_start, context_lens, block_tables, scale=scale, interpret=interpret,
              stages=stages)
