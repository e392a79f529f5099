#!/usr/bin/env bash
# Developer tuning session on a GPU machine (one call): build, GPU correctness tests of both GPU
# backends, per-variant kernel timings (Triton and CUDA), end-to-end BERT-Base training step.
# Everything lands in OUT_DIR (default ./gpu_tune) and is packed as OUT_DIR/gpu_tune.tgz.
GPU_SCRIPT=gpu_tune
source "$(dirname "$0")/gpu_env.sh" "${1:-gpu_tune}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader

( SPARSEBERT_SKIP_CPU=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 \
  timeout 200 $PY setup.py -q build_ext --inplace > "$OUT_DIR/build.log" 2>&1; echo "build exit $?" >> "$OUT_DIR/build.log" ) &
stamp "triton variants"
timeout ${T_TRITON:-170} $PY benchmarks/triton_variants.py --out "$OUT_DIR" --rep-ms 10 --jobs 8 > "$OUT_DIR/triton_variants.log" 2>&1
echo "exit $?"; tail -n 4 "$OUT_DIR/triton_variants.log"
wait; stamp "$(tail -n 1 "$OUT_DIR/build.log")"
for f in tests/test_triton_gpu.py tests/test_cuda_bsr.py; do
  stamp "$f"
  SPARSEBERT_TRITON_AUTOTUNE=0 PYTHONFAULTHANDLER=1 timeout ${T_TESTS:-80} $PY -m pytest -m gpu -q -p no:cacheprovider "$f" \
    > "$OUT_DIR/$(basename "$f" .py).log" 2>&1
  echo "exit $?"; grep -E '^(FAILED|ERROR)|passed|failed|Fatal' "$OUT_DIR/$(basename "$f" .py).log" | tail -n 8
done
stamp "cuda variants"
timeout ${T_CUDA:-100} $PY benchmarks/cuda_variants.py --out "$OUT_DIR" --budget-s 80 > "$OUT_DIR/cuda_variants.log" 2>&1
echo "exit $?"; tail -n 4 "$OUT_DIR/cuda_variants.log"
stamp "bert"
timeout ${T_BERT:-110} $PY benchmarks/bench_bert.py --out "$OUT_DIR" --levels 0.9 --block 64 --steps 5 --warmup 3 \
  > "$OUT_DIR/bert.log" 2>&1
echo "exit $?"; tail -n 6 "$OUT_DIR/bert.log"
stamp done
