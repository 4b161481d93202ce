"""The engine's error against an fp32 reference, per path (prefill, decode, chunked prefill, prefix-cache hit), next
to HF transformers' own error in the same dtype on the same inputs (scripts/quality_common.py says how).

    python scripts/bench_numerics.py --dtype bfloat16 --backend xla  --out bench/results
    python scripts/bench_numerics.py --dtype bfloat16 --backend pallas --prompts 2   # Mosaic GPU on a GPU,
                                                                                     # interpret mode on a CPU (slow)

Model: the embedded SmolLM2-135M-Instruct GGUF (or --model FILE.gguf). HF runs on the CPU (--hf-device cuda to use
the GPU; fp32 matmuls there stay fp32: TF32 is off in torch by default). Prints a table, writes
numerics_<dtype>_<backend>_<platform>.json with the device, JAX version and date. Needs the `gguf` package for HF.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality_common as qc  # noqa: E402


def measure(model_path: str, dtype: str, backend: str, num_prompts: int, max_tokens: int, batched_tokens: int,
            hf_device: str = "cpu", hf_base=None, llm=None, hf16_device: Optional[str] = None) -> dict:
    """Run the engine's paths and compare them with HF (fp32 and `dtype`); returns the JSON-able result (with the
    batched greedy run's token ids under "answers")."""
    from yaie_jax import LLM
    tok = qc.hf_tokenizer(model_path)
    prompts = [qc.chat_ids(tok, p) for p in qc.PROMPTS[:num_prompts]]
    text_ids = tok(qc.load_text(), add_special_tokens=False).input_ids
    t0 = time.perf_counter()
    if llm is None:
        llm = LLM(model_path, **qc.engine_args(dtype, backend))
    records = qc.run_paths(llm, prompts, text_ids, max_tokens=max_tokens)
    answers = []
    if batched_tokens:
        answers = qc.run_greedy(llm, [qc.chat_ids(tok, p) for p in qc.PROMPTS], batched_tokens, records)
    engine_s = time.perf_counter() - t0
    hf32 = hf_base if hf_base is not None else qc.hf_model(model_path, "float32", device=hf_device)
    models = {"float32": hf32}
    if dtype != "float32":
        models[dtype] = qc.hf_model(model_path, dtype, base=hf32, device=hf16_device or qc.accelerator_device())
    refs = qc.References(models)
    stats = qc.compare(records, refs, dtype if dtype != "float32" else None)
    ppl = qc.perplexity_of(records, refs, list(models))
    return {"env": qc.environment(), "model": os.path.basename(model_path), "dtype": dtype,
            "backend": llm.engine.runner.attention_backend, "prompts": num_prompts, "max_tokens": max_tokens,
            "batched_greedy_tokens": batched_tokens, "engine_s": engine_s, "paths": stats, "perplexity": ppl,
            "answers": answers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--backend", default="xla", choices=["xla", "pallas"])
    ap.add_argument("--model", default=None, help="a .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--prompts", type=int, default=None, help="chat prompts measured alone (default 8; pallas 2)")
    ap.add_argument("--max-tokens", type=int, default=4, help="greedy tokens per measured prompt")
    ap.add_argument("--batched-tokens", type=int, default=None,
                    help="also a batched greedy run of every prompt for this many tokens (decode path; default "
                         "24 with xla, 0 with pallas)")
    ap.add_argument("--hf-device", default="cpu")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args(argv)
    if args.model is None:
        from yaie_jax.models.default_model import default_model_path
        args.model = str(default_model_path())
    n = args.prompts if args.prompts is not None else (8 if args.backend == "xla" else 2)
    batched = args.batched_tokens if args.batched_tokens is not None else (24 if args.backend == "xla" else 0)
    res = measure(args.model, args.dtype, args.backend, n, args.max_tokens, batched, args.hf_device)
    env = res["env"]
    print(f"{res['model']} {args.dtype} backend={res['backend']} on {env['device']} (jax {env['jax']}), "
          f"engine runs {res['engine_s']:.1f} s")
    print("max/mean: |logprob - HF fp32| over each position's top-20 tokens; top1: argmax equals HF fp32's")
    print(qc.format_table(res["paths"]))
    res["failures"] = qc.path_failures(res["paths"], args.dtype)
    print("within the quality suite's marks" if not res["failures"]
          else "outside the marks: " + "; ".join(res["failures"]))
    res.pop("answers")
    print("perplexity of the text (chunked prefill):", {k: round(v, 4) for k, v in res["perplexity"].items()})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"numerics_{args.dtype}_{res['backend']}_{env['platform']}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
