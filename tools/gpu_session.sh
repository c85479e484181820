#!/usr/bin/env bash
# One device-machine session (NVIDIA H100/H200 through MLX's CUDA backend).
#   bash tools/gpu_session.sh STEP...   steps: unroll, tests, bench, models, linear, ncu, lce, percall, merge, trainmem, zero,
#   breakdown, decodestep, decodewrapper
# (env: TESTS, TESTS_K for pytest; ZERO_RUNS, ZERO_SPEC, ZERO_JSON (a folder) for zero; BENCH_ARGS, BENCH_NAME for benchmarks/ops.py; MODELS for bench --model)
# Expects .device/mlx-cuda (python3 ../shared/tools/mlx_cuda_bundle.py) and $OUT; mlx-lm (a copy of its
# package folder) in .device/py for the mlx-lm tests and `bench --model mlx-lm:...` SPECs.
# NOPRIORS=0 skips the models step's second run without the shipped priors.
# MLX's JIT cache travels in .device/ptx (saved back to $OUT/ptx.tgz) so later
# sessions skip the kernel compiles.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -n "${SKIP_INSTALL:-}" ] || bash .device/mlx-cuda/install.sh >/dev/null || exit 1  # SKIP_INSTALL=1: done already
export PYTHONPATH=$PWD:$PWD/.device/py PYTHONUNBUFFERED=1 MLX_PTX_CACHE_DIR=$PWD/.device/ptx MLX_FUSION_CACHE=/tmp/mfc
mkdir -p .device/ptx
[ -f .device/ptx.tgz ] && tar xzf .device/ptx.tgz -C .device  # a saved $OUT/ptx.tgz, carried compressed
LLAMA2=mlx-lm:llama:hidden_size=2048,num_hidden_layers=8,intermediate_size=5632,num_attention_heads=16,num_key_value_heads=8,vocab_size=32000,dtype=bfloat16
LLAMA3=${LLAMA2/vocab_size=32000/vocab_size=128256}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for step in "$@"; do
  case $step in
    unroll) python3 tools/gpu_unroll.py 2>&1 | tee "$OUT/unroll.txt" ;;
    tests) timeout -s INT ${TEST_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider --tb=line -rf ${TESTS:-tests/test_ops.py} \
             ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15 ;;
    bench) python3 benchmarks/ops.py --json "$OUT/${BENCH_NAME:-bench_gpu}.json" ${BENCH_ARGS:-} 2>/dev/null | tee "$OUT/${BENCH_NAME:-bench_gpu}.txt" ;;
    models) for spec in ${MODELS:-mlp:width=4096,depth=6,batch=8192,dtype=bfloat16}; do
              COLUMNS=200 python3 -m mlx_fusion bench --model "$spec" --json "$OUT/model-${spec%%:*}.json" 2>&1 \
                | tee -a "$OUT/models.txt"
              [ "${NOPRIORS:-1}" = 0 ] || MLX_FUSION_NO_PRIORS=1 COLUMNS=200 python3 -m mlx_fusion bench --model "$spec" \
                --json "$OUT/model-${spec%%:*}-nopriors.json" 2>&1 | tee -a "$OUT/models.txt"; done ;;
    linear) python3 tools/gpu_linear_probe.py ${PROBE_PARTS:-} 2>&1 | tee "$OUT/linear_probe.txt" ;;
    ncu) for v in compile small_m; do for m in 1 32; do
           echo "=== $v M=$m N=4096" >> "$OUT/ncu.txt"
           PROBE_VARIANT=$v PROBE_M=$m ncu --clock-control none --print-summary per-kernel \
             --metrics gpu__time_duration.sum python3 tools/gpu_linear_probe.py ncu_target >> "$OUT/ncu.txt" 2>&1
         done; done; grep -E "===|Kernel|kernel|gpu__time_duration" "$OUT/ncu.txt" | head -60 ;;
    lce) timeout 90 python3 tools/lce_gpu_probe.py > "$OUT/lce_probe.txt" 2>&1; tail -3 "$OUT/lce_probe.txt"
         timeout 90 python3 tools/lce_bench.py --tokens 4096 --dim 2048 --vocab 128256 --dtype bfloat16 --repeats 5 \
           2>&1 | tee "$OUT/lce_bench.txt" ;;
    percall) [ -d .device/before ] && PYTHONPATH=$PWD/.device/before timeout 100 python3 tools/percall_profile.py ${PERCALL_ARGS:---quick} \
               --json "$OUT/percall-before.json" > "$OUT/percall-before.txt" 2>&1
             timeout 100 python3 tools/percall_profile.py ${PERCALL_ARGS:---quick} --json "$OUT/percall.json" > "$OUT/percall.txt" 2>&1
             tail -20 "$OUT/percall.txt" ;;
    merge) timeout 90 python3 tools/merge_decode_probe.py --json "$OUT/merge_decode.json" 2>&1 | tee "$OUT/merge_decode.txt" ;;
    trainmem) for spec in ${TRAIN_SPECS:-"$LLAMA3,batch=4,seq=1025" "$LLAMA2,batch=4,seq=513"}; do
                timeout ${TRAIN_TIMEOUT:-200} python3 tools/gpu_train_memory.py "$spec" ${TRAIN_VARIANTS:-mx.compile,fused+compile,fused-model+compile} \
                  2>&1 | tee -a "$OUT/trainmem.txt"; done ;;
    zero) for i in $(seq ${ZERO_RUNS:-2}); do  # issue 11 item 4: two processes, so the spread between them shows
            timeout ${ZERO_TIMEOUT:-200} python3 tools/gpu_zero_overhead.py ${ZERO_SPEC:-} --json "${ZERO_JSON:-$OUT}/zero$i.json" \
              > "$OUT/zero$i.txt" 2>&1; grep -E "x fusions|failed" "$OUT/zero$i.txt"; done
          timeout 100 python3 tools/host_overhead_probe.py 2>&1 | tee "$OUT/host_overhead.txt" ;;
    breakdown) timeout ${BREAKDOWN_TIMEOUT:-120} python3 tools/wrapper_breakdown_probe.py 2>&1 | tee "$OUT/breakdown.txt" ;;
    decodestep) timeout ${DECODE_TIMEOUT:-120} python3 tools/decode_step_probe.py 2>&1 | tee "$OUT/decodestep.txt" ;;
    decodewrapper) timeout ${DECODE_TIMEOUT:-150} python3 tools/decode_wrapper_probe.py 2>&1 | tee "$OUT/decodewrapper.txt" ;;
    *) echo "unknown step $step" ;;
  esac
done
[ -n "${NO_PTX:-}" ] || tar czf "$OUT/ptx.tgz" -C .device ptx  # NO_PTX=1: one file fewer back
