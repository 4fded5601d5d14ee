#!/usr/bin/env bash
# The GPU check on the lent GPU machine (offline): install the carried wheel kit into /tmp/site, then run
# benchmarks/gpu_check.py (arguments are passed on). The log and the JSON summary go to $OUT (the device tool's
# folder that comes back), else /tmp/gpu_check. Prepare the kit here first: see benchmarks/README.md.
#   device run, carry [".whl"]:  bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! compgen -G ".whl/*.whl" > /dev/null; then
  echo "error: no wheels in .whl/: run 'bash ../shared/device/gpu-wheels.sh' in the repository root and carry .whl" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
export RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=180 TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt"
python3 benchmarks/gpu_check.py --json "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
