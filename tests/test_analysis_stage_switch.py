"""analysis.stage_switch: the update size on hand-made weights, and both branches from one SFT-stage policy on a
short sft_rlvr run of the small policy."""

from __future__ import annotations

import math

import pytest
import torch
from test_train_step import ScriptedBackend

from analysis.stage_switch import main, stage_switch, update_size
from visurf_ray.validation import ValidationError


def test_update_size_is_relative_to_the_weights_and_to_the_lr():
    before = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    after = [torch.tensor([3.0, 0.5]), torch.tensor([[4.0 - 0.25]])]
    size = update_size(before, after, lr=0.25)
    assert size["relative_update"] == pytest.approx(math.hypot(0.5, 0.25) / 5.0)
    assert size["update_over_lr"] == pytest.approx((0.5 + 0.25) / 3 / 0.25)


def test_both_branches_start_from_the_same_sft_policy_and_differ_in_the_optimizer_state(small_run_config, monkeypatch):
    # rollouts of unequal reward in every group, so that the RL steps have a gradient
    scripted = lambda rollout, policy: ScriptedBackend(  # noqa: E731
        policy, lambda prompt: ["<think>a.</think><answer>[]</answer>", "<answer>3"]
    )
    monkeypatch.setattr("visurf_ray.train.trainer.make_backend", scripted)
    cfg = small_run_config("steps=6", "objective.paradigm=sft_rlvr", "objective.sft_share=0.5")
    table = stage_switch(cfg, rl_steps=2)
    assert table["branch"].tolist() == ["sft", "reset", "reset", "carried", "carried"]
    assert table["step"].tolist() == [3, 4, 5, 4, 5]
    first = table[table["step"] == 4].drop(columns="branch")
    reset, carried = (row for _, row in first.iterrows())
    # the same weights and rollout seed: the same rollouts, rewards and gradient; only AdamW's state differs
    for column in ("answer_format", "reward", "zero_std", "grad_norm", "lr"):
        assert reset[column] == carried[column]
    assert reset["grad_norm"] > 0 and reset["zero_std"] == 0
    # a fresh AdamW's first step moves every weight with a gradient by ≈ lr (|g| / (|g| + eps), and weight decay);
    # the carried moments scale it by the SFT stage's gradient history
    assert 0.5 < reset["update_over_lr"] <= 1.0 + cfg.optim.weight_decay
    assert reset["relative_update"] != carried["relative_update"]


def test_stage_switch_refuses_a_run_without_two_stages_or_with_deepspeed(small_run_config):
    with pytest.raises(ValidationError, match="objective.paradigm"):
        stage_switch(small_run_config("objective.paradigm=rlvr"), rl_steps=1)
    with pytest.raises(ValidationError, match="deepspeed.enabled"):
        stage_switch(small_run_config("objective.paradigm=sft_rlvr", "deepspeed.enabled=true"), rl_steps=1)
    with pytest.raises(ValidationError, match="rl_steps"):
        stage_switch(small_run_config("steps=4", "objective.paradigm=sft_rlvr"), rl_steps=3)


def test_command_prints_the_table(small_run_overrides, tmp_path, capsys):
    table = main(["--seed", "1", "--rl-steps", "1", *small_run_overrides, "steps=2", f"output_dir={tmp_path}"])
    assert len(table) == 3 and "update_over_lr" in capsys.readouterr().out
