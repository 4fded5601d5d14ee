"""Where a run's metrics go besides its session: TensorBoard event files and wandb (offline unless the user has set
up wandb). Used by rank 0 of runs launched with experiments/train.py; sweeps log through Tune's own callbacks.
Never imports Ray."""

from __future__ import annotations

from pathlib import Path

from visurf_ray.config import ExperimentConfig


class MetricSinks:
    """Writes each step's metrics to the sinks named in `cfg.log_to` (tensorboard → <run_dir>/tensorboard,
    wandb → a run in project "visurf_ray", mode from WANDB_MODE, offline by default)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path):
        self.writer = self.wandb_run = None
        if "tensorboard" in cfg.log_to:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in cfg.log_to:
            import os

            import wandb

            self.wandb_run = wandb.init(
                project="visurf_ray",
                name=cfg.name,
                dir=str(run_dir),
                config=cfg.to_dict(),
                mode=os.environ.get("WANDB_MODE", "offline"),
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
