"""Pallas kernels in GPU interpret mode (CPU) against the plain-jnp references and a float64 brute force.

Interpret mode is slow (every program is simulated), so the kernel sweep uses small shapes and a handful of
cases chosen to cover: GQA ratios 1/3/4, head_dim 64/128, block_size 16/32, fp32 and bf16, length 1, block
and 64-key tile boundaries, decode splits (flash decoding) with empty splits, padding rows, prefix + chunk
prefill, padding tokens. Inputs are fresh random numbers each run; the interpreter fills every buffer it
allocates (kernel outputs included) with NaN, so an unwritten output row fails the comparison.
"""
from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import reference as ref
from pallas_kernels.testing import decode_case, prefill_case, rel_err

sys.path.insert(0, os.path.dirname(__file__))
import _brute  # noqa: E402

BF16 = jnp.bfloat16


def _args(case, dtype):
    return [jnp.asarray(case.q, dtype), jnp.asarray(case.k_pages, dtype), jnp.asarray(case.v_pages, dtype),
            jnp.asarray(case.block_tables), jnp.asarray(case.context_lens)]


def _tol(dtype):
    return 1e-5 if dtype == jnp.float32 else 2e-2


# ----------------------------------------------------------------------------------------------------------------
# Kernels (interpret mode)

DECODE_CASES = [
    # id, context_lens, Hkv, G, D, BS, dtype, num_splits
    ("g3-d64-b16-f32-splits", [1, 16, 17, 0, 150], 1, 3, 64, 16, jnp.float32, 2),
    ("g4-d128-b32-bf16", [33, 0, 200], 1, 4, 128, 32, BF16, None),
    ("g1-d64-b16-f32-tiles", [64, 65, 128, 0], 2, 1, 64, 16, jnp.float32, 3),
]


@pytest.mark.parametrize("lens,hkv,g,d,bs,dtype,splits", [c[1:] for c in DECODE_CASES],
                         ids=[c[0] for c in DECODE_CASES])
def test_paged_attention_kernel(lens, hkv, g, d, bs, dtype, splits):
    rng = np.random.default_rng()
    case = decode_case(rng, lens, num_kv_heads=hkv, group=g, head_dim=d, block_size=bs, table_fill=None)
    args = _args(case, dtype)
    # interpret=None must pick interpret mode on a CPU
    out = pk.paged_attention(*args, interpret=None if splits == 2 else True, num_splits=splits)
    assert out.shape == case.q.shape and out.dtype == dtype
    out = np.asarray(out.astype(jnp.float32))
    want = np.asarray(ref.paged_attention(*args).astype(jnp.float32))
    assert np.isfinite(out).all()
    assert np.all(out[np.asarray(lens) == 0] == 0)
    assert rel_err(out, want) < _tol(dtype)
    if dtype == jnp.float32:
        brute = _brute.decode(case.q, case.k_pages, case.v_pages, case.block_tables, case.context_lens)
        assert rel_err(out, brute) < 1e-5


def test_decode_partials_write_every_split():
    """Each (sequence, head, split) program writes its partials, empty splits included (m = -inf, l = 0)."""
    from pallas_kernels import mosaic
    rng = np.random.default_rng()
    lens = np.array([1, 70, 0], np.int32)                       # 1, 2 and 0 tiles of 64 keys; 2 splits
    case = decode_case(rng, lens, num_kv_heads=1, group=2, head_dim=64, block_size=16, max_blocks=8)
    qg = jnp.pad(jnp.asarray(case.q).reshape(3, 1, 2, 64), ((0, 0), (0, 0), (0, 6), (0, 0)))
    acc, m, l = mosaic.decode_partials(qg, jnp.asarray(case.k_pages), jnp.asarray(case.v_pages),
                                       jnp.asarray(case.block_tables), jnp.asarray(lens), sm_scale=0.125,
                                       num_splits=2, pages_per_split=4, stages=2, interpret=True)
    m, l, acc = np.asarray(m)[..., :2], np.asarray(l)[..., :2], np.asarray(acc)[..., :2, :]
    nonempty = np.array([[True, False], [True, True], [False, False]])[:, None, :, None]
    assert np.all(np.where(nonempty, np.isfinite(m), m == -np.inf))
    assert np.all(np.where(nonempty, l >= 1.0, l == 0.0))
    assert np.isfinite(acc).all()


PREFILL_CASES = [
    # id, q_lens, context_lens, num_tokens, Hkv, G, D, BS, dtype
    ("g3-d64-b16-f32-mixed", [1, 0, 70, 5], [20, 0, 100, 5], 80, 1, 3, 64, 16, jnp.float32),
    ("g4-d128-b32-bf16-prefix", [64, 65], [64, 200], 130, 1, 4, 128, 32, BF16),
    ("g1-d64-b32-f32-len1", [1, 3], [1, 40], 4, 2, 1, 64, 32, jnp.float32),
]


@pytest.mark.parametrize("q_lens,lens,t,hkv,g,d,bs,dtype", [c[1:] for c in PREFILL_CASES],
                         ids=[c[0] for c in PREFILL_CASES])
def test_ragged_prefill_kernel(q_lens, lens, t, hkv, g, d, bs, dtype):
    rng = np.random.default_rng()
    case = prefill_case(rng, q_lens, lens, num_tokens=t, num_kv_heads=hkv, group=g, head_dim=d, block_size=bs)
    q, k, v, bt, cl = _args(case, dtype)
    qs = jnp.asarray(case.query_start)
    out = pk.ragged_prefill_attention(q, k, v, qs, cl, bt, interpret=True)
    assert out.shape == case.q.shape and out.dtype == dtype
    out = np.asarray(out.astype(jnp.float32))
    want = np.asarray(ref.ragged_prefill_attention(q, k, v, qs, cl, bt).astype(jnp.float32))
    assert np.isfinite(out).all()
    assert np.all(out[int(case.query_start[-1]):] == 0)
    assert rel_err(out, want) < _tol(dtype)
    if dtype == jnp.float32:
        brute = _brute.prefill(case.q, case.k_pages, case.v_pages, case.query_start, case.context_lens,
                               case.block_tables)
        assert rel_err(out, brute) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# References (fast: a wider sweep against the float64 brute force)

@pytest.mark.parametrize("g", [1, 3, 4])
@pytest.mark.parametrize("d,bs", [(64, 16), (128, 32)])
def test_reference_decode_vs_brute(g, d, bs):
    rng = np.random.default_rng()
    lens = [1, bs - 1, bs, bs + 1, 0, 3 * bs + 7, 300]
    case = decode_case(rng, lens, num_kv_heads=2, group=g, head_dim=d, block_size=bs, max_blocks=40)
    out = jax.jit(ref.paged_attention)(*_args(case, jnp.float32))
    brute = _brute.decode(case.q, case.k_pages, case.v_pages, case.block_tables, case.context_lens)
    assert rel_err(out, brute) < 1e-5
    assert np.all(np.asarray(out)[4] == 0)


@pytest.mark.parametrize("g,d,bs,q_chunk", [(1, 64, 16, None), (3, 64, 16, 4), (4, 128, 32, None),
                                            (3, 128, 32, 16), (4, 64, 32, 8)])
def test_reference_prefill_vs_brute(g, d, bs, q_chunk):
    rng = np.random.default_rng()
    q_lens, lens = [1, 0, 17, 40, 5], [1, 0, 17, 300, 70]
    case = prefill_case(rng, q_lens, lens, num_tokens=70, num_kv_heads=2, group=g, head_dim=d, block_size=bs)
    q, k, v, bt, cl = _args(case, jnp.float32)
    f = jax.jit(functools.partial(ref.ragged_prefill_attention, q_chunk=q_chunk))
    out = np.asarray(f(q, k, v, jnp.asarray(case.query_start), cl, bt))
    brute = _brute.prefill(case.q, case.k_pages, case.v_pages, case.query_start, case.context_lens,
                           case.block_tables)
    assert rel_err(out, brute) < 1e-5
    assert np.all(out[int(case.query_start[-1]):] == 0)


def test_reference_bf16_close_to_fp32():
    rng = np.random.default_rng()
    case = decode_case(rng, [100, 7], num_kv_heads=2, group=4)
    f = jax.jit(ref.paged_attention)
    out16 = f(*_args(case, BF16))
    out32 = f(*_args(case, jnp.float32))
    assert out16.dtype == BF16
    assert rel_err(out16.astype(jnp.float32), out32) < 2e-2


# ----------------------------------------------------------------------------------------------------------------
# write_kv

def test_write_kv_places_tokens_and_skips_padding():
    rng = np.random.default_rng()
    H, NB, BS, D = 2, 6, 4, 8
    kp = rng.standard_normal((H, NB, BS, D)).astype(np.float32)
    vp = rng.standard_normal((H, NB, BS, D)).astype(np.float32)
    k = rng.standard_normal((5, H, D)).astype(np.float32)
    v = rng.standard_normal((5, H, D)).astype(np.float32)
    slots = np.array([0, 9, -1, 23, 5], np.int32)
    nk, nv = ref.write_kv(jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots))
    ek, ev = kp.copy(), vp.copy()
    for t, s in enumerate(slots):
        if s >= 0:
            ek[:, s // BS, s % BS] = k[t]
            ev[:, s // BS, s % BS] = v[t]
    np.testing.assert_array_equal(np.asarray(nk), ek)
    np.testing.assert_array_equal(np.asarray(nv), ev)
    assert pk.write_kv is ref.write_kv


def test_write_kv_is_in_place_under_donation():
    H, NB, BS, D = 2, 256, 16, 64
    kp = jnp.asarray(np.random.default_rng().standard_normal((H, NB, BS, D)).astype(np.float32))
    vp = kp + 1.0
    k = jnp.ones((7, H, D), jnp.float32)
    slots = jnp.array([0, 17, -1, 4095, 5, -3, 100], jnp.int32)
    f = jax.jit(ref.write_kv, donate_argnums=(0, 1))
    compiled = f.lower(kp, vp, k, k, slots).compile()
    mem = compiled.memory_analysis()
    pool_bytes = 2 * kp.size * kp.dtype.itemsize
    if mem is not None:                               # both pools aliased to the outputs, no pool-sized temp
        assert mem.alias_size_in_bytes >= pool_bytes
        assert mem.temp_size_in_bytes < kp.size * kp.dtype.itemsize // 4
    pk_ptr, pv_ptr = kp.unsafe_buffer_pointer(), vp.unsafe_buffer_pointer()
    nk, nv = f(kp, vp, k, k, slots)
    assert nk.unsafe_buffer_pointer() == pk_ptr and nv.unsafe_buffer_pointer() == pv_ptr
    assert kp.is_deleted()
    np.testing.assert_array_equal(np.asarray(nk)[:, 1, 1], np.ones((H, D), np.float32))
