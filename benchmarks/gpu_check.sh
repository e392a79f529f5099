#!/usr/bin/env bash
# The one script for a GPU machine with a preinstalled PyTorch / Triton / nvcc and no network
# (installs nothing): build sparsebert._C with nvcc, `pytest -m gpu`, Triton tuning (when
# benchmarks/tune_triton.py exists), the kernel grid (benchmarks/bench_kernels.py: JSON + PNG),
# the end-to-end BERT benchmark's GPU mode (benchmarks/bench_bert.py --device cuda).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default ./gpu_out)
#
# Everything lands in OUT_DIR, packed as OUT_DIR/gpu_check.tgz, with OUT_DIR/summary.txt (each
# step's exit code, seconds and budget, then the results' short tables). On the lent device
# machine (at most 8 files come back from $OUT):
#   bash benchmarks/gpu_check.sh /tmp/gc; cp /tmp/gc/{gpu_check.tgz,summary.txt,bench_kernels.json,bench_kernels.png} $OUT/
#
# Worst case 8 minutes: every step runs under its own `timeout -k` (seconds below, env to change;
# a step killed at its limit costs its budget plus the kill grace), and the GPU tests share one
# deadline. Defaults (worst case with kill grace): info 15 (17), build 110 (115), sparsebert info
# 10 (12), GPU tests 120 (123), tuning 25 (28), kernel grid 80 (85), BERT 70 (75), packing ~2:
# 457 s. The script refuses budgets whose worst case exceeds T_MAX (480 s).
#   T_INFO T_BUILD T_SBINFO T_TESTS T_TUNE T_BENCH T_BERT   step budgets (T_TUNE=0 skips tuning)
#   BENCH_ARGS   extra bench_kernels.py arguments (its own --budget-s is T_BENCH - 20)
#   BERT_ARGS    bench_bert.py arguments (default: --levels 0.9 --block 32 64 --steps 5 --warmup 3)
#   BUILD_CPU=1  also build the CPU kernels (slower; not needed for the GPU checks)
GPU_SCRIPT=gpu_check
source "$(dirname "$0")/gpu_env.sh" "${1:-gpu_out}"
T_INFO=${T_INFO:-15} T_BUILD=${T_BUILD:-110} T_SBINFO=${T_SBINFO:-10} T_TESTS=${T_TESTS:-120}
T_TUNE=${T_TUNE:-25} T_BENCH=${T_BENCH:-80} T_BERT=${T_BERT:-70} T_MAX=${T_MAX:-480}
BERT_ARGS=${BERT_ARGS:---levels 0.9 --block 32 64 --steps 5 --warmup 3}
# kill grace of each step's `timeout -k`, packing included
worst=$(( T_INFO + 2 + T_BUILD + 5 + T_SBINFO + 2 + T_TESTS + 3 + T_BENCH + 5 + T_BERT + 5 + 2 ))
(( T_TUNE > 0 )) && worst=$(( worst + T_TUNE + 3 ))
if (( worst > T_MAX )); then echo "gpu_check: step budgets add up to $worst s worst case > T_MAX=$T_MAX s"; exit 2; fi
SUMMARY="$OUT_DIR/summary.txt"
echo "gpu_check: worst case $worst s (budgets: info $T_INFO, build $T_BUILD, sparsebert info $T_SBINFO, tests $T_TESTS, tune $T_TUNE, kernels $T_BENCH, bert $T_BERT)" | tee "$SUMMARY"
status=0

step() {  # step NAME BUDGET LOG CMD...: CMD under its budget, output to LOG; one summary line
  local name=$1 budget=$2 log=$3; shift 3
  local s0=$(date +%s) rc
  stamp "$name (budget $budget s, log $log)"
  timeout -k "${KILL_S:-5}" "$budget" "$@" > "$log" 2>&1; rc=$?
  printf '%-34s exit %3d  %4d s of %4d s%s\n' "$name" "$rc" $(( $(date +%s) - s0 )) "$budget" \
    "$([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo '  (cut at its limit)')" >> "$SUMMARY"
  [ $rc -eq 0 ] || status=1
  return $rc
}

KILL_S=2 step "machine" "$T_INFO" "$OUT_DIR/machine.txt" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader;
  $PY -c \"import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))\""
cat "$OUT_DIR/machine.txt" | tee -a "$SUMMARY"

# No build isolation (setup.py builds against the installed torch); the system compiler: the image's
# default CC/CXX linked libstdc++ statically (RESULTS run 3), which setup.py refuses.
build_env=(CC=gcc CXX=g++ CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
           MAX_JOBS="${MAX_JOBS:-16}")
[ "${BUILD_CPU:-0}" = 1 ] || build_env+=(SPARSEBERT_SKIP_CPU=1)
step "build sparsebert._C (nvcc)" "$T_BUILD" "$OUT_DIR/build.log" env "${build_env[@]}" $PY setup.py -q build_ext --inplace \
  || tail -n 30 "$OUT_DIR/build.log"
KILL_S=2 step "sparsebert info" "$T_SBINFO" "$OUT_DIR/info.txt" $PY -m sparsebert info; cat "$OUT_DIR/info.txt"

# GPU tests: one process per file (a crash names its file), in this order (the shared harness of
# every backend first); the files share one deadline: each may use what is left minus a reserve
# of T_FILE_MIN s for every file after it (unused time rolls over to the next).
gpu_files=()
for f in tests/test_backend_harness.py tests/test_cuda_bsr.py tests/test_triton.py tests/test_triton_gpu.py \
         $(grep -l "mark.gpu" tests/test_*.py | sort); do
  [ -f "$f" ] && [[ ! " ${gpu_files[*]} " =~ " $f " ]] && gpu_files+=("$f")
done
deadline=$(( $(date +%s) + T_TESTS ))
for i in "${!gpu_files[@]}"; do
  f=${gpu_files[$i]}; name=$(basename "$f" .py)
  left=$(( deadline - $(date +%s) )); share=$(( left - ${T_FILE_MIN:-8} * (${#gpu_files[@]} - i - 1) ))
  if (( share < 5 )); then echo "$f: not run (GPU test budget spent)" | tee -a "$SUMMARY"; status=1; continue; fi
  KILL_S=3 step "pytest -m gpu $name" "$share" "$OUT_DIR/$name.log" env SPARSEBERT_TRITON_AUTOTUNE=0 \
    PYTHONFAULTHANDLER=1 $PY -m pytest -m gpu -q -p no:cacheprovider "$f"
  echo "   $(grep -E '[0-9]+ (passed|failed|error)|Fatal Python error' "$OUT_DIR/$name.log" | tail -n 1)" | tee -a "$SUMMARY"
  grep -E '^(FAILED|ERROR)|Fatal Python' "$OUT_DIR/$name.log" | head -n 10 | tee -a "$SUMMARY"
done

if [ -f benchmarks/tune_triton.py ] && (( T_TUNE > 0 )); then
  # writes the backend's data file (sparsebert/ops/triton/tuned.json) that the steps below then use
  KILL_S=3 step "tune_triton.py" "$T_TUNE" "$OUT_DIR/tune_triton.log" \
    $PY benchmarks/tune_triton.py --budget-s $(( T_TUNE * 2 / 3 ))
  tail -n 3 "$OUT_DIR/tune_triton.log"
  cp sparsebert/ops/triton/tuned.json "$OUT_DIR/" 2>/dev/null || true
fi

step "kernel grid (bench_kernels.py)" "$T_BENCH" "$OUT_DIR/bench.log" $PY benchmarks/bench_kernels.py \
  --out "$OUT_DIR" --budget-s $(( T_BENCH > 40 ? T_BENCH - 20 : T_BENCH / 2 )) --rep-ms 25 ${BENCH_ARGS:-}

if [ -f benchmarks/bench_bert.py ]; then
  # BERT-Base MLM training step and encoder inference, dense vs block-sparse (bench_bert.py GPU mode)
  step "end-to-end BERT (bench_bert.py)" "$T_BERT" "$OUT_DIR/bert.txt" \
    $PY benchmarks/bench_bert.py --device cuda --out "$OUT_DIR" $BERT_ARGS
fi

{ echo; echo "== kernel grid summary (bench_kernels.txt)"; sed -n '/^summary/,$p' "$OUT_DIR/bench_kernels.txt" 2>/dev/null || tail -n 5 "$OUT_DIR/bench.log"
  echo; echo "== end-to-end BERT (last lines of bert.txt)"; tail -n 25 "$OUT_DIR/bert.txt" 2>/dev/null; } >> "$SUMMARY"
stamp "done (status $status)"
cat "$SUMMARY"
exit $status
