#!/usr/bin/env bash
# Full build check of the CUDA half of sparsebert._C, without a GPU.
#
# 1. Makes a second venv `.venv-cuda` (once) holding a CUDA build of torch (torch==2.14.1, local
#    wheels, ~5.5 GB, ~50 s). The CPU venv `.venv` is never touched.
# 2. Builds the extension against it into a temporary folder outside the source tree (so no
#    sparsebert/_C*.so lands beside the CPU build).
# 3. Imports the built module with that venv's python and checks that the CUDA ops registered.
#
# Environment: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default: unset, so
# setup.py's own default for a machine without a GPU, "8.0;9.0a", is what gets checked),
# MAX_JOBS (default 2), VENV_CUDA (default <repo>/.venv-cuda), KEEP_BUILD=1 keeps the build folder.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV_CUDA:-$ROOT/.venv-cuda}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-2}"
unset SPARSEBERT_SKIP_CUDA SPARSEBERT_NO_EXTENSION

t0=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
    echo "cuda_build_check: creating $VENV (torch==2.14.1, CUDA build)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.14.1 numpy pybind11 ninja setuptools wheel
fi
PY="$VENV/bin/python"
"$PY" -c "import torch; print('cuda_build_check: torch', torch.__version__, 'cuda', torch.version.cuda)"
t1=$(date +%s)

BUILD="$(mktemp -d /tmp/sparsebert-cuda-build.XXXXXX)"
if [[ "${KEEP_BUILD:-0}" != "1" ]]; then trap 'rm -rf "$BUILD"' EXIT; fi
# A copy of the tree, so setup.py's build/ and egg-info stay out of the source tree too.
mkdir -p "$BUILD/src"
(cd "$ROOT" && tar --exclude=./.venv --exclude=./.venv-cuda --exclude=./.git --exclude='*.so' \
    --exclude=./build --exclude='*.egg-info' -cf - .) | (cd "$BUILD/src" && tar -xf -)
echo "cuda_build_check: building in $BUILD (arch list ${TORCH_CUDA_ARCH_LIST:-setup.py default}, MAX_JOBS=$MAX_JOBS)"
(cd "$BUILD/src" && "$PY" setup.py -q build_ext --build-temp "$BUILD/tmp" --build-lib "$BUILD/lib" > "$BUILD/build.log" 2>&1) || {
    tail -n 80 "$BUILD/build.log"; echo "cuda_build_check: FAILED to build"; exit 1; }
grep -iE "warning" "$BUILD/build.log" | grep -v "UserWarning" | head -n 20 || true
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]] && ! grep -q "no GPU visible: building the CUDA kernels for" "$BUILD/build.log"; then
    echo "cuda_build_check: setup.py did not take its default arch list"; exit 1
fi
t2=$(date +%s)

# Import the freshly built _C (not any copy in the source tree) and check the ops exist.
(cd "$BUILD" && PYTHONPATH="$BUILD/lib" "$PY" - <<'PYEOF'
import importlib.util, sys, torch
import sparsebert._C as C
assert "/sparsebert-cuda-build." in C.__file__, C.__file__
assert C.with_cuda is True, "sparsebert._C was built without CUDA"
for op in ("forward", "grad_input", "grad_weight"):
    getattr(torch.ops.sparsebert_cuda, op)
print("cuda_build_check: import OK:", C.__file__)
print("cuda_build_check: schemas:")
# The schemas bsr_cuda.cpp registers are the ones sparsebert/ops/cuda_bsr.py calls (no variant argument).
want = {
    "forward": "(Tensor x, Tensor values, Tensor? bias, Tensor index, int N, int K, int bn, int bk) -> Tensor",
    "grad_input": "(Tensor dy, Tensor values, Tensor index, int N, int K, int bn, int bk) -> Tensor",
    "grad_weight": "(Tensor x, Tensor dy, Tensor index, int N, int K, int bn, int bk) -> Tensor",
}
for op, sig in want.items():
    schema = str(getattr(torch.ops.sparsebert_cuda, op).default._schema)
    print("   ", schema)
    assert schema == f"sparsebert_cuda::{op}{sig}", (schema, sig)
assert not hasattr(torch.ops.sparsebert_cuda, "dsd_variants"), "the variant query op is gone"
PYEOF
)
# The backend module, with that _C beside the package sources: it must load the library and
# report the missing GPU (not a build problem).
cp "$BUILD"/lib/sparsebert/_C*.so "$BUILD/src/sparsebert/"
(cd "$BUILD/src" && PYTHONPATH="$BUILD/src" "$PY" - <<'PYEOF'
import torch
from sparsebert.ops import cuda_bsr
reason = cuda_bsr.unavailable_reason()
print("cuda_build_check: cuda_bsr.unavailable_reason() ->", reason)
assert cuda_bsr._lib is not None, reason
if not torch.cuda.is_available():
    assert reason is not None and "no CUDA device" in reason, reason
PYEOF
)
t3=$(date +%s)
echo "cuda_build_check: OK (venv $((t1 - t0)) s, build $((t2 - t1)) s, import $((t3 - t2)) s)"
