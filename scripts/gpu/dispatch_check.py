"""Where does a step program's call spend host time? (issue 10: ~12 ms per dispatch in W4/W6 on the H200)

A stand-in for the engine's step: ~200 argument leaves (150 weight matrices, 24 donated KV buffers, a few small
host inputs), and enough matmuls that one call keeps the GPU busy for several milliseconds. The call's host time
is measured with the device idle and with the previous call still running, with the small inputs passed as
numpy arrays (copied to the device inside the call) or put on the device first, with and without donation.
If the call blocks while the device is busy, the host waits for the device inside "dispatch".

    python scripts/gpu/dispatch_check.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench_common as bc  # noqa: E402

ROWS, WIDTH, LAYERS, REPEATS = 256, 768, 12, int(os.environ.get("DISPATCH_REPEATS", 12))


def step(params, kv, batch):
    x = params[0][batch["ids"] % WIDTH]                                   # [ROWS, WIDTH]
    for layer in range(LAYERS):
        for r in range(REPEATS):
            x = jnp.tanh(x @ params[1 + (layer * REPEATS + r) % (len(params) - 1)])
    new_kv = []
    for k, v in kv:                                                       # write one row per sequence
        k = k.at[0, batch["slots"] % k.shape[1], 0].set(x[:, :k.shape[-1]].astype(k.dtype), mode="drop")
        new_kv.append((k, v))
    return x.sum(axis=-1) + batch["lens"].astype(x.dtype), new_kv


def timed_calls(fn, make_args, busy: bool, n: int = 20) -> list:
    """Host seconds of `fn(*make_args())` per call; busy: the previous call is still running on the device."""
    out, kv = [], make_args.kv
    for _ in range(n):
        params, batch = make_args()
        if not busy:
            jax.block_until_ready(kv)
        t0 = time.perf_counter()
        res, kv = fn(params, kv, batch)
        out.append(time.perf_counter() - t0)
        if not busy:
            jax.block_until_ready(res)
    jax.block_until_ready(kv)
    make_args.kv = kv
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    key = jax.random.PRNGKey(0)
    params = [jax.random.normal(jax.random.fold_in(key, i), (WIDTH, WIDTH), jnp.bfloat16) * 0.03
              for i in range(150)]                                        # 150 x [WIDTH, WIDTH]
    kv = [(jnp.zeros((12, 4096, 16, 64), jnp.bfloat16), jnp.zeros((12, 4096, 16, 64), jnp.bfloat16))
          for _ in range(12)]                                             # 24 x [heads, blocks, block, head_dim]
    rng = np.random.default_rng(0)

    def host_batch():
        return {"ids": rng.integers(0, 50000, ROWS).astype(np.int32),            # [ROWS]
                "slots": rng.integers(0, 4096, ROWS).astype(np.int32),           # [ROWS]
                "lens": rng.integers(1, 700, ROWS).astype(np.int32),             # [ROWS]
                "tables": rng.integers(0, 4096, (ROWS, 64)).astype(np.int32)}    # [ROWS, 64]

    rows = []
    for donate in (True, False):
        jitted = jax.jit(step, donate_argnums=(1,) if donate else ())
        compiled = jitted.lower(params, kv, host_batch()).compile()
        for inputs in ("numpy", "device_put"):
            def make_args():
                b = host_batch()
                return params, (b if inputs == "numpy" else jax.device_put(b))
            make_args.kv = kv
            for busy in (False, True):
                for fn_name, fn in (("Compiled", compiled), ("jit", jitted)):
                    timed_calls(fn, make_args, busy, n=3)                 # warm
                    t = timed_calls(fn, make_args, busy)
                    rows.append({"donate": donate, "inputs": inputs, "device_busy": busy, "callable": fn_name,
                                 "call_ms_median": 1e3 * statistics.median(t), "call_ms_max": 1e3 * max(t)})
            kv = make_args.kv
    # the device time of one call, for scale
    b = jax.device_put(host_batch())
    fn = jax.jit(step)
    jax.block_until_ready(fn(params, kv, b))
    ts = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, kv, b))
        ts.append(time.perf_counter() - t0)
    device_ms = 1e3 * statistics.median(ts)
    bc.print_table(rows, ["donate", "inputs", "device_busy", "callable", "call_ms_median", "call_ms_max"])
    print(f"one call end to end (idle device): {device_ms:.2f} ms")
    record = {"env": bc.environment(), "call_end_to_end_ms": device_ms, "results": rows}
    print("wrote", bc.write_result(args.out, "dispatch_check", record))


if __name__ == "__main__":
    main()
