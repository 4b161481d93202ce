"""Offline throughput (issue 10 workloads W1, W4, W6): yaie_jax vs HF transformers continuous batching.

    python scripts/bench_throughput.py --workload W1 --backend yaie
    python scripts/bench_throughput.py --workload W1 --backend hf
    python scripts/bench_throughput.py --workload W4 --backend yaie   # prefix cache on (cascade on/off) and off
    python scripts/bench_throughput.py --workload W1 --backend yaie --deterministic   # batch-invariant mode

Random weights, bf16, EOS ignored. Prints a table; writes JSON (device, JAX version, date, config) and a PNG.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(__file__))
import bench_common as bc  # noqa: E402
from host_trace import HostTrace  # noqa: E402


def model_dir_for(workload: str, root: str) -> str:
    if workload == "W6":
        return bc.smollm2_shape_dir(os.path.join(root, "smollm2_shape"))
    return bc.gpt2_124m_dir(os.path.join(root, "gpt2_124m"))


def run_yaie(model_dir: str, prompts, max_new, args, enable_prefix_caching: bool = True,
             cascade_attention: bool = True) -> dict:
    from yaie_jax import LLM, SamplingParams
    t0 = time.perf_counter()
    if args.untuned:     # what a user who sets nothing gets: the engine's own defaults (yaie_jax/defaults.py)
        llm = LLM(model_dir)
    else:
        llm = LLM(model_dir, dtype="bfloat16", max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
                  cascade_attention=cascade_attention and not args.no_cascade,
                  attention_backend=args.attention_backend, num_decode_steps=args.num_decode_steps,
                  max_model_len=args.max_model_len, warmup=not args.no_warmup,
                  gpu_memory_utilization=args.gpu_memory_utilization, gc_freeze=not args.no_gc_freeze,
                  pipelined_prefill=args.pipelined_prefill, deterministic=args.deterministic)
    engine_args = {k: getattr(llm.engine.config, k) for k in
                   ("dtype", "max_num_seqs", "max_num_batched_tokens", "num_decode_steps", "gpu_memory_utilization")}
    print("engine arguments:", engine_args, flush=True)
    startup_s = time.perf_counter() - t0
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_new]
    # Warm-up: the whole workload once (compiles every shape it meets), then the timed passes.
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    llm.engine.wait_for_warmup()              # every bucket compiled (background compiles after start-up)
    print(f"warm-up pass {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(args.warmup_passes - 1):   # more untimed passes (is one enough for a steady state?)
        llm.engine.block_manager.reset_prefix_cache()
        llm.generate(prompts, params, use_tqdm=False)
    from yaie_jax.engine.gc_pause import GcPauseMeter
    passes = []
    for i in range(args.repeats):
        llm.engine.block_manager.reset_prefix_cache()
        stats0 = llm.get_stats()
        cascade0 = llm.engine.runner.num_cascade_calls
        last = i == args.repeats - 1
        traced = args.host_trace and (last or args.host_trace_all)
        trace = HostTrace(llm.engine) if traced else contextlib.nullcontext()
        t0 = time.perf_counter()
        with trace:
            outs = llm.generate(prompts, params, use_tqdm=last)
        elapsed = time.perf_counter() - t0
        stats = llm.get_stats()
        ttfts = [o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outs]
        passes.append({
            "elapsed_s": elapsed, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "mean_ttft_s": sum(ttfts) / len(ttfts),
            "prefix_cache_hit_tokens": stats.get("prefix_cache_hit_tokens", 0)
            - stats0.get("prefix_cache_hit_tokens", 0),
            "num_preemptions": stats.get("num_preemptions", 0) - stats0.get("num_preemptions", 0),
            "num_device_calls": stats["num_steps"] - stats0["num_steps"],
            "num_pipelined_calls": stats["num_pipelined_calls"] - stats0["num_pipelined_calls"],
            "num_pipelined_prefill_calls": stats["num_pipelined_prefill_calls"]
            - stats0["num_pipelined_prefill_calls"],
            "num_cascade_calls": llm.engine.runner.num_cascade_calls - cascade0,
            # host seconds per engine phase; wait_device ~ time the host had nothing to do
            "host_time_s": {k: v - stats0["host_time_s"].get(k, 0.0) for k, v in stats["host_time_s"].items()},
            # garbage-collector pauses (every thread) during the pass
            "gc": GcPauseMeter.delta(stats["gc"], stats0["gc"]),
            "host_trace": trace.summary() if traced else None})
    # the pass of median elapsed time stands for the run; every pass's time is kept beside it
    times = [p["elapsed_s"] for p in passes]
    median = sorted(range(len(passes)), key=lambda j: times[j])[len(passes) // 2]
    row = {**{k: v for k, v in passes[median].items() if k != "host_trace"}, "engine_args": engine_args,
           "startup_s": startup_s, "repeats": len(passes), "elapsed_s_all": times,
           "passes": [{"elapsed_s": p["elapsed_s"], "output_tok_s": p["output_tokens"] / p["elapsed_s"],
                       "mean_ttft_s": p["mean_ttft_s"],
                       "gc_full_collections": p["gc"]["collections"][2],
                       "gc_pause_ms": p["gc"]["total_pause_s"] * 1e3,
                       **({"host_trace": p["host_trace"]} if args.host_trace_all else {})} for p in passes]}
    row["output_tok_s"] = row["output_tokens"] / row["elapsed_s"]
    for j, p in enumerate(passes):
        print(f"pass {j}: {p['output_tokens'] / p['elapsed_s']:,.0f} tok/s, {p['elapsed_s']:.3f} s, "
              f"gc {p['gc']['collections']} {p['gc']['total_pause_s'] * 1e3:.1f} ms", flush=True)
    if args.host_trace:
        row["host_trace"] = passes[-1]["host_trace"]     # of the last pass
        print("host trace:", json.dumps(row["host_trace"], indent=None)[:3000])
    if args.profile_prompts:
        row["profile"] = profile_pass(llm, prompts[:args.profile_prompts], params[:args.profile_prompts], args)
    if args.host_profile:
        row["host_profile"] = host_profile_pass(llm, prompts, params)
    return row


def host_profile_pass(llm, prompts, params, top: int = 30) -> dict:
    """One more (untimed) pass under cProfile: the host functions with the most own time and the most
    cumulative time, as [function, calls, own s, cumulative s] rows."""
    import cProfile
    import pstats
    llm.engine.block_manager.reset_prefix_cache()
    prof = cProfile.Profile()
    prof.runcall(llm.generate, prompts, params, use_tqdm=False)
    stats = pstats.Stats(prof).stats      # {(file, line, name): (prim calls, calls, own s, cumulative s, callers)}
    rows = [[f"{os.path.basename(f)}:{line}({name})", n, round(tt, 5), round(ct, 5)]
            for (f, line, name), (_, n, tt, ct, _) in stats.items()]
    by_own = sorted(rows, key=lambda r: -r[2])[:top]
    by_cum = sorted(rows, key=lambda r: -r[3])[:top]
    for r in by_own[:15]:
        print("host own %-70s %6d %8.4f %8.4f" % tuple(r))
    return {"by_own_s": by_own, "by_cumulative_s": by_cum}


def profile_pass(llm, prompts, params, args) -> dict:
    """One more (untimed) pass under jax.profiler; returns the trace summary (scripts/profile_summary.py)."""
    import profile_summary
    trace_dir = os.path.join(args.out, f"trace_{args.workload}")
    llm.engine.block_manager.reset_prefix_cache()
    with profile_summary.trace(trace_dir):
        llm.generate(prompts, params, use_tqdm=False)
    summary = profile_summary.summarize(trace_dir)
    profile_summary.print_summary(summary)
    return summary


def run_hf(model_dir: str, prompts, max_new, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation import GenerationConfig
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                 attn_implementation=args.hf_attn).cuda().eval()
    gen = GenerationConfig(max_new_tokens=max(max_new), do_sample=False, eos_token_id=None, pad_token_id=0,
                           use_cuda_graph=True)
    if len(set(max_new)) != 1:
        return run_hf_manager(model, gen, prompts, max_new)
    # warm-up: the whole workload once (compiles, graph captures, and a manager sized for it), then the timed pass
    model.generate_batch(prompts, generation_config=gen, progress_bar=False, persistent_manager=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = model.generate_batch(prompts, generation_config=gen, progress_bar=True, persistent_manager=True)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    n_out = sum(len(r.generated_tokens) for r in res.values())
    return {"elapsed_s": elapsed, "output_tokens": n_out, "output_tok_s": n_out / elapsed}


def run_hf_manager(model, gen, prompts, max_new) -> dict:
    """Per-request max_new_tokens (W6) through HF's continuous-batching manager (generate_batch takes one)."""
    import torch
    manager = model.init_continuous_batching(generation_config=gen)
    manager.start()

    def run(batch, limits, tag):
        for i, (p, m) in enumerate(zip(batch, limits)):
            manager.add_request(p, request_id=f"{tag}{i}", max_new_tokens=m)
        done, n_out = 0, 0
        with tqdm(total=len(batch), desc=f"hf {tag}", unit="req") as bar:
            while done < len(batch):
                r = manager.get_result(timeout=1)
                if r is not None and r.is_finished():
                    done += 1
                    n_out += len(r.generated_tokens)
                    bar.update(1)
                elif r is None and not manager.is_running():
                    raise RuntimeError("HF continuous batching manager stopped")
        return n_out

    try:
        run(prompts[:64], max_new[:64], "warm")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n_out = run(prompts, max_new, "r")
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    finally:
        manager.stop(block=True)
    return {"elapsed_s": elapsed, "output_tokens": n_out, "output_tok_s": n_out / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="W1", choices=["W1", "W4", "W6"])
    ap.add_argument("--backend", default="yaie", choices=["yaie", "hf"])
    ap.add_argument("--model-root", default=os.path.expanduser("~/.cache/yaie_bench"))
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--num-decode-steps", type=int, default=8)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--untuned", action="store_true",
                    help="LLM(model) with no engine arguments at all (the defaults a user gets; ignores the above)")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--warmup-passes", type=int, default=1, help="untimed passes of the workload before the timed ones")
    ap.add_argument("--pipelined-prefill", action="store_true", help="engine arg pipelined_prefill=True")
    ap.add_argument("--deterministic", action="store_true",
                    help="engine arg deterministic=True (batch-invariant steps, yaie_jax/executor/deterministic.py)")
    ap.add_argument("--no-gc-freeze", action="store_true", help="engine arg gc_freeze=False (yaie_jax/engine/gc_pause.py)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed passes (yaie); the table shows the pass of median time, the JSON every pass's time")
    ap.add_argument("--no-cascade", action="store_true", help="plain paged decode even where prefixes are shared")
    ap.add_argument("--w4-rows", default="on,on-nocascade,off",
                    help="W4 engines to run, in order: on (prefix cache, cascade decode), on-nocascade, off")
    ap.add_argument("--hf-attn", default="paged|sdpa")
    ap.add_argument("--host-trace", action="store_true",
                    help="time the runner's parts, main-thread CPU and GC pauses during the timed pass "
                         "(scripts/host_trace.py)")
    ap.add_argument("--host-trace-all", action="store_true",
                    help="with --host-trace: trace every timed pass (each pass's summary kept in its `passes` entry)")
    ap.add_argument("--host-profile", action="store_true",
                    help="after the timed pass, run it again under cProfile and record the top host functions")
    ap.add_argument("--profile-prompts", type=int, default=0,
                    help="after the timed pass, run the first N prompts again under jax.profiler and summarize")
    args = ap.parse_args()

    prompts, max_new = bc.workload(args.workload)
    if args.num_prompts:
        prompts, max_new = prompts[:args.num_prompts], max_new[:args.num_prompts]
    model_dir = model_dir_for(args.workload, args.model_root)
    rows = []
    if args.backend == "hf":
        rows.append({"backend": "hf", **run_hf(model_dir, prompts, max_new, args)})
    elif args.workload == "W4":
        # prefix cache on (with cascade decode attention, then without it, to attribute the gain), then off
        configs = {"on": (True, True), "on-nocascade": (True, False), "off": (False, False)}
        for key in args.w4_rows.split(","):
            on, cascade = configs[key]
            if cascade and args.no_cascade:
                continue
            name = f"yaie prefix_cache={'on' if on else 'off'}" + (" cascade=off" if on and not cascade else "")
            rows.append({"backend": name, **run_yaie(model_dir, prompts, max_new, args, enable_prefix_caching=on,
                                                     cascade_attention=cascade)})
    else:
        name = "yaie deterministic" if args.deterministic else "yaie"
        rows.append({"backend": name, **run_yaie(model_dir, prompts, max_new, args)})
    bc.print_table(rows, ["backend", "output_tok_s", "elapsed_s", "output_tokens", "mean_ttft_s", "startup_s",
                          "num_device_calls", "num_cascade_calls"])
    record = {"workload": args.workload, "config": vars(args), "env": bc.environment(), "results": rows}
    tag = "_deterministic" if args.deterministic and args.backend == "yaie" else ""
    path = bc.write_result(args.out, f"throughput_{args.workload}_{args.backend}{tag}", record)
    print("wrote", path)


if __name__ == "__main__":
    main()
