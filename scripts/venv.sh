#!/usr/bin/env bash
# Creates or updates the project's virtual environment (.venv) and prints its python path.
# Idempotent: reinstalls only when pyproject.toml or constraints.txt changed since the last install.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VISURF_VENV:-$root/.venv}
stamp=$venv/.visurf-install-stamp
want=$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv" >&2
fi
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "[venv] installing visurf_ray[dev] into $venv (first time ~2 min)" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$root/constraints.txt" -e "$root[dev]" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
