"""Issue 10's W4 targets over several runs: for each `bench_throughput.py --workload W4` result (one process
each), prefix cache on vs off -- output tokens/s ratio (target >= 2) and mean TTFT ratio (target <= 1/3) -- as a
table, one JSON and a plot (PNG).

    python scripts/w4_ratios.py --name W4_ratios_H200 run1=dir1/throughput_W4_yaie.json run2=...

A run's ratio compares its median-time passes (the row's own numbers); where every pass's TTFT is kept
(`passes[].mean_ttft_s`), the per-pass spread is shown beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

ON, OFF = "yaie prefix_cache=on", "yaie prefix_cache=off"


def run_ratios(record: dict) -> dict:
    """{on/off tok/s, on/off mean TTFT ms, the two ratios} of one W4 result; KeyError if a row is missing."""
    rows = {r["backend"]: r for r in record["results"]}
    on, off = rows[ON], rows[OFF]
    out = {"on_tok_s": on["output_tok_s"], "off_tok_s": off["output_tok_s"],
           "on_ttft_ms": on["mean_ttft_s"] * 1e3, "off_ttft_ms": off["mean_ttft_s"] * 1e3,
           "date": record["env"].get("date"), "device": record["env"].get("device")}
    out["throughput_ratio"] = out["on_tok_s"] / out["off_tok_s"]
    out["ttft_ratio"] = out["on_ttft_ms"] / out["off_ttft_ms"]
    for key, row in (("on", on), ("off", off)):
        ttfts = [p["mean_ttft_s"] * 1e3 for p in row.get("passes", []) if "mean_ttft_s" in p]
        if ttfts:
            out[f"{key}_ttft_ms_passes"] = ttfts
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="label=path/to/throughput_W4_yaie.json")
    ap.add_argument("--name", default="W4_ratios")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    runs = {}
    for spec in args.runs:
        label, _, path = spec.partition("=")
        with open(path) as f:
            runs[label] = run_ratios(json.load(f))
    table = [{"run": k, **{c: v[c] for c in ("on_tok_s", "off_tok_s", "throughput_ratio", "on_ttft_ms",
                                             "off_ttft_ms", "ttft_ratio")}} for k, v in runs.items()]
    bc.print_table(table, list(table[0]))
    tp = [v["throughput_ratio"] for v in runs.values()]
    tt = [v["ttft_ratio"] for v in runs.values()]
    summary = {"runs": len(runs), "throughput_ratio_median": statistics.median(tp),
               "throughput_ratio_met": sum(r >= 2 for r in tp), "ttft_ratio_median": statistics.median(tt),
               "ttft_ratio_met": sum(r <= 1 / 3 for r in tt)}
    print(json.dumps(summary))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.name}.json")
    with open(path, "w") as f:
        json.dump({"summary": summary, "runs": runs}, f, indent=1)
    print("wrote", path)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = list(runs)
    x = range(len(labels))
    axes[0].bar(x, tp, color="tab:blue")
    axes[0].axhline(2.0, color="k", ls="--", lw=1, label="target >= 2")
    axes[0].set_title("W4 output tok/s, prefix cache on / off")
    axes[1].bar(x, tt, color="tab:orange")
    axes[1].axhline(1 / 3, color="k", ls="--", lw=1, label="target <= 1/3")
    axes[1].set_title("W4 mean TTFT, on / off")
    for ax in axes:
        ax.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=8)
        ax.legend()
    fig.tight_layout()
    png = os.path.join(args.out, f"{args.name}.png")
    fig.savefig(png, dpi=110)
    print("wrote", png)


if __name__ == "__main__":
    main()
