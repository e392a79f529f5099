#!/usr/bin/env bash
# One script for a GPU machine with a preinstalled PyTorch/Triton/nvcc and no internet:
# builds sparsebert._C with nvcc, runs the GPU correctness tests, then the kernel benchmark.
# Installs nothing from the network. Target: under 6 minutes on an H100.
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default ./gpu_out; all logs, JSON and plots land there,
#                                                 and also packed as OUT_DIR/gpu_check.tgz)
GPU_SCRIPT=gpu_check
source "$(dirname "$0")/gpu_env.sh" "${1:-gpu_out}"
status=0

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"

stamp "build sparsebert._C with nvcc (log: $OUT_DIR/build.log)"
build() {
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} \
    MAX_JOBS=${MAX_JOBS:-16} timeout 400 "$@" $PY setup.py -q build_ext --inplace >> "$OUT_DIR/build.log" 2>&1
}
# setup.py refuses a build that links libstdc++ statically (C++ errors would crash Python);
# some GPU images set such a compiler as CC/CXX: then retry with the system compiler.
( build env || { grep -q "static libstdc++" "$OUT_DIR/build.log" && echo "retrying with CC=gcc CXX=g++" \
    && build env CC=gcc CXX=g++; } ) &
build_pid=$!

stamp "CPU test suite on this machine's torch (no Triton interpreter tests) while the build runs"
timeout 300 $PY -m pytest -q -x -p no:cacheprovider tests/test_layout.py tests/test_bsr_linear.py \
  tests/test_layers.py tests/test_pruning.py tests/test_hf.py 2>&1 | tail -n 5 | tee "$OUT_DIR/cpu_tests.txt" || status=1

wait $build_pid || { echo "BUILD FAILED"; tail -n 40 "$OUT_DIR/build.log"; status=1; }
stamp "build done"
$PY -m sparsebert info 2>&1 | tee "$OUT_DIR/info.txt"

stamp "GPU correctness tests (pytest -m gpu), one process per file so a crash names its file"
for f in tests/test_*gpu*.py tests/test_cuda_bsr.py; do
  [ -f "$f" ] || continue
  name=$(basename "$f" .py)
  SPARSEBERT_TRITON_AUTOTUNE=0 timeout 300 $PY -m pytest -m gpu -q -p no:cacheprovider "$f" \
    > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  echo "$f: exit $rc; $(grep -E 'passed|failed|error|Fatal Python error' "$OUT_DIR/$name.log" | tail -n 2 | tr '\n' ' ')"
  [ $rc -eq 0 ] || { status=1; grep -E '^(FAILED|ERROR)|Fatal Python|^E  ' "$OUT_DIR/$name.log" | head -n 15;
                     grep -A3 'Current thread' "$OUT_DIR/$name.log" | grep -m3 'tests/\|sparsebert/' ; }
done

stamp "kernel benchmark"
timeout 300 $PY benchmarks/bench_kernels.py --out "$OUT_DIR" ${BENCH_ARGS:-} > "$OUT_DIR/bench.log" 2>&1 \
  || status=1
tail -n 5 "$OUT_DIR/bench.log"

if [ -f benchmarks/bench_bert.py ]; then
  stamp "end-to-end BERT-base MLM training step and encoder inference (bench_bert.py GPU mode)"
  # dense (eager, compiled, sparsebert.optimize) and block-sparse 0/50/90% at 32x32 and 64x64, each with
  # Hugging Face's full MLM head and after sparsebert.optimize; inference latency at batch 1/8/64
  timeout 420 $PY benchmarks/bench_bert.py --device cuda --out "$OUT_DIR" \
    ${BERT_ARGS:---levels 0 0.5 0.9 --block 32 64 --steps 5 --warmup 3 --compile --compile-levels 0.9} 2>&1 \
    | tail -n 40 | tee "$OUT_DIR/bert.txt" || status=1
fi
stamp "done (status $status)"
exit $status
