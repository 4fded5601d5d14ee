"""Ray Train scaling on CPU: the same global batch on 1 worker and on 2 workers, side by side in one run.

    python benchmarks/scaling.py                          # ViSurf, tiny_cpu.yaml, random-init tiny model, 4 steps
    python benchmarks/scaling.py --steps 6 rollout.max_new_tokens=96

Each layout trains the same config (global batch `data.prompts_per_step`, split evenly over the workers, DeepSpeed
ZeRO-2 as in tiny_cpu.yaml) through `visurf_ray.train.launcher.launch` on one local Ray cluster, from the same
randomly initialised tiny Qwen2.5-VL. Layouts: 1 worker × 1 CPU (1 torch thread), 1 worker × 2 CPUs (2 threads),
2 workers × 1 CPU (gloo, 1 thread each). Per layout: the mean optimizer-step time of rank 0 (`train_time_total` /
steps: rollout + reward + update, the all-reduce included; Ray start, model load and the final evaluation excluded)
and the whole `fit` wall time. Scaling efficiency of 2 workers = step(1 × 1 CPU) / (2 · step(2 × 1 CPU)): 1.0 is
linear, 0.5 no gain.

The default sweep's wall time and peak memory are printed by `python experiments/sweep.py` itself (MemoryWatch).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visurf_ray.config import ExperimentConfig, load_config  # noqa: E402

DEFAULT_CONFIG = ROOT / "experiments" / "configs" / "tiny_cpu.yaml"
LAYOUTS = ((1, 1.0), (1, 2.0), (2, 1.0))  # (workers, CPUs per worker)


def layout_config(cfg: ExperimentConfig, workers: int, cpus: float, output_dir: Path) -> ExperimentConfig:
    return replace(
        cfg,
        name=f"scaling-{workers}x{cpus:g}",
        output_dir=str(output_dir),
        ray=replace(cfg.ray, num_workers=workers, cpus_per_worker=cpus),
    )


def run_layouts(cfg: ExperimentConfig, output_dir: Path) -> list[dict[str, float]]:
    """Fit `cfg` once per layout; rank 0's mean step time and the fit's wall time."""
    from visurf_ray.train.launcher import init_ray, launch

    init_ray(cfg.ray.address)
    rows = []
    for workers, cpus in LAYOUTS:
        started = time.perf_counter()
        metrics = launch(layout_config(cfg, workers, cpus, output_dir))
        wall = time.perf_counter() - started
        rows.append(
            {
                "workers": workers,
                "cpus": cpus,
                "step_s": metrics["train_time_total"] / metrics["step"],
                "update_s": metrics["time/update"],
                "rollout_s": metrics["time/rollout"],
                "fit_s": wall,
            }
        )
        print(f"[{workers} x {cpus:g} CPU] {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML experiment config")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per layout")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps ({args.steps}) must be >= 1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("WANDB_MODE", "disabled")
    from benchmarks.step_runner import random_tiny_model

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="scaling-") as scratch:
        cfg = load_config(
            args.config,
            [
                f"steps={args.steps}",
                "eval_every=0",
                "checkpoint_every=0",
                "data.eval_size=8",
                "log_to=[stdout]",
                *args.overrides,
            ],
        )
        model_dir = random_tiny_model(Path(scratch) / "model", cfg.seed)
        cfg = replace(cfg, model=replace(cfg.model, path=str(model_dir)))
        rows = run_layouts(cfg, Path(scratch) / "runs")
    base = rows[0]["step_s"]
    print(
        f"Ray Train scaling, {cfg.objective.paradigm}, global batch {cfg.data.prompts_per_step} prompts × "
        f"G={cfg.objective.num_rollouts}, max_new_tokens={cfg.rollout.max_new_tokens}, {args.steps} steps, random-init "
        f"tiny Qwen2.5-VL, CPU ({os.cpu_count()} cores), load average {load_before:.1f} before / "
        f"{os.getloadavg()[0]:.1f} after"
    )
    print(
        f"{'layout':18s} {'step (s)':>9s} {'rollout':>8s} {'update':>8s} {'fit (s)':>8s} {'speed-up':>9s} {'eff.':>6s}"
    )
    for row in rows:
        speedup = base / row["step_s"]
        print(
            f"{row['workers']} worker × {row['cpus']:g} CPU  {row['step_s']:9.2f} {row['rollout_s']:8.2f} "
            f"{row['update_s']:8.2f} {row['fit_s']:8.1f} {speedup:9.2f} {speedup / (row['workers'] * row['cpus']):6.2f}"
        )
    return rows


if __name__ == "__main__":
    main()
