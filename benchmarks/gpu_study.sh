#!/usr/bin/env bash
# On the GPU machine (no network, preinstalled python3; after benchmarks/gpu_check.sh, whose build
# this reuses if the machine is still warm): the study's `gpu` preset from the carried data cache.
#
#   bash benchmarks/gpu_study.sh [SECONDS] [OUT_DIR]     (default 150 s; OUT_DIR default ./gpu_study)
#
# SECONDS is the study's --time-limit: no encoder starts after it (running ones finish), the
# report covers the finished encoders and names the others; a rerun resumes from the run cache
# (OUT_DIR/runs). The data: the pieces that benchmarks/gpu_study_carry.sh packed here into
# .gpu_carry/a (carried by an earlier call) and .gpu_carry/b (this call), joined into a cache
# folder; the study verifies each archive's sha256. PRESET (default gpu) and STUDY_ARGS (extra
# `sparsebert study` arguments) override the run. Results in OUT_DIR; the files to fetch (at most
# 8 come back from $OUT):
#   bash benchmarks/gpu_study.sh 150 /tmp/gs; cp /tmp/gs/{results.md,results.csv,results.json,study.tgz} $OUT/
GPU_SCRIPT=study
PACK_EXCLUDE=runs              # the run cache (checkpoints) stays out of study.tgz
source "$(dirname "$0")/gpu_env.sh" "${2:-gpu_study}"
LIMIT=${1:-150}
CACHE=${GPU_STUDY_CACHE:-/tmp/sparsebert-gpu-cache}

stamp "joining the carried archives into $CACHE"
missing=0
for d in .gpu_carry/a .gpu_carry/b; do [ -d "$d" ] || { echo "gpu_study: $d is not here (carry it; see benchmarks/gpu_study_carry.sh)"; missing=1; }; done
(( missing == 0 )) || exit 2
$PY - "$CACHE" <<'PYEOF' || exit 2
import re, shutil, sys
from pathlib import Path
cache = Path(sys.argv[1])
pieces = sorted(p for d in ("a", "b") for p in Path(".gpu_carry", d).glob("*.part[0-9][0-9]"))
groups = {}
for p in pieces:
    m = re.fullmatch(r"(.+?)__(.+)\.part(\d\d)", p.name)
    groups.setdefault((m.group(1), m.group(2)), []).append((int(m.group(3)), p))
for (source, name), parts in groups.items():
    parts.sort()
    if [i for i, _ in parts] != list(range(len(parts))):
        sys.exit(f"gpu_study: pieces of {name} missing: have {[i for i, _ in parts]}")
    dest = cache / "downloads" / source
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / name, "wb") as out:
        for _, p in parts:
            out.write(p.read_bytes())
    print(f"gpu_study: {source}/{name}: {len(parts)} pieces")
shutil.copy(Path(".gpu_carry/b/checksums.json"), cache / "checksums.json")
PYEOF

stamp "sparsebert study --preset ${PRESET:-gpu} --time-limit $LIMIT"
$PY -m sparsebert study --preset "${PRESET:-gpu}" --time-limit "$LIMIT" --cache-dir "$CACHE" \
  --out "$OUT_DIR" --force --no-progress ${STUDY_ARGS:-} 2>&1 | tee "$OUT_DIR/study.log"
rc=${PIPESTATUS[0]}
stamp "done (exit $rc)"
exit "$rc"
