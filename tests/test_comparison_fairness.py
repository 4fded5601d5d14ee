"""The comparison's baselines and ablations test what they name: SFT's own target text, SFT→RLVR's fresh optimizer at
the switch, an unaligned label that differs from the rollouts' style beyond its think block, and both smoothing rules
on the grounding and anomaly cases where the paper's literal rule fires one accuracy point below the label."""

from __future__ import annotations

import json

import pytest
import torch

from visurf_ray.config import DeepSpeedConfig, OptimConfig
from visurf_ray.data.benchmark import make_split, target_text
from visurf_ray.models.generation import Rollouts
from visurf_ray.models.policy import load_policy
from visurf_ray.objectives.paradigms import ObjectiveConfig, get_paradigm
from visurf_ray.rewards.controls import label_completion
from visurf_ray.rollout.base import SamplingConfig
from visurf_ray.rollout.hf import HFRolloutBackend
from visurf_ray.train.engine import build_engine
from visurf_ray.train.schedules import StagedSchedule
from visurf_ray.train.step import score_groups, sft_label, smoothing_reference
from visurf_ray.train.trainer import Trainer


def first_of(kind: str, split: str = "posttrain"):
    return next(s for s in make_split(split, 300, seed=0) if s.meta["kind"] == kind)


def test_unaligned_label_differs_from_the_aligned_one_beyond_the_think_prefix():
    sample = first_of("grounding_single")
    rollout = target_text(sample)  # the base model's own style: spaced JSON after its reasoning
    aligned = label_completion("grounding", sample.solution, [rollout], align=True)
    unaligned = label_completion("grounding", sample.solution, [rollout], align=False)
    assert aligned.removeprefix("<think></think>") != unaligned
    assert '"bbox_2d": [' in aligned and '"bbox_2d":[' in unaligned and ", " not in unaligned
    assert json.loads(aligned.split("<answer>")[1].split("</answer>")[0]) == json.loads(sample.solution)


def test_sft_target_is_a_baseline_setting_of_its_own():
    sample = first_of("grounding_single")
    assert sft_label(sample, "answer") == f"<answer>{sample.solution}</answer>"
    assert sft_label(sample, "empty_think") == label_completion("grounding", sample.solution, [], align=True)
    assert sft_label(sample, "reasoning") == target_text(sample)
    rollouts = Rollouts([[1]], [0], [target_text(sample)])
    for align in (True, False):  # ViSurf's align flag does not change SFT's text
        objective = ObjectiveConfig(paradigm="sft", align_label=align)
        (group,) = score_groups([sample], None, objective, get_paradigm("sft"))
        assert group.label_text == f"<answer>{sample.solution}</answer>"
    (visurf,) = score_groups([sample], rollouts, ObjectiveConfig(), get_paradigm("visurf"))
    assert visurf.label_text.startswith('<think></think><answer>[{"bbox_2d": [')


def rollout_text(answer) -> str:
    return f"<think>looking.</think><answer>{json.dumps(answer)}</answer>"


def smoothing_case(sample, near_miss: str):
    """One group whose every rollout is one accuracy point below the label; the smoothing condition per rule."""
    rollouts = Rollouts([[1]] * 2, [0, 0], [near_miss] * 2)
    objective = ObjectiveConfig(num_rollouts=2)
    (group,) = score_groups([sample], rollouts, objective, get_paradigm("visurf"))
    rewards = torch.tensor([[c["overall"] for c in group.rollout_components]], dtype=torch.float64)
    label = torch.tensor([group.label_components["overall"]], dtype=torch.float64)
    fired = {}
    for rule in ("literal", "like_for_like"):
        cfg = ObjectiveConfig(num_rollouts=2, smoothing_rule=rule)
        reference = smoothing_reference([group], rule)
        advantages = get_paradigm("visurf").advantages(rewards, label, cfg, smoothing_reference=reference)
        fired[rule] = advantages.metrics["smoothing_fired_fraction"]
    return group, fired


def test_grounding_near_miss_fires_only_the_literal_smoothing_rule():
    sample = first_of("grounding_single")
    (truth,) = json.loads(sample.solution)
    x1, y1, x2, y2 = truth["bbox_2d"]
    near_miss = rollout_text([{"bbox_2d": truth["bbox_2d"], "point_2d": [x2, y2]}])  # box right, point 40 px off
    group, fired = smoothing_case(sample, near_miss)
    assert [c["accuracy"] for c in group.rollout_components] == [2.0, 2.0]
    assert group.rollout_components[0]["overall"] == group.label_components["overall"] == 5.0
    assert fired == {"literal": 1.0, "like_for_like": 0.0}


def test_anomaly_near_miss_fires_only_the_literal_smoothing_rule():
    sample = first_of("anomaly_defect")
    near_miss = rollout_text({"defect": True, "bbox_2d": [0, 0, 3, 3]})  # presence right, box wrong
    group, fired = smoothing_case(sample, near_miss)
    assert group.rollout_components[0]["accuracy"] == 1.0
    assert group.rollout_components[0]["overall"] == group.label_components["overall"] == 4.0
    assert fired == {"literal": 1.0, "like_for_like": 0.0}


def test_staged_schedule_restarts_at_each_stage():
    schedule = StagedSchedule(total=10, warmup=2, starts=(0, 4))
    assert [schedule(s) for s in range(4)] == [StagedSchedule(total=4, warmup=2)(s) for s in range(4)]
    assert [schedule(s) for s in range(4, 10)] == [StagedSchedule(total=6, warmup=2)(s) for s in range(6)]
    with pytest.raises(ValueError, match="begin at 0"):
        StagedSchedule(total=10, warmup=0, starts=(2,))


def test_constant_schedule_warms_up_then_holds_the_learning_rate_in_every_stage():
    schedule = StagedSchedule(total=10, warmup=2, starts=(0, 4), shape="constant")
    assert [schedule(s) for s in range(10)] == [0.5, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="schedule shape"):
        StagedSchedule(total=10, warmup=0, shape="step")


@pytest.mark.parametrize("deepspeed", [False, True])
def test_sft_rlvr_switch_gives_the_rl_stage_a_fresh_optimizer(small_policy_dir, deepspeed):
    """One SFT step, the switch, one RLVR step == one RLVR step of a new optimizer from the post-SFT weights."""
    objective = ObjectiveConfig(paradigm="sft_rlvr", num_rollouts=2, sft_share=0.5)
    samples = make_split("posttrain", 2, seed=1)
    optim, ds = OptimConfig(lr=1e-2), DeepSpeedConfig(enabled=deepspeed, zero_stage=2)
    starts = get_paradigm("sft_rlvr").stage_starts(2, objective)
    assert starts == (0, 1)

    def trainer(policy, engine, paradigm, total):
        return Trainer(
            policy=policy,
            engine=engine,
            backend=HFRolloutBackend(policy),
            paradigm=get_paradigm(paradigm),
            objective=objective,
            sampling=SamplingConfig(max_new_tokens=8),
            total_steps=total,
        )

    policy = load_policy(small_policy_dir)
    engine = build_engine(policy.model, optim, ds, total_steps=2, micro_batch=2, stage_starts=starts)
    staged = trainer(policy, engine, "sft_rlvr", 2)
    staged.step(0, samples, seed=0)
    assert engine.torch_optimizer().state  # SFT moments
    after_sft = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    staged.step(1, samples, seed=1)  # the stage switch resets the optimizer state before the RL step

    fresh_policy = load_policy(small_policy_dir)
    fresh_policy.model.load_state_dict(after_sft)
    fresh = build_engine(fresh_policy.model, optim, ds, total_steps=1, micro_batch=2)
    trainer(fresh_policy, fresh, "rlvr", 1).step(0, samples, seed=1)
    for (name, got), want in zip(engine.module.state_dict().items(), fresh.module.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7, msg=name)
