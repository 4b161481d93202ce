"""Paged attention kernels (Pallas / Mosaic GPU) with plain-jnp references of the same signatures.

Public API (the references in `pallas_kernels.reference` have the same signatures):
- `paged_attention(q, k_pages, v_pages, block_tables, context_lens, *, scale=None, interpret=None)`: decode.
- `cascade_paged_attention(q, k_pages, v_pages, block_tables, context_lens, cascade, ...)`: decode where groups
  of sequences share a prefix of pages, read once per group (cascade attention).
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

__all__ = ["paged_attention", "cascade_paged_attention", "ragged_prefill_attention", "write_kv", "reference", "GPU_KERNELS_VALIDATED"]

# True: tests/gpu/test_kernels_gpu.py passes on the GPU with this kernel code (bench/NOTES.md, "Figures moved out
# of the code"); the engine's "auto" backend then picks these kernels there. Set False to force the XLA path.
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


def _decode_stages(head_dim, stages):
    # Pipeline depth of the K/V ring by head dim, chosen by measurement (bench/NOTES.md, "Figures moved out of
    # the code"): D=128 2 stages (q 16 KB + ring 64 KB: 2 programs per SM), D=64 4 stages (72 KB).
    if stages is not None:
        return stages
    return 4 if head_dim <= 64 else 2


def _split_partials(q_rows, k_pages, v_pages, block_tables, context_lens, *, sm_scale, num_splits, stages,
                    interpret):
    """Flash-decoding partials of R query rows per (sequence, KV head) that share one K/V stream.

    q_rows [S, Hkv, R, D] (R <= 64); block_tables [S, MB]; context_lens [S]. Returns acc [S, Hkv, splits, R, D]
    f32 (unnormalized), m [S, Hkv, splits, R] (log2 domain, -inf for an empty split), l [S, Hkv, splits, R]."""
    from . import mosaic
    S, Hkv, R, D = q_rows.shape
    NB, BS = k_pages.shape[1:3]
    Rp = _round_up(R, 8)
    MB = block_tables.shape[1]
    splits, pages_per_split = _decode_plan(S, Hkv, MB, BS, num_splits)
    q_rows = q_rows.astype(k_pages.dtype)
    if Rp != R:
        q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, Rp - R), (0, 0)))
    bt = jnp.clip(block_tables.astype(jnp.int32), 0, NB - 1)
    bt = jnp.pad(bt, ((0, 0), (0, splits * pages_per_split - MB)))
    acc, m, l = mosaic.decode_partials(q_rows, k_pages, v_pages, bt, context_lens.astype(jnp.int32),
                                       sm_scale=sm_scale, num_splits=splits, pages_per_split=pages_per_split,
                                       stages=_decode_stages(D, stages), interpret=interpret)
    return acc[..., :R, :], m[..., :R], l[..., :R]


def _paged_attention(q, k_pages, v_pages, block_tables, context_lens, *, scale=None, interpret=None,
                     num_splits=None, stages=None):
    """Decode attention over paged K/V. q [S, Hq, D] -> [S, Hq, D] in q.dtype (zeros where context_lens == 0).

    `num_splits` (flash-decoding splits of each sequence's pages) and `stages` (K/V buffers in flight) are
    tuning knobs; by default chosen from the shapes."""
    from . import mosaic
    interpret = _resolve_interpret(interpret)
    S, Hq, D = q.shape
    Hkv = k_pages.shape[0]
    if not interpret and not _kernel_supported(k_pages, Hq):
        return reference.paged_attention(q, k_pages, v_pages, block_tables, context_lens, scale=scale)
    G = Hq // Hkv
    sm_scale = (1.0 / D ** 0.5) if scale is None else float(scale)
    cl = context_lens.astype(jnp.int32)
    acc, m, l = _split_partials(q.reshape(S, Hkv, G, D), k_pages, v_pages, block_tables, cl, sm_scale=sm_scale,
                                num_splits=num_splits, stages=stages, interpret=interpret)
    out = mosaic.combine_splits(acc, m, l)                                        # [S, Hkv, G, D]
    out = jnp.where((cl > 0)[:, None, None, None], out, 0.0)
    return out.reshape(S, Hq, D).astype(q.dtype)


CASCADE_KEYS = ("item_rows", "item_lens", "item_tables", "row_item", "row_slot")


def _cascade_paged_attention(q, k_pages, v_pages, block_tables, context_lens, cascade, *, scale=None,
                             interpret=None, num_splits=None, stages=None):
    """Decode attention where groups of sequences share their first pages (a prefix held once in the pool):
    each group's queries read the shared pages once, as the rows of one query tile, and each sequence reads
    only its own pages after them; the two partial softmaxes are merged per row (cascade attention). Same result
    as `paged_attention` over the full block tables, up to summation order.

    cascade: dict of int32 arrays (`CASCADE_KEYS`), I items of up to M member rows each:
      item_rows [I, M]   batch rows of each item's members (unused slots: any row; their results are dropped)
      item_lens [I]      tokens of the item's shared prefix, a multiple of the block size (0 = unused item)
      item_tables [I, MB] a block table whose first item_lens / block_size entries are the shared pages
      row_item [S]       the item of each batch row, -1 = none;  row_slot [S]: the row's member slot in it
    Contract: a row r of item i has block_tables[r, :item_lens[i] / BS] equal to item_tables[i, :...] and
    context_lens[r] >= item_lens[i]; M * (num_q_heads / num_kv_heads) <= 64."""
    from . import mosaic
    interpret = _resolve_interpret(interpret)
    S, Hq, D = q.shape
    Hkv, NB, BS, _ = k_pages.shape
    if not interpret and not _kernel_supported(k_pages, Hq):
        return reference.paged_attention(q, k_pages, v_pages, block_tables, context_lens, scale=scale)
    item_rows, item_lens, item_tables, row_item, row_slot = (cascade[k].astype(jnp.int32) for k in CASCADE_KEYS)
    I, M = item_rows.shape
    G = Hq // Hkv
    assert M * G <= mosaic.TILE_M, (M, G)
    sm_scale = (1.0 / D ** 0.5) if scale is None else float(scale)
    cl = context_lens.astype(jnp.int32)
    in_item = row_item >= 0                                                       # [S]
    ri = jnp.clip(row_item, 0, I - 1)
    rs = jnp.clip(row_slot, 0, M - 1)
    prefix = jnp.where(in_item, item_lens[ri], 0)                                 # [S] tokens read by the item
    # each row's own pages: its table shifted past the shared prefix
    MB = block_tables.shape[1]
    cols = jnp.clip(jnp.arange(MB, dtype=jnp.int32)[None, :] + (prefix // BS)[:, None], 0, MB - 1)
    own_tables = jnp.take_along_axis(block_tables.astype(jnp.int32), cols, axis=1)   # [S, MB]
    own_lens = jnp.where(cl > 0, jnp.maximum(cl - prefix, 0), 0)
    qg = q.reshape(S, Hkv, G, D)
    acc, m, l = _split_partials(qg, k_pages, v_pages, own_tables, own_lens, sm_scale=sm_scale,
                                num_splits=num_splits, stages=stages, interpret=interpret)
    # shared pages: item i's members x G query heads are the rows of one tile per KV head
    q_items = jnp.transpose(qg[item_rows], (0, 2, 1, 3, 4)).reshape(I, Hkv, M * G, D)   # [I, Hkv, M*G, D]
    acc_i, m_i, l_i = _split_partials(q_items, k_pages, v_pages, item_tables, item_lens, sm_scale=sm_scale,
                                      num_splits=None, stages=stages, interpret=interpret)
    acc_i, m_i, l_i = mosaic.merge_splits(acc_i, m_i, l_i)                       # [I, Hkv, M*G(, D)]
    acc_r = acc_i.reshape(I, Hkv, M, G, D)[ri, :, rs]                             # [S, Hkv, G, D]
    m_r = jnp.where(in_item[:, None, None], m_i.reshape(I, Hkv, M, G)[ri, :, rs], -jnp.inf)   # [S, Hkv, G]
    l_r = jnp.where(in_item[:, None, None], l_i.reshape(I, Hkv, M, G)[ri, :, rs], 0.0)
    out = mosaic.combine_splits(jnp.concatenate([acc, acc_r[:, :, None]], axis=2),
                                jnp.concatenate([m, m_r[:, :, None]], axis=2),
                                jnp.concatenate([l, l_r[:, :, None]], axis=2))   # [S, Hkv, G, D]
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
# kernel from every layer, and lowering a Mosaic GPU kernel is costly Python work holding the GIL (figures in
# bench/NOTES.md, "Figures moved out of the code"). Inside a jitted step these become one private function
# called from every layer; XLA inlines it, so the compiled program is the same.
_KERNEL_STATICS = ("scale", "interpret", "num_splits", "stages")
_paged_attention_jit = jax.jit(_paged_attention, static_argnames=_KERNEL_STATICS)
_cascade_paged_attention_jit = jax.jit(_cascade_paged_attention, static_argnames=_KERNEL_STATICS)
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


def cascade_paged_attention(q, k_pages, v_pages, block_tables, context_lens, cascade, *, scale=None,
                            interpret=None, num_splits=None, stages=None):
    """`paged_attention` reading prefixes shared by groups of sequences once per group (see
    `_cascade_paged_attention` for the `cascade` arrays and their contract)."""
    interpret = _resolve_interpret(interpret)
    fn = _cascade_paged_attention_jit if isinstance(interpret, bool) else _cascade_paged_attention
    return fn(q, k_pages, v_pages, block_tables, context_lens, cascade, scale=scale, interpret=interpret,
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
