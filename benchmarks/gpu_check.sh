#!/usr/bin/env bash
# GPU check of evictkit on a machine with CUDA torch + triton + transformers + pluggy + attrs
# preinstalled and no network. Makes evictkit importable from this checkout without touching the
# network, then runs benchmarks/gpu_check.py (kernel bit-exactness, bandwidth, policy prefill)
# and writes $OUT/gpu_check.md (or ./gpu_check.md).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # same code paths, tiny sizes, on CPU
#
#   PYTHON     interpreter (default: the first of python3, python, python3.12 that imports torch)
#   EK_TARGET  where pip installs evictkit (default: /tmp/ek); the checkout is never modified
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then  # the first interpreter on PATH that has torch
    for cand in python3 python python3.12; do
        if command -v "$cand" >/dev/null && "$cand" -c "import torch" 2>/dev/null; then PYTHON="$cand"; break; fi
    done
fi
PY="${PYTHON:-python3}"
TARGET="${EK_TARGET:-/tmp/ek}"
START=$(date +%s)

echo "[gpu_check.sh] $("$PY" -V 2>&1) at $(command -v "$PY")"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

check_import() {
    # from / : run in the checkout, `python -c` would import the raw ./evictkit source instead
    (cd / && PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
        "import evictkit, evictkit.plugins, evictkit.kernels, evictkit.specs; assert evictkit.policies(); print('[gpu_check.sh] evictkit from', evictkit.__file__, '-', len(evictkit.policies()), 'policies')")
}

# 1. a regular (non-editable) install into a private target: no index, no build isolation, no deps,
#    so pip never reaches for the network; it needs setuptools>=69 in the interpreter.
#    Built from a copy of the checkout, so no build/ or egg-info lands in the repository.
LAYOUT=""
SRC="$(mktemp -d)/evictkit-src"
mkdir -p "$SRC" && cp -r "$ROOT/pyproject.toml" "$ROOT/evictkit" "$ROOT/plugins" "$ROOT/kernels" "$ROOT/specs" "$SRC"/
[[ -f "$ROOT/README.md" ]] && cp "$ROOT/README.md" "$SRC"/
rm -rf "$TARGET"
if timeout 60 "$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index --target "$TARGET" "$SRC" \
        >/tmp/gpu_check_pip.log 2>&1 && check_import "$TARGET"; then
    LAYOUT="$TARGET"
    echo "[gpu_check.sh] installed with pip into $TARGET"
else
    echo "[gpu_check.sh] pip install failed or unusable (see /tmp/gpu_check_pip.log: $(tail -1 /tmp/gpu_check_pip.log)); laying out by hand"
    # 2. fallback: gpu_check.py copies the packages into place and writes the entry points itself
    LAYOUT=""
fi

if [[ -n "$LAYOUT" ]]; then
    export PYTHONPATH="$LAYOUT${PYTHONPATH:+:$PYTHONPATH}"
fi
timeout "${GPU_CHECK_TIMEOUT:-230}" "$PY" "$ROOT/benchmarks/gpu_check.py" --layout /tmp/ek-layout "$@"
rc=$?
echo "[gpu_check.sh] done in $(( $(date +%s) - START )) s (rc=$rc)"
exit $rc
