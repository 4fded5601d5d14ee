"""The per-worker training loop, written as a plain function of (config, session).

`run_training` runs identically in one process (`LocalSession`: no Ray, used by tests and debugging) and as Ray
Train's `train_loop_per_worker` (`visurf_ray.train.launcher.RaySession`). The session is the only thing that differs:
it says which rank this is, receives metrics and checkpoint folders, and hands back the checkpoint to resume from.
Never imports Ray.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from visurf_ray.config import ExperimentConfig
from visurf_ray.data.sample import Sample
from visurf_ray.train.data import eval_sets, train_dataset
from visurf_ray.train.engine import Engine
from visurf_ray.train.eval_cache import cached_evaluation, evaluation_key
from visurf_ray.train.evaluate import Evaluation, evaluate
from visurf_ray.train.models import model_dir
from visurf_ray.train.sinks import MetricSinks, RunIdentity
from visurf_ray.train.trainer import Trainer
from visurf_ray.validation import require

TRAINER_STATE = "trainer_state.json"
EVAL_ITEMS = "eval_items.jsonl"
"""Per-item evaluation rows of a run (`train.evaluate.Evaluation.items` with their "step"), appended by rank 0 in
the run folder after every evaluation; a resumed run first drops the rows of steps after its checkpoint."""
METRICS_ROWS = "metrics.jsonl"
"""A `LocalSession`'s reported metrics, a row per step (same rule on resume)."""


def keep_rows_until(path: Path, last_step: int) -> None:
    """Rewrite the JSON-lines file `path` (if any) without its rows whose "step" is after `last_step`, atomically."""
    if not path.is_file():
        return
    with open(path) as rows:
        kept = [row for row in rows if json.loads(row)["step"] <= last_step]
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text("".join(kept))
    os.replace(scratch, path)


class Session(Protocol):
    """Where a worker's loop reports to and resumes from."""

    rank: int
    world_size: int

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None: ...

    def latest_checkpoint(self) -> Path | None: ...

    def run_identity(self, run_dir: Path) -> RunIdentity:
        """How the run writing into `run_dir` appears in the metric sinks (the same id when it resumes)."""
        ...


class LocalSession:
    """In-process session: metrics to stdout and `<run_dir>/metrics.jsonl`, checkpoints to `<run_dir>/checkpoints/`.

    A checkpoint folder is moved into place with one rename, so a run killed mid-write never leaves a partial one.
    """

    rank = 0
    world_size = 1

    def __init__(self, run_dir: str | Path, *, keep: int = 2, verbose: bool = True):
        self.run_dir = Path(run_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.verbose = verbose
        self.history: list[dict[str, float]] = []

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.history.append(metrics)
        with open(self.run_dir / METRICS_ROWS, "a") as out:
            out.write(json.dumps(metrics) + "\n")
        if checkpoint_dir is not None:
            final = self.checkpoints / f"step_{int(metrics['step']):06d}"
            if final.exists():
                shutil.rmtree(final)
            os.replace(checkpoint_dir, final)
            for old in sorted(self.checkpoints.glob("step_*"))[: -self.keep]:
                shutil.rmtree(old)

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in self.checkpoints.glob("step_*") if (p / TRAINER_STATE).is_file())
        return done[-1] if done else None

    def run_identity(self, run_dir: Path) -> RunIdentity:
        return RunIdentity.of_run_dir(run_dir, name=run_dir.name)

    def scratch_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.checkpoints))


def step_seed(seed: int, step: int, rank: int) -> int:
    """The sampling seed of one worker's step: a function of (seed, step, rank) alone, so a resumed run samples the
    same completions as an uninterrupted one."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**31 - 1)


def batch_for_step(
    dataset: list[Sample], step: int, per_step: int, rank: int, world_size: int, seed: int
) -> list[Sample]:
    """This worker's share of step `step`'s prompts: epoch-wise seeded shuffles of `dataset`, the global batch of
    `per_step` prompts split into contiguous per-rank shards."""
    require(
        per_step % world_size == 0,
        f"data.prompts_per_step={per_step}",
        f"must be divisible by ray.num_workers={world_size}",
    )
    local = per_step // world_size
    first = step * per_step + rank * local
    picked = []
    for position in range(first, first + local):
        epoch, offset = divmod(position, len(dataset))
        order = np.random.default_rng([seed, epoch]).permutation(len(dataset))
        picked.append(dataset[int(order[offset])])
    return picked


def _average_across_ranks(metrics: dict[str, float], world_size: int) -> dict[str, float]:
    if world_size == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(keys, (values / world_size).tolist()))


def _rng_state() -> dict:
    """Global RNGs (the suite's own sampling uses explicit seeds and numpy Generators; this covers library code)."""
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    folder: Path, engine: Engine, step: int, carried: dict[str, float], rank: int, cfg: ExperimentConfig
) -> None:
    """Engine state (weights, optimizer, LR schedule), the data position (`step`: batches are a function of it), the
    metrics carried from step to step (running totals, latest evaluation) and this rank's RNG state."""
    engine.save(folder)
    torch.save(_rng_state(), folder / f"rng_rank{rank}.pt")
    if rank == 0:
        state = {"step": step, "carried": carried, "config": cfg.to_dict()}
        (folder / TRAINER_STATE).write_text(json.dumps(state))


def read_trainer_state(folder: str | Path) -> dict:
    """A checkpoint folder's trainer_state.json as `save_checkpoint` wrote it: "step", "carried", "config"."""
    return json.loads((Path(folder) / TRAINER_STATE).read_text())


def load_checkpoint(folder: Path, engine: Engine, rank: int) -> tuple[int, dict[str, float]]:
    """Restore a checkpoint written by `save_checkpoint`; returns (steps already done, carried metrics)."""
    engine.load(folder)
    rng_file = folder / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    state = read_trainer_state(folder)
    return int(state["step"]), state["carried"]


def _progress(step: int, total: int, metrics: dict[str, float], started: float) -> None:
    shown = ("loss", "rollout/overall", "label/overall", "label_advantage_mean", "all_fail_fraction", "step_time")
    parts = [f"{k}={metrics[k]:.3g}" for k in shown if k in metrics]
    parts += [f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith("eval/") and k.endswith("/score")]
    bar = "#" * int(20 * step / total)
    print(
        f"[{bar:<20}] step {step}/{total} {time.perf_counter() - started:5.1f}s " + " ".join(parts),
        file=sys.stderr,
        flush=True,
    )


def run_training(cfg: ExperimentConfig, session: Session, *, scratch_dir=None) -> dict[str, float]:
    """Train `cfg` on this worker, resuming from the session's latest checkpoint; returns the last metrics.

    scratch_dir: a callable returning an empty folder to write a checkpoint into before handing it to the session
    (default: a new temporary folder).
    """
    rank, world = session.rank, session.world_size
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    trainer = Trainer.from_config(cfg, world_size=world)
    dataset = train_dataset(cfg)
    evals = eval_sets(cfg)

    run_dir = Path(cfg.output_dir).resolve() / cfg.name

    def evaluate_at(step: int) -> None:
        """Evaluate the policy after `step` updates: metrics into `carried`, item rows into the run's EVAL_ITEMS.
        The starting policy's evaluation is shared through `eval_cache` by every run with the same checkpoint,
        items and settings (single-worker runs: ranks of a multi-worker run must all evaluate)."""
        began = time.perf_counter()

        def compute() -> Evaluation:
            return evaluate(trainer.policy, evals, cfg.rollout.eval_max_new_tokens, rank=rank, world_size=world)

        if step == 0 and world == 1:
            key = evaluation_key(model_dir(cfg.model), evals, cfg.rollout.eval_max_new_tokens, cfg.model.dtype)
            evaluation = cached_evaluation(key, compute)
        else:
            evaluation = compute()
        carried.update(evaluation.metrics)
        carried["eval_step"] = float(step)
        carried["eval_time_total"] = carried.get("eval_time_total", 0.0) + time.perf_counter() - began
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / EVAL_ITEMS, "a") as out:
                out.writelines(json.dumps({"step": step, **row}) + "\n" for row in evaluation.items)

    start = 0
    # Reported with every step: the budget so far (comparable across paradigms) and the latest evaluation, so that
    # every report carries the eval metrics a sweep optimises (step 0 evaluates the starting policy).
    carried = {"generated_tokens_total": 0.0, "train_time_total": 0.0, "eval_time_total": 0.0}
    resume_from = session.latest_checkpoint()
    if resume_from is not None:
        start, carried = load_checkpoint(resume_from, trainer.engine, rank)
        trainer.backend.sync_weights(trainer.module)
        if rank == 0:  # rows written after the checkpoint (an interrupted run's) are written again from `start`
            keep_rows_until(run_dir / EVAL_ITEMS, start)
            keep_rows_until(run_dir / METRICS_ROWS, start)
    elif cfg.eval_every:
        evaluate_at(0)
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    sinks = MetricSinks(cfg, run_dir, session.run_identity(run_dir)) if rank == 0 else None
    try:
        for step in range(start, cfg.steps):
            samples = batch_for_step(dataset, step, cfg.data.prompts_per_step, rank, world, cfg.seed)
            metrics = trainer.step(step, samples, step_seed(cfg.seed, step, rank))
            metrics = _average_across_ranks(metrics, world)
            done = step + 1
            metrics["step"] = float(done)
            metrics["prompts_seen"] = float(done * cfg.data.prompts_per_step)
            carried["generated_tokens_total"] += metrics.get("generated_tokens", 0.0) * world
            carried["train_time_total"] += metrics["step_time"]
            if done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0):
                evaluate_at(done)
            metrics.update(carried)
            checkpoint_dir = None
            if done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                checkpoint_dir = Path(scratch_dir() if scratch_dir else tempfile.mkdtemp(prefix="visurf-ckpt-"))
                save_checkpoint(checkpoint_dir, trainer.engine, done, carried, rank, cfg)
            if sinks is not None:  # rank 0
                sinks.log(metrics, done)
                if "stdout" in cfg.log_to:
                    _progress(done, cfg.steps, metrics, started)
            session.report(metrics, checkpoint_dir)
    finally:  # also when the run is interrupted (KeyboardInterrupt, a stopped Tune trial's SystemExit)
        if sinks is not None:
            sinks.close()
    return metrics
