"""Paged attention callables for the models (see models/base.py for the contract).

The runner builds one per step from its StepBatch's fields (step_types.py): it writes the new tokens' K/V into the
paged pool at `slot_mapping`, then runs decode attention (one query per sequence) or ragged prefill attention
(query chunks back to back) over the pages.
Backends: "pallas" (pallas_kernels: Mosaic GPU on the GPU, interpret mode on CPU) and "xla" (the plain-jnp
references of the same functions, which XLA compiles anywhere).
"""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from yaie_jax.executor.parallel import AXIS, shard_map


def kernel_functions(backend: str):
    """(write_kv, paged_attention, ragged_prefill_attention, cascade_paged_attention) for a backend name
    ("xla" | "pallas"). The "xla" cascade is plain decode attention (the plan is only a saving)."""
    if backend == "xla":
        mod = importlib.import_module("pallas_kernels.reference")
    elif backend == "pallas":
        mod = importlib.import_module("pallas_kernels")
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    return mod.write_kv, mod.paged_attention, mod.ragged_prefill_attention, mod.cascade_paged_attention


def kv_storage_dtype(dtype, backend: str):
    """The dtype the KV pool's arrays hold for a pool of `dtype` values: uint16 (the values' bit patterns) for a
    16-bit float pool on the CPU with the "xla" backend, else `dtype` itself.

    XLA:CPU upcasts every bf16/f16 op to float32 over its whole operand, a pool scatter included (a convert of
    each layer's K and V pages to f32 and back per step; bench/NOTES.md, "Figures moved out of the code"), and it
    materializes a bitcast of the pool as a copy. An integer
    scatter into the donated pool is done in place; reads bitcast the gathered pages (fused into the gather)."""
    if (backend == "xla" and jax.default_backend() == "cpu"
            and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))):
        return jnp.dtype(jnp.uint16)
    return jnp.dtype(dtype)


def make_paged_attention(backend: str, *, decode: bool, slot_mapping, query_start, context_lens, block_tables,
                         mesh=None, cascade=None, kv_dtype=None):
    """The attention callable of one step (models/base.py contract). With a TP `mesh` the KV pool stays split by
    KV head (parallel.py): the K/V writes run per shard for either backend, and so do the "pallas" kernels
    (`_per_shard`); the "xla" attention is left to XLA's partitioner. `cascade`: a decode step's cascade plan
    (yaie_jax/executor/cascade.py; arrays), or None for plain paged decode attention. `kv_dtype`: the dtype of the pool's
    values where the pool's arrays hold their bit patterns instead (`kv_storage_dtype`), else None."""
    write_kv, paged_attention, ragged_prefill_attention, cascade_attention = kernel_functions(backend)
    cpu_xla = backend == "xla" and jax.default_backend() == "cpu"
    if cpu_xla:
        paged_attention, ragged_prefill_attention = _cpu_tuned(paged_attention, ragged_prefill_attention, kv_dtype)
    if mesh is not None:
        write_kv = _write_kv_per_shard(mesh, write_kv)
    if mesh is not None and backend == "pallas":
        paged_attention, ragged_prefill_attention, cascade_attention = _per_shard(
            mesh, paged_attention, ragged_prefill_attention, cascade_attention)

    def attention(layer_idx, q, k, v, kv_cache):
        # q [T, num_heads, head_dim]; k, v [T, num_kv_heads, head_dim]; pages [num_kv_heads, blocks, bs, head_dim]
        k_pages, v_pages = kv_cache
        bits = kv_dtype is not None and k_pages.dtype != jnp.dtype(kv_dtype)
        if bits:   # the pool holds bit patterns: write the new values' bits (an integer scatter, in place)
            k = jax.lax.bitcast_convert_type(k.astype(kv_dtype), k_pages.dtype)
            v = jax.lax.bitcast_convert_type(v.astype(kv_dtype), v_pages.dtype)
        k_pages, v_pages = write_kv(k_pages, v_pages, k, v, slot_mapping)
        if mesh is not None:  # keep the pool split by KV head across steps (no re-layout between calls)
            pool = NamedSharding(mesh, P(AXIS, None, None, None))
            k_pages = jax.lax.with_sharding_constraint(k_pages, pool)
            v_pages = jax.lax.with_sharding_constraint(v_pages, pool)
        new_cache = (k_pages, v_pages)      # bits: read through `_cpu_tuned`'s views (CPU "xla" only, no cascade)
        if decode and cascade is not None:
            out = cascade_attention(q, k_pages, v_pages, block_tables, context_lens, cascade)
        elif decode:
            out = paged_attention(q, k_pages, v_pages, block_tables, context_lens)
        else:
            out = ragged_prefill_attention(q, k_pages, v_pages, query_start, context_lens, block_tables)
        return out, new_cache

    return attention


def _cpu_tuned(paged_attention, ragged_prefill_attention, kv_dtype):
    """The "xla" kernels as run on the CPU: the pages of a pool of bit patterns (`kv_storage_dtype`) are viewed
    after each gather, and work on padding is skipped: decode attention runs row by row up to the last row with
    context (the batched reference gathers every row's max_model_len pages, padding rows' included), and ragged
    prefill takes one work item per loop iteration (its default packs up to 28 per iteration for GPU
    parallelism, most of them padding for a short prompt). The reference's math (its dots have other shapes
    here: sums may round differently, tests/kernels/test_cpu_attention.py). Its saving: bench/NOTES.md §17."""
    view = {} if kv_dtype is None else {"pages_dtype": kv_dtype}

    def decode(q, k_pages, v_pages, block_tables, context_lens):
        S = q.shape[0]
        rows = jnp.max(jnp.where(context_lens > 0, jnp.arange(S, dtype=jnp.int32) + 1, 0))   # up to the last live

        def row(i, out):
            one = lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1)          # noqa: E731 - row i, [1, ...]
            o = paged_attention(one(q), k_pages, v_pages, one(block_tables), one(context_lens), **view)
            return jax.lax.dynamic_update_slice_in_dim(out, o, i, 0)

        return jax.lax.fori_loop(0, rows, row, jnp.zeros_like(q))          # padding rows stay zeros

    def prefill(q, k_pages, v_pages, query_start, context_lens, block_tables):
        return ragged_prefill_attention(q, k_pages, v_pages, query_start, context_lens, block_tables,
                                        items_per_step=1, **view)

    return decode, prefill


def _write_kv_per_shard(mesh, write_kv):
    """write_kv per TP shard: each shard scatters its KV heads' new K/V into its slice of the pool (slots are
    the same on every shard), so the pool is never gathered whatever the partitioner would have chosen."""
    heads = P(None, AXIS, None)              # new k / v [T, Hkv, D] split by KV head
    pool = P(AXIS, None, None, None)

    def write(k_pages, v_pages, k, v, slot_mapping):
        return shard_map(write_kv, mesh=mesh, in_specs=(pool, pool, heads, heads, P()),
                         out_specs=(pool, pool))(k_pages, v_pages, k, v, slot_mapping)

    return write


def _per_shard(mesh, paged_attention, ragged_prefill_attention, cascade_attention):
    """The Pallas kernels run per TP shard under shard_map: shard i gets query heads [i*Hq/N, (i+1)*Hq/N) and KV
    heads [i*Hkv/N, (i+1)*Hkv/N) -- the same query-to-KV grouping as unsharded, since N divides both counts --
    and the replicated tables; its output is its own heads' slice. No communication inside attention."""
    if jax.default_backend() != "gpu":   # CPU: the kernels run in Pallas's GPU interpreter
        _interpret_per_device_barrier_check()
    heads = P(None, AXIS, None)              # q / out [T, Hq, D] split by head
    pool = P(AXIS, None, None, None)         # pages [Hkv, blocks, bs, D] split by KV head
    rep = P()                                # block tables, context lengths, query starts, cascade plans: whole

    def decode(q, kp, vp, bt, cl):
        return shard_map(paged_attention, mesh=mesh, in_specs=(heads, pool, pool, rep, rep),
                         out_specs=heads)(q, kp, vp, bt, cl)

    def prefill(q, kp, vp, qs, cl, bt):
        return shard_map(ragged_prefill_attention, mesh=mesh, in_specs=(heads, pool, pool, rep, rep, rep),
                         out_specs=heads)(q, kp, vp, qs, cl, bt)

    def cascade(q, kp, vp, bt, cl, plan):
        return shard_map(cascade_attention, mesh=mesh, in_specs=(heads, pool, pool, rep, rep, rep),
                         out_specs=heads)(q, kp, vp, bt, cl, plan)

    return decode, prefill, cascade


_INTERPRET_CHECK_PATCHED = False


def _interpret_per_device_barrier_check() -> None:
    """Make Pallas's GPU interpret mode (CPU) usable on several devices at once; a no-op after the first call
    and on a JAX without the check.

    Under shard_map each device interprets the kernel in its own thread against one process-wide simulated
    memory. At the end of a kernel the interpreter asserts that no barrier is still allocated -- over *all*
    devices (jax 0.10.2 `GPUSharedMemory.assert_no_barriers_allocated`), so a device that finishes first trips
    over a barrier another device still uses, and the failed callback leaves the rest waiting forever at the
    interpreter's clean-up barrier. We swap in the same check restricted to the calling device's allocations: a
    kernel must still free every barrier it allocated. The compiled Mosaic GPU kernels never run this code."""
    global _INTERPRET_CHECK_PATCHED
    if _INTERPRET_CHECK_PATCHED:
        return
    try:
        from jax._src import callback
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks, jaxpr_interpret
    except ImportError:
        return
    if not hasattr(gpu_callbacks, "call_assert_no_barriers_allocated"):
        return

    def own_barriers_freed(token, device_id):
        memory = gpu_callbacks._get_shared_memory()
        dev = int(device_id)
        with memory.lock:
            items = list(memory.mem.items())
        for key, alloc in items:
            if getattr(key, "device_id", dev) == dev and "Barrier" in type(alloc).__name__:
                raise AssertionError(f"Barrier remains allocated at key `{key}`.")
        return token

    def call_assert_no_barriers_allocated(token):
        device_id = jaxpr_interpret.DeviceInfo().device_id     # traced: this shard's logical device id
        return callback.io_callback(own_barriers_freed, gpu_callbacks.TOKEN_SHAPE_DTYPE, token, device_id)

    gpu_callbacks.call_assert_no_barriers_allocated = call_assert_no_barriers_allocated
    _INTERPRET_CHECK_PATCHED = True
