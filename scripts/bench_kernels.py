"""Benchmark the Pallas paged-attention kernels against the XLA reference path on the current device.

Prints a table and writes JSON (device, JAX version, date, measured copy bandwidth, every row) to --out.
Decode: batch {1, 8, 64, 256} x context {128, 1024, 4096}; prefill: {512, 4096} new tokens; with --cascade,
decode where groups of rows share a prefix (cascade kernel vs plain paged decode, the table's "xla_us" column). Times are medians
of device-synchronized repeats of a jitted loop that calls the op `--reps` times back to back (each call's q
depends on the previous output through a 0-weighted term, so nothing is hoisted and launch gaps stay small),
divided by reps. GB/s counts the bytes a call must move: the K/V of every context token read once, q read and
the output written once. The copy bandwidth is a large device-to-device copy (bytes read + written).

    python scripts/bench_kernels.py --out bench/results
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import pallas_kernels as pk  # noqa: E402
from pallas_kernels import reference as ref  # noqa: E402


def timed_loop(fn, args, reps, repeats, vary=0):
    """Median/min/max seconds per call of fn(*args): one jitted program runs `reps` calls back to back (Python-
    unrolled: no device while-loop, whose per-iteration predicate sync would dominate small calls); each call's
    arg `vary` gets a 0-weighted term of the previous output, so XLA can neither hoist nor merge the calls."""
    def chain(*a):
        carry = jnp.float32(0)
        for _ in range(reps):
            a2 = list(a)
            a2[vary] = a[vary] + (carry * 0).astype(a[vary].dtype)
            out = fn(*a2)
            carry = out.reshape(-1)[0].astype(jnp.float32)
        return carry
    f = jax.jit(chain)
    jax.block_until_ready(f(*args))                      # compile + warm up
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append((time.perf_counter() - t0) / reps)
    return statistics.median(ts), min(ts), max(ts)


def _time_async(f, x, calls=5, repeats=7):
    jax.block_until_ready(f(x))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            y = f(x)
        jax.block_until_ready(y)
        ts.append((time.perf_counter() - t0) / calls)
    return statistics.median(ts)


def memory_bandwidths(nbytes=2 << 30):
    """Device-memory ceilings: copy-like elementwise kernels (bytes read + written) and a read-only reduction."""
    if jax.default_backend() == "cpu":
        nbytes = 64 << 20
    res = {}
    x32 = jax.random.normal(jax.random.key(1), (nbytes // 4,), jnp.float32)
    res["copy_f32_add"] = 2 * nbytes / _time_async(jax.jit(lambda a: a + 1.0), x32)
    x16 = x32.astype(jnp.bfloat16)
    res["copy_bf16_scale"] = 2 * x16.nbytes / _time_async(jax.jit(lambda a: a * 2), x16)
    res["read_bf16_sum"] = x16.nbytes / _time_async(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), x16)
    del x32, x16
    return res


def make_pool(key, num_kv_heads, num_blocks, block_size, head_dim, dtype):
    kk, kv = jax.random.split(key)
    shape = (num_kv_heads, num_blocks, block_size, head_dim)
    return (jax.random.normal(kk, shape, jnp.float32).astype(dtype),
            jax.random.normal(kv, shape, jnp.float32).astype(dtype))


def plot(json_path, png_path):
    """Decode GB/s vs batch (one line per context) for the kernel and the XLA path, with the copy ceiling."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(json_path) as fh:
        d = json.load(fh)
    rows = [r for r in d["rows"] if r.get("kind") == "decode" and "error" not in r
            and "stages" not in r and "num_splits" not in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, ctx in enumerate(sorted({r["context"] for r in rows})):
        rs = sorted((r for r in rows if r["context"] == ctx), key=lambda r: r["batch"])
        color = f"C{i}"
        ax.plot([r["batch"] for r in rs], [r["gbps"] for r in rs], "o-", color=color, label=f"Pallas ctx={ctx}")
        ax.plot([r["batch"] for r in rs if "ref_time_us" in r],
                [r["bytes"] / r["ref_time_us"] / 1e3 for r in rs if "ref_time_us" in r], "x--", color=color,
                label=f"XLA ctx={ctx}")
    ax.axhline(d["copy_bandwidth_gbps"], color="k", lw=0.8, ls=":", label="measured copy bandwidth")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("GB/s (K/V + q + out bytes / time)")
    r0 = rows[0] if rows else {}
    ax.set_title(f"paged decode, {d['device']}, jax {d['jax_version']}\n"
                 f"Hq={r0.get('num_q_heads')} Hkv={r0.get('num_kv_heads')} D={r0.get('head_dim')} "
                 f"block={r0.get('block_size')} bf16", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--plot":
        return plot(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new rows after this long")
    ap.add_argument("--num-q-heads", type=int, default=32)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--no-ref", action="store_true", help="skip the XLA reference timings")
    ap.add_argument("--tune", action="store_true", help="also sweep stages / splits at a few decode shapes")
    ap.add_argument("--cascade", action="store_true",
                    help="also time cascade decode (shared prefixes) against plain paged decode")
    ap.add_argument("--cascade-only", action="store_true", help="only the cascade rows")
    ap.add_argument("--tag", default="", help="suffix for the JSON file name")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (checks the script on CPU)")
    args = ap.parse_args()
    t_start = time.time()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}", flush=True)
    bws = memory_bandwidths()
    bw = max(v for k, v in bws.items() if k.startswith("copy"))
    print("measured bandwidths (GB/s): " + ", ".join(f"{k}={v / 1e9:.0f}" for k, v in bws.items()) +
          f"; copy bandwidth used below = {bw / 1e9:.0f} GB/s (read + write)", flush=True)

    Hq, Hkv, D, BS = args.num_q_heads, args.num_kv_heads, args.head_dim, args.block_size
    dt = jnp.bfloat16
    isz = 2
    batches, ctxs = [1, 8, 64, 256], [128, 1024, 4096]
    interpret = False
    if args.smoke:
        batches, ctxs, interpret = [1, 2], [64, 128], True
        Hq, Hkv, D = 4, 2, 64
    max_tokens = max(batches) * max(ctxs)
    NB = max(max_tokens, 256 * 1280) // BS + 8       # room for the cascade rows too
    key = jax.random.key(0)
    k_pages, v_pages = make_pool(key, Hkv, NB, BS, D, dt)
    rng = np.random.default_rng(0)
    rows = []

    def over_budget():
        return time.time() - t_start > args.budget_s

    def decode_row(S, ctx, **kw):
        MB = ctx // BS
        bt = jnp.asarray(rng.permutation(NB)[:S * MB].reshape(S, MB).astype(np.int32))
        cl = jnp.full((S,), ctx, jnp.int32)
        q = jax.random.normal(jax.random.fold_in(key, S * 7 + ctx), (S, Hq, D), jnp.float32).astype(dt)
        nbytes = S * ctx * Hkv * D * isz * 2 + 2 * S * Hq * D * isz
        f = functools.partial(pk.paged_attention, interpret=interpret, **kw)
        t, tmin, tmax = timed_loop(lambda q_, k_, v_: f(q_, k_, v_, bt, cl), (q, k_pages, v_pages),
                                   args.reps, args.repeats)
        row = dict(kind="decode", batch=S, context=ctx, num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                   block_size=BS, dtype="bfloat16", time_us=t * 1e6, time_min_us=tmin * 1e6,
                   time_max_us=tmax * 1e6, bytes=nbytes, gbps=nbytes / t / 1e9, frac_copy_bw=nbytes / t / bw,
                   **{k: v for k, v in kw.items()})
        if not args.no_ref and not kw:
            try:
                tr, _, _ = timed_loop(lambda q_, k_, v_: ref.paged_attention(q_, k_, v_, bt, cl),
                                      (q, k_pages, v_pages), max(2, args.reps // 2), 3)
                row.update(ref_time_us=tr * 1e6, speedup=tr / t)
            except Exception as e:  # noqa: BLE001 (e.g. out of memory for the XLA gather)
                row.update(ref_error=f"{type(e).__name__}: {str(e)[:200]}")
        return row

    def prefill_row(T, n_seqs=1, prefix=0):
        per = T // n_seqs
        ctx = per + prefix
        MB = -(-ctx // BS)
        bt = jnp.asarray(rng.permutation(NB)[:n_seqs * MB].reshape(n_seqs, MB).astype(np.int32))
        cl = jnp.full((n_seqs,), ctx, jnp.int32)
        qs = jnp.arange(n_seqs + 1, dtype=jnp.int32) * per
        q = jax.random.normal(jax.random.fold_in(key, T), (T, Hq, D), jnp.float32).astype(dt)
        # causal FLOPs: each query attends (its position + 1) keys; 2 matmuls, 2 FLOPs per MAC
        keys = sum(prefix + i + 1 for i in range(per)) * n_seqs
        flops = 4 * Hq * D * keys
        nbytes = n_seqs * ctx * Hkv * D * isz * 2 + 2 * T * Hq * D * isz
        f = functools.partial(pk.ragged_prefill_attention, interpret=interpret)
        t, tmin, tmax = timed_loop(lambda q_, k_, v_: f(q_, k_, v_, qs, cl, bt), (q, k_pages, v_pages),
                                   max(2, args.reps // 2), args.repeats)
        row = dict(kind="prefill", tokens=T, seqs=n_seqs, prefix=prefix, num_q_heads=Hq, num_kv_heads=Hkv,
                   head_dim=D, block_size=BS, dtype="bfloat16", time_us=t * 1e6, time_min_us=tmin * 1e6,
                   time_max_us=tmax * 1e6, tflops=flops / t / 1e12, bytes=nbytes, gbps=nbytes / t / 1e9,
                   frac_copy_bw=nbytes / t / bw)
        if not args.no_ref:
            try:
                tr, _, _ = timed_loop(lambda q_, k_, v_: ref.ragged_prefill_attention(q_, k_, v_, qs, cl, bt),
                                      (q, k_pages, v_pages), 2, 3)
                row.update(ref_time_us=tr * 1e6, speedup=tr / t)
            except Exception as e:  # noqa: BLE001
                row.update(ref_error=f"{type(e).__name__}: {str(e)[:200]}")
        return row

    def cascade_row(S, groups, prefix, own_max):
        """Decode where `groups` equal groups of the S rows share a `prefix`-token page run (issue 10's W4 shape),
        each row with 1..own_max tokens of its own: the cascade kernel vs plain paged decode on the same tables."""
        from pallas_kernels.testing import share_leading_pages
        from yaie_jax.executor.cascade import engine_plan
        own = rng.integers(1, own_max + 1, size=S)
        cl_np = (prefix + own).astype(np.int32)
        MB = -(-int(cl_np.max()) // BS)
        bt_np = rng.permutation(NB)[:S * MB].reshape(S, MB).astype(np.int32)
        share_leading_pages(bt_np, [(prefix // BS, S // groups)] * groups)
        plan = engine_plan(bt_np, cl_np, block_size=BS, group=Hq // Hkv)       # the engine's cascade policy
        plan = {k: jnp.asarray(v) for k, v in plan.items()}
        bt, cl = jnp.asarray(bt_np), jnp.asarray(cl_np)
        q = jax.random.normal(jax.random.fold_in(key, S + prefix), (S, Hq, D), jnp.float32).astype(dt)
        fc = functools.partial(pk.cascade_paged_attention, interpret=interpret)
        fp = functools.partial(pk.paged_attention, interpret=interpret)
        err = float(jnp.linalg.norm((fc(q, k_pages, v_pages, bt, cl, plan) - fp(q, k_pages, v_pages, bt, cl))
                                    .astype(jnp.float32)) / jnp.linalg.norm(fp(q, k_pages, v_pages, bt, cl)
                                                                            .astype(jnp.float32)))
        t, tmin, tmax = timed_loop(lambda q_, k_, v_: fc(q_, k_, v_, bt, cl, plan), (q, k_pages, v_pages),
                                   args.reps, args.repeats)
        tp, _, _ = timed_loop(lambda q_, k_, v_: fp(q_, k_, v_, bt, cl), (q, k_pages, v_pages),
                              args.reps, args.repeats)
        nbytes = int(cl_np.sum()) * Hkv * D * isz * 2 + 2 * S * Hq * D * isz     # what plain decode must read
        return dict(kind="cascade", batch=S, groups=groups, prefix=prefix, own_max=own_max, num_q_heads=Hq,
                    num_kv_heads=Hkv, head_dim=D, block_size=BS, dtype="bfloat16", time_us=t * 1e6,
                    time_min_us=tmin * 1e6, time_max_us=tmax * 1e6, plain_time_us=tp * 1e6, speedup=tp / t,
                    rel_err_vs_plain=err, bytes=nbytes, gbps=nbytes / t / 1e9, frac_copy_bw=nbytes / t / bw)

    plan = [("decode", dict(S=S, ctx=c)) for S in batches for c in ctxs]
    if args.cascade_only:
        plan = []
    if args.cascade or args.cascade_only:
        plan += [("cascade", dict(S=256, groups=8, prefix=512, own_max=192)),
                 ("cascade", dict(S=64, groups=2, prefix=1024, own_max=256))]
    if not args.cascade_only:
        plan += [("prefill", dict(T=512)), ("prefill", dict(T=4096)), ("prefill", dict(T=4096, n_seqs=8)),
                 ("prefill", dict(T=512, prefix=3584))]
    if args.smoke:
        plan = [p for p in plan if p[0] == "decode"] + ([] if args.cascade_only else [
            ("prefill", dict(T=64)), ("prefill", dict(T=32, n_seqs=2, prefix=16))])
        if args.cascade or args.cascade_only:
            plan.append(("cascade", dict(S=16, groups=2, prefix=64, own_max=32)))
    if args.tune:
        for S, c in [(64, 1024), (256, 1024), (8, 4096), (64, 4096)]:
            for st in (2, 3, 4):
                plan.append(("decode", dict(S=S, ctx=c, stages=st)))
        for S, c, sp in [(8, 4096, 4), (8, 4096, 8), (8, 4096, 16), (1, 4096, 8), (1, 4096, 32), (64, 1024, 2),
                         (8, 1024, 4), (8, 1024, 8)]:
            plan.append(("decode", dict(S=S, ctx=c, num_splits=sp)))
    for kind, kw in plan:
        if over_budget():
            print(f"budget reached, skipping {kind} {kw}", flush=True)
            continue
        try:
            row = {"decode": decode_row, "prefill": prefill_row, "cascade": cascade_row}[kind](**kw)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row = dict(kind=kind, error=f"{type(e).__name__}: {str(e)[:2000]}", **kw)
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    print()
    print(f"{dev.device_kind}, jax {jax.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s; Hq={Hq} Hkv={Hkv} "
          f"D={D} block={BS} bf16")
    print(f"{'kind':8s} {'shape':28s} {'time_us':>9s} {'GB/s':>7s} {'%copy':>6s} {'TFLOP/s':>8s} "
          f"{'xla_us':>9s} {'speedup':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['kind']:8s} ERROR {r['error'][:100]}")
            continue
        if r["kind"] == "cascade":
            shape = f"b={r['batch']} {r['groups']}x{r['prefix']}+<={r['own_max']}"
            r = dict(r, ref_time_us=r["plain_time_us"])           # the "xla_us" column: plain Pallas decode here
        elif r["kind"] == "decode":
            extra = "".join(f" {k}={r[k]}" for k in ("stages", "num_splits") if k in r)
            shape = f"b={r['batch']} ctx={r['context']}{extra}"
        else:
            shape = f"T={r['tokens']} seqs={r['seqs']} prefix={r['prefix']}"
        print(f"{r['kind']:8s} {shape:28s} {r['time_us']:9.1f} {r['gbps']:7.0f} {100 * r['frac_copy_bw']:5.0f}% "
              f"{r.get('tflops', float('nan')):8.1f} {r.get('ref_time_us', float('nan')):9.1f} "
              f"{r.get('speedup', float('nan')):7.2f}")

    os.makedirs(args.out, exist_ok=True)
    name = "kernels_" + dev.device_kind.replace(" ", "_").replace("/", "_") + (f"_{args.tag}" if args.tag else "") \
        + ".json"
    with open(os.path.join(args.out, name), "w") as fh:
        json.dump(dict(device=dev.device_kind, platform=dev.platform, jax_version=jax.__version__,
                       date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       copy_bandwidth_gbps=bw / 1e9, bandwidths_gbps={k: v / 1e9 for k, v in bws.items()},
                       timing="median of repeats of a jitted chain of reps calls, per call", reps=args.reps, repeats=args.repeats, rows=rows), fh, indent=1)
    print(f"wrote {os.path.join(args.out, name)}; {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
