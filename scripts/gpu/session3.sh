#!/usr/bin/env bash
# W1 + W2 on yaie (Pallas Mosaic GPU kernels, fused decode, threaded AOT warm-up), HF W2 baseline; same call.
set -x
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export YAIE_COMPILE_CACHE_DIR=/tmp/yaie_xla_cache
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi -L
f() { grep -v "it/s\]\|s/it\]\|tensor/s\]\|request/s\]\|shape/s\]\|s/shape\]\|req/s\]\|s/req\]"; }
timeout 240 python3 scripts/bench_throughput.py --workload W1 --backend yaie --attention-backend ${BACKEND:-pallas} \
   --num-decode-steps 8 --max-model-len 1024 --out $OUT 2>&1 | f | tail -12
timeout 80 python3 scripts/bench_latency.py --backend yaie --attention-backend ${BACKEND:-pallas} --num-decode-steps 16 --out $OUT 2>&1 | f | tail -4
timeout 100 python3 scripts/bench_latency.py --backend hf --out $OUT 2>&1 | f | tail -6
ls $OUT
