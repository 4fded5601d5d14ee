"""Whether a CPU build of the tiny base model gives the same bits on other x86-64 CPUs: the default recipe's first
`--steps` pretraining steps on this machine and under qemu-user's emulation of other CPU models (TCG: the emulated
CPU's instruction sets and vendor are what torch, oneDNN and MKL dispatch on), each run printing the sha256 of its
weights and its numerics (`visurf_ray.train.pretrain.numerics`). Exit status 1 when the digests differ.

    python experiments/cpu_portability.py [--steps 3] [--cpus Haswell,EPYC-Rome]

Needs `qemu-x86_64` (Debian: `apt-get install qemu-user`) for the emulated runs; emulation runs ~60x slower
(about 3 min per CPU model for 3 steps on 2 cores). `--cpus ""` runs this machine only. The kernel switches of
`visurf_ray.numerics` are in effect unless the environment sets them otherwise (e.g. `MKL_CBWR=AVX2` to see MKL
split Intel from AMD). Under qemu-user /proc/cpuinfo is the host's, so an emulated run's numerics name this machine's
CPU model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_digest(steps: int) -> dict:
    """The sha256 of the weights (name and bytes of every tensor, by name) after `steps` steps of the default
    recipe, with this process's numerics."""
    from visurf_ray.train.pretrain import PretrainConfig, numerics, train_base

    policy = train_base(replace(PretrainConfig(), steps=steps), log=lambda line: None)
    digest = hashlib.sha256()
    for name, tensor in sorted(policy.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return {"sha256": digest.hexdigest(), "numerics": numerics()}


def run_child(steps: int, cpu: str) -> dict:
    """`build_digest` in a fresh process, natively ("") or under `qemu-x86_64 -cpu <cpu>`."""
    command = [sys.executable, __file__, "--child", "--steps", str(steps)]
    if cpu:
        qemu = shutil.which("qemu-x86_64")
        if qemu is None:
            raise SystemExit("qemu-x86_64 not found (Debian: apt-get install qemu-user); --cpus '' runs natively only")
        command = [qemu, "-cpu", cpu, *command]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the run on {cpu or 'this machine'} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="pretraining steps of the default recipe")
    parser.add_argument("--cpus", default="Haswell,EPYC-Rome", help="qemu CPU models, comma-separated")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(build_digest(args.steps)))
        return 0
    runs = {"this machine": run_child(args.steps, "")}
    for cpu in filter(None, args.cpus.split(",")):
        runs[f"qemu -cpu {cpu}"] = run_child(args.steps, cpu)
    print(f"| run | weights sha256 after {args.steps} steps | numerics |\n|---|---|---|")
    for name, run in runs.items():
        numerics = ", ".join(f"{key} {value}" for key, value in run["numerics"].items())
        print(f"| {name} | `{run['sha256'][:16]}…` | {numerics} |")
    agree = len({run["sha256"] for run in runs.values()}) == 1
    print("the same bits on every CPU" if agree else "the bits differ between CPUs")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
