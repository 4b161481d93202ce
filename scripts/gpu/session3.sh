#!/usr/bin/env bash
# W1 yaie (threaded AOT warm-up, fused decode) then HF W1 and W2 in the same call.
set -x
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export YAIE_COMPILE_CACHE_DIR=/tmp/yaie_xla_cache
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi -L
f() { grep -v "it/s\]\|s/it\]\|tensor/s\]\|request/s\]\|shape/s\]\|s/shape\]"; }
timeout 270 python3 scripts/bench_throughput.py --workload W1 --backend yaie --attention-backend xla \
   --num-decode-steps 8 --max-model-len 1024 --out $OUT 2>&1 | f | tail -12
timeout 60 python3 scripts/bench_latency.py --backend yaie --attention-backend xla --num-decode-steps 16 --out $OUT 2>&1 | f | tail -4
timeout 150 python3 scripts/bench_throughput.py --workload W1 --backend hf --out $OUT 2>&1 | f | tail -6
timeout 100 python3 scripts/bench_latency.py --backend hf --out $OUT 2>&1 | f | tail -6
ls $OUT
