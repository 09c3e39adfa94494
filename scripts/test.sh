#!/usr/bin/env bash
# The README's test command: installs what the tests need into .venv, then lints, type-checks
# the domain and runs every test (unit and integration; integration starts its own services).
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install -q --upgrade pip
# torch is pinned here (a CPU build lies on these machines; an unpinned torch pulls CUDA).
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[export,prod,dev]"

echo "== ruff"
ruff check .
echo "== mypy (domain: pcd_core, jobs)"
mypy
echo "== docker-compose config"
bash scripts/check_compose.sh
echo "== pytest"
python -m pytest -q -p no:cacheprovider "$@"
