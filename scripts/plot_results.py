"""Bar charts (PNG) of committed benchmark JSON: yaie vs the HF baseline measured on the same card.

    python scripts/plot_results.py --suffix _H200        # reads bench/results/*_H200.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import bench_common as bc  # noqa: E402


def load(path):
    with open(path) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="bench/results")
    ap.add_argument("--suffix", default="_H200")
    args = ap.parse_args()
    p = lambda name: os.path.join(args.dir, f"{name}{args.suffix}.json")  # noqa: E731
    if os.path.exists(p("throughput_W1_yaie")) and os.path.exists(p("throughput_W1_hf")):
        y, h = load(p("throughput_W1_yaie")), load(p("throughput_W1_hf"))
        card = y["env"].get("device", "")
        bc.bar_plot(os.path.join(args.dir, f"W1{args.suffix}.png"), ["HF continuous batching", "yaie_jax"],
                    [h["results"][0]["output_tok_s"], y["results"][0]["output_tok_s"]], "output tokens / s",
                    f"W1 offline: GPT-2 124M bf16, 512 prompts x 256 tokens, {card}")
    if os.path.exists(p("latency_W2_yaie")) and os.path.exists(p("latency_W2_hf")):
        y, h = load(p("latency_W2_yaie")), load(p("latency_W2_hf"))
        card = y["env"].get("device", "")
        bc.bar_plot(os.path.join(args.dir, f"W2{args.suffix}.png"), ["HF static-cache generate", "yaie_jax"],
                    [h["summary"]["ms_per_token"], y["summary"]["ms_per_token"]], "ms per output token",
                    f"W2 single stream: GPT-2 124M bf16, {card}")
    if os.path.exists(p("throughput_W4_yaie")):
        w = load(p("throughput_W4_yaie"))
        rows = w["results"]
        bc.bar_plot(os.path.join(args.dir, f"W4{args.suffix}.png"), [r["backend"].replace("yaie prefix_cache=", "cache ")
                                                                    .replace(" cascade=off", "\nno cascade")
                                                                    for r in rows],
                    [r["output_tok_s"] for r in rows], "output tokens / s",
                    "W4 shared prefix (8 groups x 32 requests): prefix cache on vs off, NVIDIA H200")


if __name__ == "__main__":
    main()
