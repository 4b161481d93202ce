#!/usr/bin/env bash
# One device call: W1 (yaie + HF) and W2 (yaie + HF) on one GPU. Logs and JSON under $OUT.
set -x
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi -L; python3 -c "import jax; print(jax.__version__, jax.devices())"
timeout 200 python3 scripts/bench_throughput.py --workload W1 --backend yaie --attention-backend xla \
   --no-warmup --max-model-len 1024 --out $OUT 2>&1 | grep -v "it/s\]" | tail -25
timeout 120 python3 scripts/bench_latency.py --backend yaie --attention-backend xla --no-warmup --out $OUT 2>&1 | tail -8
timeout 150 python3 scripts/bench_throughput.py --workload W1 --backend hf --out $OUT 2>&1 | grep -v "it/s\]" | tail -15
timeout 100 python3 scripts/bench_latency.py --backend hf --out $OUT 2>&1 | tail -8
ls $OUT
