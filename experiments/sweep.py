"""The main job: compare SFT, RLVR, SFT→RLVR, ViSurf and ViSurf's reward-control ablations with a Ray Tune sweep.

    python experiments/sweep.py                                   # the embedded tiny default on this machine
    python experiments/sweep.py --sweep experiments/configs/sweep_qwen2_5_vl_3b.yaml      # on a Ray cluster
    python experiments/sweep.py seeds=[0] tune.max_concurrent_trials=1 experiment.steps=10   # overrides

Joins a running Ray cluster when there is one (RAY_ADDRESS or `ray start`), else starts a local one on 127.0.0.1.
Ctrl-C or SIGTERM stops the trials (their loggers closed), saves the sweep's state and exits with 128 + the signal;
re-running the same command resumes the sweep (finished trials are kept); `--fresh` starts over; `--report` writes
the tables and report of a stopped sweep's finished trials (those that reached their last step) without running any.
Writes Tune's experiment folder under runs/sweeps/<name>/ (`storage_dir`, a folder or a URI such as s3://bucket/prefix;
per trial `train/`: evaluation rows, TensorBoard, wandb) and results/<name>/: results, history and items
{csv,parquet}, summary.md (re-written from the tables by `python -m analysis.report results/<name>`), curves.png,
tasks.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import signal
import sys
import threading
import time
from pathlib import Path

from visurf_ray.config import ConfigError
from visurf_ray.interrupts import Interrupts
from visurf_ray.sweep import RUN_NAME, load_sweep, storage_join, storage_location

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = Path(__file__).parent / "configs" / "sweep_tiny.yaml"


class MemoryWatch:
    """Peak memory of the sweep's own processes (bytes), sampled every 2 s: the proportional set size (PSS: shared
    pages split between the processes that map them; ~3 ms a process to read) summed over this process and its
    descendants — the local Ray cluster it started, the trials and their workers; other jobs on the machine are not
    counted. A sweep that joins a running cluster counts only this driver."""

    def __init__(self):
        import psutil

        self._root = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _total(self) -> int:
        import psutil

        total = 0
        for process in (self._root, *self._root.children(recursive=True)):
            with contextlib.suppress(psutil.Error):  # a process that ended or is not readable
                total += process.memory_full_info().pss
        return total

    def _run(self):
        while not self._stop.wait(2.0):
            self.peak = max(self.peak, self._total())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def connect_ray() -> str:
    """Join a running cluster if there is one, else start a local one bound to loopback; returns which.
    RAY_ADDRESS=local starts a local one even beside a running cluster (tests: never join another job's cluster)."""
    import os

    import ray

    from visurf_ray.numerics import ray_env_vars

    env = {"env_vars": ray_env_vars()}  # every trial's kernels pinned as the driver's (visurf_ray.numerics)
    if os.environ.get("RAY_ADDRESS") == "local":
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False, runtime_env=env)
        return "started a local Ray cluster on 127.0.0.1"
    try:
        ray.init(address="auto", log_to_driver=False, runtime_env=env)
        return "joined the running Ray cluster"
    except ConnectionError:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False, runtime_env=env)
        return "started a local Ray cluster on 127.0.0.1"


def _trial_rows(result, name: str, *, uri: bool) -> list[str]:
    """The lines of file `name` in a trial's run folder, read from storage: the trial's folder on a filesystem path,
    or (`uri`) through the result's pyarrow filesystem (S3, ...)."""
    if not uri:
        with open(Path(result.path) / RUN_NAME / name) as rows:
            return rows.readlines()
    with result.filesystem.open_input_stream(f"{result.path.rstrip('/')}/{RUN_NAME}/{name}") as stream:
        return stream.read().decode().splitlines(keepends=True)


def collect(sweep, result_grid) -> dict:
    """Tidy results, history and per-item evaluation tables from Tune's ResultGrid (items from each trial's
    `train/eval_items.jsonl`, which `visurf_ray.sweep.run_trial`'s loop writes, read from storage)."""
    import json

    import pandas as pd

    from analysis.results import tidy_history, tidy_items, tidy_trial
    from visurf_ray.sweep import is_uri
    from visurf_ray.train.loop import EVAL_ITEMS

    uri = is_uri(sweep.storage_dir)
    results, histories, items = [], [], []
    for result in result_grid:
        if result.error is not None or result.metrics is None or not result.config:
            continue
        params = result.config
        trial_id = Path(result.path).name
        config = sweep.trial_config(params).to_dict()
        variant, paradigm = params["variant"], config["objective"]["paradigm"]
        results.append(tidy_trial(trial_id, variant, config, result.metrics))
        histories.append(tidy_history(trial_id, variant, params["seed"], result.metrics_dataframe))
        rows = _trial_rows(result, EVAL_ITEMS, uri=uri)
        items.append(tidy_items(trial_id, variant, paradigm, params["seed"], map(json.loads, rows)))
    if not results:
        raise RuntimeError("no trial reported any result; see the trial logs under the Tune experiment folder")
    return {
        name: pd.concat(frames, ignore_index=True)
        for name, frames in (("results", results), ("history", histories), ("items", items))
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default=str(DEFAULT_SWEEP), help="sweep YAML")
    parser.add_argument("--fresh", action="store_true", help="discard an earlier run of this sweep and start over")
    parser.add_argument("--report", action="store_true", help="report a stopped sweep's finished trials; runs no trial")
    parser.add_argument("overrides", nargs="*", help="sweep keys (seeds=[0]) or experiment.<key>=value")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep, args.overrides)
    except ConfigError as error:
        parser.error(str(error))
    if args.report:
        if args.fresh:
            parser.error("--report reads the sweep's saved state; --fresh would discard it")
        return report_finished(sweep)
    with Interrupts() as interrupts:
        try:
            return run_sweep(sweep, fresh=args.fresh, interrupts=interrupts)
        except KeyboardInterrupt:
            interrupts.received = interrupts.received or signal.SIGINT
        storage = storage_join(storage_location(sweep, ROOT), sweep.name)
        print(
            f"{interrupts.name}: sweep stopped; its state is saved in {storage} and the same command resumes it",
            file=sys.stderr,
            flush=True,
        )
        import ray

        ray.shutdown()  # stops the local cluster if this process started it
        raise SystemExit(interrupts.exit_code)


def with_base_model_digest(sweep):
    """`sweep` with `model.weights_sha256` set to the tiny base model's (built first if need be) when its trials
    start from it: every trial checks that its node built these bits (a CPU that rounds otherwise builds another
    model), and the report names them."""
    from visurf_ray.config import TINY_BASE_MODEL, load_config

    base = load_config(sweep.experiment, [f"{k}={v}" for k, v in sweep.overrides.items()])
    if base.model.path != TINY_BASE_MODEL:
        return sweep
    from visurf_ray.train.pretrain import ensure_base_model, weights_sha256

    folder = ensure_base_model()
    digest = base.model.weights_sha256 or weights_sha256(folder)
    print(f"tiny base model: {folder} (weights sha256 {digest})", flush=True)
    return dataclasses.replace(sweep, overrides={**sweep.overrides, "model.weights_sha256": digest})


def write_outputs(sweep, tables: dict) -> tuple[Path, str]:
    """Write `tables` (`collect`'s), the report and the plots into results/<name>/; returns (that folder, report)."""
    from analysis.report import write_summary
    from analysis.results import plot_curves, plot_task_bars, write_tables

    out_dir = (ROOT / sweep.output_dir / sweep.name).resolve()
    write_tables(tables, out_dir)
    report = write_summary(out_dir)
    plot_curves(tables["history"], out_dir / "curves.png")
    plot_task_bars(tables["results"], out_dir / "tasks.png")
    return out_dir, report


def report_finished(sweep) -> Path:
    """Tables, report and plots of a stopped sweep's finished trials — those whose last report is their config's
    last step — from its saved Tune state, into results/<name>/; runs no trial. The report's header counts the
    trials it covers."""
    import ray

    from visurf_ray.sweep import build_tuner

    sweep = with_base_model_digest(sweep)
    storage = storage_location(sweep, ROOT)
    print(connect_ray(), flush=True)
    try:
        grid = build_tuner(sweep, storage, restore=True).get_results()
        finished = [
            result
            for result in grid
            if result.error is None
            and result.metrics
            and result.config
            and int(result.metrics.get("step", 0)) == sweep.trial_config(result.config).steps
        ]
        if not finished:
            raise SystemExit(f"no trial of {sweep.name} has finished yet ({len(grid)} started)")
        out_dir, report = write_outputs(sweep, collect(sweep, finished))
    finally:
        ray.shutdown()
    print(f"\n{report}\n{len(finished)} of {len(grid)} trials finished; results: {out_dir}")
    return out_dir


def run_sweep(sweep, *, fresh: bool, interrupts: Interrupts) -> Path:
    """Run (or resume) `sweep`, then write its tables, report and plots; KeyboardInterrupt if interrupted."""
    from visurf_ray.sweep import StopFlag, build_tuner, check_shared_storage, check_storage_uri, delete_storage, is_uri

    started, memory = time.perf_counter(), MemoryWatch()
    sweep = with_base_model_digest(sweep)
    storage = storage_location(sweep, ROOT)
    if is_uri(storage):  # a bucket is shared by every node: check that it is there and writable
        check_storage_uri(storage)
    if fresh:
        delete_storage(storage_join(storage, sweep.name))
    print(connect_ray(), flush=True)
    if not is_uri(storage):
        check_shared_storage(Path(storage))
    tuner = build_tuner(sweep, storage, restore=not fresh)
    with interrupts.tuning(on_stop=functools.partial(StopFlag.raise_for, sweep.name)):
        result_grid = tuner.fit()
    if interrupts.received:
        raise KeyboardInterrupt(interrupts.name)
    errors = [r for r in result_grid if r.error is not None]

    tables = collect(sweep, result_grid)
    out_dir, report = write_outputs(sweep, tables)
    wall, peak = time.perf_counter() - started, memory.stop()
    print(f"\n{report}")
    print(
        f"{len(tables['results']['trial_id'].unique())} trials, {len(errors)} failed; wall {wall / 60:.1f} min, "
        f"peak memory {peak / 2**30:.2f} GiB (PSS of the sweep's processes)"
    )
    experiment = storage_join(storage, sweep.name)
    print(f"results: {out_dir}\nTune experiment (TensorBoard: tensorboard --logdir {experiment}): {experiment}")
    if errors:
        raise SystemExit(f"{len(errors)} trial(s) failed: {[str(r.error)[:200] for r in errors]}")
    return out_dir


if __name__ == "__main__":
    main()
