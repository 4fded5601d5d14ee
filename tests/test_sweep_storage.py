"""A sweep whose storage is a URI (`storage_dir: s3://bucket/prefix`), against a local S3 server (moto) on 127.0.0.1:
Tune's experiment folder, each trial's run folder (evaluation rows, TensorBoard, wandb) and its checkpoints land in
the bucket; the driver's report reads the trials' rows from there; an interrupted sweep resumes from the bucket
without rerunning a finished trial; a bucket the driver cannot reach or write is a clear error naming the URI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from visurf_ray.config import ConfigError
from visurf_ray.sweep import load_sweep, storage_join

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "sweep.py"
BUCKET = "visurf-test"


@pytest.fixture
def s3(monkeypatch):
    """A local S3 server (moto, in this process) with the bucket BUCKET; the AWS variables that pyarrow (Ray's
    storage) and boto3 read point at it, in this process and the processes it starts. Yields its pyarrow filesystem."""
    pytest.importorskip("moto", reason="moto[s3] and flask (the project's dev extra) run the local S3 server")
    import boto3
    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    try:
        yield pyarrow.fs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1")
    finally:
        server.stop()


def test_storage_uris_are_checked_when_the_sweep_is_read(small_sweep_args):
    args = small_sweep_args("pytest-uri")
    assert load_sweep(ROOT / "experiments" / "configs" / "sweep_tiny.yaml", ["storage_dir=s3://b/p"]).storage_dir
    with pytest.raises(ConfigError, match=r"storage_dir='ftp://host/runs' is not supported: a URI's scheme"):
        load_sweep(ROOT / "experiments" / "configs" / "sweep_tiny.yaml", [*args, "storage_dir=ftp://host/runs"])
    with pytest.raises(ConfigError, match=r"storage_dir='s3:///runs' names no bucket"):
        load_sweep(ROOT / "experiments" / "configs" / "sweep_tiny.yaml", [*args, "storage_dir=s3:///runs"])
    assert (
        storage_join("s3://b/p?endpoint_override=h:1", "sweep", "trial") == "s3://b/p/sweep/trial?endpoint_override=h:1"
    )
    assert storage_join("s3://b", "sweep") == "s3://b/sweep"
    assert storage_join("/mnt/runs", "sweep") == "/mnt/runs/sweep"


def test_an_unreachable_bucket_stops_the_sweep_naming_the_uri(s3, small_sweep_args):
    """Checked by the driver before Ray starts: a bucket that does not exist on the server."""
    from experiments import sweep as sweep_cli

    uri = "s3://no-such-bucket/sweeps"
    with pytest.raises(ConfigError, match=rf"storage_dir='{uri}' is not reachable or not writable.*no-such-bucket"):
        sweep_cli.main([*small_sweep_args("pytest-unreachable"), f"storage_dir={uri}"])


def _files(fs, path: str) -> dict[str, object]:
    """Every object under `path` in the bucket: path relative to it -> FileInfo."""
    import pyarrow.fs

    found = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
    return {info.path.removeprefix(path + "/"): info for info in found if info.type == pyarrow.fs.FileType.File}


def _read(fs, path: str) -> str:
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def _finished(fs, experiment: str) -> set[str]:
    """Trials whose result.json in the bucket has their last step (2)."""
    import pyarrow.fs

    done = set()
    for trial in fs.get_file_info(pyarrow.fs.FileSelector(experiment, allow_not_found=True)):
        if trial.type == pyarrow.fs.FileType.Directory:
            with contextlib.suppress(OSError, json.JSONDecodeError):  # no result yet, or a line being written
                if any(json.loads(row)["step"] == 2.0 for row in _read(fs, f"{trial.path}/result.json").splitlines()):
                    done.add(trial.base_name)
    return done


@pytest.mark.ray
def test_sweep_on_s3_storage_stores_trials_in_the_bucket_and_resumes_from_it(s3, small_sweep_args, tmp_path):
    """Two trials one at a time, stopped (SIGINT) once the first has finished, then resumed: everything a trial keeps
    is in the bucket, the report is written from it, and the finished trial is not run again."""
    name = "pytest-s3"
    prefix = f"{BUCKET}/sweeps"
    experiment = f"{prefix}/{name}"
    args = [
        sys.executable,
        str(SWEEP),
        *small_sweep_args(name, "{SFT: {objective.paradigm: sft}, ViSurf: {objective.paradigm: visurf}}"),
        f"storage_dir=s3://{prefix}",
        "tune.max_concurrent_trials=1",
    ]
    ray_temp = Path(f"/tmp/visurf-s3-{os.getpid()}")  # this test's own Ray cluster (short: socket path limits)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_temp)}
    try:
        first = subprocess.Popen(
            [*args[:2], "--fresh", *args[2:]],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        deadline = time.time() + 120
        while not (finished := _finished(s3, experiment)):
            assert first.poll() is None and time.time() < deadline, first.communicate()[0][-3000:]
            time.sleep(1)
        first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state (to the bucket) and stops
        try:
            output = first.communicate(timeout=90)[0]
        finally:
            with contextlib.suppress(ProcessLookupError):  # Ray processes the interrupted driver left behind
                os.killpg(first.pid, signal.SIGKILL)
        assert first.returncode == 128 + signal.SIGINT, output[-3000:]
        assert f"state is saved in s3://{experiment}" in output
        assert len(finished) == 1, "the interrupt came too late to leave the second trial unfinished"
        (done,) = finished
        stored = {f: (i.mtime, i.size) for f, i in _files(s3, f"{experiment}/{done}").items()}

        resumed = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "2 trials, 0 failed" in resumed.stdout
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)

    # The finished trial was not run again: its objects in the bucket are the ones written before the interrupt.
    assert {f: (i.mtime, i.size) for f, i in _files(s3, f"{experiment}/{done}").items()} == stored
    files = _files(s3, experiment)
    trials = {f.split("/")[0] for f in files if f.endswith("/result.json")}
    assert len(trials) == 2 and _finished(s3, experiment) == trials
    assert "tuner.pkl" in files  # Tune's experiment state, what the resume restored from
    for trial in trials:
        mine = {f.removeprefix(f"{trial}/") for f in files if f.startswith(f"{trial}/")}
        assert {"result.json", "progress.csv", "params.json", "train/eval_items.jsonl"} <= mine, sorted(mine)
        assert [f for f in mine if f.startswith("train/tensorboard/events.out.tfevents.")], sorted(mine)
        assert [f for f in mine if f.startswith("train/wandb/offline-run-")], sorted(mine)
        assert [f for f in mine if f.startswith("checkpoint_") and f.endswith("/trainer_state.json")], sorted(mine)
        steps = [json.loads(row)["step"] for row in _read(s3, f"{experiment}/{trial}/result.json").splitlines()]
        assert steps == [1.0, 2.0]
        # evaluation rows of steps 0, 1, 2 once each (a resumed trial continues the stored rows, drops none twice)
        rows = [json.loads(row) for row in _read(s3, f"{experiment}/{trial}/train/eval_items.jsonl").splitlines()]
        per_step = {step: sum(row["step"] == step for row in rows) for step in (0, 1, 2)}
        assert len(rows) == sum(per_step.values()) and len(set(per_step.values())) == 1 and per_step[0] > 0, per_step

    # The driver's report, from the bucket's rows: every trial's items at every evaluated step.
    import pandas as pd

    out_dir = tmp_path / "results" / name
    assert "ViSurf" in (out_dir / "summary.md").read_text()
    assert set(pd.read_parquet(out_dir / "results.parquet")["variant"]) == {"SFT", "ViSurf"}
    items = pd.read_parquet(out_dir / "items.parquet")
    assert set(items["step"]) == {0, 1, 2} and items["trial_id"].nunique() == 2
    assert not (tmp_path / "runs").exists()  # nothing went to a local storage folder


@pytest.mark.ray
@pytest.mark.slow
def test_a_trial_with_train_workers_on_s3_storage(s3, small_sweep_args, tmp_path):
    """`ray.num_workers: 1` (a TorchTrainer per trial): Train's checkpoints and rank 0's run folder (uploaded by the
    worker itself, `mirrored_loop_per_worker`) are in the trial's folder in the bucket; a rerun restores, reruns
    nothing. ~80 s + ~30 s here."""
    name = "pytest-s3-workers"
    experiment = f"{BUCKET}/sweeps/{name}"
    args = [
        sys.executable,
        str(SWEEP),
        *small_sweep_args(name, "{ViSurf: {objective.paradigm: visurf}}"),
        "experiment.ray.num_workers=1",
        "experiment.ray.cpus_per_worker=1",
        "tune.cpus_per_trial=0.1",
        f"storage_dir=s3://{BUCKET}/sweeps",
    ]
    ray_temp = Path(f"/tmp/visurf-s3w-{os.getpid()}")
    env = {**os.environ, "RAY_TMPDIR": str(ray_temp)}
    try:
        for extra in (["--fresh"], []):
            done = subprocess.run(
                [*args[:2], *extra, *args[2:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            assert "1 trials, 0 failed" in done.stdout
            stored = {f: (i.mtime, i.size) for f, i in _files(s3, experiment).items() if "/" in f}
            if extra:
                first = stored
        assert stored == first  # the rerun restored the finished trial and ran nothing again
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
    files = _files(s3, experiment)
    (trial,) = {f.split("/")[0] for f in files if f.endswith("/result.json")}
    mine = {f.removeprefix(f"{trial}/") for f in files if f.startswith(f"{trial}/")}
    assert "train/eval_items.jsonl" in mine and [f for f in mine if f.startswith("train/tensorboard/events.")]
    assert len([f for f in mine if f.startswith("train/checkpoint_") and f.endswith("/trainer_state.json")]) == 2
    rows = [json.loads(row) for row in _read(s3, f"{experiment}/{trial}/train/eval_items.jsonl").splitlines()]
    assert {row["step"] for row in rows} == {0, 1, 2}
    assert (tmp_path / "results" / name / "summary.md").is_file()
