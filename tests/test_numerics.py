"""The CPU kernel pin of `visurf_ray.numerics`: in effect in a fresh process that imports visurf_ray, a user's own
setting kept, passed on to Ray workers; and the portability check's native run (its emulated runs need qemu-user and
minutes each: README, "Tiny base model")."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from visurf_ray.numerics import PINNED_CPU_NUMERICS, ray_env_vars

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")
HAS_AVX2 = X86 and "avx2" in Path("/proc/cpuinfo").read_text().split()


def fresh_process(code: str, **env: str) -> str:
    """stdout of `code` run by a new interpreter whose environment lacks the pinned switches (plus `env`)."""
    clean = {key: value for key, value in os.environ.items() if key not in PINNED_CPU_NUMERICS}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, cwd=ROOT, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_importing_visurf_ray_pins_the_kernels_before_torch_runs_one():
    shown = fresh_process(
        "import torch, os, visurf_ray; torch.ones(3).exp(); print(torch.backends.cpu.get_cpu_capability(),"
        " os.environ.get('MKL_CBWR', '-'), os.environ.get('ONEDNN_MAX_CPU_ISA', '-'))"
    )
    if X86:  # CI's and the project's machines
        assert shown == f"{'AVX2' if HAS_AVX2 else 'DEFAULT'} COMPATIBLE AVX2"
    else:
        assert shown.endswith(" - -")


def test_a_users_own_setting_is_kept_and_passed_to_ray_workers():
    assert fresh_process("import os, visurf_ray; print(os.environ.get('MKL_CBWR'))", MKL_CBWR="AVX2") == "AVX2"
    assert ray_env_vars() == (PINNED_CPU_NUMERICS if X86 else {})  # this process: visurf_ray imported, nothing set


def test_the_portability_check_runs_here_and_prints_its_digest():
    done = subprocess.run(
        [sys.executable, "experiments/cpu_portability.py", "--steps", "1", "--cpus", ""],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout.splitlines()
    assert table[2].startswith("| this machine | `") and "cpu_capability" in table[2]
    assert table[-1] == "the same bits on every CPU"
