"""The Pallas kernels compiled by Mosaic GPU against the plain-jnp references, on the GPU.

Skipped without a GPU. Fresh random inputs per case; the reference runs on the same device in fp32 (precision
HIGHEST) over the same bf16 inputs, so the only differences are the kernel's bf16 P@V operand and summation order.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import pallas_kernels as pk  # noqa: E402
from pallas_kernels import reference as ref  # noqa: E402
from pallas_kernels.testing import decode_case, prefill_case, rel_err  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]

BF16 = jnp.bfloat16
TOL = 2e-2          # ||out - ref|| / ||ref|| for bf16 inputs (bf16 P in P@V, bf16 output rounding)


def _dev(case):
    return [jnp.asarray(a) for a in (case.q, case.k_pages, case.v_pages, case.block_tables, case.context_lens)]


DECODE = [
    # (context_lens, Hkv, G, D, BS, num_splits)
    ([1, 16, 17, 0, 64, 65, 200], 2, 3, 64, 16, None),
    ([1, 31, 32, 33, 0, 130], 2, 4, 128, 32, None),
    ([5, 3000, 0, 777], 2, 1, 128, 16, None),
    ([4096, 1, 2049], 1, 4, 64, 32, 7),
    ([100, 1000, 0], 3, 3, 128, 16, 1),
    ([1500] * 4, 1, 8, 64, 16, 3),
]


@pytest.mark.parametrize("lens,hkv,g,d,bs,splits", DECODE)
def test_decode_matches_reference(lens, hkv, g, d, bs, splits):
    rng = np.random.default_rng()
    case = decode_case(rng, lens, num_kv_heads=hkv, group=g, head_dim=d, block_size=bs, dtype=BF16,
                       extra_blocks=5)
    q, k, v, bt, cl = _dev(case)
    out = jax.jit(functools.partial(pk.paged_attention, interpret=False, num_splits=splits))(q, k, v, bt, cl)
    want = jax.jit(ref.paged_attention)(q, k, v, bt, cl)
    out, want = np.asarray(out.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert np.all(out[np.asarray(cl) == 0] == 0)
    assert rel_err(out, want) < TOL, rel_err(out, want)


PREFILL = [
    # (q_lens, context_lens, num_tokens, Hkv, G, D, BS)
    ([5, 0, 64, 1, 130], [5, 0, 64, 40, 300], 220, 2, 3, 64, 16),      # fresh prompts, prefix + chunk, padding
    ([1, 65, 200], [33, 65, 1000], 266, 1, 4, 128, 32),
    ([300], [300], 300, 2, 1, 128, 16),
    ([17, 3], [17, 2000], 24, 2, 4, 64, 32),
]


@pytest.mark.parametrize("q_lens,lens,t,hkv,g,d,bs", PREFILL)
def test_prefill_matches_reference(q_lens, lens, t, hkv, g, d, bs):
    rng = np.random.default_rng()
    case = prefill_case(rng, q_lens, lens, num_tokens=t, num_kv_heads=hkv, group=g, head_dim=d, block_size=bs,
                        dtype=BF16)
    q, k, v, bt, cl = _dev(case)
    qs = jnp.asarray(case.query_start)
    out = jax.jit(functools.partial(pk.ragged_prefill_attention, interpret=False))(q, k, v, qs, cl, bt)
    want = jax.jit(ref.ragged_prefill_attention)(q, k, v, qs, cl, bt)
    out, want = np.asarray(out.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))
    assert np.isfinite(out).all()
    assert np.all(out[int(case.query_start[-1]):] == 0)
    assert rel_err(out, want) < TOL, rel_err(out, want)


def test_fp32_pools_fall_back_to_reference():
    rng = np.random.default_rng()
    case = decode_case(rng, [7, 100], dtype=np.float32)
    q, k, v, bt, cl = _dev(case)
    out = pk.paged_attention(q, k, v, bt, cl, interpret=False)
    want = ref.paged_attention(q, k, v, bt, cl)
    assert rel_err(out, want) < 1e-5


CASCADE = [
    # (groups [(shared pages, member contexts)], Hkv, G, D, BS, members per item)
    ([(32, [600, 513, 700, 640] * 8), (8, [200, 300]), (0, [50, 0, 900])], 12, 1, 64, 16, 64),
    ([(20, [400, 321, 999] * 5), (2, [40, 33])], 2, 4, 128, 16, 16),
    ([(6, [300, 200, 193, 1000])], 3, 3, 64, 32, 21),
]


@pytest.mark.parametrize("groups,hkv,g,d,bs,m", CASCADE)
def test_cascade_matches_plain_decode(groups, hkv, g, d, bs, m):
    from pallas_kernels.testing import shared_prefix_case
    from yaie_jax.executor.cascade import plan_cascade
    rng = np.random.default_rng()
    case, _ = shared_prefix_case(rng, groups, num_kv_heads=hkv, group=g, head_dim=d, block_size=bs, dtype=BF16)
    plan = plan_cascade(case.block_tables, case.context_lens, block_size=bs, max_items=8, members_per_item=m,
                        min_prefix_blocks=2)
    assert plan is not None
    plan = {k: jnp.asarray(a) for k, a in plan.items()}
    q, k, v, bt, cl = _dev(case)
    out = jax.jit(functools.partial(pk.cascade_paged_attention, interpret=False))(q, k, v, bt, cl, plan)
    want = jax.jit(ref.paged_attention)(q, k, v, bt, cl)
    out, want = np.asarray(out.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))
    assert np.isfinite(out).all()
    assert np.all(out[np.asarray(cl) == 0] == 0)
    assert rel_err(out, want) < TOL, rel_err(out, want)
