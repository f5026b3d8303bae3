#!/usr/bin/env bash
# Create the separate environment for the kvpress side-by-side (benchmarks/kvpress/).
#
# kvpress 0.5.5 pins transformers>=4.56,<5.3 while evictkit's own venv runs a newer transformers,
# so kvpress lives in its own venv. torch is installed first and pinned to the main venv's
# version, so kvpress's resolver keeps it instead of pulling another build. evictkit itself is
# installed from this checkout with --no-deps (it only needs torch, transformers, pluggy, attrs,
# tqdm, all present after kvpress): the side-by-side checks that evictkit runs on the older
# transformers too.
#
#   KVPRESS_VENV   where to create it (default: .venv-kvpress in the repository root)
#   PYTHON         the interpreter to build it from (default: python3)
#   TORCH_SPEC     torch requirement (default: torch==2.13.0)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${KVPRESS_VENV:-$ROOT/.venv-kvpress}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating $VENV with $("$PY" -V 2>&1)"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" "kvpress==0.5.5" "$TORCH_SPEC"
# evictkit's runtime deps that kvpress does not bring; then evictkit from this checkout.
"${PIP[@]}" "pluggy>=1.5" "attrs>=23.1" "tqdm>=4.60" "setuptools>=69"
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "kvpress", "evictkit"):
    print(f"{name} {md.version(name)}")
PY
echo "kvpress environment ready: $VENV"
