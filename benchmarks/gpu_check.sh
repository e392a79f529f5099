#!/usr/bin/env bash
# One script for a GPU machine with a preinstalled PyTorch/Triton/nvcc and no internet:
# builds sparsebert._C with nvcc, runs the GPU correctness tests, then the kernel benchmark.
# Installs nothing from the network. Target: under 6 minutes on an H100.
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (OUT_DIR defaults to $OUT or ./gpu_out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"

stamp "build sparsebert._C with nvcc (log: $OUT_DIR/build.log)"
( CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} \
  MAX_JOBS=${MAX_JOBS:-16} timeout 400 $PY setup.py -q build_ext --inplace ) > "$OUT_DIR/build.log" 2>&1 &
build_pid=$!

stamp "CPU test suite on this machine's torch (no Triton interpreter tests) while the build runs"
timeout 300 $PY -m pytest -q -x -p no:cacheprovider tests/test_layout.py tests/test_bsr_linear.py \
  tests/test_layers.py tests/test_pruning.py tests/test_hf.py 2>&1 | tail -n 5 | tee "$OUT_DIR/cpu_tests.txt" || status=1

wait $build_pid || { echo "BUILD FAILED"; tail -n 40 "$OUT_DIR/build.log"; status=1; }
stamp "build done"
$PY -m sparsebert info 2>&1 | tee "$OUT_DIR/info.txt"

stamp "GPU correctness tests (pytest -m gpu)"
SPARSEBERT_TRITON_AUTOTUNE=0 timeout 420 $PY -m pytest -m gpu -q -p no:cacheprovider -x --timeout=400 tests/ 2>&1 \
  | tail -n 30 | tee "$OUT_DIR/gpu_tests.txt" || status=1

stamp "kernel benchmark"
timeout 300 $PY benchmarks/bench_kernels.py --out "$OUT_DIR" ${BENCH_ARGS:-} 2>&1 | tail -n 80 \
  | tee "$OUT_DIR/bench.txt" || status=1

if [ -f benchmarks/bench_bert.py ]; then
  stamp "end-to-end BERT-base MLM training step"
  timeout 240 $PY benchmarks/bench_bert.py 2>&1 | tail -n 20 | tee "$OUT_DIR/bert.txt" || status=1
fi
stamp "done (status $status)"
exit $status
