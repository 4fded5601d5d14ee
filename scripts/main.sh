#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment, then run the default experiment on the embedded tiny
# model and offline benchmark. Extra arguments are passed on (e.g. key=value overrides).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$("$root/scripts/venv.sh")
cd "$root"
source "$root/scripts/env.sh"
exec "$python" experiments/train.py "$@"
