"""Single-stream latency (issue 10 workload W2): one 128-token prompt, 256 output tokens, GPT-2 124M bf16.

    python scripts/bench_latency.py --backend yaie
    python scripts/bench_latency.py --backend hf      # static-cache compiled generate

Reports ms per output token (decode only, after the first token) and TTFT, median over repeats.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import bench_common as bc  # noqa: E402


def run_yaie(model_dir, prompt, max_new, args):
    from yaie_jax import SamplingParams
    from yaie_jax.engine.core import LLMEngine
    t0 = time.perf_counter()
    eng = LLMEngine(model=model_dir, dtype="bfloat16", max_num_seqs=8, max_num_batched_tokens=512,
                    num_decode_steps=args.num_decode_steps, attention_backend=args.attention_backend,
                    warmup=not args.no_warmup, gpu_memory_utilization=0.3)
    startup_s = time.perf_counter() - t0
    print(f"engine start-up {startup_s:.1f} s")
    eng.wait_for_warmup()
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    results = [dict(r, startup_s=startup_s) for r in bc.single_stream_runs(eng, prompt, params, args.repeats)]
    if args.profile:
        import profile_summary
        trace_dir = os.path.join(args.out, "trace_W2")
        with profile_summary.trace(trace_dir):
            eng.add_request("profiled", prompt, params)
            while eng.has_unfinished_requests():
                eng.step()
        results[-1]["profile"] = profile_summary.summarize(trace_dir)
        profile_summary.print_summary(results[-1]["profile"])
    return results


def run_hf(model_dir, prompt, max_new, args):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    model.generation_config.eos_token_id = None
    model.generation_config.cache_implementation = "static"   # generate() compiles the static-cache decode step
    ids = torch.tensor([prompt], device="cuda")
    results = []
    for rep in range(args.repeats + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if rep > 1:
            ttft = t1 - t0
            results.append({"ttft_ms": ttft * 1e3, "ms_per_token": (t2 - t1 - ttft) * 1e3 / (max_new - 1)})
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="yaie", choices=["yaie", "hf"])
    ap.add_argument("--model-root", default=os.path.expanduser("~/.cache/yaie_bench"))
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--num-decode-steps", type=int, default=16)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--profile", action="store_true", help="one more run under jax.profiler, summarized")
    args = ap.parse_args()
    prompts, max_new = bc.workload("W2")
    model_dir = bc.gpt2_124m_dir(os.path.join(args.model_root, "gpt2_124m"))
    runs = (run_hf if args.backend == "hf" else run_yaie)(model_dir, prompts[0], max_new[0], args)
    row = {"backend": args.backend,
           "ms_per_token": statistics.median(r["ms_per_token"] for r in runs),
           "ttft_ms": statistics.median(r["ttft_ms"] for r in runs), "repeats": len(runs)}
    bc.print_table([row], ["backend", "ms_per_token", "ttft_ms", "repeats"])
    path = bc.write_result(args.out, f"latency_W2_{args.backend}",
                           {"workload": "W2", "config": vars(args), "env": bc.environment(), "runs": runs,
                            "summary": row})
    print("wrote", path)


if __name__ == "__main__":
    main()
