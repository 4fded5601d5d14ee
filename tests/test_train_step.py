"""One training step on a small real Qwen2.5-VL: members, label presence, rewards, advantages and the update.

Rollouts come either from the real HF backend or, where a test needs known rewards, from `ScriptedBackend`, a
rollout backend that returns chosen completion texts (the step, not the sampler, is under test there)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from visurf_ray.config import DeepSpeedConfig, OptimConfig
from visurf_ray.data.benchmark import make_split
from visurf_ray.models.generation import Rollouts
from visurf_ray.models.policy import load_policy, use_input_dtype_norms
from visurf_ray.objectives.paradigms import ObjectiveConfig, get_paradigm
from visurf_ray.rollout.base import SamplingConfig
from visurf_ray.rollout.hf import HFRolloutBackend
from visurf_ray.train.engine import build_engine
from visurf_ray.train.step import length_groups, score_groups
from visurf_ray.train.trainer import Trainer


class ScriptedBackend:
    """Returns, for every prompt, the same chosen completion texts (tokenized with the policy's tokenizer + eos)."""

    def __init__(self, policy, texts_for_prompt):
        self.policy = policy
        self.texts_for_prompt = texts_for_prompt
        self.calls = 0

    def generate(self, prompt_batch, n, sampling, seed, *, images, questions):
        self.calls += 1
        tokenizer = self.policy.tokenizer
        ids, index, texts = [], [], []
        for prompt in range(len(prompt_batch)):
            chosen = self.texts_for_prompt(prompt)
            assert len(chosen) == n
            for text in chosen:
                ids.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
                index.append(prompt)
                texts.append(text)
        return Rollouts(ids, index, texts, old_logp=None)

    def sync_weights(self, model):
        """Nothing to do: the scripted completions do not depend on the weights."""


def grounding_samples(n):
    samples = [s for s in make_split("posttrain", 200, seed=3) if s.task == "grounding" and s.solution != "[]"]
    return samples[:n]


def test_label_reasoning_gives_each_label_its_samples_reasoning():
    samples = grounding_samples(2)
    texts = ['<think>x</think><answer>[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3]}]</answer>'] * 4
    rollouts = Rollouts([[1]] * 4, [0, 0, 1, 1], texts, old_logp=None)
    plain = score_groups(samples, rollouts, ObjectiveConfig(), get_paradigm("visurf"))
    reasoned = score_groups(samples, rollouts, ObjectiveConfig(label_reasoning=True), get_paradigm("visurf"))
    for sample, without, with_reasoning in zip(samples, plain, reasoned):
        assert without.label_text.startswith("<think></think>")
        assert with_reasoning.label_text == without.label_text.replace(
            "<think></think>", f"<think>{sample.meta['think']}</think>"
        )
        assert with_reasoning.label_components == without.label_components  # thinking reward eliminated in both
    bare = dataclasses.replace(samples[1], meta={k: v for k, v in samples[1].meta.items() if k != "think"})
    with pytest.raises(ValueError, match=f"{bare.id}.*reasoning"):
        score_groups([samples[0], bare], rollouts, ObjectiveConfig(label_reasoning=True), get_paradigm("visurf"))


def make_engine(policy, *, deepspeed=False, lr=1e-3):
    torch.manual_seed(0)
    return build_engine(
        policy.model,
        OptimConfig(lr=lr),
        DeepSpeedConfig(enabled=deepspeed, zero_stage=2),
        total_steps=10,
        micro_batch=4,
    )


def make_trainer(policy, backend, objective, *, deepspeed=False, **options):
    return Trainer(
        policy=policy,
        engine=make_engine(policy, deepspeed=deepspeed),
        backend=backend,
        paradigm=get_paradigm(objective.paradigm),
        objective=objective,
        sampling=SamplingConfig(max_new_tokens=8),
        total_steps=1,
        **options,
    )


def run_step(policy, backend, objective, samples, *, micro_batches=1, deepspeed=False):
    trainer = make_trainer(policy, backend, objective, deepspeed=deepspeed, micro_batches=micro_batches)
    return trainer.step(0, samples, seed=0)


def test_all_fail_group_gives_the_label_the_derived_advantage(small_policy_dir):
    policy = load_policy(small_policy_dir)
    G = 4
    wrong = ['<think>x</think><answer>[{"bbox_2d": [0, 0, 1, 1], "point_2d": [0, 0]}]</answer>'] * G
    backend = ScriptedBackend(policy, lambda prompt: wrong)
    objective = ObjectiveConfig(paradigm="visurf", num_rollouts=G, eps=0.0)
    metrics = run_step(policy, backend, objective, grounding_samples(2))
    assert metrics["all_fail_fraction"] == 1.0
    assert metrics["smoothing_fired_fraction"] == 0.0
    assert metrics["rollout/accuracy"] == 0.0
    # The aligned label scores full accuracy but (control 2) no thinking reward.
    assert metrics["label/accuracy"] == 3.0 and metrics["label/thinking_format"] == 0.0
    # Every rollout has the same reward here, so the group is G copies of it plus the label's.
    group = torch.tensor([metrics["rollout/overall"]] * G + [metrics["label/overall"]], dtype=torch.float64)
    expected = ((group[-1] - group.mean()) / group.std()).item()
    assert metrics["label_advantage_mean"] == pytest.approx(expected, rel=1e-6)


def test_matched_label_is_smoothed_away(small_policy_dir):
    policy = load_policy(small_policy_dir)
    samples = grounding_samples(2)
    G = 3
    answers = {i: f"<think>found it.</think><answer>{s.solution}</answer>" for i, s in enumerate(samples)}
    backend = ScriptedBackend(policy, lambda prompt: [answers[prompt]] * (G - 1) + ["<answer>[]</answer>"])
    objective = ObjectiveConfig(paradigm="visurf", num_rollouts=G)
    metrics = run_step(policy, backend, objective, samples)
    assert metrics["smoothing_fired_fraction"] == 1.0
    assert metrics["label_advantage_mean"] == 0.0
    assert metrics["all_fail_fraction"] == 0.0


def test_like_for_like_smoothing_keeps_the_label_against_a_near_miss(small_policy_dir):
    policy = load_policy(small_policy_dir)
    samples = grounding_samples(2)
    near_misses = {}
    for index, sample in enumerate(samples):
        objects = json.loads(sample.solution)
        wrong_points = [{"bbox_2d": o["bbox_2d"], "point_2d": o["bbox_2d"][2:]} for o in objects]
        near_misses[index] = f"<think>x</think><answer>{json.dumps(wrong_points)}</answer>"
    backend = ScriptedBackend(policy, lambda prompt: [near_misses[prompt]] * 2)
    fired = {}
    for rule in ("literal", "like_for_like"):
        objective = ObjectiveConfig(paradigm="visurf", num_rollouts=2, smoothing_rule=rule)
        fired[rule] = run_step(policy, backend, objective, samples)["smoothing_fired_fraction"]
    assert fired == {"literal": 1.0, "like_for_like": 0.0}


@pytest.mark.parametrize("paradigm", ["sft", "rlvr", "visurf", "luffy", "chord"])
def test_each_paradigm_updates_the_policy_with_its_members(small_policy_dir, paradigm):
    policy = load_policy(small_policy_dir)
    before = [p.detach().clone() for p in policy.model.parameters()]
    backend = HFRolloutBackend(policy)
    objective = ObjectiveConfig(paradigm=paradigm, num_rollouts=3)
    metrics = run_step(policy, backend, objective, make_split("posttrain", 2, seed=1))
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    assert 0 < metrics["step_cpu_time"] and 0 < metrics["step_time"]
    changed = sum(not torch.equal(a, b.detach()) for a, b in zip(before, policy.model.parameters()))
    assert changed > 0
    has_label = paradigm != "rlvr"
    has_rollouts = paradigm != "sft"
    assert ("label/overall" in metrics) == has_label
    assert ("rollout/overall" in metrics) == has_rollouts
    assert ("label_token_fraction" in metrics) == has_label
    assert ("rollout_token_fraction" in metrics) == has_rollouts
    if paradigm == "sft":
        assert metrics["time/rollout"] < 0.5  # no sampling at all in SFT
    assert metrics["paradigm_stage"] == get_paradigm(paradigm).paradigm_id
    if has_rollouts:
        assert {"clip_fraction", "approx_kl", "pg_loss", "rollout_reward_mean", "zero_std_fraction"} <= metrics.keys()
    if paradigm == "chord":
        assert metrics["chord_mu"] == pytest.approx(objective.chord_mu_start)


def test_luffy_samples_g_minus_one_rollouts_and_puts_the_label_in_their_group(small_policy_dir):
    """G = 4: three sampled rollouts (the scripted backend checks n = 3) and the label make each group of four."""
    policy = load_policy(small_policy_dir)
    G = 4
    wrong = ['<think>x</think><answer>[{"bbox_2d": [0, 0, 1, 1], "point_2d": [0, 0]}]</answer>'] * (G - 1)
    backend = ScriptedBackend(policy, lambda prompt: wrong)
    objective = ObjectiveConfig(paradigm="luffy", num_rollouts=G, eps=0.0)
    metrics = run_step(policy, backend, objective, grounding_samples(2))
    assert backend.calls == 1 and metrics["paradigm_stage"] == 4.0
    assert metrics["label_token_fraction"] + metrics["rollout_token_fraction"] == pytest.approx(1.0)
    group = torch.tensor([metrics["rollout/overall"]] * (G - 1) + [metrics["label/overall"]], dtype=torch.float64)
    expected = ((group[-1] - group.mean()) / group.std()).item()
    assert metrics["label_advantage_mean"] == pytest.approx(expected, rel=1e-6)
    assert 0 < metrics["label_shaping_weight_mean"] <= 0.25 and metrics["clip_fraction"] == 0.0


@pytest.mark.parametrize(
    ("paradigm", "num_rollouts", "agg"),
    [("visurf", 3, "token-mean"), ("luffy", 4, "token-mean"), ("chord", 3, "seq-mean-token-mean")],
)
def test_micro_batches_give_the_same_update_as_one_batch(small_policy_dir, paradigm, num_rollouts, agg):
    """Exact for every paradigm whose loss is one aggregation over the members (ViSurf, LUFFY), and for CHORD's two
    per-term means under the per-sequence aggregations."""
    samples = make_split("posttrain", 4, seed=2)
    results = []
    for micro_batches in (1, 2):
        policy = load_policy(small_policy_dir, dtype=torch.float64)
        backend = ScriptedBackend(
            policy,
            lambda prompt: [
                "<think>a.</think><answer>[]</answer>",
                '<think>b b.</think><answer>{"anomaly": "no"}</answer>',
                "<answer>3</answer>",
            ],
        )
        objective = ObjectiveConfig(paradigm=paradigm, num_rollouts=num_rollouts, agg=agg)
        run_step(policy, backend, objective, samples, micro_batches=micro_batches)
        results.append(torch.cat([p.detach().flatten() for p in policy.model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-10, rtol=0)


def test_deepspeed_zero2_step_runs_in_process(small_policy_dir):
    policy = load_policy(small_policy_dir)
    objective = ObjectiveConfig(paradigm="visurf", num_rollouts=2)
    metrics = run_step(
        policy, HFRolloutBackend(policy), objective, make_split("posttrain", 2, seed=4), micro_batches=2, deepspeed=True
    )
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


def test_length_groups_pad_each_group_to_its_own_longest():
    assert length_groups([96, 96, 96, 40, 96]) == [[3], [0, 1, 2, 4]]
    assert length_groups([50, 50, 50]) == [[0, 1, 2]]  # nothing to save: one pass
    assert length_groups([96, 95, 40], max_groups=1) == [[2, 1, 0]]
    assert length_groups([100] * 9 + [95]) == [[9, 0, 1, 2, 3, 4, 5, 6, 7, 8]]  # saves 0.5 % < min_saving
    groups = length_groups([5, 80, 6, 81, 40, 41, 7], max_groups=3)
    assert groups == [[0, 2, 6], [4, 5], [1, 3]]
    with pytest.raises(ValueError, match="lengths"):
        length_groups([3, 0])
    with pytest.raises(ValueError, match="max_groups"):
        length_groups([3], max_groups=0)


def float64_visurf_gradients(policy_dir, samples, answers, objective, *, checkpointing=False, on_policy=None, **step):
    """Every parameter's gradient after one float64 ViSurf trainer step from the saved weights (float64 norms:
    transformers' RMSNorm would round gradients to float32). `on_policy(policy)` runs before the step (e.g. hooks)."""
    policy = load_policy(policy_dir, dtype=torch.float64)
    use_input_dtype_norms(policy.model)
    if checkpointing:
        policy.model.gradient_checkpointing_enable()
    trainer = make_trainer(policy, ScriptedBackend(policy, lambda prompt: answers), objective, **step)
    accumulated = {}
    for name, parameter in policy.model.named_parameters():
        parameter.register_post_accumulate_grad_hook(
            lambda p, name=name, into=accumulated: into.__setitem__(name, p.grad.clone())
        )
    if on_policy is not None:
        on_policy(policy)
    trainer.step(0, samples, seed=0)
    return accumulated


def test_length_grouped_forwards_give_the_same_gradient_as_one_padded_batch(small_policy_dir):
    """Long rollouts and a short label: the grouped step runs each chunk's prompts once and its completions in two
    passes against them, and accumulates the float64 policy's gradient exactly as one padded pass does, with and
    without micro-batches (float64 norms: transformers' RMSNorm would round gradients to float32)."""
    samples = make_split("posttrain", 4, seed=2)
    long_thought = "<think>" + "the box is here. " * 12 + "</think>"
    answers = [long_thought + "<answer>[]</answer>", long_thought + "<answer>3</answer>", "<answer>1</answer>"]
    objective = ObjectiveConfig(paradigm="visurf", num_rollouts=3, agg="seq-mean-token-mean")
    gradients, forwards = {}, []
    for micro_batches, groups in ((1, 1), (1, 2), (2, 2)):

        def count_passes(policy, n=micro_batches):
            policy.model.model.language_model.register_forward_hook(lambda *_: forwards.append(n))

        gradients[micro_batches, groups] = float64_visurf_gradients(
            small_policy_dir,
            samples,
            answers,
            objective,
            on_policy=count_passes,
            micro_batches=micro_batches,
            length_groups_per_chunk=groups,
        )
    # language-model passes per step: micro_batches × (1 prompt pass + length groups)
    assert forwards == [1] * 2 + [1] * 3 + [2] * 6
    reference = gradients[1, 1]
    assert max(float(g.abs().max()) for g in reference.values()) > 1e-3
    for key, grads in gradients.items():
        assert grads.keys() == reference.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(
                grad,
                reference[name],
                rtol=0,
                atol=1e-10,
                msg=lambda m, k=key, n=name: f"{k} {n}: {m}",
            )


def test_gradient_checkpointing_runs_every_member_with_its_prompt_and_gives_the_same_gradient(small_policy_dir):
    """Gradient checkpointing drops the key/value cache, so the step scores full prompt + completion sequences; the
    float64 gradient equals the shared-prompt step's."""
    samples = make_split("posttrain", 2, seed=3)
    answers = ["<think>here</think><answer>[]</answer>", "<answer>[]</answer>"]
    objective = ObjectiveConfig(paradigm="visurf", num_rollouts=2)
    shared, checkpointed = (
        float64_visurf_gradients(small_policy_dir, samples, answers, objective, checkpointing=checkpointing)
        for checkpointing in (False, True)
    )
    assert shared.keys() == checkpointed.keys() and max(float(g.abs().max()) for g in shared.values()) > 1e-4
    for name in shared:
        torch.testing.assert_close(
            checkpointed[name], shared[name], rtol=0, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}"
        )
