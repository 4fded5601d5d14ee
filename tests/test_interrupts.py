"""Interrupting the main job and experiments/train.py as a user does (a terminal's Ctrl-C to the process group, or
`kill` = SIGTERM): a prompt exit with one line and 128 + the signal, the experiment state and checkpoints kept,
every wandb run finished, no Ray process left, and a re-run that ends with the same results as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "sweep.py"
TRAIN = ROOT / "experiments" / "train.py"
EXIT_SECONDS = 15
SWEEP_STEPS = 24  # long enough that neither trial has ended when the second one starts logging
VARIANTS = "{RLVR: {objective.paradigm: rlvr}, ViSurf: {objective.paradigm: visurf}}"

pytestmark = pytest.mark.ray


def sweep_command(small_sweep_args, name: str) -> list[str]:
    """A 2-trial sweep whose trials run together, log to wandb and checkpoint every step."""
    args = small_sweep_args(name, VARIANTS)
    args = [a for a in args if not a.startswith(("experiment.steps=", "experiment.eval_every="))]
    return [
        sys.executable,
        str(SWEEP),
        *args,
        f"experiment.steps={SWEEP_STEPS}",
        "experiment.eval_every=12",
        "experiment.log_to=[tensorboard, wandb]",
        "tune.max_concurrent_trials=2",
    ]


def start(command: list[str]) -> subprocess.Popen:
    """Start `command` in a session of its own with default signal handling, as a shell starts a job."""
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_until(condition, process: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"exited ({process.returncode}) before {what}: {process.communicate()[1][-3000:]}")
        if time.time() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.5)


def wandb_runs(folder: Path) -> list[Path]:
    return sorted(folder.glob("**/wandb/offline-run-*"))


def wandb_run_finished(run: Path) -> bool:
    """Whether the offline run's process finished it (its internal log ends with the stream's last message)."""
    log = run / "logs" / "debug-internal.log"
    return log.is_file() and "stream: all finished" in log.read_text()


def interrupt(process: subprocess.Popen, number: int, *, group: bool) -> tuple[float, str]:
    """Send signal `number` (to the process group when `group`, as a terminal's Ctrl-C does); return the seconds until
    the process exited and its stderr. Asserts that every process it started is gone within 5 s of its exit."""
    descendants = psutil.Process(process.pid).children(recursive=True)
    sent = time.perf_counter()
    if group:
        os.killpg(process.pid, number)
    else:
        process.send_signal(number)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    elapsed = time.perf_counter() - sent
    _, alive = psutil.wait_procs(descendants, timeout=5)
    assert not alive, f"left behind: {[p.info for p in psutil.Process().children()]} {alive}"
    return elapsed, stderr


def final_results(out_dir: Path) -> tuple[pd.Series, pd.DataFrame]:
    """Final metric values by (variant, eval set, metric) and the per-item rows, without trial ids and timings."""
    results = pd.read_parquet(out_dir / "results.parquet")
    values = results.set_index(["variant", "eval_set", "metric"])["value"].sort_index()
    values = values[~values.index.get_level_values("metric").str.contains("time")]
    items = pd.read_parquet(out_dir / "items.parquet").drop(columns=["trial_id"])
    return values, items.sort_values(list(items.columns)).reset_index(drop=True)


def test_ctrl_c_stops_the_sweep_within_seconds_and_a_rerun_ends_as_an_uninterrupted_sweep(small_sweep_args, tmp_path):
    name = "pytest-ctrl-c"
    experiment = tmp_path / "runs" / name
    command = sweep_command(small_sweep_args, name)
    process = start([*command, "--fresh"])

    def both_trials_logging() -> bool:
        runs = wandb_runs(experiment)
        return len(runs) == 2 and len(list(experiment.glob("*/progress.csv"))) == 2

    wait_until(both_trials_logging, process, 300, "two trials running")
    elapsed, stderr = interrupt(process, signal.SIGINT, group=True)

    assert process.returncode == 128 + signal.SIGINT
    assert elapsed < EXIT_SECONDS, f"took {elapsed:.1f} s to exit"
    assert f"SIGINT: sweep stopped; its state is saved in {experiment}" in stderr
    assert "Traceback" not in stderr and "Tuner.restore" not in stderr
    assert list(experiment.glob("experiment_state-*.json"))
    unfinished = [
        json.loads(rows.read_text().splitlines()[-1])["step"] < SWEEP_STEPS for rows in experiment.glob("*/result.json")
    ]
    assert unfinished == [True, True], "the interrupt came after the trials ended"
    runs = wandb_runs(experiment)
    assert len(runs) == 2 and all(map(wandb_run_finished, runs)), runs

    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 trials, 0 failed" in resumed.stdout
    assert "may be a performance bottleneck" not in resumed.stderr  # no Tune callback over 0.5 s per result
    runs = wandb_runs(experiment)
    assert all(map(wandb_run_finished, runs))
    assert len({run.name.rsplit("-", 1)[-1] for run in runs}) == 2  # one wandb run (id) per trial, resumed

    reference = subprocess.run(
        [*[a.replace(name, "pytest-uninterrupted") for a in command], "--fresh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    values, items = final_results(tmp_path / "results" / name)
    reference_values, reference_items = final_results(tmp_path / "results" / "pytest-uninterrupted")
    pd.testing.assert_series_equal(values, reference_values)
    pd.testing.assert_frame_equal(items, reference_items)


def test_sigterm_stops_the_sweep_like_ctrl_c(small_sweep_args, tmp_path):
    name = "pytest-sigterm"
    experiment = tmp_path / "runs" / name
    process = start([*sweep_command(small_sweep_args, name), "--fresh"])
    wait_until(lambda: len(wandb_runs(experiment)) == 2, process, 300, "two trials logging")
    elapsed, stderr = interrupt(process, signal.SIGTERM, group=False)

    assert process.returncode == 128 + signal.SIGTERM
    assert elapsed < EXIT_SECONDS, f"took {elapsed:.1f} s to exit"
    assert "SIGTERM: sweep stopped" in stderr
    assert list(experiment.glob("experiment_state-*.json"))
    assert all(map(wandb_run_finished, wandb_runs(experiment)))


def test_sigterm_stops_train_py_and_the_rerun_resumes_from_its_checkpoint(small_run_overrides, tmp_path):
    command = [
        sys.executable,
        str(TRAIN),
        *small_run_overrides,
        "steps=12",
        "eval_every=6",
        "checkpoint_every=1",
        "data.eval_size=4",
        "log_to=[stdout, tensorboard, wandb]",
        f"output_dir={tmp_path}",
        "name=run",
    ]
    run = tmp_path / "run"
    process = start(command)

    def reported(steps: int) -> bool:
        rows = run / "metrics.jsonl"
        return rows.is_file() and len(rows.read_text().splitlines()) >= steps

    wait_until(lambda: reported(2), process, 300, "2 steps")
    elapsed, stderr = interrupt(process, signal.SIGTERM, group=False)

    assert process.returncode == 128 + signal.SIGTERM
    assert elapsed < EXIT_SECONDS, f"took {elapsed:.1f} s to exit"
    assert f"SIGTERM: run stopped; its checkpoints are kept under {run}" in stderr
    assert all(map(wandb_run_finished, wandb_runs(run)))
    steps_before = [json.loads(row)["step"] for row in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps_before) < 12 and list((run / "checkpoints").glob("step_*"))

    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads(row)["step"] for row in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [float(step) for step in range(1, 13)]  # rows after the checkpoint are written once, by the rerun
    eval_steps = Counter(json.loads(row)["step"] for row in (run / "eval_items.jsonl").read_text().splitlines())
    assert set(eval_steps) == {0, 6, 12} and len(set(eval_steps.values())) == 1  # each evaluation's rows once
    assert all(map(wandb_run_finished, wandb_runs(run)))
