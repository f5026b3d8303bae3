#!/usr/bin/env bash
# The kvpress side-by-side in one command: creates the kvpress venv when missing
# (setup_env.sh), then runs compare.py from evictkit's venv and writes the markdown table.
#
#   bash benchmarks/kvpress/run.sh [compare.py options, e.g. --quick, --out docs/kvpress.md]
#
#   KVPRESS_VENV   the kvpress venv (default: .venv-kvpress in the repository root)
#   EVICTKIT_PYTHON  evictkit's interpreter (default: .venv/bin/python, else python3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export KVPRESS_VENV="${KVPRESS_VENV:-$ROOT/.venv-kvpress}"
PY="${EVICTKIT_PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
if [[ ! -x "$KVPRESS_VENV/bin/python" ]] || ! "$KVPRESS_VENV/bin/python" -c "import kvpress, evictkit" 2>/dev/null; then
    bash "$ROOT/benchmarks/kvpress/setup_env.sh"
fi
exec "$PY" "$ROOT/benchmarks/kvpress/compare.py" --kvpress-python "$KVPRESS_VENV/bin/python" "$@"
