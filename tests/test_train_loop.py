"""The per-worker loop in this process (every paradigm), checkpoint → crash → resume equivalence, and Ray Train with
two CPU workers and DeepSpeed ZeRO-2."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from visurf_ray.train.launcher import launch, run_dir
from visurf_ray.train.loop import EVAL_ITEMS, LocalSession, run_training


@pytest.fixture
def small_config(small_run_config):
    """`make(name, *extra)`: a SMALL_RUN config evaluated on grounding and count (4 items each), no checkpoint
    but the last; `extra` overrides last."""

    def make(name, *extra):
        return small_run_config(
            "checkpoint_every=0",
            "data.eval_size=4",
            "data.eval_splits=[eval/grounding,retained/count]",
            "optim.lr=1e-3",
            *extra,
            name=name,
        )

    return make


@pytest.mark.parametrize("paradigm", ["sft", "rlvr", "visurf", "sft_rlvr", "luffy", "chord"])
def test_in_process_loop_runs_every_paradigm(small_config, paradigm):
    cfg = small_config(paradigm, f"objective.paradigm={paradigm}")
    metrics = launch(cfg)
    assert metrics["step"] == 2.0 and math.isfinite(metrics["loss"])
    assert 0.0 <= metrics["eval/grounding/score"] <= 1.0
    assert "eval/retained/count/accuracy" in metrics
    lines = (run_dir(cfg) / "metrics.jsonl").read_text().splitlines()
    stages = [json.loads(line)["paradigm_stage"] for line in lines]
    expected = {"sft": [0, 0], "rlvr": [1, 1], "visurf": [2, 2], "sft_rlvr": [0, 1], "luffy": [4, 4], "chord": [5, 5]}
    expected = expected[paradigm]
    assert stages == expected
    if paradigm == "chord":  # μ decays from chord_mu_start at the first step to chord_mu_end at the last
        assert [json.loads(line)["chord_mu"] for line in lines] == pytest.approx([0.9, 0.05], abs=1e-12)
    assert (run_dir(cfg) / "checkpoints" / "step_000002" / "trainer_state.json").is_file()


class CrashAfter(LocalSession):
    """A LocalSession whose process 'dies' right after the report of step `crash_step` (checkpoint already written)."""

    def __init__(self, run_dir, crash_step):
        super().__init__(run_dir)
        self.crash_step = crash_step

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if metrics["step"] == self.crash_step:
            raise KeyboardInterrupt("killed")


@pytest.mark.parametrize("deepspeed", [False, True])
def test_killed_and_resumed_run_matches_an_uninterrupted_one(small_config, deepspeed):
    overrides = ["steps=4", "checkpoint_every=2", "objective.paradigm=visurf", f"deepspeed.enabled={deepspeed}"]
    straight_cfg = small_config("straight", *overrides)
    straight = LocalSession(run_dir(straight_cfg), verbose=False)
    run_training(straight_cfg, straight, scratch_dir=straight.scratch_dir)

    resumed_cfg = small_config("resumed", *overrides)
    crashing = CrashAfter(run_dir(resumed_cfg), crash_step=2)
    with pytest.raises(KeyboardInterrupt):
        run_training(resumed_cfg, crashing, scratch_dir=crashing.scratch_dir)
    second = LocalSession(run_dir(resumed_cfg), verbose=False)
    run_training(resumed_cfg, second, scratch_dir=second.scratch_dir)

    assert [m["step"] for m in second.history] == [3.0, 4.0]
    for key in ("loss", "rollout/overall", "label/overall", "grad_norm", "label_advantage_mean"):
        assert second.history[-1][key] == pytest.approx(straight.history[-1][key], rel=1e-4, abs=1e-6), key
    final = [
        torch.load(p, weights_only=False)
        for p in (
            *run_dir(straight_cfg).glob("checkpoints/step_000004/rng_rank0.pt"),
            *run_dir(resumed_cfg).glob("checkpoints/step_000004/rng_rank0.pt"),
        )
    ]
    assert len(final) == 2 and torch.equal(final[0]["torch"], final[1]["torch"])


@pytest.mark.ray
def test_ray_train_two_cpu_workers_with_deepspeed_zero2(small_config):
    import ray

    cfg = small_config(
        "ray",
        "ray.num_workers=2",
        "deepspeed.enabled=true",
        "deepspeed.zero_stage=2",
        "objective.paradigm=visurf",
        "checkpoint_every=1",
    )
    try:
        metrics = launch(cfg)
    finally:
        ray.shutdown()
    assert metrics["step"] == 2.0 and math.isfinite(metrics["loss"])
    assert "eval/grounding/score" in metrics
    checkpoints = sorted(p for p in run_dir(cfg).glob("checkpoint_*") if p.is_dir())
    assert checkpoints, "Ray Train wrote no checkpoint"
    names = {p.name for p in checkpoints[-1].rglob("*") if p.is_file()}
    assert {"trainer_state.json", "rng_rank0.pt", "rng_rank1.pt"} <= names
    assert any(n.startswith("zero_pp_rank_1") for n in names)  # each rank's ZeRO-2 optimizer shard


def test_every_report_carries_the_latest_evaluation(small_config):
    """Tune checks each report for the sweep's metric: the starting policy is evaluated at step 0 and the latest
    evaluation rides along with every later report."""
    cfg = small_config("carried", "steps=3", "eval_every=2", "objective.paradigm=rlvr")
    launch(cfg)
    reports = [json.loads(line) for line in (run_dir(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_step"] for r in reports] == [0.0, 2.0, 3.0]
    assert all("eval/mean_score" in r and "eval/grounding/score" in r for r in reports)


def test_runs_write_eval_items_and_share_the_starting_evaluation(small_config, tmp_path, monkeypatch):
    """Every evaluation's item rows land in the run folder; two runs from the same checkpoint on the same items
    compute the step-0 evaluation once (the second reads it from the cache) and record identical rows."""
    monkeypatch.setenv("VISURF_CACHE", str(tmp_path / "cache"))
    rows = {}
    for paradigm in ("sft", "rlvr"):
        cfg = small_config(paradigm, "steps=1", "eval_every=1", f"objective.paradigm={paradigm}")
        launch(cfg)
        rows[paradigm] = [json.loads(line) for line in (run_dir(cfg) / EVAL_ITEMS).read_text().splitlines()]
    assert len(list((tmp_path / "cache" / "evaluations").glob("*.json"))) == 1
    step0 = {paradigm: [r for r in found if r["step"] == 0] for paradigm, found in rows.items()}
    assert step0["sft"] == step0["rlvr"]
    for found in rows.values():
        assert sorted({r["step"] for r in found}) == [0, 1]
        grounding = [r for r in found if r["step"] == 1 and r["eval_set"] == "grounding"]
        slices = ["empty_image"] * 4 + ["no_object"] * 4 + ["seen"] * 4 + ["unseen_attribute"] * 4
        assert sorted(r["slice"] for r in grounding) == slices
        assert all({"iou", "empty", "logp_empty", "multi_block"} <= set(r) for r in grounding)
        assert all(re.fullmatch("[0-9a-f]{16}", r["content"]) for r in found)
        count = [r for r in found if r["step"] == 1 and r["eval_set"] == "retained/count"]
        assert len(count) == 4 and all(r["slice"] == "all" and "correct" in r for r in count)


def test_a_build_lock_left_by_a_killed_process_does_not_block_deepspeed_on_cpu(tmp_path):
    """torch's JIT build lock file, left by a process killed while it built or loaded DeepSpeed's CPU collectives,
    would make every later `deepspeed.initialize` wait forever; the engine clears it under an flock and loads the op."""
    import os
    import subprocess
    import sys

    from torch.utils.cpp_extension import _get_build_directory

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    load = [sys.executable, "-c", "from visurf_ray.train.engine import load_cpu_communication_op as f; f()"]
    subprocess.run(load, env=env, check=True, timeout=600)  # built once per machine (cached in TORCH_EXTENSIONS_DIR)
    stale = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    stale.touch()
    subprocess.run(load, env=env, check=True, timeout=60)
    assert not stale.exists()
