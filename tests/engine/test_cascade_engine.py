"""Cascade decode attention inside the full engine (Pallas kernels in interpret mode): requests sharing a cached
prompt prefix decode with a cascade plan, and their greedy tokens are HF's. (Interpret mode is slow: small batch,
the bucket threshold lowered to 8 rows.)"""
import numpy as np

import support
from yaie_jax import LLM, SamplingParams
from yaie_jax.executor import runner as runner_mod


def _shared_prefix_prompts(rng, groups=2, per_group=3, prefix_len=80):
    prefixes = [rng.integers(1, 384, size=prefix_len).tolist() for _ in range(groups)]
    return [p + rng.integers(1, 384, size=int(rng.integers(2, 8))).tolist() for p in prefixes
            for _ in range(per_group)]


def test_cascade_decode_matches_hf(gpt2_dir, monkeypatch):
    monkeypatch.setattr(runner_mod, "CASCADE_MIN_ROWS", 8)
    rng = np.random.default_rng()
    prompts = _shared_prefix_prompts(rng)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = LLM(gpt2_dir, cascade_attention=True, dtype="float32", attention_backend="pallas", warmup=False,
              compile_cache_dir=None, max_num_batched_tokens=512, max_num_seqs=8, num_decode_steps=2)
    runner = llm.engine.runner
    plans = []
    plan_fn = runner.cascade_plan
    runner.cascade_plan = lambda *a: plans.append(plan_fn(*a)) or plans[-1]
    outs = llm.generate(prompts, params, use_tqdm=False)
    used = [p for p in plans if p is not None]
    assert used, "no decode call carried a cascade plan"
    # the items share their group's 80-token prefix (5 whole 16-token pages); once both groups decode, all 6 rows
    assert {int(n) for p in used for n in p["item_lens"] if n > 0} == {80}
    assert max(int((p["row_item"] >= 0).sum()) for p in used) == 6
    for p, o in zip(prompts, outs):
        support.assert_same_greedy(gpt2_dir, p, o.outputs[0].token_ids, support.hf_greedy(gpt2_dir, p, 4))

    # after a start-up warm-up, a bucket's cascade program is compiled in the background when first needed, and
    # until it is ready the batch runs with plain decode attention (no plan)
    runner.programs.warm_started = True
    runner.programs.ready.clear()
    bt = np.arange(8 * runner.max_blocks_per_seq, dtype=np.int32).reshape(8, -1)
    bt[1, :5] = bt[0, :5]
    cl = np.array([90, 85, 30, 0, 0, 0, 0, 0], np.int32)
    assert runner.cascade_plan("multi", bt, cl, 3) is None
    runner.wait_for_warmup()
    plan = runner.cascade_plan("multi", bt, cl, 3)
    assert plan is not None and list(plan["row_item"][:3]) == [0, 0, -1] and plan["item_lens"][0] == 80
    # a batch padded to a larger bucket (its own still compiling) also requests its own bucket's cascade program
    runner.programs.ready.clear()
    bt16 = np.concatenate([bt, bt + bt.size])
    cl16 = np.concatenate([cl, np.zeros(8, np.int32)])
    assert runner.cascade_plan("decode", bt16, cl16, 3) is None
    assert {("decode+cascade", 16, 16), ("decode+cascade", 8, 8)} <= runner.programs.requested
    runner.wait_for_warmup()
