"""Does a 16-bit dtype buy speed for the embedded model here? Prefill and decode throughput of
SmolLM2-135M-Instruct (GGUF) through the engine in float32 and bfloat16 (XLA attention), after a warm-up run that
compiles every program used. Prints a table, writes bench_dtype_<platform>.json (device, JAX version, date).

    python scripts/bench_dtype.py --out bench/results
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality_common as qc  # noqa: E402


def run(dtype: str, prompts, decode_tokens: int, repeats: int) -> dict:
    from yaie_jax import LLM, SamplingParams
    llm = LLM(dtype=dtype, attention_backend="xla", max_num_seqs=len(prompts), max_num_batched_tokens=512,
              max_model_len=512, num_gpu_blocks=256, compile_cache_dir=None)
    first = SamplingParams(temperature=0, max_tokens=1)
    dec = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    llm.generate(prompts, first, use_tqdm=False)                  # compile the prefill program
    llm.generate(prompts, dec, use_tqdm=False)                    # ... and the decode one
    n_prompt = sum(len(p) for p in prompts)
    pre, tot = [], []
    for _ in range(repeats):
        llm.engine.block_manager.reset_prefix_cache()             # every prompt token is computed again
        t0 = time.perf_counter()
        llm.generate(prompts, first, use_tqdm=False)
        pre.append(time.perf_counter() - t0)
        llm.engine.block_manager.reset_prefix_cache()
        t0 = time.perf_counter()
        llm.generate(prompts, dec, use_tqdm=False)
        tot.append(time.perf_counter() - t0)
    p_s, t_s = min(pre), min(tot)
    return {"dtype": dtype, "prompt_tokens": n_prompt, "prefill_s": p_s, "prefill_tok_s": n_prompt / p_s,
            "decode_tokens": decode_tokens * len(prompts),
            "decode_tok_s": decode_tokens * len(prompts) / max(1e-9, t_s - p_s), "total_s": t_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args(argv)
    from yaie_jax.models.default_model import default_model_path
    tok = qc.hf_tokenizer(str(default_model_path()))
    prompts = [qc.chat_ids(tok, p) for p in qc.PROMPTS[:args.prompts]]
    rows = [run(dt, prompts, args.decode_tokens, args.repeats) for dt in ("float32", "bfloat16")]
    env = qc.environment()
    print(f"SmolLM2-135M-Instruct on {env['device']} ({os.cpu_count()} cores, jax {env['jax']}); best of "
          f"{args.repeats}, {args.prompts} prompts")
    print(f"{'dtype':9} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for r in rows:
        print(f"{r['dtype']:9} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_dtype_{env['platform']}.json")
    with open(path, "w") as f:
        json.dump({"env": env, "cpu_count": os.cpu_count(), "rows": rows, "args": vars(args)}, f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
