"""Ray Tune sweeps over paradigms, ViSurf's reward controls, seeds and any other config key (the Ray edge).

A sweep file names a base experiment config, the variants to compare (named override sets: SFT, RLVR, SFT→RLVR,
ViSurf and its reward-control ablations), seeds, extra grid/distribution axes, and Tune settings. Each trial runs the
per-worker loop: in the trial's own process when `ray.num_workers` is 0 (the tiny CPU default), else as a Ray Train
`TorchTrainer` (DeepSpeed in each worker) reporting to Tune through `TuneReportCallback` (the Train V2 pattern).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from visurf_ray.config import ConfigError, ExperimentConfig, check_paths, load_config
from visurf_ray.train.loop import run_training
from visurf_ray.train.sinks import RunIdentity, close_open_sinks

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint")
RUN_NAME = "train"
"""A trial's run folder inside its Tune trial folder (the loop's run_dir: per-item evaluation rows)."""


@dataclass(frozen=True)
class TuneSettings:
    metric: str = "eval/mean_score"
    mode: str = "max"
    scheduler: str = "none"  # none | asha | median
    grace_period: int = 1  # ASHA / median stopping: reports before a trial may be stopped
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 2  # restarts of a trial whose process or node dies, each from its latest checkpoint
    wandb_project: str = "visurf_ray"

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ConfigError(f"tune.mode={self.mode!r} is invalid: expected max or min")
        if self.scheduler not in ("none", "asha", "median"):
            raise ConfigError(f"tune.scheduler={self.scheduler!r} is invalid: expected none, asha or median")
        if self.max_concurrent_trials < 1:
            raise ConfigError(f"tune.max_concurrent_trials={self.max_concurrent_trials} is invalid: expected >= 1")
        if self.cpus_per_trial <= 0:
            raise ConfigError(f"tune.cpus_per_trial={self.cpus_per_trial} is invalid: expected > 0")
        if self.max_failures < 0:
            raise ConfigError(f"tune.max_failures={self.max_failures} is invalid: expected >= 0")


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep varies. `variants`: name -> overrides (dotted key -> value); `seeds`: grid of `seed`;
    `grid`: dotted key -> list of values; `sample`: dotted key -> {distribution: args}; `num_samples`: draws of
    `sample` per grid point."""

    name: str
    experiment: str  # base experiment YAML (relative paths are relative to the sweep file)
    overrides: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    grid: dict[str, list] = field(default_factory=dict)
    sample: dict[str, dict[str, list]] = field(default_factory=dict)
    num_samples: int = 1
    output_dir: str = "results"  # tables and plots go to <output_dir>/<name>/ (relative to the project root)
    # Tune's experiment folders and each trial's Train storage (relative to the project root); on a multi-node cluster
    # a path every node mounts (`check_shared_storage`)
    storage_dir: str = "runs/sweeps"
    tune: TuneSettings = field(default_factory=TuneSettings)

    def trial_overrides(self, params: dict[str, Any]) -> list[str]:
        """`key=value` overrides of one trial's parameters (`variant`, `seed`, and `cfg/<dotted key>` entries)."""
        overrides = [f"{k}={_yaml_value(v)}" for k, v in self.overrides.items()]
        overrides += [f"{k}={_yaml_value(v)}" for k, v in self.variants[params["variant"]].items()]
        overrides.append(f"seed={params['seed']}")
        overrides += [f"{k.removeprefix('cfg/')}={_yaml_value(v)}" for k, v in params.items() if k.startswith("cfg/")]
        return overrides

    def trial_config(self, params: dict[str, Any]) -> ExperimentConfig:
        return load_config(self.experiment, self.trial_overrides(params))


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read a sweep YAML; `overrides` are `key=value` for the sweep's own keys (e.g. `tune.max_concurrent_trials=1`,
    `seeds=[0]`) or, prefixed with `experiment.`, overrides of every trial's config. Validates every key a trial
    will set against the experiment config, naming an unknown key."""
    from visurf_ray.config import config_from_dict, merge, parse_override

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "experiment" and len(keys) > 1:
            values = merge(values, ["overrides", ".".join(keys[1:])], value)
        else:
            values = merge(values, keys, value)
    known = {f.name for f in dataclasses.fields(SweepConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown sweep key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    for key in ("name", "experiment"):
        if key not in values:
            raise ConfigError(f"sweep file {str(path)!r} has no {key!r}")
    experiment = Path(values["experiment"])
    values["experiment"] = str(experiment if experiment.is_absolute() else (path.parent / experiment).resolve())
    values["tune"] = config_from_dict(values.get("tune", {}), TuneSettings, "tune.")
    values["seeds"] = tuple(values.get("seeds", (0,)))
    sweep = SweepConfig(**values)
    _validate(sweep)
    return sweep


def _validate(sweep: SweepConfig) -> None:
    if "://" in sweep.storage_dir:
        raise ConfigError(
            f"storage_dir={sweep.storage_dir!r} is not supported: each trial writes its run folder (evaluation rows, "
            "TensorBoard, wandb) straight into storage, so it must be a filesystem path every node mounts (NFS, EFS, "
            "FSx, or a bucket mounted with mountpoint-s3 / s3fs), not a URI"
        )
    if not sweep.variants:
        raise ConfigError("variants is empty: the sweep has no configuration to run")
    if not sweep.seeds:
        raise ConfigError("seeds is empty: the sweep has no trial to run")
    for key, values in sweep.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key} is empty or not a list: expected at least one value")
    for key, spec in sweep.sample.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"sample.{key} must be one of {{{', '.join(DISTRIBUTIONS)}: [args]}}, got {spec!r}")
    for variant, overrides in sweep.variants.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"variants.{variant} must map config keys to values, got {overrides!r}")
        params = {"variant": variant, "seed": sweep.seeds[0]}
        params |= {f"cfg/{k}": v[0] for k, v in sweep.grid.items()}
        params |= {f"cfg/{k}": next(iter(spec.values()))[0] for k, spec in sweep.sample.items()}  # a valid draw
        try:
            _check_trial_resources(sweep.tune, sweep.trial_config(params))
        except ConfigError as error:
            raise ConfigError(f"variant {variant!r}: {error}") from error


def _check_trial_resources(tune: TuneSettings, cfg: ExperimentConfig) -> None:
    """A trial asks Ray for what its config runs on: its own process trains when `ray.num_workers` is 0 (so it
    holds the GPU), else it only drives Ray Train workers that ask for their GPUs themselves."""
    if cfg.ray.num_workers == 0 and cfg.ray.use_gpu and tune.gpus_per_trial == 0:
        raise ConfigError(
            "tune.gpus_per_trial=0 is invalid with ray.use_gpu=true and ray.num_workers=0: the trial trains in its own "
            "process and needs a GPU (set tune.gpus_per_trial=1)"
        )
    if cfg.ray.num_workers > 0 and tune.gpus_per_trial > 0:
        raise ConfigError(
            f"tune.gpus_per_trial={tune.gpus_per_trial} is invalid with ray.num_workers={cfg.ray.num_workers}: the "
            "trial only drives its Ray Train workers, which ask for their GPUs (ray.use_gpu); set it to 0"
        )


def check_shared_storage(storage: Path) -> None:
    """On a cluster of several nodes, ConfigError unless every alive node sees `storage` (absolute): the driver writes
    a marker file there and a task on each node looks for it. Trials and their Train workers restart on any node and
    read their checkpoints and run folders from there, so a node-local folder (the default `runs/sweeps` inside a
    `ray job submit` working directory, a local disk) would lose them."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2:
        return
    storage.mkdir(parents=True, exist_ok=True)
    marker = storage / f".visurf-shared-{uuid.uuid4().hex}"
    marker.touch()
    exists = ray.remote(num_cpus=0)(os.path.exists)
    try:
        seen = ray.get(
            [
                exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
                    str(marker)
                )
                for node in nodes
            ]
        )
    finally:
        marker.unlink()
    blind = [node["NodeID"][:12] for node, ok in zip(nodes, seen) if not ok]
    if blind:
        raise ConfigError(
            f"storage_dir resolves to {str(storage)!r}, which {len(blind)} of the cluster's {len(nodes)} nodes do not "
            f"see (node ids {', '.join(blind)}): on a multi-node cluster Tune's and Train's storage must be a path "
            "every node mounts (NFS, EFS, FSx)"
        )


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's search space: grids over variants, seeds and `grid` keys; distributions for `sample` keys."""
    from ray import tune

    space: dict[str, Any] = {
        "variant": tune.grid_search(list(sweep.variants)),
        "seed": tune.grid_search(list(sweep.seeds)),
    }
    for key, values in sweep.grid.items():
        space[f"cfg/{key}"] = tune.grid_search(values)
    for key, spec in sweep.sample.items():
        kind, args = next(iter(spec.items()))
        space[f"cfg/{key}"] = getattr(tune, kind)(args) if kind == "choice" else getattr(tune, kind)(*args)
    return space


class TuneSession:
    """The loop's session inside a Tune trial (in-process training): reports and checkpoints through Tune; its metric
    sinks form one wandb run per trial, named after the trial's folder and grouped by sweep."""

    rank = 0
    world_size = 1

    def __init__(self, project: str):
        import ray
        from ray import tune

        self._restored = tune.get_checkpoint()
        self._project = project
        self._node_id = ray.get_runtime_context().get_node_id()  # in every report: where the trial ran

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        from ray import tune

        checkpoint = None if checkpoint_dir is None else tune.Checkpoint.from_directory(str(checkpoint_dir))
        tune.report({**metrics, "node_id": self._node_id}, checkpoint=checkpoint)

    def latest_checkpoint(self) -> Path | None:
        if self._restored is None:
            return None
        return Path(self._restored.to_directory(tempfile.mkdtemp(prefix="visurf-restore-")))

    def run_identity(self, run_dir: Path) -> RunIdentity:
        from ray import tune

        context = tune.get_context()
        return RunIdentity.of_run_dir(
            run_dir, name=Path(context.get_trial_dir()).name, group=context.get_experiment_name(), project=self._project
        )


def run_trial(params: dict[str, Any], sweep: SweepConfig, storage: str) -> None:
    """Tune's function trainable: one trial = one experiment config, logging its own TensorBoard and wandb run.

    The trial's run folder (RUN_NAME: per-item evaluation rows, TensorBoard, wandb) is written straight into its
    folder under `storage` (a path every node sees), not into Tune's local working copy that reaches storage only at
    checkpoints: so a resumed trial finds its earlier rows, and a stopped trial's closed wandb run is what is kept."""
    cfg = sweep.trial_config(params)
    from ray import tune

    trial_dir = Path(storage) / sweep.name / Path(tune.get_context().get_trial_dir()).name
    # Tune's table shows progress (no per-step stdout); the loop's sinks write the trial's TensorBoard and wandb.
    log_to = tuple(sink for sink in cfg.log_to if sink != "stdout")
    cfg = dataclasses.replace(cfg, name=RUN_NAME, output_dir=str(trial_dir), log_to=log_to)
    check_paths(cfg)
    if cfg.ray.num_workers == 0:
        finished = StopFlag.watch(sweep.name, on_raise=close_open_sinks)
        try:
            run_training(cfg, TuneSession(sweep.tune.wandb_project))
        finally:
            finished.set()  # the actor may run another trial next: stop watching for this one
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from visurf_ray.train.launcher import torch_trainer

    result = torch_trainer(cfg, callbacks=[TuneReportCallback()]).fit()
    if result.error is not None:
        raise result.error


def trainable(sweep: SweepConfig, storage: Path):
    """`run_trial` as a Tune trainable whose stop closes the trial's metric sinks before the process ends: Tune stops
    a trial between two of its reports (an interrupted sweep, a scheduler's early stop) and ends the process right
    after, while the loop's own `finally` may still be finishing the wandb run in its thread."""
    from ray import tune
    from ray.tune.trainable import wrap_function

    # a class made by Tune at run time (mypy cannot check a dynamic base)
    class SweepTrial(wrap_function(tune.with_parameters(run_trial, sweep=sweep, storage=str(storage)))):  # type: ignore[misc]
        def cleanup(self):
            close_open_sinks()
            super().cleanup()

    SweepTrial.__name__ = SweepTrial.__qualname__ = "run_trial"
    return SweepTrial


_STOP_FLAGS: dict[str, Any] = {}
"""This driver's stop flags by sweep name (a named actor lives while a handle to it does)."""


class StopFlag:
    """An interrupted sweep's message to its running trials, on every node: a named Ray actor (no CPU) that the driver
    raises on SIGINT/SIGTERM and each trial polls from a thread. A trial closes its metric sinks as soon as it sees
    it: Tune can stop a running trial only between two reports, and kills it 5 s after asking."""

    POLL_SECONDS = 0.5

    def __init__(self):
        self.raised = False

    def raise_flag(self) -> None:
        self.raised = True

    def is_raised(self) -> bool:
        return self.raised

    @staticmethod
    def actor_name(sweep_name: str) -> str:
        return f"visurf-sweep-stop:{sweep_name}"

    @classmethod
    def create(cls, sweep_name: str) -> None:
        """Create the sweep's flag, lowered, owned by this driver (replacing an earlier run's)."""
        import ray

        name = cls.actor_name(sweep_name)
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(name))
        _STOP_FLAGS[sweep_name] = ray.remote(num_cpus=0)(cls).options(name=name).remote()

    @classmethod
    def raise_for(cls, sweep_name: str) -> None:
        """Raise the flag of the sweep `sweep_name` (its driver's Ray connection)."""
        import ray

        ray.get(_STOP_FLAGS[sweep_name].raise_flag.remote())

    @classmethod
    def watch(cls, sweep_name: str, on_raise) -> threading.Event:
        """Call `on_raise()` from a daemon thread once the sweep's flag is raised or the driver that owns it is gone;
        setting the returned event ends the watch without calling it."""
        import ray

        flag = ray.get_actor(cls.actor_name(sweep_name))
        finished = threading.Event()

        def poll() -> None:
            while not finished.wait(cls.POLL_SECONDS):
                raised: bool
                try:
                    raised = bool(ray.get(flag.is_raised.remote()))
                except ray.exceptions.RayError:
                    raised = True
                if raised:
                    on_raise()
                    return

        threading.Thread(target=poll, name="visurf-stop-flag", daemon=True).start()
        return finished


def build_tuner(sweep: SweepConfig, storage: Path, *, restore: bool):
    """The Tuner of `sweep`, stored under `storage/<name>`; resumed (finished trials kept) when `restore`."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule, TrialScheduler

    trainer = tune.with_resources(
        trainable(sweep, storage), {"CPU": sweep.tune.cpus_per_trial, "GPU": sweep.tune.gpus_per_trial}
    )
    StopFlag.create(sweep.name)
    # Tune's CSV and JSON loggers feed the ResultGrid; TensorBoard and wandb are written by each trial (`run_trial`)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # a restored Tuner's too
    experiment_dir = storage / sweep.name
    if restore and tune.Tuner.can_restore(str(experiment_dir)):
        return tune.Tuner.restore(str(experiment_dir), trainer, resume_errored=True)
    scheduler: TrialScheduler | None = None
    if sweep.tune.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", grace_period=sweep.tune.grace_period)
    elif sweep.tune.scheduler == "median":
        scheduler = MedianStoppingRule(time_attr="step", grace_period=sweep.tune.grace_period)
    return tune.Tuner(
        trainer,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.tune.metric,
            mode=sweep.tune.mode,
            scheduler=scheduler,
            num_samples=sweep.num_samples,
            max_concurrent_trials=sweep.tune.max_concurrent_trials,
            trial_dirname_creator=lambda trial: (
                f"{trial.config['variant']}_seed{trial.config['seed']}_{trial.trial_id}".replace(" ", "_").replace(
                    "/", "-"
                )
            ),
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=str(storage),
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback()],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),  # 1 forces a state snapshot at every checkpoint
            failure_config=tune.FailureConfig(max_failures=sweep.tune.max_failures),
        ),
    )
