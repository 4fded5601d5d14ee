"""The Ray edge of training: run the per-worker loop in this process (`ray.num_workers: 0`) or under Ray Train V2's
`TorchTrainer` (CPU workers with gloo, GPU workers with NCCL), with checkpoints, resume and failure handling."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from visurf_ray.config import ExperimentConfig, check_paths, config_from_dict
from visurf_ray.numerics import PINNED_CPU_NUMERICS, ray_env_vars
from visurf_ray.train.loop import LocalSession, run_training
from visurf_ray.train.sinks import RunIdentity


class RaySession:
    """A Ray Train worker's session: rank from the train context, reports through `ray.train.report`."""

    def __init__(self):
        import ray.train

        context = ray.train.get_context()
        if torch.cuda.is_available():  # one GPU per worker: make it the default device before the policy loads
            import ray.train.torch

            torch.cuda.set_device(ray.train.torch.get_device())
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self._restored = ray.train.get_checkpoint()
        self._restored_dir: Path | None = None

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)))

    def latest_checkpoint(self) -> Path | None:
        if self._restored is None:
            return None
        if self._restored_dir is None:
            self._restored_dir = Path(self._restored.to_directory(tempfile.mkdtemp(prefix="visurf-restore-")))
        return self._restored_dir

    def run_identity(self, run_dir: Path) -> RunIdentity:
        return RunIdentity.of_run_dir(run_dir, name=run_dir.name)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point: the plain loop with a RaySession. `config` is `ExperimentConfig.to_dict()`."""
    run_training(config_from_dict(config), RaySession())


def run_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.output_dir).resolve() / cfg.name


def torch_trainer(cfg: ExperimentConfig, *, callbacks: list | None = None, storage_path: str | None = None, loop=None):
    """A TorchTrainer running `cfg` on `ray.num_workers` workers (DeepSpeed inside each worker). `storage_path`:
    Train's storage (a folder or a URI; default `cfg.output_dir`); `loop`: the per-worker function (default
    `train_loop_per_worker`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cfg.ray.cpus_per_worker}
    env = {
        k: os.environ[k]
        for k in ("TORCH_EXTENSIONS_DIR", "VISURF_CACHE", "DS_ACCELERATOR", "WANDB_MODE", *PINNED_CPU_NUMERICS)
        if k in os.environ
    }
    return TorchTrainer(
        loop or train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path or str(Path(cfg.output_dir).resolve()),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            # Ray Train v2's RunConfig (what ray.train exports at run time) takes it; mypy reads the v1 class
            worker_runtime_env={"env_vars": env} if env else None,  # type: ignore[call-arg]
        ),
    )


def init_ray(address: str = "") -> None:
    """Join `address` (or RAY_ADDRESS / "auto") or start a local cluster bound to 127.0.0.1 (also for "local")."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS", "")
    env = {"env_vars": ray_env_vars()}  # the workers' kernels pinned as this process's (visurf_ray.numerics)
    if target and target != "local":
        ray.init(address=target, log_to_driver=True, runtime_env=env)
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True, runtime_env=env)


def launch(cfg: ExperimentConfig) -> dict[str, float]:
    """Run `cfg` and return its final metrics: in this process when `ray.num_workers` is 0, else under Ray Train."""
    check_paths(cfg)
    if cfg.ray.num_workers == 0:
        session = LocalSession(run_dir(cfg))
        return run_training(cfg, session, scratch_dir=session.scratch_dir)
    init_ray(cfg.ray.address)
    result = torch_trainer(cfg).fit()
    if result.error is not None:
        raise result.error
    return dict(result.metrics or {})
