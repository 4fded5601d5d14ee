"""Ray Tune sweeps over paradigms, ViSurf's reward controls, seeds and any other config key (the Ray edge).

A sweep file names a base experiment config, the variants to compare (named override sets: SFT, RLVR, SFT→RLVR,
ViSurf and its reward-control ablations), seeds, extra grid/distribution axes, and Tune settings. Each trial runs the
per-worker loop: in the trial's own process when `ray.num_workers` is 0 (the tiny CPU default), else as a Ray Train
`TorchTrainer` (DeepSpeed in each worker) reporting to Tune through `TuneReportCallback` (the Train V2 pattern).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from visurf_ray.config import ConfigError, ExperimentConfig, check_paths, load_config
from visurf_ray.train.loop import run_training
from visurf_ray.train.sinks import RunIdentity, close_open_sinks
from visurf_ray.validation import check_choice, check_int, check_number, require

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint")
RUN_NAME = "train"
"""A trial's run folder inside its Tune trial folder (the loop's run_dir: per-item evaluation rows)."""
URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file", "mock")
"""`storage_dir` URIs: the schemes pyarrow's `FileSystem.from_uri` (Ray's storage) resolves."""


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
        check_choice("tune.mode", self.mode, ("max", "min"), error=ConfigError)
        check_choice("tune.scheduler", self.scheduler, ("none", "asha", "median"), error=ConfigError)
        check_int("tune.grace_period", self.grace_period, low=1, error=ConfigError)
        check_int("tune.max_concurrent_trials", self.max_concurrent_trials, low=1, error=ConfigError)
        check_number("tune.cpus_per_trial", self.cpus_per_trial, low=0, low_open=True, error=ConfigError)
        check_number("tune.gpus_per_trial", self.gpus_per_trial, low=0, error=ConfigError)
        check_int("tune.max_failures", self.max_failures, low=0, error=ConfigError)


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
    # Tune's experiment folders and each trial's Train storage: a path (relative to the project root; on a multi-node
    # cluster one every node mounts, `check_shared_storage`) or a URI (s3://bucket/prefix, `check_storage_uri`)
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
    if is_uri(sweep.storage_dir):
        split = urlsplit(sweep.storage_dir)
        where = f"storage_dir={sweep.storage_dir!r}"
        require(
            split.scheme in URI_SCHEMES,
            where,
            f"is not supported: a URI's scheme must be one of {', '.join(URI_SCHEMES)} (pyarrow filesystems), or give "
            "a path",
            error=ConfigError,
        )
        require(
            split.scheme in ("file", "mock") or split.netloc,
            where,
            f"names no bucket: expected {split.scheme}://bucket/prefix",
            error=ConfigError,
        )
    require(sweep.variants, "variants", "is empty: the sweep has no configuration to run", error=ConfigError)
    require(sweep.seeds, "seeds", "is empty: the sweep has no trial to run", error=ConfigError)
    for key, values in sweep.grid.items():
        require(
            isinstance(values, list) and values,
            f"grid.{key}",
            f"must be a list of at least one value, got {values!r}",
            error=ConfigError,
        )
    for key, spec in sweep.sample.items():
        require(
            isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS,
            f"sample.{key}",
            f"must be one of {{{', '.join(DISTRIBUTIONS)}: [args]}}, got {spec!r}",
            error=ConfigError,
        )
    for variant, overrides in sweep.variants.items():
        require(
            isinstance(overrides, dict),
            f"variants.{variant}",
            f"must map config keys to values, got {overrides!r}",
            error=ConfigError,
        )
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
    require(
        cfg.ray.num_workers > 0 or not cfg.ray.use_gpu or tune.gpus_per_trial > 0,
        "tune.gpus_per_trial=0",
        "is invalid with ray.use_gpu=true and ray.num_workers=0: the trial trains in its own process and needs a GPU "
        "(set tune.gpus_per_trial=1)",
        error=ConfigError,
    )
    require(
        cfg.ray.num_workers == 0 or tune.gpus_per_trial == 0,
        f"tune.gpus_per_trial={tune.gpus_per_trial}",
        f"is invalid with ray.num_workers={cfg.ray.num_workers}: the trial only drives its Ray Train workers, which "
        "ask for their GPUs (ray.use_gpu); set it to 0",
        error=ConfigError,
    )


def is_uri(storage: str | Path) -> bool:
    """Whether a storage location is a URI (s3://bucket/prefix) rather than a filesystem path."""
    return "://" in str(storage)


def storage_location(sweep: SweepConfig, root: Path) -> str:
    """Where the sweep's Tune experiment folder lives: `storage_dir` as written when it is a URI, else the absolute
    folder it names (relative to `root`, the project root)."""
    if is_uri(sweep.storage_dir):
        return sweep.storage_dir
    return str((root / sweep.storage_dir).resolve())


def storage_join(storage: str, *parts: str) -> str:
    """`storage` (a path or a URI, whose query string is kept) with `parts` appended to its path."""
    if not is_uri(storage):
        return str(Path(storage, *parts))
    split = urlsplit(storage)
    return urlunsplit(split._replace(path="/".join([split.path.rstrip("/"), *parts])))


def storage_filesystem(storage: str):
    """(pyarrow filesystem, path on it) of a storage URI, as Ray resolves it (`pyarrow.fs.FileSystem.from_uri`: S3
    credentials, region and endpoint from the usual AWS variables, AWS_ENDPOINT_URL included, or the URI's query)."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(storage)


def check_storage_uri(storage: str) -> None:
    """ConfigError naming `storage` unless this process can reach it, create its folder and write, read back and
    delete a marker file there. A bucket is shared by every node by construction; the trials' nodes reach it with
    their own credentials (instance profile or the same variables)."""
    import uuid

    import pyarrow

    try:
        filesystem, path = storage_filesystem(storage)
        filesystem.create_dir(path)
        marker = f"{path.rstrip('/')}/.visurf-writable-{uuid.uuid4().hex}"
        with filesystem.open_output_stream(marker) as out:
            out.write(b"ok")
        with filesystem.open_input_stream(marker) as back:
            if back.read() != b"ok":
                raise OSError(f"the marker {marker!r} read back differs from what was written")
        filesystem.delete_file(marker)
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        reason = " ".join(str(error).split())[:300]
        raise ConfigError(
            f"storage_dir={storage!r} is not reachable or not writable from the sweep's driver: {reason}"
        ) from error


def delete_storage(storage: str) -> None:
    """Delete a storage folder or URI prefix and everything in it, if it exists (`--fresh`)."""
    if not is_uri(storage):
        if Path(storage).exists():
            shutil.rmtree(storage)
        return
    import pyarrow.fs

    filesystem, path = storage_filesystem(storage)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        filesystem.delete_dir(path)


def download_rows(storage: str, local: Path) -> None:
    """Copy a run folder's row files (evaluation rows, metrics) from the URI `storage` into the folder `local`, those
    it has: what a resumed trial appends to (TensorBoard and wandb start files of their own, kept in storage)."""
    import pyarrow.fs

    from visurf_ray.train.loop import EVAL_ITEMS, METRICS_ROWS

    filesystem, path = storage_filesystem(storage)
    for name in (EVAL_ITEMS, METRICS_ROWS):
        remote = f"{path.rstrip('/')}/{name}"
        if filesystem.get_file_info(remote).type == pyarrow.fs.FileType.File:
            local.mkdir(parents=True, exist_ok=True)
            pyarrow.fs.copy_files(
                remote,
                str(local / name),
                source_filesystem=filesystem,
                destination_filesystem=pyarrow.fs.LocalFileSystem(),
            )


def upload_folder(local: Path, storage: str) -> None:
    """Copy the folder `local` to the URI `storage` (files of the same name replaced, others kept)."""
    import pyarrow.fs

    if not local.is_dir():
        return
    filesystem, path = storage_filesystem(storage)
    filesystem.create_dir(path)
    pyarrow.fs.copy_files(
        str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=filesystem
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


def _identity_of_uri(uri: str, name: str, **fields) -> RunIdentity:
    """A run's identity when its run folder lives at `uri` (a trial's local copy moves between nodes and restarts):
    its id is a hash of the URI without its query string, the same wherever and whenever the trial resumes."""
    digest = hashlib.sha256(urlunsplit(urlsplit(uri)._replace(query="")).encode()).hexdigest()[:16]
    return RunIdentity(name=name, id=digest, **fields)


class TuneSession:
    """The loop's session inside a Tune trial (in-process training): reports and checkpoints through Tune; its metric
    sinks form one wandb run per trial, named after the trial's folder and grouped by sweep. `remote_run`: the run
    folder's URI when storage is a URI (the wandb run's id follows it, not the local copy's path)."""

    rank = 0
    world_size = 1

    def __init__(self, project: str, remote_run: str | None = None):
        import ray
        from ray import tune

        self._restored = tune.get_checkpoint()
        self._project = project
        self._remote_run = remote_run
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
        name, group = Path(context.get_trial_dir()).name, context.get_experiment_name()
        if self._remote_run is not None:
            return _identity_of_uri(self._remote_run, name, group=group, project=self._project)
        return RunIdentity.of_run_dir(run_dir, name=name, group=group, project=self._project)


def run_trial(params: dict[str, Any], sweep: SweepConfig, storage: str) -> None:
    """Tune's function trainable: one trial = one experiment config, logging its own TensorBoard and wandb run.

    Storage a path: the trial's run folder (RUN_NAME: per-item evaluation rows, TensorBoard, wandb) is written
    straight into its folder under `storage` (a path every node sees), not into Tune's local working copy that reaches
    storage only at checkpoints: so a resumed trial finds its earlier rows, and a stopped trial's closed wandb run is
    what is kept. Storage a URI: the run folder is written in the trial's local working folder, which Ray uploads to
    the trial's folder in storage at every checkpoint and when the trial ends (`SyncConfig(sync_artifacts=True)`), and
    a resumed trial first downloads its earlier rows from there (`download_rows`)."""
    cfg = sweep.trial_config(params)
    from ray import tune

    local_trial_dir = Path(tune.get_context().get_trial_dir())
    remote_run = storage_join(storage, sweep.name, local_trial_dir.name, RUN_NAME) if is_uri(storage) else None
    trial_dir = Path(storage) / sweep.name / local_trial_dir.name if remote_run is None else local_trial_dir
    # Tune's table shows progress (no per-step stdout); the loop's sinks write the trial's TensorBoard and wandb.
    log_to = tuple(sink for sink in cfg.log_to if sink != "stdout")
    cfg = dataclasses.replace(cfg, name=RUN_NAME, output_dir=str(trial_dir), log_to=log_to)
    check_paths(cfg)
    if cfg.ray.num_workers == 0:
        if remote_run is not None:
            download_rows(remote_run, trial_dir / RUN_NAME)
        finished = StopFlag.watch(sweep.name, on_raise=close_open_sinks)
        try:
            run_training(cfg, TuneSession(sweep.tune.wandb_project, remote_run))
        finally:
            finished.set()  # the actor may run another trial next: stop watching for this one
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from visurf_ray.train.launcher import torch_trainer

    if remote_run is None:
        trainer = torch_trainer(cfg, callbacks=[TuneReportCallback()])
    else:  # Train's storage: the trial's folder in the bucket (checkpoints under train/); rank 0 mirrors its run folder
        trainer = torch_trainer(
            cfg,
            callbacks=[TuneReportCallback()],
            storage_path=storage_join(storage, sweep.name, local_trial_dir.name),
            loop=functools.partial(mirrored_loop_per_worker, remote_run=remote_run),
        )
    result = trainer.fit()
    if result.error is not None:
        raise result.error


def mirrored_loop_per_worker(config: dict[str, Any], remote_run: str) -> None:
    """Ray Train's entry point for a trial whose storage is a URI: each worker writes in a local folder of its own;
    rank 0 first downloads the run's earlier rows from `remote_run`, then uploads its run folder there before each
    checkpoint is reported (so stored rows always cover the latest checkpoint) and when the loop ends."""
    from visurf_ray.config import config_from_dict

    cfg = dataclasses.replace(config_from_dict(config), output_dir=tempfile.mkdtemp(prefix="visurf-run-"))
    session = MirroredRaySession(remote_run, Path(cfg.output_dir) / cfg.name)
    if session.rank == 0:
        download_rows(remote_run, session.local_run)
    try:
        run_training(cfg, session)
    finally:
        if session.rank == 0:
            upload_folder(session.local_run, remote_run)


class MirroredRaySession:
    """A Ray Train worker's session (`visurf_ray.train.launcher.RaySession`) whose rank 0 uploads its local run folder
    to `remote_run` before reporting a checkpoint; its wandb run's id follows the URI."""

    def __init__(self, remote_run: str, local_run: Path):
        from visurf_ray.train.launcher import RaySession

        self._session = RaySession()
        self.rank, self.world_size = self._session.rank, self._session.world_size
        self.remote_run, self.local_run = remote_run, local_run

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None and self.rank == 0:
            upload_folder(self.local_run, self.remote_run)
        self._session.report(metrics, checkpoint_dir)

    def latest_checkpoint(self) -> Path | None:
        return self._session.latest_checkpoint()

    def run_identity(self, run_dir: Path) -> RunIdentity:
        return _identity_of_uri(self.remote_run, name=run_dir.name)


def trainable(sweep: SweepConfig, storage: str):
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


def build_tuner(sweep: SweepConfig, storage: str, *, restore: bool):
    """The Tuner of `sweep`, stored under `storage/<name>` (a folder or a URI, `storage_location`); resumed (finished
    trials kept) when `restore`."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule, TrialScheduler

    trainer = tune.with_resources(
        trainable(sweep, storage), {"CPU": sweep.tune.cpus_per_trial, "GPU": sweep.tune.gpus_per_trial}
    )
    StopFlag.create(sweep.name)
    # Tune's CSV and JSON loggers feed the ResultGrid; TensorBoard and wandb are written by each trial (`run_trial`)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # a restored Tuner's too
    experiment_dir = storage_join(storage, sweep.name)
    if restore and tune.Tuner.can_restore(experiment_dir):
        return tune.Tuner.restore(experiment_dir, trainer, resume_errored=True)
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
            # a URI: each trial's local working folder (its run folder, `run_trial`) is uploaded to its trial folder
            sync_config=tune.SyncConfig(sync_artifacts=True) if is_uri(storage) else None,
        ),
    )
