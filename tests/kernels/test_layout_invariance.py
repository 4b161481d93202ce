"""The property deterministic mode (yaie_jax/executor/deterministic.py) builds on: at fixed input shapes, the ragged prefill
attention of a query depends only on its own position and keys, bit for bit -- not on where its segment starts in
the token chunk, how the sequence's queries are split into segments (a prompt chunk or a 1-token decode segment),
or what the other segments hold. Checked for the XLA reference and the Pallas kernel (GPU interpret mode), bf16
and fp32. (The decode kernel has no such property: its flash-decoding splits follow the batch size.)"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import reference as ref

T, S = 32, 8                 # tokens and segments of every call (fixed shapes, as in deterministic mode)
HKV, G, D, BS, MB = 1, 2, 64, 16, 8
CTX = 100                    # the sequence under test: 100 tokens cached, queries at positions 70..99


def _layouts(rng):
    """[(query_start, context_lens, seq of each segment, {position: token row})]: three layouts of queries of
    the sequence under test (sequence 0) among other sequences' segments."""
    layouts = []
    # (a) all 30 queries in one segment at the chunk start
    layouts.append(([0, 30], [CTX], [0], {70 + i: i for i in range(30)}))
    # (b) after a 5-token segment of another sequence; positions 70..96 only (a shorter prompt chunk)
    layouts.append(([0, 5, 32], [40, CTX - 3], [1, 0], {70 + i: 5 + i for i in range(27)}))
    # (c) position 99 as a decode token (1-token segment) between other sequences' segments
    layouts.append(([0, 7, 8, 20], [9, CTX, 60], [2, 0, 1], {99: 7}))
    out = []
    for qs, cl, seqs, rows in layouts:
        pad = S - len(cl)
        out.append((np.array(qs + [qs[-1]] * pad, np.int32), np.array(cl + [0] * pad, np.int32),
                    np.array(seqs + [0] * pad, np.int32), rows))
    return out


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_prefill_attention_of_a_query_ignores_the_layout(backend, dtype):
    rng = np.random.default_rng(0)
    nb = 3 * MB
    k_pages = jnp.asarray(rng.standard_normal((HKV, nb, BS, D)), dtype)
    v_pages = jnp.asarray(rng.standard_normal((HKV, nb, BS, D)), dtype)
    tables = rng.permutation(nb).reshape(3, MB).astype(np.int32)          # 3 sequences' block tables
    q_of_pos = rng.standard_normal((CTX, HKV * G, D)).astype(np.float32)  # each position's query
    attend = ref.ragged_prefill_attention if backend == "xla" else \
        lambda *a: pk.ragged_prefill_attention(*a, interpret=True)
    results = []
    for qs, cl, seqs, rows in _layouts(rng):
        q = rng.standard_normal((T, HKV * G, D)).astype(np.float32)          # other tokens: anything
        for pos, row in rows.items():
            q[row] = q_of_pos[pos]
        out = attend(jnp.asarray(q, dtype), k_pages, v_pages, jnp.asarray(qs), jnp.asarray(cl),
                     jnp.asarray(tables[seqs]))
        out = np.asarray(out.astype(jnp.float32))
        results.append({pos: out[row] for pos, row in rows.items()})
    for other in results[1:]:
        for pos, got in other.items():
            np.testing.assert_array_equal(got, results[0][pos], err_msg=f"position {pos}")
