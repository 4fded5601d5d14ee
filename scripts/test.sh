#!/usr/bin/env bash
# Runs the test suite in the project's virtual environment (created/updated first).
#   bash scripts/test.sh          fast suite (what CI runs)
#   bash scripts/test.sh slow     the slow end-to-end checks (full base-model pretraining, full default sweep)
#   bash scripts/test.sh ARGS...  any other pytest arguments
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$("$root/scripts/venv.sh")
cd "$root"
source "$root/scripts/env.sh"
"$python" -m ruff check .
"$python" -m ruff format --check .
if [[ ${1:-} == slow ]]; then
  shift
  exec "$python" -m pytest -m slow "$@"
fi
exec "$python" -m pytest "$@"
