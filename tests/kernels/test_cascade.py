"""Cascade decode attention: the host planner (yaie_jax.executor.cascade) against a brute-force check of its contract, and
the kernel (GPU interpret mode) with a plan against plain decode attention over the full tables (reference and
float64 brute force)."""
from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import reference as ref
from pallas_kernels.testing import rel_err, shared_prefix_case
from yaie_jax.executor.cascade import empty_plan, plan_cascade

sys.path.insert(0, os.path.dirname(__file__))
import _brute  # noqa: E402


def _jnp_plan(plan):
    return {k: jnp.asarray(v) for k, v in plan.items()}


def _args(case, dtype):
    return [jnp.asarray(case.q, dtype), jnp.asarray(case.k_pages, dtype), jnp.asarray(case.v_pages, dtype),
            jnp.asarray(case.block_tables), jnp.asarray(case.context_lens)]


# ----------------------------------------------------------------------------------------------------------------
# Planner


def _check_contract(plan, bt, cl, bs, members_per_item, min_blocks):
    S = len(cl)
    seen = set()
    for i in range(len(plan["item_lens"])):
        n = int(plan["item_lens"][i])
        if n == 0:
            continue
        assert n % bs == 0 and n // bs >= min_blocks
        members = [r for r in range(S) if plan["row_item"][r] == i]
        assert 2 <= len(members) <= members_per_item
        for r in members:
            assert r not in seen
            seen.add(r)
            slot = plan["row_slot"][r]
            assert plan["item_rows"][i, slot] == r
            assert np.array_equal(bt[r, :n // bs], plan["item_tables"][i, :n // bs])
            assert cl[r] - 1 >= n            # the shared pages were all filled before this call
    assert all(plan["row_item"][r] == -1 for r in range(S) if r not in seen)


def test_plan_finds_groups_and_keeps_contract():
    rng = np.random.default_rng()
    bs = 4
    for _ in range(50):
        S = int(rng.integers(2, 24))
        MB = 12
        bt = rng.permutation(1000)[:S * MB].reshape(S, MB).astype(np.int32)
        cl = rng.integers(0, MB * bs + 1, size=S).astype(np.int32)
        # groups sharing 1..MB leading pages (by construction), some rows alone
        g = rng.integers(0, 4, size=S)
        for k in range(1, 4):
            rows = np.nonzero(g == k)[0]
            if len(rows) > 1:
                shared = int(rng.integers(1, MB + 1))
                bt[rows[1:], :shared] = bt[rows[0], :shared]
        M = int(rng.integers(2, 6))
        min_blocks = int(rng.integers(1, 3))
        plan = plan_cascade(bt, cl, block_size=bs, max_items=8, members_per_item=M, min_prefix_blocks=min_blocks)
        if plan is None:
            # no two live rows share min_blocks filled pages
            ok = [r for r in range(S) if cl[r] > 0 and (cl[r] - 1) // bs >= min_blocks]
            for a in ok:
                for b in ok:
                    if a < b:
                        n = min(min_blocks, (cl[a] - 1) // bs, (cl[b] - 1) // bs)
                        assert not np.array_equal(bt[a, :n], bt[b, :n]) or n < min_blocks
            continue
        _check_contract(plan, bt, cl, bs, M, min_blocks)


def test_plan_w4_like_batch():
    """8 groups x 5 rows sharing 8 pages each, 2 rows alone: 8 items (members_per_item 8), every grouped row in."""
    bs, MB = 16, 12
    rng = np.random.default_rng()
    bt = rng.permutation(10_000)[:42 * MB].reshape(42, MB).astype(np.int32)
    for g in range(8):
        bt[g * 5 + 1:g * 5 + 5, :8] = bt[g * 5, :8]
    cl = np.full(42, 8 * bs + 20, np.int32)
    plan = plan_cascade(bt, cl, block_size=bs, max_items=16, members_per_item=8, min_prefix_blocks=4)
    assert (plan["item_lens"] > 0).sum() == 8 and set(plan["item_lens"]) - {0} == {8 * bs}
    assert (plan["row_item"] >= 0).sum() == 40 and (plan["row_item"][40:] == -1).all()
    # capped at 3 items: the three kept are whole groups
    plan = plan_cascade(bt, cl, block_size=bs, max_items=3, members_per_item=8, min_prefix_blocks=4)
    assert (plan["row_item"] >= 0).sum() == 15
    # the page holding position context-1 is never shared: contexts that end on the 8th page share 7
    cl[:] = 8 * bs
    plan = plan_cascade(bt, cl, block_size=bs, max_items=16, members_per_item=8, min_prefix_blocks=4)
    assert set(plan["item_lens"]) - {0} == {7 * bs}


# ----------------------------------------------------------------------------------------------------------------
# Kernel (interpret mode)

CASES = [
    # id, groups [(shared pages, member contexts)], Hkv, G, D, BS, dtype, members_per_item
    ("g1-f32", [(4, [70, 65, 100]), (2, [40, 33]), (0, [17, 0])], 2, 1, 64, 16, jnp.float32, 2),
    ("g3-bf16", [(3, [64, 50, 130, 49])], 1, 3, 64, 16, jnp.bfloat16, 21),
]


@pytest.mark.parametrize("groups,hkv,g,d,bs,dtype,m", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cascade_kernel_matches_plain_decode(groups, hkv, g, d, bs, dtype, m):
    rng = np.random.default_rng()
    case, _ = shared_prefix_case(rng, groups, num_kv_heads=hkv, group=g, head_dim=d, block_size=bs, dtype=dtype)
    plan = plan_cascade(case.block_tables, case.context_lens, block_size=bs, max_items=4, members_per_item=m,
                        min_prefix_blocks=1)
    assert plan is not None and (plan["row_item"] >= 0).sum() >= 2
    args = _args(case, dtype)
    out = pk.cascade_paged_attention(*args, _jnp_plan(plan), interpret=True)
    assert out.shape == case.q.shape and out.dtype == dtype
    out = np.asarray(out.astype(jnp.float32))
    want = np.asarray(ref.paged_attention(*args).astype(jnp.float32))
    assert np.isfinite(out).all()
    assert np.all(out[case.context_lens == 0] == 0)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert rel_err(out, want) < tol
    if dtype == jnp.float32:
        brute = _brute.decode(case.q, case.k_pages, case.v_pages, case.block_tables, case.context_lens)
        assert rel_err(out, brute) < 1e-5
    # the reference with a plan ignores it
    assert rel_err(np.asarray(ref.cascade_paged_attention(*args, _jnp_plan(plan)).astype(jnp.float32)), want) == 0


def test_cascade_kernel_empty_suffix_and_empty_plan():
    """A row whose whole context is the shared prefix (nothing of its own) and a plan with no items."""
    rng = np.random.default_rng()
    bs = 16
    case, rows = shared_prefix_case(rng, [(2, [33, 40])], num_kv_heads=1, group=1, head_dim=64, block_size=bs)
    case.context_lens[0] = 32                      # row 0 now ends exactly at the shared pages
    plan = empty_plan(2, case.block_tables.shape[1], max_items=1, members_per_item=2)
    plan.update(item_rows=np.array([[0, 1]], np.int32), item_lens=np.array([32], np.int32),
                item_tables=case.block_tables[:1].copy(), row_item=np.array([0, 0], np.int32))
    plan["row_slot"] = np.array([0, 1], np.int32)
    args = _args(case, jnp.float32)
    want = np.asarray(ref.paged_attention(*args))
    out = np.asarray(pk.cascade_paged_attention(*args, _jnp_plan(plan), interpret=True))
    assert rel_err(out, want) < 1e-5
    out = np.asarray(pk.cascade_paged_attention(*args, _jnp_plan(empty_plan(2, case.block_tables.shape[1],
                                                                            max_items=1, members_per_item=2)),
                                                interpret=True))
    assert rel_err(out, want) < 1e-5
