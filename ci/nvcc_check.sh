#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc for sm_80 and sm_90a (no GPU, no torch needed; seconds).
# Fails on any compiler error, and on any kernel with register spills or a stack frame;
# VERBOSE=1 prints each kernel's registers / stack / spills (demangled names).
# Environment: CUDA_HOME (default /usr/local/cuda), NVCC (default $CUDA_HOME/bin/nvcc).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="${NVCC:-$CUDA_HOME/bin/nvcc}"
OUT="$(mktemp -d /tmp/sparsebert-nvcc.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT

shopt -s nullglob
sources=("$ROOT"/csrc/cuda/*.cu)
if (( ${#sources[@]} == 0 )); then echo "nvcc_check: no csrc/cuda/*.cu files"; exit 1; fi
# Same flags as setup.py's nvcc list (minus torch's), plus ptxas verbosity.
flags=(-O3 -std=c++17 --use_fast_math -lineinfo --expt-relaxed-constexpr -Werror all-warnings -Xptxas -v)
t0=$(date +%s)
fail=0
compile() {  # compile <src> <gencode> <log> <obj>
    "$NVCC" "${flags[@]}" -gencode="$2" -c "$1" -o "$4" >"$3" 2>&1
}
pids=(); jobs_=()
for arch in "arch=compute_80,code=sm_80" "arch=compute_90a,code=sm_90a"; do
    for src in "${sources[@]}"; do
        name="$(basename "$src" .cu)"; tag="${arch##*code=}"
        compile "$src" "$arch" "$OUT/$name.$tag.log" "$OUT/$name.$tag.o" &
        pids+=($!); jobs_+=("$name.$tag")
        # at most ${NVCC_JOBS:-2} compiles at once
        if (( ${#pids[@]} % ${NVCC_JOBS:-2} == 0 )); then wait "${pids[-1]}" || true; fi
    done
done
for i in "${!pids[@]}"; do
    job="${jobs_[$i]}"; log="$OUT/$job.log"
    if wait "${pids[$i]}"; then
        spills=$(grep -cE "[1-9][0-9]* bytes (spill|stack)" "$log" || true)
        echo "nvcc_check: ok   $job ($spills kernels with spills / stack frames)"
        if (( spills > 0 )); then echo "nvcc_check: FAIL $job spills registers or uses a stack frame"; fail=1; fi
        if [[ "${VERBOSE:-0}" == "1" || "$spills" != "0" ]]; then
            # "Compiling entry function 'NAME'" then "Used R registers" then "S bytes stack frame, ..."
            awk -v job="$job" '
                /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2) }
                /bytes stack frame/ { match($0, /[0-9]+ bytes stack frame, [0-9]+ bytes spill stores, [0-9]+ bytes spill loads/);
                    st = substr($0, RSTART, RLENGTH) }
                /Used [0-9]+ registers/ { match($0, /Used [0-9]+/); regs = substr($0, RSTART + 5, RLENGTH - 5);
                    printf "    %-14s regs %3s  %s  %s\n", job, regs, st, name }' "$log" \
                | { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }
        fi
    else
        echo "nvcc_check: FAIL $job"; cat "$log"; fail=1
    fi
done
echo "nvcc_check: $(( $(date +%s) - t0 )) s"
exit $fail
