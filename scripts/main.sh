#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment, then run the default sweep on the embedded tiny
# model and offline benchmark (python experiments/sweep.py). Extra arguments are passed on (sweep overrides).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$("$root/scripts/venv.sh")
cd "$root"
source "$root/scripts/env.sh"
exec "$python" experiments/sweep.py "$@"
