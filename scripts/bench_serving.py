"""Serving benchmark (issue 10 workload W3): Poisson arrivals against any OpenAI-compatible server.

    python -m yaie_jax.serve MODEL --port 8000 &          # or vLLM / SGLang / transformers serve
    python scripts/bench_serving.py --base-url http://127.0.0.1:8000/v1 --rates 4 16 64

Each request: a prompt of random token ids with length U[64,512] (numpy default_rng(0)), 128 output tokens,
streamed, EOS ignored (vLLM's `ignore_eos` extra). Reports TTFT and inter-token latency p50/p99 and output
throughput per rate; writes JSON (with the server's device when it says) and a PNG to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import bench_common as bc  # noqa: E402


async def one_request(client, model, prompt, max_tokens):
    t0 = time.perf_counter()
    stamps = []
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    if not stamps:
        return None
    itl = np.diff(stamps).tolist()
    return {"ttft_s": stamps[0] - t0, "itl_s": itl, "e2e_s": stamps[-1] - t0, "chunks": len(stamps)}


async def run_rate(client, model, prompts, rate, max_tokens, seed):
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=len(prompts))
    tasks = []
    t0 = time.perf_counter()
    for p, gap in zip(prompts, gaps):
        await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one_request(client, model, p, max_tokens)))
    results = [r for r in await asyncio.gather(*tasks) if r is not None]
    elapsed = time.perf_counter() - t0
    ttft = np.array([r["ttft_s"] for r in results]) * 1e3
    itl = np.array([x for r in results for x in r["itl_s"]]) * 1e3
    n_tokens = len(results) * max_tokens
    return {"rate_rps": rate, "requests": len(results), "elapsed_s": elapsed, "output_tok_s": n_tokens / elapsed,
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "itl_p50_ms": float(np.percentile(itl, 50)) if len(itl) else None,
            "itl_p99_ms": float(np.percentile(itl, 99)) if len(itl) else None}


async def main_async(args):
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=600)
    model = args.model or (await client.models.list()).data[0].id
    rng = np.random.default_rng(0)
    rows = []
    for rate in args.rates:
        n = args.num_requests or int(max(32, min(512, rate * args.duration_s)))
        lens = rng.integers(args.min_prompt, args.max_prompt + 1, size=n)
        prompts = [rng.integers(0, args.vocab, size=int(k)).tolist() for k in lens]
        await run_rate(client, model, prompts[:4], 4.0, 8, 1)                  # warm-up
        rows.append(await run_rate(client, model, prompts, rate, args.max_tokens, int(rate)))
        bc.print_table(rows[-1:], list(rows[-1]))
    return model, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default=os.environ.get("YAIE_API_KEY", "unused"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--rates", type=float, nargs="+", default=[4, 16, 64])
    ap.add_argument("--duration-s", type=float, default=30.0)
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--min-prompt", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    model, rows = asyncio.run(main_async(args))
    cols = ["rate_rps", "requests", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"]
    bc.print_table(rows, cols)
    path = bc.write_result(args.out, "serving_W3", {"workload": "W3", "model": model, "config": vars(args),
                                                    "env": bc.environment(), "results": rows})
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        r = [x["rate_rps"] for x in rows]
        ax[0].plot(r, [x["ttft_p50_ms"] for x in rows], "o-", label="p50")
        ax[0].plot(r, [x["ttft_p99_ms"] for x in rows], "o-", label="p99")
        ax[0].set(xlabel="requests/s", ylabel="TTFT (ms)", xscale="log")
        ax[1].plot(r, [x["itl_p50_ms"] for x in rows], "o-", label="p50")
        ax[1].plot(r, [x["itl_p99_ms"] for x in rows], "o-", label="p99")
        ax[1].set(xlabel="requests/s", ylabel="inter-token latency (ms)", xscale="log")
        ax[0].legend()
        fig.tight_layout()
        fig.savefig(path.replace(".json", ".png"), dpi=100)
    except Exception as e:  # plotting is optional
        print("no plot:", e)
    print("wrote", path)


if __name__ == "__main__":
    main()
