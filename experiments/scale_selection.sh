#!/usr/bin/env bash
# The scale experiment (experiments/scale_selection.py) on the lent GPU machine, sized to one device call: variants
# train side by side for 240 s each (perception checks at 300 items per class: ~90 s at 200 on 2 CPU cores) and stop
# at a 520-s deadline; results (not the models) go to $OUT.
# Prepare here, once: python3 -m pip download --no-deps -d .whl transformers==5.19.0   (the version the code is tested
# on; the machine's image has 5.17). Then:  device run, carry [".whl"], timeout_s 600:  bash experiments/scale_selection.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
wheel=$(compgen -G ".whl/transformers-*.whl" | head -n 1) || true
if [[ -z "$wheel" ]]; then
  echo "error: no transformers wheel in .whl/: run 'python3 -m pip download --no-deps -d .whl transformers==5.19.0'" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$wheel"
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-/tmp/scale_selection}
runs=/tmp/scale_selection_runs
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt"
status=0
python3 experiments/scale_selection.py --device cuda --out "$runs" --train-budget-s 240 --deadline-s 520 "$@" \
  2>&1 | tee "$out/scale_selection.log" || status=$?
cp "$runs"/*.log "$runs"/*.json "$runs"/summary.md "$out"/ 2>/dev/null || true
for folder in "$runs"/*/; do
  name=$(basename "$folder")
  mkdir -p "$out/$name"
  cp "$folder"/result.json "$folder"/pretrain_report.json "$out/$name"/ 2>/dev/null || true
done
exit "$status"
