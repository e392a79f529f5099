# Sourced by benchmarks/gpu_check.sh: run from the repository root with the machine's python3 and
# real (not interpreted) Triton; logs go to OUT_DIR, packed as OUT_DIR/$GPU_SCRIPT.tgz on exit (one
# file to fetch; PACK_EXCLUDE leaves one more name out). Needs GPU_SCRIPT and the script's $1.
# PYTHON overrides the interpreter.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR=${1:-$GPU_SCRIPT}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
pack() { tar czf "/tmp/$GPU_SCRIPT.$$.tgz" -C "$OUT_DIR" --exclude="$GPU_SCRIPT.tgz" ${PACK_EXCLUDE:+--exclude="$PACK_EXCLUDE"} . 2>/dev/null \
           && mv "/tmp/$GPU_SCRIPT.$$.tgz" "$OUT_DIR/$GPU_SCRIPT.tgz"; }
trap pack EXIT
