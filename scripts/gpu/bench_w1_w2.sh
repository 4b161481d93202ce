#!/usr/bin/env bash
# One device call (produced the committed H100 W1/W2 numbers): W1 and W2 on yaie with lazy compilation (a full untimed pass first), Pallas kernels.
set -x
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export YAIE_COMPILE_CACHE_DIR=/tmp/yaie_xla_cache
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi -L
timeout 300 python3 scripts/bench_throughput.py --workload W1 --backend yaie --attention-backend ${BACKEND:-pallas} \
   --num-decode-steps 8 --max-model-len 1024 --no-warmup --out $OUT > $OUT/w1.log 2>&1
grep -a "warm-up\|backend\|yaie\|Error\|error" $OUT/w1.log | tail -8
timeout 120 python3 scripts/bench_latency.py --backend yaie --attention-backend ${BACKEND:-pallas} --num-decode-steps 16 \
   --no-warmup --out $OUT > $OUT/w2.log 2>&1
grep -a "start-up\|backend\|yaie\|Error\|error" $OUT/w2.log | tail -6
ls $OUT
