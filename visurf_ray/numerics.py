"""CPU float rounding pinned across x86-64 machines (no torch import: it must run before torch's kernels load).

A CPU build of the tiny base model, or a CPU trial, takes its rounding from the kernels torch dispatches to, and
those follow the CPU: ATen's vectorised kernels (AVX2 or AVX-512), oneDNN's JIT kernels, and MKL's BLAS and vector
math, whose code paths differ between Intel and AMD processors. Over 1,100 steps at a high learning rate a last-bit
difference grows into another model (README, "Tiny base model"). `pin_cpu_numerics` sets the three switches that
fix these paths; with them, and with AdamW's fused kernel (the loop version's `sqrt` goes through MKL's vector
math, which follows the CPU whatever `MKL_CBWR` says), a build gives the same bits on an AMD Zen 4 (AVX-512) and on
Intel Haswell and AMD Zen 2 CPU models emulated by qemu (`experiments/cpu_portability.py`).
"""

from __future__ import annotations

import os
import platform

PINNED_CPU_NUMERICS = {
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's AVX2 kernels, also on AVX-512 CPUs (a CPU without AVX2 falls back)
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's convolutions: at most AVX2
    "MKL_CBWR": "COMPATIBLE",  # MKL's one code path for every x86 CPU, Intel's or AMD's (~1.5x slower CPU steps)
}
"""Environment switches of torch's CPU kernels (read once, when each library first runs)."""


def pin_cpu_numerics() -> None:
    """Set `PINNED_CPU_NUMERICS` in this process's environment on x86-64, keeping any value the user set (the
    building machine's `numerics()` records what was in effect). Importing `visurf_ray` calls it, so the pin holds
    when visurf_ray is imported before torch runs its first CPU kernel; Ray workers get it through the runtime
    environment (`ray_env_vars`)."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        for key, value in PINNED_CPU_NUMERICS.items():
            os.environ.setdefault(key, value)


def ray_env_vars() -> dict[str, str]:
    """The pinned switches as this process has them, for a Ray runtime environment's `env_vars`."""
    return {key: os.environ[key] for key in PINNED_CPU_NUMERICS if key in os.environ}
