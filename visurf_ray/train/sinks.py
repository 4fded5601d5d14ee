"""Where a run's metrics go besides its session: TensorBoard event files and wandb (offline unless the user has set
up wandb), written by rank 0 of every run, a sweep's trials included (one wandb run per trial, in the trial's own
process: no logging actor, nothing queued through the driver). Never imports Ray.

A run can be stopped from another thread (an interrupted sweep's trial, `visurf_ray.sweep.StopFlag`, is killed
seconds later, mid-step): `close_open_sinks` closes every open sink of the process, and a closed sink ignores later
writes, so an interrupted run's writers and wandb run are finished.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast, get_args

from visurf_ray.config import ExperimentConfig
from visurf_ray.validation import check_choice

WandbMode = Literal["online", "offline", "disabled", "shared"]


def wandb_mode() -> WandbMode:
    """The wandb mode of WANDB_MODE (offline when unset); ValueError naming the variable for an unknown one."""
    mode = os.environ.get("WANDB_MODE", "offline")
    check_choice("WANDB_MODE", mode, get_args(WandbMode))
    return cast(WandbMode, mode)


DEFAULT_PROJECT = "visurf_ray"
_OPEN: weakref.WeakSet[MetricSinks] = weakref.WeakSet()


@dataclass(frozen=True)
class RunIdentity:
    """How a run appears in wandb: its display `name`, `group` (a sweep's name) and `project`, and an `id` that
    stays the same when the run resumes after an interrupt, so a resumed run continues its wandb run."""

    name: str
    id: str
    group: str | None = None
    project: str = DEFAULT_PROJECT

    @classmethod
    def of_run_dir(cls, run_dir: Path, name: str, **fields) -> RunIdentity:
        """The identity of the run writing into `run_dir`: its id is a hash of the folder's absolute path."""
        digest = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        return cls(name=name, id=digest, **fields)


class MetricSinks:
    """Writes each step's metrics to the sinks named in `cfg.log_to` (tensorboard → <run_dir>/tensorboard,
    wandb → the run `identity`, mode from WANDB_MODE, offline by default, files under <run_dir>/wandb)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, identity: RunIdentity):
        self.writer = self.wandb_run = None
        self._lock = threading.Lock()
        self._closed = False
        if "tensorboard" in cfg.log_to:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in cfg.log_to:
            import wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb.init(
                project=identity.project,
                group=identity.group,
                name=identity.name,
                id=identity.id,
                resume="allow",
                dir=str(run_dir),
                config=cfg.to_dict(),
                mode=wandb_mode(),
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )
        _OPEN.add(self)

    def log(self, metrics: dict[str, float], step: int) -> None:
        with self._lock:
            if self._closed:
                return
            if self.writer is not None:
                for key, value in metrics.items():
                    self.writer.add_scalar(key, value, step)
                self.writer.flush()
            if self.wandb_run is not None:
                self.wandb_run.log(metrics, step=step)

    def close(self) -> None:
        """Close the TensorBoard writer and finish the wandb run; later calls and later `log`s do nothing."""
        with self._lock:  # a second caller waits here until the first has closed everything
            if self._closed:
                return
            self._closed = True
            if self.writer is not None:
                self.writer.close()
            if self.wandb_run is not None:
                self.wandb_run.finish()
            _OPEN.discard(self)


def close_open_sinks() -> None:
    """Close every sink of this process that is still open (a run stopped from outside its loop's thread)."""
    for sinks in list(_OPEN):
        sinks.close()


atexit.register(close_open_sinks)  # a process that exits normally while its loop runs (e.g. on SystemExit)
