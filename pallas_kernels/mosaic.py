"""Paged attention kernels in Pallas for Mosaic GPU (`plgpu.kernel`), runnable in GPU interpret mode on a CPU.

Both kernels share one inner loop (`_attend_tiles`): a 64-row query tile sits in SMEM, K/V arrive page by page
through TMA copies (one copy per page, `pages_per_tile` pages per 64-key tile, `stages`-deep ring of SMEM
buffers with one barrier per buffer), scores and P@V run on the Hopper tensor cores (`wgmma`, M = 64), and the
softmax is the usual online (running max / running sum) one in fp32, in the log2 domain.

Decode: one program per (sequence, KV head, split). The GQA group's `G` query heads are rows 0..G-1 of the 64-row
tile (rows past G are never stored: wgmma rows are independent, so whatever sits there cannot leak into real
rows). Each split walks its share of the sequence's block table and writes an unnormalized accumulator with its
running max and sum; `combine_splits` (XLA, tiny) merges the splits (flash decoding).

Ragged prefill: the query tokens are cut into work items of up to 64 rows of one sequence (built in XLA by
`_prefill_items`); one program per (item, query head) walks the keys 0..last position of the item, causal mask
on the tiles that need it.

Layout conventions: K/V pages [num_kv_heads, num_blocks, block_size, head_dim] are read in place (no gather copy).
The inputs of the tensor cores must be 16-bit here (bf16/f16): fp32 wgmma would round to tf32 and needs
K-major operands, which the V tile is not. fp32 pools use the XLA path on the GPU (see __init__.py).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
TILE_M = 64        # wgmma M: query rows per program
TILE_K = 64        # keys per step (multiple of 64: the P@V contraction is swizzle-wide)


def interpret_params(interpret):
    """False (compile with Mosaic GPU) or the GPU interpreter's parameters: True -> defaults (fresh buffers
    filled with NaN, out-of-bounds reads raise); an InterpretGPUParams instance is passed through."""
    if interpret is None or interpret is False:
        return False
    if interpret is True:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        return InterpretGPUParams()
    return interpret


def _transforms(dtype, head_dim):
    """SMEM tiling/swizzle for a [rows, head_dim] tile of a 16-bit dtype (what wgmma and TMA expect)."""
    itemsize = jnp.dtype(dtype).itemsize
    for swizzle in (128, 64, 32):
        elems = swizzle // itemsize
        if head_dim % elems == 0:
            return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))
    raise ValueError(f"head_dim {head_dim} not supported for {dtype}")


def _attend_tiles(*, q_smem, k_smem, v_smem, k_bar, v_bar, fetch_k, fetch_v, n_tiles, stages, sm_scale,
                  mask_fn, dtype, head_dim, interpret):
    """Online softmax over `n_tiles` K/V tiles; returns (acc [64, D] f32, m [64] log2-domain, l [64])."""
    qk_scale = sm_scale * LOG2E

    for i in range(stages):                                   # prologue: fill the ring
        @pl.when(i < n_tiles)
        def _():
            fetch_k(i, i)
            fetch_v(i, i)

    m_i = _cast(jnp.full((TILE_M,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1), interpret)
    l_i = _cast(jnp.full((TILE_M,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1), interpret)
    acc = _cast(jnp.full((TILE_M, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA, interpret)

    def body(t, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(t, jnp.array(stages, t.dtype))
        plgpu.barrier_wait(k_bar.at[slot])

        if interpret:   # the GPU interpreter's wgmma takes no transposed operand: same product, plain dot
            qk = lax.dot_general(q_smem[...], k_smem[slot], (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        else:
            def compute_qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, _transposed(k_smem.at[slot]))
                return acc_ref[...]
            qk = pl.run_scoped(compute_qk, plgpu.ACC((TILE_M, TILE_K), jnp.float32))

        nxt = t + stages                                      # the K buffer is free again: refill it

        @pl.when(nxt < n_tiles)
        def _():
            fetch_k(nxt, slot)

        s = qk * qk_scale
        s = jnp.where(mask_fn(t), s, -jnp.inf)
        m_new = jnp.maximum(m_i, s.max(axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(v_bar.at[slot])

        if interpret:
            acc = acc + jnp.dot(p.astype(dtype), v_smem[slot], preferred_element_type=jnp.float32)
        else:
            def compute_pv(acc_ref):
                plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])
            acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))

        @pl.when(nxt < n_tiles)
        def _():
            fetch_v(nxt, slot)

        return acc, m_new, l_i

    return lax.fori_loop(0, n_tiles, body, (acc, m_i, l_i))


def _cast(x, layout, interpret):
    # The GPU interpreter has no rule for layout_cast; layouts only matter to the Mosaic GPU lowering.
    return x if interpret else plgpu.layout_cast(x, layout)


def _iota(shape, dim, interpret):
    return _cast(lax.broadcasted_iota(jnp.int32, shape, dim), plgpu.Layout.WGMMA, interpret)


def _transposed(ref):
    # jax 0.11 deprecates plgpu.transpose_ref in favour of the ref's own .transpose (absent on older refs).
    if hasattr(ref, "transpose"):
        return ref.transpose((1, 0))
    return plgpu.transpose_ref(ref, (1, 0))


def _make_fetch(src_pages, dst_smem, bar, *, kv_head, table_ref, table_row, page_base, pages_per_tile, block_size):
    def fetch(tile, slot):
        for j in range(pages_per_tile):
            blk = table_ref[table_row, page_base + tile * pages_per_tile + j]
            plgpu.copy_gmem_to_smem(src_pages.at[kv_head, blk],
                                    dst_smem.at[slot, pl.ds(j * block_size, block_size)], bar.at[slot])
    return fetch


# ----------------------------------------------------------------------------------------------------------------
# Decode


def decode_partials(q_groups, k_pages, v_pages, block_tables, context_lens, *, sm_scale, num_splits,
                    pages_per_split, stages, interpret):
    """Per-split partial results of paged decode attention.

    q_groups [S, Hkv, Gp, D] (GQA group rows, Gp a multiple of 8, <= 64); block_tables [S, num_splits *
    pages_per_split] int32 (entries in range); context_lens [S] int32. Returns acc [S, Hkv, splits, Gp, D] f32
    (unnormalized), m [S, Hkv, splits, Gp] (log2 domain, -inf for an empty split), l [S, Hkv, splits, Gp]."""
    S, Hkv, Gp, D = q_groups.shape
    _, NB, BS, _ = k_pages.shape
    dtype = k_pages.dtype
    P = TILE_K // BS
    assert TILE_K % BS == 0 and pages_per_split % P == 0 and Gp % 8 == 0 and Gp <= TILE_M
    assert block_tables.shape[1] == num_splits * pages_per_split
    tr = _transforms(dtype, D)

    def kernel(q_ref, k_ref, v_ref, bt_ref, cl_ref, acc_ref, m_ref, l_ref, q_smem, q_bar, k_bar, v_bar):
        s = lax.axis_index("s")
        h = lax.axis_index("h")
        sp = lax.axis_index("p")
        ctx = cl_ref[s]
        n_pages = (ctx + (BS - 1)) // BS
        page0 = sp * pages_per_split
        n_my_pages = jnp.clip(n_pages - page0, 0, pages_per_split)
        n_tiles = (n_my_pages + (P - 1)) // P

        plgpu.copy_gmem_to_smem(q_ref.at[s, h], q_smem.at[pl.ds(0, Gp)], q_bar)
        plgpu.barrier_wait(q_bar)
        key0 = page0 * BS

        def mask_fn(t):
            kv_ids = _iota((TILE_M, TILE_K), 1, interpret)
            return kv_ids + (key0 + t * TILE_K) < ctx

        # K/V ring and the output staging buffers live in consecutive scopes, so they share SMEM (fewer bytes
        # per program -> more programs resident per SM).
        def loop_scope(k_smem, v_smem):
            common = dict(kv_head=h, table_ref=bt_ref, table_row=s, page_base=page0, pages_per_tile=P,
                          block_size=BS)
            return _attend_tiles(q_smem=q_smem, k_smem=k_smem, v_smem=v_smem, k_bar=k_bar, v_bar=v_bar,
                                 fetch_k=_make_fetch(k_ref, k_smem, k_bar, **common),
                                 fetch_v=_make_fetch(v_ref, v_smem, v_bar, **common), n_tiles=n_tiles,
                                 stages=stages, sm_scale=sm_scale, mask_fn=mask_fn, dtype=dtype, head_dim=D,
                                 interpret=interpret)
        acc, m_i, l_i = pl.run_scoped(loop_scope, plgpu.SMEM((stages, TILE_K, D), dtype, transforms=tr),
                                      plgpu.SMEM((stages, TILE_K, D), dtype, transforms=tr))

        def out_scope(o_smem, m_smem, l_smem):
            o_smem[...] = acc
            m_smem[...] = m_i
            l_smem[...] = l_i
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, Gp)], acc_ref.at[s, h, sp])
            plgpu.copy_smem_to_gmem(m_smem.at[pl.ds(0, Gp)], m_ref.at[s, h, sp])
            plgpu.copy_smem_to_gmem(l_smem.at[pl.ds(0, Gp)], l_ref.at[s, h, sp])
            plgpu.wait_smem_to_gmem(0)
        pl.run_scoped(out_scope, plgpu.SMEM((TILE_M, D), jnp.float32), plgpu.SMEM((TILE_M,), jnp.float32),
                      plgpu.SMEM((TILE_M,), jnp.float32))

    out_type = (jax.ShapeDtypeStruct((S, Hkv, num_splits, Gp, D), jnp.float32),
                jax.ShapeDtypeStruct((S, Hkv, num_splits, Gp), jnp.float32),
                jax.ShapeDtypeStruct((S, Hkv, num_splits, Gp), jnp.float32))
    scratch = (
        plgpu.SMEM((TILE_M, D), dtype, transforms=tr),
        plgpu.Barrier(num_arrivals=1),
        plgpu.Barrier(num_arrivals=P, num_barriers=stages),
        plgpu.Barrier(num_arrivals=P, num_barriers=stages),
    )
    f = plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=(S, Hkv, num_splits),
                     grid_names=("s", "h", "p"),
                     interpret=interpret_params(interpret))
    return f(q_groups, k_pages, v_pages, block_tables, context_lens)


def merge_splits(acc, m, l):
    """Merge flash-decoding splits into one unnormalized partial: acc [..., splits, G, D], m/l [..., splits, G]
    -> (acc [..., G, D], m [..., G] (-inf where every split is empty), l [..., G]), all f32."""
    m_max = jnp.max(m, axis=-2)                                              # [..., G]
    m_safe = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
    w = jnp.where(jnp.isfinite(m), jnp.exp2(m - m_safe[..., None, :]), 0.0)  # [..., splits, G]
    return jnp.sum(w[..., None] * acc, axis=-3), m_max, jnp.sum(w * l, axis=-2)


def combine_splits(acc, m, l):
    """Merge flash-decoding splits: acc [..., splits, G, D], m/l [..., splits, G] -> [..., G, D] f32."""
    num, _, denom = merge_splits(acc, m, l)
    return num / jnp.where(denom > 0, denom, 1.0)[..., None]


# ----------------------------------------------------------------------------------------------------------------
# Ragged prefill


def prefill_items(query_start, context_lens, num_tokens, rows=TILE_M):
    """Work items of up to `rows` query rows of one sequence, as int32 arrays of static length W.

    Returns (W, item_seq, item_row0, item_nrows, item_pos0): item i covers tokens item_row0 .. +item_nrows-1,
    at absolute positions item_pos0 ... Padding items have item_nrows = 0."""
    S = context_lens.shape[0]
    W = -(-num_tokens // rows) + S
    q_len = jnp.maximum(query_start[1:] - query_start[:-1], 0)
    n_chunks = (q_len + rows - 1) // rows
    item_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(n_chunks).astype(jnp.int32)])
    item = jnp.arange(W, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(item_start, item, side="right") - 1, 0, S - 1).astype(jnp.int32)
    chunk = item - item_start[seq]
    row0 = query_start[seq] + chunk * rows
    nrows = jnp.clip(query_start[seq + 1] - row0, 0, rows)
    nrows = jnp.where(item < item_start[S], nrows, 0).astype(jnp.int32)
    pos0 = (context_lens[seq] - q_len[seq] + chunk * rows).astype(jnp.int32)
    return W, seq, row0.astype(jnp.int32), nrows, pos0


def prefill_items_attention(q_items, k_pages, v_pages, block_tables, item_seq, item_nrows, item_pos0, *,
                            sm_scale, group, stages, interpret):
    """q_items [W, Hq, 64, D] -> out [W, Hq, 64, D] (q dtype; rows past an item's nrows are garbage)."""
    W, Hq, M, D = q_items.shape
    _, NB, BS, _ = k_pages.shape
    dtype = k_pages.dtype
    P = TILE_K // BS
    assert M == TILE_M and TILE_K % BS == 0 and block_tables.shape[1] % P == 0
    tr = _transforms(dtype, D)

    def kernel(q_ref, k_ref, v_ref, bt_ref, seq_ref, nrows_ref, pos0_ref, o_ref,
               q_smem, k_smem, v_smem, q_bar, k_bar, v_bar):
        w = lax.axis_index("w")
        hq = lax.axis_index("h")
        h = hq // group
        seq = seq_ref[w]
        nrows = nrows_ref[w]
        pos0 = pos0_ref[w]
        n_keys = jnp.where(nrows > 0, pos0 + nrows, 0)
        n_tiles = (n_keys + (TILE_K - 1)) // TILE_K

        plgpu.copy_gmem_to_smem(q_ref.at[w, hq], q_smem, q_bar)
        plgpu.barrier_wait(q_bar)

        common = dict(kv_head=h, table_ref=bt_ref, table_row=seq, page_base=0, pages_per_tile=P, block_size=BS)
        fetch_k = _make_fetch(k_ref, k_smem, k_bar, **common)
        fetch_v = _make_fetch(v_ref, v_smem, v_bar, **common)

        def mask_fn(t):
            q_ids = _iota((TILE_M, TILE_K), 0, interpret)
            kv_ids = _iota((TILE_M, TILE_K), 1, interpret)
            return kv_ids + t * TILE_K <= q_ids + pos0

        acc, m_i, l_i = _attend_tiles(q_smem=q_smem, k_smem=k_smem, v_smem=v_smem, k_bar=k_bar, v_bar=v_bar,
                                      fetch_k=fetch_k, fetch_v=fetch_v, n_tiles=n_tiles, stages=stages,
                                      sm_scale=sm_scale, mask_fn=mask_fn, dtype=dtype, head_dim=D,
                                      interpret=interpret)
        del m_i
        l_safe = jnp.where(l_i > 0, l_i, 1.0)
        acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
        q_smem[...] = acc.astype(dtype)                                      # the Q tile is free: reuse it
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[w, hq])
        plgpu.wait_smem_to_gmem(0)

    scratch = (
        plgpu.SMEM((TILE_M, D), dtype, transforms=tr),
        plgpu.SMEM((stages, TILE_K, D), dtype, transforms=tr),
        plgpu.SMEM((stages, TILE_K, D), dtype, transforms=tr),
        plgpu.Barrier(num_arrivals=1),
        plgpu.Barrier(num_arrivals=P, num_barriers=stages),
        plgpu.Barrier(num_arrivals=P, num_barriers=stages),
    )
    f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((W, Hq, TILE_M, D), dtype), scratch_types=scratch,
                     grid=(W, Hq), grid_names=("w", "h"),
                     interpret=interpret_params(interpret))
    return f(q_items, k_pages, v_pages, block_tables, item_seq, item_nrows, item_pos0)
