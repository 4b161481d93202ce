"""Deterministic mode on the GPU (bf16): is a request's output the same alone and in any batch? (issue 19 part 6)

GPT-2 124M, random weights (the W1 model), bf16. A 300-token target prompt is run with a seeded sampled request
(temperature 0.8, top_p 0.9) and a greedy one, 64 new tokens, top-2 logprobs:
  alone          on a fresh engine (max_num_seqs 512, max_num_batched_tokens 8192, 8 fused decode steps)
  batch          the same engine, the target twice among N other random requests (prompts U[64,512], mixed
                 sampling parameters; two of them share the target's first 256 tokens)
  prefix hit     the same engine, the target again (its prompt blocks in the prefix cache)
  small engine   another engine: prompts chunked by 1000 tokens, single decode steps, a KV pool small enough
                 that the batch preempts (swap to a host pool, then recompute when that is full)
for each attention backend (xla, pallas = Mosaic GPU) with deterministic=True and, to show what the mode fixes,
for pallas with deterministic=False (alone / batch / prefix hit only). The other requests all sample with a
filter, so that a batch compiles the sampler variant the sampled target compiles alone (compile time); the greedy
target still runs an all-greedy program alone and a mixed one in the batch. Every run is compared with "alone": token ids and the exact
float logprobs. Prints a table, writes determinism_check.json (after each engine set, so a cut-short run keeps what it did); exit
status 1 if deterministic mode differed.

    python scripts/gpu/determinism_check.py --out $OUT
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench_common as bc  # noqa: E402

MAX_NEW = 64


def _record(out) -> tuple:
    c = out.outputs[0]
    return c.token_ids, [sorted((tid, lp.logprob) for tid, lp in d.items()) for d in c.logprobs]


def _first_diff(a: list, b: list):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def workload(num_others: int, seed: int = 0):
    from yaie_jax import SamplingParams
    rng = np.random.default_rng(seed)
    target = rng.integers(1, 50257, 300).tolist()
    mine = [SamplingParams(temperature=0.8, top_p=0.9, seed=4321, max_tokens=MAX_NEW, logprobs=2, ignore_eos=True),
            SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=2, ignore_eos=True)]
    prompts, params = [], []
    for i in range(num_others):
        n = int(rng.integers(64, 513))
        prompts.append((target[:256] if i < 2 else []) + rng.integers(1, 50257, n).tolist())
        top_k = int(rng.choice([0, 50]))
        params.append(SamplingParams(temperature=float(rng.choice([0.7, 1.0])), top_k=top_k,
                                     top_p=0.95 if top_k == 0 else 1.0, logprobs=int(rng.choice([0, 0, 5])),
                                     max_tokens=int(rng.integers(16, 97)), seed=i, ignore_eos=True))
    half = num_others // 2
    batch_prompts = prompts[:half] + [target, target] + prompts[half:]
    batch_params = params[:half] + mine + params[half:]
    return target, mine, batch_prompts, batch_params, half


def engine(model_dir, backend, deterministic, **kw):
    from yaie_jax import LLM
    return LLM(model_dir, dtype="bfloat16", attention_backend=backend, deterministic=deterministic, warmup=False,
               gc_freeze=False, max_num_seqs=512, **kw)


def scenarios(model_dir, backend, deterministic, args):
    """{scenario: [sampled record, greedy record]} and what happened (preemptions, cache hits)."""
    target, mine, prompts, params, at = workload(args.num_others)
    facts = {}
    llm = engine(model_dir, backend, deterministic, max_num_batched_tokens=8192, num_decode_steps=8,
                 num_gpu_blocks=20_000)
    t0 = time.perf_counter()
    runs = {"alone": [_record(llm.generate([target], [p], use_tqdm=False)[0]) for p in mine]}
    outs = llm.generate(prompts, params, use_tqdm=False)
    runs["batch"] = [_record(outs[at]), _record(outs[at + 1])]
    hits = [llm.generate([target], [p], use_tqdm=False)[0] for p in mine]
    runs["prefix hit"] = [_record(h) for h in hits]
    facts["cached_tokens"] = hits[0].num_cached_tokens
    facts["engine_a_s"] = round(time.perf_counter() - t0, 1)
    del llm, outs
    gc.collect()
    if deterministic:
        llm = engine(model_dir, backend, deterministic, max_num_batched_tokens=1000, num_decode_steps=1,
                     num_gpu_blocks=args.small_pool_blocks, num_cpu_blocks=args.small_pool_blocks // 2)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs["small engine (chunks, preemption)"] = [_record(outs[at]), _record(outs[at + 1])]
        facts["preemptions"] = llm.get_stats()["num_preemptions"]
        facts["engine_b_s"] = round(time.perf_counter() - t0, 1)
        del llm, outs
        gc.collect()
    return runs, facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="pallas,xla", help="in order (a cut-short run keeps the first)")
    ap.add_argument("--off-backends", default="pallas", help="backends also run with deterministic=False")
    ap.add_argument("--num-others", type=int, default=510)
    ap.add_argument("--small-pool-blocks", type=int, default=400,
                    help="KV blocks of the small engine (1500 never preempted on an H200: NOTES §19)")
    ap.add_argument("--model-root", default=os.path.expanduser("~/.cache/yaie_bench"))
    ap.add_argument("--model-dir", default=None, help="another model with GPT-2's vocabulary (e.g. a CPU smoke run)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    model_dir = args.model_dir or bc.gpt2_124m_dir(os.path.join(args.model_root, "gpt2_124m"))
    rows, facts_all = [], {}
    cols = ["backend", "deterministic", "scenario", "sampled_tokens_same", "sampled_logprobs_same",
            "sampled_first_diff", "greedy_tokens_same", "greedy_logprobs_same", "greedy_first_diff"]
    offs = [b for b in args.off_backends.split(",") if b]
    for backend in args.backends.split(","):
        for on in [True] + ([False] if backend in offs else []):
            mode = "on" if on else "off"
            t0 = time.perf_counter()
            runs, facts = scenarios(model_dir, backend, on, args)
            facts["wall_s"] = round(time.perf_counter() - t0, 1)
            facts_all[f"{backend} {mode}"] = facts
            print(f"{backend} deterministic={on}: {facts}", flush=True)
            ref = runs.pop("alone")
            for name, got in runs.items():
                row = {"backend": backend, "deterministic": on, "scenario": name}
                for which, r, g in zip(("sampled", "greedy"), ref, got):
                    row[f"{which}_tokens_same"] = g[0] == r[0]
                    row[f"{which}_logprobs_same"] = g[1] == r[1]
                    row[f"{which}_first_diff"] = _first_diff(r[0], g[0]) if g[0] != r[0] else _first_diff(r[1], g[1])
                rows.append(row)
            ok = write(args, rows, cols, facts_all)
    bc.print_table(rows, cols)
    print("deterministic mode invariant in every scenario:", ok)
    sys.exit(0 if ok else 1)


def write(args, rows, cols, facts) -> bool:
    """Write what is done so far; returns whether every deterministic-mode row matched."""
    import jax
    from yaie_jax.executor import deterministic as det
    ok = all(r[c] for r in rows if r["deterministic"] for c in cols if c.endswith("_same"))
    record = {"env": bc.environment(), "config": vars(args), "chunk_tokens": det.chunk_tokens(jax.default_backend()),
              "compiler_options": det.compiler_options(jax.default_backend()), "facts": facts, "rows": rows,
              "deterministic_invariant": ok}
    bc.write_result(args.out, "determinism_check", record)
    return ok


if __name__ == "__main__":
    main()
