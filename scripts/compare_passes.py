"""Compare the timed passes of several `bench_throughput.py` runs (each run one process, `--repeats N`): per pass
output tokens/s and garbage-collector pauses, as a table, one JSON and a strip plot (PNG).

    python scripts/compare_passes.py --name gc_freeze_W1_H200 \\
        nofreeze_1=dir1/throughput_W1_yaie.json freeze_1=dir2/throughput_W1_yaie.json ...

Labels sharing the text before the last "_" (e.g. freeze_1, freeze_2) form one group in the plot.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402


def passes_of(row: dict) -> list:
    """[{"output_tok_s", "elapsed_s", ("gc_full_collections", "gc_pause_ms")}] of a result row: its `passes`, or
    for runs recorded before those were kept, every pass's time from `elapsed_s_all` (GC from `--log`)."""
    if "passes" in row:
        return row["passes"]
    return [{"output_tok_s": row["output_tokens"] / t, "elapsed_s": t} for t in row["elapsed_s_all"]]


def passes_from_log(path: str) -> list:
    """(gc full collections, gc pause ms) per 'pass i: N tok/s, T s, gc {0: a, 1: b, 2: c} X ms' line."""
    found = [re.search(r"gc \{.*2: (\d+)\} ([\d.]+) ms", line) for line in open(path) if line.startswith("pass ")]
    return [(int(m.group(1)), float(m.group(2))) for m in found if m]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=PATH of a throughput JSON")
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--log", action="append", default=[],
                    help="LABEL=PATH of the run's log: its 'pass i: ... gc {...} X ms' lines are parsed too")
    args = ap.parse_args()
    logs = dict(s.split("=", 1) for s in args.log)
    runs = {}
    for spec in args.runs:
        label, path = spec.split("=", 1)
        rec = json.load(open(path))
        passes = passes_of(rec["results"][0])
        if label in logs:
            for p, (full, ms) in zip(passes, passes_from_log(logs[label])):
                p.update(gc_full_collections=full, gc_pause_ms=ms)
        runs[label] = {"source": path, "env": rec["env"], "passes": passes,
                       "median_output_tok_s": statistics.median(p["output_tok_s"] for p in passes),
                       "min_output_tok_s": min(p["output_tok_s"] for p in passes)}
    rows = [{"run": k, "median_tok_s": v["median_output_tok_s"], "min_tok_s": v["min_output_tok_s"],
             "passes": len(v["passes"]),
             "max_gc_pause_ms": max((p.get("gc_pause_ms", 0.0) for p in v["passes"]), default=0.0)}
            for k, v in runs.items()]
    bc.print_table(rows, ["run", "median_tok_s", "min_tok_s", "passes", "max_gc_pause_ms"])
    first_env = next(iter(runs.values()))["env"]
    path = bc.write_result(args.out, args.name, {"env": first_env, "runs": runs})
    print("wrote", path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({k.rsplit("_", 1)[0] for k in runs})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, run in runs.items():
        x = groups.index(label.rsplit("_", 1)[0])
        ys = [p["output_tok_s"] for p in run["passes"]]
        ax.scatter([x + 0.1 * (list(runs).index(label) % 4 - 1.5)] * len(ys), ys, label=label, s=18)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("output tokens/s (one pass)")
    ax.set_title(f"{args.name}: every timed pass")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = os.path.splitext(path)[0] + ".png"
    fig.savefig(png, dpi=120)
    print("wrote", png)


if __name__ == "__main__":
    main()
