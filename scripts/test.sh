#!/usr/bin/env bash
# Runs the test suite in the project's virtual environment (created/updated first).
#   bash scripts/test.sh          fast suite (what CI runs): ruff lint and format, mypy over visurf_ray/, pytest
#   bash scripts/test.sh slow     the slow end-to-end checks (full base-model pretraining, full default sweep)
#   bash scripts/test.sh vllm     the vLLM tests, run for real on the CPU in .venv-vllm (scripts/venv-vllm.sh)
#   bash scripts/test.sh ARGS...  any other pytest arguments
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ ${1:-} == vllm ]]; then
  shift
  python=$("$root/scripts/venv-vllm.sh")
  cd "$root"
  source "$root/scripts/env.sh"
  exec "$python" -m pytest -m vllm tests/test_rollout_vllm.py "$@"
fi
python=$("$root/scripts/venv.sh")
cd "$root"
source "$root/scripts/env.sh"
"$python" -m ruff check .
"$python" -m ruff format --check .
"$python" -m mypy
if [[ ${1:-} == slow ]]; then
  shift
  exec "$python" -m pytest -m slow "$@"
fi
exec "$python" -m pytest "$@"
