"""Tensor-parallel scaling (issue 8): GPT-2 large (36 layers, 1280 wide, 20 heads; random weights, bf16) at
TP = 1, 2, 4 with the LM head / token embedding replicated or vocab-parallel (yaie_jax/executor/parallel.py).

    PYTHONPATH=$PWD python scripts/bench_tp.py                                  # --tp 1,2,4 --head replicated,vocab
    PYTHONPATH=$PWD python scripts/bench_tp.py --tp 4 --head vocab --append     # one more config into the same JSON
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
        PYTHONPATH=$PWD python scripts/bench_tp.py --model tiny --out /tmp/bench_tp   # CPU smoke test

Per configuration (TP size, head layout; TP=1 runs once, as there is nothing to split), one engine, torn down
before the next one:
  throughput   W1-style: random prompts of 64-512 tokens, `--output-len` new tokens each, EOS ignored,
               greedy; one untimed pass (compiles every shape it meets), prefix cache reset, then the timed pass.
  single-stream  one 128-token prompt, `--single-stream-tokens` new tokens; one untimed run, then the median
               ms per output token (after the first) of `--repeats` runs.
TP sizes above the number of visible devices are skipped. Prints a table; writes JSON (environment, config,
rows) and a PNG (tok/s and ms/token against TP) to --out as tp_<model>.json / .png.

--model tiny: a 2-layer GPT-2 with 4 heads and smaller defaults (32 prompts, 16 + 32 tokens), for checking the
script end to end on CPU; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import bench_common as bc  # noqa: E402

# model name -> defaults (num_prompts, output_len, single_stream_tokens, max_model_len)
MODEL_DEFAULTS = {"gpt2_large": (256, 128, 256, 1024), "tiny": (32, 16, 32, 1024)}


def tiny_gpt2_dir(path: str) -> str:
    """A 2-layer, 64-wide GPT-2 with 4 heads (TP up to 4), vocab 512, 1024 positions, random weights."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=1024, vocab_size=512, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    bc._save_tokenizer(path, 512)
    return path


def model_dir(name: str, root: str) -> str:
    if name == "tiny":
        return tiny_gpt2_dir(os.path.join(root, "gpt2_tiny"))
    return bc.gpt2_large_dir(os.path.join(root, "gpt2_large"))


def w1_prompts(num_prompts: int, vocab_size: int, seed: int = 0) -> List[List[int]]:
    """W1-style prompts: lengths uniform in [64, 512], ids uniform below min(vocab, 50257) (as W1 draws them)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(64, 513, size=num_prompts)                               # [num_prompts]
    high = min(vocab_size, 50257)
    return [rng.integers(0, high, size=int(n)).tolist() for n in lens]


def configs(tp_sizes: List[int], heads: List[str], num_devices: int) -> List[Dict]:
    """(tp, head) pairs to run, in order; TP=1 once (head "replicated": nothing to split); sizes above the
    visible devices are reported as skipped."""
    out = []
    for tp in tp_sizes:
        if tp > num_devices:
            print(f"skip TP={tp}: only {num_devices} devices visible", flush=True)
            continue
        for head in (["replicated"] if tp == 1 else heads):
            out.append({"tp": tp, "head": head})
    return out


def build_llm(path: str, tp: int, head: str, args):
    """An LLM for one configuration (bf16, compiles lazily: the untimed passes compile what they meet)."""
    from yaie_jax import LLM
    return LLM(path, dtype="bfloat16", tensor_parallel_size=tp, tp_head_layout=head, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, num_decode_steps=args.num_decode_steps,
               max_model_len=args.max_model_len, attention_backend=args.attention_backend,
               gpu_memory_utilization=args.gpu_memory_utilization, warmup=args.engine_warmup)


def run_throughput(llm, prompts: List[List[int]], output_len: int) -> Dict:
    """Untimed pass, prefix cache reset, timed pass; output tokens per second of the timed pass."""
    from yaie_jax import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    warm_s = time.perf_counter() - t0
    llm.engine.block_manager.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    llm.engine.block_manager.reset_prefix_cache()
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    ttfts = [o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outs]
    return {"output_tok_s": n_out / elapsed, "elapsed_s": elapsed, "output_tokens": n_out,
            "mean_ttft_s": sum(ttfts) / len(ttfts), "throughput_warmup_s": warm_s,
            "_tokens": [list(o.outputs[0].token_ids) for o in outs]}


def run_single_stream(llm, prompt: List[int], num_tokens: int, repeats: int) -> Dict:
    """One untimed run, then `repeats` timed ones: median ms per output token after the first, and TTFT."""
    from yaie_jax import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    runs = bc.single_stream_runs(llm.engine, prompt, params, repeats)
    return {"ms_per_token": statistics.median(r["ms_per_token"] for r in runs),
            "single_ttft_ms": statistics.median(r["ttft_ms"] for r in runs)}


def param_bytes_on_first_device(llm) -> int:
    """Bytes of params held by the first device of the engine's mesh (shows what TP and the head layout split)."""
    import jax
    params = llm.engine.runner.params
    dev = None
    total = 0
    for leaf in jax.tree_util.tree_leaves(params):
        shard = leaf.addressable_shards[0] if dev is None else \
            next(s for s in leaf.addressable_shards if s.device == dev)
        dev = shard.device
        total += shard.data.nbytes
    return total


def device_bytes_in_use() -> Optional[int]:
    """Bytes in use on the first device (None where the platform does not say, e.g. CPU)."""
    import jax
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    return None if not stats else stats.get("bytes_in_use")


def teardown(llm) -> None:
    """Drop the engine and everything that keeps its device buffers (KV pool, params, compiled programs)."""
    import jax
    llm.engine.runner.kv_caches = None
    llm.engine.runner.params = None
    del llm
    gc.collect()
    jax.clear_caches()
    gc.collect()


def run_config(path: str, cfg: Dict, prompts, single_prompt, args) -> Dict:
    """One (tp, head) configuration end to end on a fresh engine; the row of the result table."""
    import jax
    # each row names its own workload and card, so rows merged by --append from several runs stay comparable
    row = dict(cfg, num_prompts=len(prompts), output_len=args.output_len,
               single_stream_tokens=args.single_stream_tokens, device=str(jax.devices()[0].device_kind),
               bytes_in_use_before=device_bytes_in_use())
    t0 = time.perf_counter()
    llm = build_llm(path, cfg["tp"], cfg["head"], args)
    row["startup_s"] = time.perf_counter() - t0
    row["param_mib_device0"] = param_bytes_on_first_device(llm) / 2 ** 20
    row["kv_blocks"] = llm.engine.runner.num_gpu_blocks
    row["attention_backend"] = llm.engine.runner.attention_backend
    print(f"TP={cfg['tp']} head={cfg['head']}: engine up in {row['startup_s']:.1f} s "
          f"({row['attention_backend']} attention, {row['kv_blocks']} KV blocks)", flush=True)
    row.update(run_throughput(llm, prompts, args.output_len))
    print(f"  throughput {row['output_tok_s']:,.0f} tok/s (untimed pass {row['throughput_warmup_s']:.1f} s)",
          flush=True)
    row.update(run_single_stream(llm, single_prompt, args.single_stream_tokens, args.repeats))
    print(f"  single stream {row['ms_per_token']:.2f} ms/token", flush=True)
    teardown(llm)
    return row


def add_agreement(rows: List[Dict], n_first: int = 16) -> None:
    """Sanity check of TP > 1 against TP = 1 in the same run (greedy): the share of prompts whose first token,
    and whose first `n_first` tokens, equal TP=1's. bf16 sums in another order may flip a near-tie and so part
    a sequence later on; wrong sharding changes nearly every first token. Drops the token lists from the rows."""
    base = next((r["_tokens"] for r in rows if r["tp"] == 1), None)
    for r in rows:
        toks = r.pop("_tokens")
        if base is None:
            continue
        r["first_token_agree_tp1"] = float(np.mean([a[:1] == b[:1] for a, b in zip(toks, base)]))
        r[f"first{n_first}_agree_tp1"] = float(np.mean([a[:n_first] == b[:n_first] for a, b in zip(toks, base)]))


def merge_rows(old: List[Dict], new: List[Dict]) -> List[Dict]:
    """`old` rows with those of the same (tp, head) replaced by `new` ones, sorted by head then TP."""
    keep = {(r["tp"], r["head"]): r for r in old}
    keep.update({(r["tp"], r["head"]): r for r in new})
    return sorted(keep.values(), key=lambda r: (r["tp"], r["head"]))


def plot(rows: List[Dict], path: str, title: str) -> None:
    """tok/s and ms/token against TP, one line per head layout (TP=1 shared by both)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        base = [r for r in rows if r["tp"] == 1]
        for head in sorted({r["head"] for r in rows if r["tp"] > 1} or {"replicated"}):
            line = sorted(base + [r for r in rows if r["tp"] > 1 and r["head"] == head], key=lambda r: r["tp"])
            tps = [r["tp"] for r in line]
            ax[0].plot(tps, [r["output_tok_s"] for r in line], "o-", label=f"head {head}")
            ax[1].plot(tps, [r["ms_per_token"] for r in line], "o-", label=f"head {head}")
        ax[0].set(xlabel="tensor-parallel size", ylabel="output tok/s (W1-style)", xticks=[1, 2, 4])
        ax[1].set(xlabel="tensor-parallel size", ylabel="single-stream ms / token", xticks=[1, 2, 4])
        ax[0].legend()
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        print("wrote", path)
    except Exception as e:  # plotting is optional
        print("no plot:", e)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2_large", choices=sorted(MODEL_DEFAULTS))
    ap.add_argument("--tp", default="1,2,4", help="comma-separated TP sizes")
    ap.add_argument("--head", default="replicated,vocab", help="comma-separated head layouts for TP > 1")
    ap.add_argument("--model-root", default=os.path.expanduser("~/.cache/yaie_bench"))
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--append", action="store_true", help="merge rows into an existing JSON of the same model")
    ap.add_argument("--num-prompts", type=int, default=None, help="default 256 (tiny: 32)")
    ap.add_argument("--output-len", type=int, default=None, help="default 128 (tiny: 16)")
    ap.add_argument("--single-stream-tokens", type=int, default=None, help="default 256 (tiny: 32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--num-decode-steps", type=int, default=8)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--engine-warmup", action="store_true", help="also compile every bucket at engine start")
    args = ap.parse_args()
    d_prompts, d_out, d_single, d_len = MODEL_DEFAULTS[args.model]
    args.num_prompts = args.num_prompts or d_prompts
    args.output_len = args.output_len or d_out
    args.single_stream_tokens = args.single_stream_tokens or d_single
    args.max_model_len = args.max_model_len or d_len

    import jax
    path = model_dir(args.model, args.model_root)
    with open(os.path.join(path, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    prompts = w1_prompts(args.num_prompts, vocab_size)
    single_prompt = np.random.default_rng(1).integers(0, min(vocab_size, 50257), size=128).tolist()
    todo = configs([int(x) for x in args.tp.split(",")], args.head.split(","), jax.device_count())
    rows = [run_config(path, cfg, prompts, single_prompt, args) for cfg in todo]
    add_agreement(rows)

    name = f"tp_{args.model}"
    json_path = os.path.join(args.out, f"{name}.json")
    if args.append and os.path.exists(json_path):
        with open(json_path) as f:
            rows = merge_rows(json.load(f)["rows"], rows)
    bc.print_table(rows, ["tp", "head", "output_tok_s", "elapsed_s", "mean_ttft_s", "ms_per_token",
                          "single_ttft_ms", "param_mib_device0", "kv_blocks", "startup_s",
                          "first_token_agree_tp1", "first16_agree_tp1"])
    record = {"benchmark": "tensor parallel (W1-style throughput, single-stream ms/token)", "model": args.model,
              "config": vars(args), "env": bc.environment(), "rows": rows}
    print("wrote", bc.write_result(args.out, name, record))
    plot(rows, json_path.replace(".json", ".png"),
         f"{args.model}, bf16, {record['env'].get('device', '?')} x{record['env'].get('num_devices', '?')}")


if __name__ == "__main__":
    main()
