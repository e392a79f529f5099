#!/usr/bin/env bash
# Developer session on a GPU machine (one call): build with the machine's default compiler and with
# the system g++, check that C++ errors reach Python from each build, GPU tests of both backends,
# the kernel benchmark (auto included) and the end-to-end BERT-Base step. Logs in OUT_DIR.
GPU_SCRIPT=gpu_final
source "$(dirname "$0")/gpu_env.sh" "${1:-gpu_final}"
echo "CC=${CC:-} CXX=${CXX:-}; g++: $(command -v g++) $(g++ --version | head -n1); /opt/gcc: $(/opt/gcc/bin/g++ --version 2>/dev/null | head -n1)"
build() {  # $1 = tag, rest = env assignments
  local tag=$1; shift
  env "$@" SPARSEBERT_SKIP_CPU=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=8 \
    timeout 150 $PY setup.py -q build_ext --build-lib /tmp/lib_$tag --build-temp /tmp/tmp_$tag > "$OUT_DIR/build_$tag.log" 2>&1
  echo "build $tag exit $?" >> "$OUT_DIR/build_$tag.log"
}
build default A=1 & build sysgcc CC=/usr/bin/gcc CXX=/usr/bin/g++ & wait
for tag in default sysgcc; do
  so=$(ls /tmp/lib_$tag/sparsebert/_C*.so 2>/dev/null | head -n1)
  stamp "$(tail -n1 "$OUT_DIR/build_$tag.log"); $so"
  [ -n "$so" ] || continue
  ldd "$so" | grep -E "stdc|gcc_s|gomp" | sed 's/^/   /'
  echo "   __cxa_throw: $(nm -D "$so" | grep -c ' U __cxa_throw') undefined, $(nm -D "$so" | grep -c ' T __cxa_throw') defined"
  timeout 30 $PY benchmarks/diag_cxx_exceptions.py "$so" 2>&1 | tail -n 4; echo "   diag exit $?"
done
good=default
grep -q "bad variant: caught" <(timeout 30 $PY benchmarks/diag_cxx_exceptions.py /tmp/lib_default/sparsebert/_C*.so 2>&1) || good=sysgcc
cp /tmp/lib_$good/sparsebert/_C*.so sparsebert/ && stamp "using the $good build"
for f in tests/test_cuda_bsr.py tests/test_triton_gpu.py; do
  stamp "$f"
  SPARSEBERT_TRITON_AUTOTUNE=0 PYTHONFAULTHANDLER=1 timeout ${T_TESTS:-100} $PY -m pytest -m gpu -q -p no:cacheprovider "$f" \
    > "$OUT_DIR/$(basename "$f" .py).log" 2>&1
  echo "exit $?"; grep -E '^(FAILED|ERROR)|passed|failed|Fatal' "$OUT_DIR/$(basename "$f" .py).log" | tail -n 8
done
if [ "${T_BENCH:-150}" != 0 ]; then   # T_BENCH=0 / T_BERT=0 skip a step
  stamp "kernel benchmark"
  timeout ${T_BENCH:-150} $PY benchmarks/bench_kernels.py --out "$OUT_DIR" > "$OUT_DIR/bench.log" 2>&1
  echo "exit $?"; tail -n 3 "$OUT_DIR/bench.log"
fi
if [ "${T_BERT:-70}" != 0 ]; then
  stamp "bert"
  timeout ${T_BERT:-70} $PY benchmarks/bench_bert.py --out "$OUT_DIR" --levels 0.9 --block 32 --steps 5 --warmup 3 \
    > "$OUT_DIR/bert.log" 2>&1
  echo "exit $?"; tail -n 4 "$OUT_DIR/bert.log"
fi
stamp done
