"""The sweep: config errors, a 2-trial Tune sweep end to end, restore after an interrupt, cluster.yaml's schema, and
(slow) the full default sweep."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from visurf_ray.config import ConfigError
from visurf_ray.objectives import PARADIGMS
from visurf_ray.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "sweep.py"
DEFAULT_SWEEP = ROOT / "experiments" / "configs" / "sweep_tiny.yaml"


def test_default_sweep_covers_every_paradigm_and_ablation():
    sweep = load_sweep(DEFAULT_SWEEP)
    paradigms = {sweep.trial_config({"variant": v, "seed": 0}).objective.paradigm for v in sweep.variants}
    assert paradigms == set(PARADIGMS) == {"sft", "rlvr", "sft_rlvr", "visurf", "luffy", "chord"}
    visurf = [sweep.trial_config({"variant": v, "seed": 0}).objective for v in sweep.variants]
    visurf = [o for o in visurf if o.paradigm == "visurf"]
    assert {(o.align_label, o.eliminate_label_thinking, o.smoothing, o.label_reasoning) for o in visurf} == {
        (True, True, True, False),
        (False, True, True, False),
        (True, False, True, False),
        (True, True, False, False),
        (True, True, True, True),
    }
    assert len(sweep.seeds) >= 2
    powered = load_sweep(ROOT / "experiments" / "configs" / "sweep_tiny_paper.yaml")
    powered_paradigms = [powered.trial_config({"variant": v, "seed": 0}).objective.paradigm for v in powered.variants]
    assert sorted(powered_paradigms) == sorted(set(PARADIGMS))  # one variant per paradigm


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("variants={A: {objective.smoothng: true}}", "objective.smoothng"),
        ("variants={A: {objective.paradigm: ppo}}", "paradigm"),
        ("grid={optim.lr: []}", r"grid\.optim\.lr"),
        ("grid={optim.learning_rate: [0.1]}", r"optim\.learning_rate"),
        ("variants={}", "variants is empty"),
        ("seeds=[]", "seeds is empty"),
        ("sample={optim.lr: {gaussian: [0, 1]}}", r"sample\.optim\.lr"),
        ("tune.scheduler=hyperband", r"tune\.scheduler"),
        ("trials=3", "unknown sweep key 'trials'"),
    ],
)
def test_sweep_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(DEFAULT_SWEEP, [override])


@pytest.mark.ray
def test_two_trial_sweep_end_to_end(small_sweep_args, tmp_path, monkeypatch):
    import ray
    from PIL import Image

    from experiments import sweep as sweep_cli

    monkeypatch.chdir(ROOT)
    try:
        out_dir = sweep_cli.main(["--fresh", *small_sweep_args("pytest-sweep")])
    finally:
        ray.shutdown()
    import pandas as pd

    results = pd.read_parquet(out_dir / "results.parquet")
    assert set(results["variant"]) == {"RLVR", "ViSurf"}
    assert {"trial_id", "variant", "paradigm", "seed", "eval_set", "metric", "value", "config/optim.lr"} <= set(
        results.columns
    )
    sets = set(results["eval_set"])
    assert {"grounding", "gui_point", "anomaly", "retained/count", "mean"} <= sets
    scores = results[results["metric"] == "score"]
    assert len(scores) == 2 * 5 and scores["value"].between(0, 1).all()
    history = pd.read_parquet(out_dir / "history.parquet")
    assert sorted(history["step"].unique()) == [1.0, 2.0]
    for plot in ("curves.png", "tasks.png"):
        with Image.open(out_dir / plot) as image:
            assert image.width > 200 and image.height > 100
            assert len(set(image.convert("L").getdata())) > 5  # not a blank canvas
    assert "ViSurf" in (out_dir / "summary.md").read_text()
    trial_dirs = [p for p in (tmp_path / "runs" / "pytest-sweep").iterdir() if p.is_dir()]
    assert all(list(p.glob("train/tensorboard/events.out.tfevents.*")) for p in trial_dirs)  # TensorBoard per trial
    assert all(len(list(p.glob("train/wandb/offline-run-*"))) == 1 for p in trial_dirs)  # one wandb run per trial


def _finished_trials(experiment: Path) -> set[str]:
    return {
        p.parent.name
        for p in experiment.glob("*/result.json")
        if any(
            json.loads(line).get("done") or json.loads(line).get("step") == 2.0
            for line in p.read_text().splitlines()
            if line.strip()
        )
    }


@pytest.mark.ray
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(small_sweep_args, tmp_path):
    name = "pytest-restore"
    experiment = tmp_path / "runs" / name
    variants = (
        "{SFT: {objective.paradigm: sft}, RLVR: {objective.paradigm: rlvr}, ViSurf: {objective.paradigm: visurf}}"
    )
    args = [
        sys.executable,
        str(SWEEP),
        *small_sweep_args(name, variants),
        "tune.max_concurrent_trials=1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [*args[:2], "--fresh", *args[2:]],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not _finished_trials(experiment):
        time.sleep(0.5)
    first = _finished_trials(experiment)
    process.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and stops
    try:
        process.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # Ray processes the interrupted driver left behind
            os.killpg(process.pid, signal.SIGKILL)
    assert first and len(first) < 3, "the interrupt came too late to leave unfinished trials"
    stamps = {t: (experiment / t / "result.json").stat().st_mtime_ns for t in first}

    # the stopped sweep's report covers its finished trials only, and runs nothing
    finished = _finished_trials(experiment)
    report = subprocess.run([*args[:2], "--report", *args[2:]], cwd=ROOT, env=env, capture_output=True, text=True)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    assert f"{len(finished)} of " in report.stdout and _finished_trials(experiment) == finished
    summary = (tmp_path / "results" / name / "summary.md").read_text()
    assert f"{len(finished)} trials, seeds [0]" in summary
    assert set(pd.read_parquet(tmp_path / "results" / name / "results.parquet")["trial_id"]) == finished

    resumed = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert len(_finished_trials(experiment)) == 3
    assert {t: (experiment / t / "result.json").stat().st_mtime_ns for t in first} == stamps
    assert "3 trials, 0 failed" in resumed.stdout


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(config)
    assert any(t["node_config"]["InstanceType"].startswith("p") for t in config["available_node_types"].values())
    assert any("[gpu]" in command for command in config["setup_commands"])
    broken = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    broken["available_node_types"]["head"]["bogus"] = 1
    with pytest.raises(Exception, match="bogus"):
        validate_config(broken)


@pytest.mark.slow
def test_full_default_sweep(monkeypatch):
    """The README's main job: every paradigm and ablation, two seeds, on the tiny base model."""
    import ray

    from experiments import sweep as sweep_cli

    monkeypatch.chdir(ROOT)
    try:
        out_dir = sweep_cli.main(["--fresh"])
    finally:
        ray.shutdown()
    import pandas as pd

    results = pd.read_parquet(out_dir / "results.parquet")
    sweep = load_sweep(DEFAULT_SWEEP)
    assert results["trial_id"].nunique() == len(sweep.variants) * len(sweep.seeds) == 22
    scores = results[results["metric"] == "score"].groupby(["variant", "seed"])["eval_set"].nunique()
    assert set(scores.index) == {(v, seed) for v in sweep.variants for seed in sweep.seeds}
    assert (scores == 5).all()  # grounding, gui_point, anomaly, retained/count and their mean
    assert results["value"].notna().all()
    items = pd.read_parquet(out_dir / "items.parquet")
    per_trial = items.groupby(["trial_id", "step"]).size()
    assert set(per_trial.index.get_level_values("step")) == {0, 24} and (per_trial == 800).all()  # 8 slices × 100
    summary = (out_dir / "summary.md").read_text()
    assert "## The paper's claims on this sweep" in summary and "ViSurf − RLVR" in summary
    assert "ViSurf − LUFFY" in summary and "ViSurf − CHORD" in summary


@pytest.mark.parametrize("preset", ["sweep_tiny_paper.yaml", "sweep_tiny_paper_ablations.yaml"])
def test_powered_presets_load_validate_and_run_their_first_trial(small_policy_dir, tmp_path, preset):
    """Each powered preset: ≥ 3 seeds at one budget, 100 eval items per slice; its first trial's config, shortened
    and on a small policy, trains and evaluates in this process."""
    import dataclasses

    from visurf_ray.train.launcher import launch

    sweep = load_sweep(ROOT / "experiments" / "configs" / preset)
    assert len(sweep.seeds) >= 3 and sweep.overrides["data.eval_size"] == 100
    first = sweep.trial_config({"variant": next(iter(sweep.variants)), "seed": sweep.seeds[0]})
    assert first.steps == 300 and first.eval_every == 60
    short = dataclasses.replace(
        first,
        name="first-trial",
        output_dir=str(tmp_path),
        steps=2,
        eval_every=2,
        checkpoint_every=0,
        log_to=(),
        model=dataclasses.replace(first.model, path=str(small_policy_dir)),
        data=dataclasses.replace(first.data, eval_size=2, prompts_per_step=2),
        rollout=dataclasses.replace(first.rollout, max_new_tokens=8, eval_max_new_tokens=8),
        objective=dataclasses.replace(first.objective, num_rollouts=2),
        deepspeed=dataclasses.replace(first.deepspeed, enabled=False),
    )
    metrics = launch(short)
    assert metrics["step"] == 2.0 and "eval/grounding/n_acc" in metrics


@pytest.mark.ray
def test_a_trial_whose_process_is_killed_restarts_from_its_checkpoint(small_sweep_args, tmp_path):
    """`tune.max_failures`: a trial killed mid-run (a lost node, a preempted spot instance) is restarted by Tune from
    its latest checkpoint and the sweep ends as if nothing happened."""
    import psutil

    name = "pytest-killed-trial"
    experiment = tmp_path / "runs" / name
    args = small_sweep_args(name, "{RLVR: {objective.paradigm: rlvr}}")
    args = [a for a in args if not a.startswith("experiment.steps=")] + ["experiment.steps=12"]
    process = subprocess.Popen(
        [sys.executable, str(SWEEP), "--fresh", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not list(experiment.glob("*/checkpoint_00000[2-9]")):
        assert process.poll() is None and time.time() < deadline, "the trial never checkpointed twice"
        time.sleep(0.5)
    trials = [p for p in psutil.Process(process.pid).children(recursive=True) if "ray::" in " ".join(p.cmdline())]
    trials = [p for p in trials if "Trainable" in " ".join(p.cmdline()) or "run_trial" in " ".join(p.cmdline())]
    assert len(trials) == 1, [p.cmdline() for p in trials]
    trials[0].kill()
    try:
        stdout, stderr = process.communicate(timeout=400)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr[-3000:]
    assert "1 trials, 0 failed" in stdout
    trial_dir = next(p for p in experiment.iterdir() if p.is_dir())
    assert "actor died unexpectedly" in (trial_dir / "error.txt").read_text()  # the kill, recorded, then retried
    steps = [json.loads(row)["step"] for row in (trial_dir / "result.json").read_text().splitlines()]
    assert steps[-1] == 12.0
