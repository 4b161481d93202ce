"""Weight quantization on a Llama-3.1-8B-shaped model (random bf16 weights): bf16 vs int8 vs int4 vs fp8 in one run.

    python scripts/bench_quant.py --out $OUT                 # H200: fits one 10-minute call (see --modes)
    python scripts/bench_quant.py --tiny --out /tmp/bq       # CPU: a tiny shape, checks that the script runs

Per mode: (a) single stream: one 128-token prompt, 128 greedy tokens, batch 1, ms per output token after the first
(median of --repeats runs after an untimed one); (b) W8: 1,024 requests of 128 random tokens in, 128 out (EOS
ignored), output tok/s of a timed pass after an untimed one; (c) matmul micro-benchmark: each 8B projection shape
at M=1 and M=256 rows, time per matmul and the weight bytes it reads per second, so the table says whether XLA's
fused dequantize-matmul keeps up with the bytes (weight-only modes at M=1 should approach bf16's GB/s at 1/2 or
1/4 of its time; where they do not, a Pallas kernel is the next step).

The bf16 weights are drawn on the device once (normal(0, 0.02); norms 1) and every mode quantizes that one set on
the device (yaie_jax.quantization), so no 8B fp32 model is ever built on the host; each mode's quantized params,
engine and compiled programs are freed before the next. The engine gets the in-memory model through the loader
(`yaie_jax.models.loader.load_model` replaced), runs without a tokenizer (token-id prompts) and a fixed KV pool
(--num-gpu-blocks) so every mode has the same pool. Prints a table; writes JSON (card, JAX version, date).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import bench_common as bc  # noqa: E402

MODES = ("bf16", "int8", "int4", "fp8")


def model_config(tiny: bool):
    from yaie_jax.models.config import ModelConfig
    if tiny:
        return ModelConfig(arch="llama", vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=64, intermediate_size=512, max_position_embeddings=1024, norm_eps=1e-5,
                           tie_word_embeddings=False, activation="silu", rope_theta=500000.0)
    return ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,   # Llama-3.1-8B
                       num_kv_heads=8, head_dim=128, intermediate_size=14336, max_position_embeddings=131072,
                       norm_eps=1e-5, tie_word_embeddings=False, activation="silu", rope_theta=500000.0)


def random_params(model, seed: int = 0):
    """bf16 params of `model`'s shapes on the default device: normal(0, 0.02), norm scales 1."""
    import jax
    import jax.numpy as jnp
    normal = jax.jit(lambda key, shape: (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(jnp.bfloat16),
                     static_argnums=1)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 4096))

    def one(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        return jnp.ones(s.shape, jnp.bfloat16) if name == "scale" else normal(next(keys), tuple(s.shape))
    return jax.tree_util.tree_map_with_path(one, model.param_shapes())


def weight_bytes(params) -> int:
    import jax
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize // (2 if str(a.dtype) == "int4" else 1)
               for a in jax.tree.leaves(params))


def make_llm(model, args):
    """An LLM serving the in-memory `model` (loader replaced while the engine loads)."""
    from yaie_jax import LLM
    from yaie_jax.models import loader
    saved = loader.load_model
    loader.load_model = lambda *a, **k: model
    try:
        return LLM("bench-quant-random-llama", skip_tokenizer_init=True, dtype="bfloat16",
                   num_gpu_blocks=args.num_gpu_blocks, max_model_len=args.in_len + args.out_len + 16,
                   warmup=not args.no_warmup, compile_cache_dir=None)
    finally:
        loader.load_model = saved


def run_engine(model, args, rng) -> dict:
    from yaie_jax import SamplingParams
    t0 = time.perf_counter()
    llm = make_llm(model, args)
    llm.engine.wait_for_warmup()
    row = {"startup_s": time.perf_counter() - t0}
    V = model.config.vocab_size
    prompt = rng.integers(0, V, args.in_len).tolist()
    single = SamplingParams(temperature=0.0, max_tokens=args.single_tokens, ignore_eos=True)
    runs = bc.single_stream_runs(llm.engine, prompt, single, args.repeats)
    row["single_ms_per_token"] = statistics.median(r["ms_per_token"] for r in runs)
    row["single_ms_per_token_all"] = [r["ms_per_token"] for r in runs]
    prompts = [rng.integers(0, V, args.in_len).tolist() for _ in range(args.requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.out_len, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)                      # untimed: compiles what W8 meets
    llm.engine.block_manager.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    row["w8_output_tokens"] = sum(len(o.outputs[0].token_ids) for o in outs)
    row["w8_elapsed_s"] = elapsed
    row["w8_tok_s"] = row["w8_output_tokens"] / elapsed
    row["max_num_seqs"] = llm.engine.config.max_num_seqs
    del llm, outs
    return row


def matmul_bench(mode: str, cfg, rows: int, reps: int = 8, group: int = 128) -> list:
    """[{shape, rows, us, weight_GBps}] for each projection shape: a scan over `reps` distinct weights (more
    bytes than the L2 holds), timed after a compile, median of 5."""
    import jax
    import jax.numpy as jnp
    from yaie_jax.quantization import quantize_kernel, quantized_matmul
    D, F, KV = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.head_dim
    out = []
    for n_in, n_out in ((D, D), (D, KV), (D, F), (F, D)):
        key = jax.random.PRNGKey(n_in * 7 + n_out)
        w = (0.02 * jax.random.normal(key, (reps, n_in, n_out), jnp.float32)).astype(jnp.bfloat16)
        leaves = ({"kernel": w} if mode == "bf16" else
                  jax.tree.map(lambda *a: jnp.stack(a), *[quantize_kernel(w[i], mode, group) for i in range(reps)]))
        x = jax.random.normal(key, (rows, n_in), jnp.bfloat16)

        def body(acc, lv):
            y = jnp.dot(x, lv["kernel"]) if mode == "bf16" else quantized_matmul(x, lv)
            return acc + y.astype(jnp.float32), None
        fn = jax.jit(lambda lv: jax.lax.scan(body, jnp.zeros((rows, n_out), jnp.float32), lv)[0])
        fn(leaves).block_until_ready()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn(leaves).block_until_ready()
            times.append((time.perf_counter() - t0) / reps)
        t = statistics.median(times)
        nbytes = weight_bytes(leaves) / reps
        out.append({"mode": mode, "shape": f"{n_in}x{n_out}", "rows": rows, "us": t * 1e6,
                    "weight_GBps": nbytes / t / 1e9})
        del w, leaves
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--tiny", action="store_true", help="a tiny Llama shape and workload (CPU check)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--requests", type=int, default=None, help="W8 requests (default 1024; --tiny: 16)")
    p.add_argument("--in-len", type=int, default=128)
    p.add_argument("--out-len", type=int, default=None, help="W8 output tokens (default 128; --tiny: 8)")
    p.add_argument("--single-tokens", type=int, default=None, help="single-stream tokens (128; --tiny: 8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--num-gpu-blocks", type=int, default=None, help="KV pool (default: W8's 1024 x 272 tokens)")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--skip-engine", action="store_true", help="only the matmul micro-benchmark")
    p.add_argument("--skip-matmul", action="store_true")
    a = p.parse_args(argv)
    a.requests = a.requests or (16 if a.tiny else 1024)
    a.out_len = a.out_len or (8 if a.tiny else 128)
    a.single_tokens = a.single_tokens or (8 if a.tiny else 128)
    if a.tiny:
        a.in_len = min(a.in_len, 32)
    a.num_gpu_blocks = a.num_gpu_blocks or (a.requests * (a.in_len + a.out_len + 16)) // 16 + 64
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.modes if m not in MODES]
    if bad or not a.modes:
        p.error(f"unknown mode(s) {bad} (choose from {', '.join(MODES)})")
    return a


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax
    from yaie_jax.models.llama import LlamaForCausalLM
    from yaie_jax.quantization import quantize_params
    cfg = model_config(args.tiny)
    t0 = time.perf_counter()
    base = random_params(LlamaForCausalLM(cfg))
    jax.block_until_ready(base)
    print(f"random bf16 weights: {weight_bytes(base) / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
    rng = np.random.default_rng(0)
    rows, matmuls = [], []
    for mode in args.modes:
        t0 = time.perf_counter()
        params = base if mode == "bf16" else quantize_params(base, mode, args.group_size)
        jax.block_until_ready(params)
        row = {"mode": mode, "weight_GB": weight_bytes(params) / 1e9, "quantize_s": time.perf_counter() - t0}
        if not args.skip_engine:
            row.update(run_engine(LlamaForCausalLM(cfg, params), args, rng))
        del params
        gc.collect()
        jax.clear_caches()
        if not args.skip_matmul:
            for m_rows in (1, 256):
                matmuls += matmul_bench(mode, cfg, m_rows, reps=2 if args.tiny else 8, group=args.group_size)
            gc.collect()
        rows.append(row)
        print(row, flush=True)
        path = write_record(args, rows, matmuls)            # after every mode: a run cut short keeps what it did
    print()
    bc.print_table(rows, ["mode", "weight_GB", "single_ms_per_token", "single_vs_bf16", "w8_tok_s", "w8_vs_bf16",
                          "startup_s"])
    if matmuls:
        print()
        bc.print_table(matmuls, ["mode", "shape", "rows", "us", "weight_GBps"])
    print("wrote", path)


def write_record(args, rows, matmuls) -> str:
    """Ratios to the bf16 row (when there is one) added to `rows`; the JSON record written to --out."""
    ref = next((r for r in rows if r["mode"] == "bf16"), None)
    for r in rows:
        if ref is not None and "single_ms_per_token" in r and "single_ms_per_token" in ref:
            r["single_vs_bf16"] = r["single_ms_per_token"] / ref["single_ms_per_token"]
            r["w8_vs_bf16"] = r["w8_tok_s"] / ref["w8_tok_s"]
    record = {"env": bc.environment(), "config": dict(vars(args)),
              "model": "tiny Llama" if args.tiny else "Llama-3.1-8B shape, random bf16 weights",
              "rows": rows, "matmul": matmuls}
    name = "quant_tiny" if args.tiny else f"quant_llama8b_{record['env'].get('device', 'unknown').replace(' ', '_')}"
    return bc.write_result(args.out, name, record)


if __name__ == "__main__":
    main()
