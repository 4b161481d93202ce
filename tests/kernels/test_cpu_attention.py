"""The "xla" attention as the CPU runs it (yaie_jax.executor.attention._cpu_tuned: decode row by row up to the last row
with context, prefill one work item per iteration, pages of a bit-pattern pool viewed after the gather): the same
output bit for bit from a pool of values and from its uint16 bit patterns; the batched reference's up to float32
rounding (other dot shapes, other summation order), and the float64 brute force's within tolerance."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference as ref
from pallas_kernels.testing import decode_case, prefill_case
from yaie_jax.executor.attention import _cpu_tuned

sys.path.insert(0, os.path.dirname(__file__))
import _brute  # noqa: E402


def pools(case, dtype, bits: bool):
    k, v = jnp.asarray(case.k_pages, dtype), jnp.asarray(case.v_pages, dtype)
    if bits:
        k, v = jax.lax.bitcast_convert_type(k, jnp.uint16), jax.lax.bitcast_convert_type(v, jnp.uint16)
    return k, v


@pytest.mark.parametrize("dtype,bits", [(jnp.float32, False), (jnp.bfloat16, False), (jnp.bfloat16, True)])
@pytest.mark.parametrize("lens", [[5, 0, 40, 17, 0, 0, 0, 0], [1, 1, 1], [0, 0, 0, 0], [33, 200, 0, 64]])
def test_decode_rows_equal_the_batched_reference(dtype, bits, lens):
    rng = np.random.default_rng(len(lens) + sum(lens))
    case = decode_case(rng, lens, num_kv_heads=2, group=3, head_dim=64, block_size=16, max_blocks=16,
                       table_fill=None)
    q = jnp.asarray(case.q, dtype)
    k_vals, v_vals = pools(case, dtype, False)
    decode, _ = _cpu_tuned(ref.paged_attention, ref.ragged_prefill_attention, dtype if bits else None)
    values, _ = _cpu_tuned(ref.paged_attention, ref.ragged_prefill_attention, None)
    tables, lens = jnp.asarray(case.block_tables), jnp.asarray(case.context_lens)
    got = np.asarray(jax.jit(decode)(q, *pools(case, dtype, bits), tables, lens).astype(jnp.float32))
    np.testing.assert_array_equal(got, np.asarray(jax.jit(values)(q, k_vals, v_vals, tables, lens)
                                                  .astype(jnp.float32)))
    want = np.asarray(jax.jit(ref.paged_attention)(q, k_vals, v_vals, tables, lens).astype(jnp.float32))
    tight = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(got, want, **tight)
    assert not got[np.asarray(case.context_lens) == 0].any()                   # padding rows: zeros
    brute = _brute.decode(case.q, case.k_pages, case.v_pages, case.block_tables, case.context_lens)
    np.testing.assert_allclose(got, brute, atol=1e-4 if dtype == jnp.float32 else 5e-2)

@pytest.mark.parametrize("dtype,bits", [(jnp.float32, False), (jnp.bfloat16, True)])
def test_prefill_one_item_per_iteration_equals_the_reference(dtype, bits):
    rng = np.random.default_rng(7)
    case = prefill_case(rng, [40, 3, 1], [40, 35, 90], num_tokens=64, num_kv_heads=2, group=3, head_dim=64,
                        block_size=16, max_blocks=16)
    q = jnp.asarray(case.q, dtype)
    args = (jnp.asarray(case.query_start), jnp.asarray(case.context_lens), jnp.asarray(case.block_tables))
    _, prefill = _cpu_tuned(ref.paged_attention, ref.ragged_prefill_attention, dtype if bits else None)
    _, values = _cpu_tuned(ref.paged_attention, ref.ragged_prefill_attention, None)
    got = np.asarray(jax.jit(prefill)(q, *pools(case, dtype, bits), *args).astype(jnp.float32))
    np.testing.assert_array_equal(got, np.asarray(jax.jit(values)(q, *pools(case, dtype, False), *args)
                                                  .astype(jnp.float32)))
    want = jax.jit(ref.ragged_prefill_attention)(q, *pools(case, dtype, False), *args)
    tight = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(got, np.asarray(want.astype(jnp.float32)), **tight)
