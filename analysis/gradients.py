"""Gradient derivation checks on a policy: prompt groups sampled from it (or built from chosen rollout texts) and
scored as the trainer scores them, each group's gradients and identity residuals (`analysis.gradient_identities`) as
one table row, and the same over the checkpoints of a training run, to see how the label's (SFT-like) term changes as
the policy improves. Plots: `analysis.gradient_plots`; the command: `experiments/gradients.py`.

Everything runs in float64 on CPU (`load_float64_policy`). Imports torch, transformers (through `visurf_ray.models`)
and pandas; never Ray.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from analysis.gradient_identities import (
    AGGREGATION,
    gradient_metrics,
    group_outcome,
    identity_residuals,
    paradigm_gradients,
)
from visurf_ray import rewards
from visurf_ray.config import TINY_BASE_MODEL
from visurf_ray.data.sample import Sample
from visurf_ray.models.generation import Rollouts, generate
from visurf_ray.models.inputs import completion_logprobs, encode_prompts, encode_sequences
from visurf_ray.models.policy import Policy, load_policy, use_input_dtype_norms
from visurf_ray.objectives.paradigms import ObjectiveConfig, get_paradigm
from visurf_ray.train.engine import load_saved_weights
from visurf_ray.train.loop import TRAINER_STATE, read_trainer_state
from visurf_ray.train.step import label_token_ids, score_groups
from visurf_ray.validation import check_int, check_number


@dataclass(frozen=True)
class GradientCheckConfig:
    """How groups are sampled and which ViSurf objective is differentiated; validated on construction.

    num_rollouts: G completions per prompt (>= 2). max_new_tokens: rollout length limit in tokens (48: a tiny-model
    answer with its reasoning is ~34 tokens). temperature: sampling temperature (> 0). seed: the sampling seed, the
    same at every checkpoint. unbiased_std, smoothing, eps, align_label, eliminate_label_thinking: as in
    `ObjectiveConfig` (eps defaults to 0 here: the closed forms are exact then).
    """

    num_rollouts: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    seed: int = 0
    unbiased_std: bool = True
    smoothing: bool = True
    eps: float = 0.0
    align_label: bool = True
    eliminate_label_thinking: bool = True

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, low=1)
        check_int("seed", self.seed, low=0)
        check_number("temperature", self.temperature, low=0, low_open=True)
        self.objective()  # validates num_rollouts, eps and the flags

    def objective(self) -> ObjectiveConfig:
        """The ViSurf objective differentiated: these settings, agg "seq-mean-token-mean", no KL term."""
        return ObjectiveConfig(
            paradigm="visurf",
            num_rollouts=self.num_rollouts,
            agg=AGGREGATION,
            unbiased_std=self.unbiased_std,
            smoothing=self.smoothing,
            eps=self.eps,
            align_label=self.align_label,
            eliminate_label_thinking=self.eliminate_label_thinking,
            kl_coef=0.0,
        )


@dataclass(frozen=True)
class Group:
    """One prompt group, scored as the trainer scores it (`visurf_ray.train.step.score_groups`).

    rollout_ids: G completions as token ids (each closed by eos unless cut at max_new_tokens); rollout_texts: their
    text. label_text / label_ids: the label completion after the reward controls (aligned when configured), its ids
    closed by eos. rollout_rewards / label_reward: `overall` rewards (reward units), the label's after eliminating its
    thinking reward when configured and before smoothing. rollout_success: the task verifier's `is_success` per rollout.
    """

    sample: Sample
    rollout_texts: list[str]
    rollout_ids: list[list[int]]
    label_text: str
    label_ids: list[int]
    rollout_rewards: list[float]
    label_reward: float
    rollout_success: list[bool]

    @property
    def outcome(self) -> str:
        """`group_outcome` of this group."""
        return group_outcome(self.rollout_rewards, self.label_reward, self.rollout_success)


def _groups_from_rollouts(
    policy: Policy, samples: list[Sample], rollouts: Rollouts, cfg: GradientCheckConfig
) -> list[Group]:
    scored = score_groups(samples, rollouts, cfg.objective(), get_paradigm("visurf"))
    labels = label_token_ids(policy, [group.label_text for group in scored])
    groups = []
    for index, (sample, group, label_ids) in enumerate(zip(samples, scored, labels)):
        members = [j for j, owner in enumerate(rollouts.prompt_index) if owner == index]
        verifier = rewards.get_task(sample.task)
        groups.append(
            Group(
                sample=sample,
                rollout_texts=[rollouts.texts[j] for j in members],
                rollout_ids=[rollouts.completion_ids[j] for j in members],
                label_text=group.label_text,
                label_ids=label_ids,
                rollout_rewards=[c["overall"] for c in group.rollout_components],
                label_reward=group.label_components["overall"],
                rollout_success=[verifier.is_success(c) for c in group.rollout_components],
            )
        )
    return groups


def sample_groups(policy: Policy, samples: list[Sample], cfg: GradientCheckConfig) -> list[Group]:
    """Sample cfg.num_rollouts completions per prompt (seed cfg.seed, cfg.temperature, up to cfg.max_new_tokens tokens)
    with `visurf_ray.models.generation.generate` and score each group as the trainer does."""
    if not samples:
        raise ValueError("samples is empty: no prompt to sample groups for")
    prompts = encode_prompts(policy, [s.image for s in samples], [s.problem for s in samples])
    completions = generate(
        policy,
        prompts,
        num_return_sequences=cfg.num_rollouts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed,
    )
    rollouts = Rollouts(completions.completion_ids, completions.prompt_index, completions.texts)
    return _groups_from_rollouts(policy, samples, rollouts, cfg)


def constructed_groups(
    policy: Policy, samples: list[Sample], rollout_texts: list[list[str]], cfg: GradientCheckConfig
) -> list[Group]:
    """Groups whose rollouts are chosen texts (each tokenized and closed by eos), scored as the trainer does.

    rollout_texts: for each sample, exactly cfg.num_rollouts completion strings.
    """
    if not samples or len(rollout_texts) != len(samples):
        raise ValueError(f"rollout_texts needs one list per sample ({len(samples)}), got {len(rollout_texts)}")
    for index, texts in enumerate(rollout_texts):
        if len(texts) != cfg.num_rollouts or not all(isinstance(text, str) for text in texts):
            raise ValueError(
                f"rollout_texts[{index}] must hold {cfg.num_rollouts} strings (num_rollouts), got {texts!r}"
            )
    flat = [text for texts in rollout_texts for text in texts]
    prompt_index = [index for index, texts in enumerate(rollout_texts) for _ in texts]
    rollouts = Rollouts(label_token_ids(policy, flat), prompt_index, flat)
    return _groups_from_rollouts(policy, samples, rollouts, cfg)


def group_logprobs(policy: Policy, group: Group) -> tuple[Tensor, Tensor]:
    """Log-probs of the group's G+1 members (rollouts, then the label) under `policy`, differentiable.

    Returns (logp [G+1, T] nats in the model's dtype, mask [G+1, T] bool), T the longest member in tokens.
    """
    prompts = encode_prompts(policy, [group.sample.image], [group.sample.problem])
    members = [*group.rollout_ids, group.label_ids]
    sequences = encode_sequences(policy, prompts, members, [0] * len(members)).to(policy.device)
    logp, mask = completion_logprobs(policy.model, sequences)
    return logp, mask.bool()


def gradient_table(policy: Policy, groups: list[Group], cfg: GradientCheckConfig, *, step: int = 0) -> pd.DataFrame:
    """One row per group at one checkpoint (`step`, optimizer steps; 0 for the starting model): the group's facts
    (prompt id, task, outcome, rewards, success rate, smoothing), `gradient_metrics` and `residual_<check>` for every
    check in CHECKS. The policy must be float64 for residuals below TOLERANCE; it is put in eval mode."""
    policy.model.eval()
    params = [p for p in policy.model.parameters() if p.requires_grad]
    objective = cfg.objective()
    rows = []
    for group in groups:
        logp, mask = group_logprobs(policy, group)
        rollout_rewards = torch.tensor(group.rollout_rewards, dtype=torch.float64)
        grads = paradigm_gradients(logp, mask, params, rollout_rewards, group.label_reward, objective)
        residuals = identity_residuals(grads, objective)
        rows.append(
            {
                "step": step,
                "prompt_id": group.sample.id,
                "task": group.sample.task,
                "outcome": group.outcome,
                "all_fail": not any(group.rollout_success),
                "success_rate": sum(group.rollout_success) / len(group.rollout_success),
                "rollout_reward_mean": sum(group.rollout_rewards) / len(group.rollout_rewards),
                "rollout_reward_max": max(group.rollout_rewards),
                "label_reward": group.label_reward,
                "smoothing_fired": grads.smoothing_fired,
                **gradient_metrics(grads),
                **{f"residual_{name}": value for name, value in residuals.items()},
            }
        )
    return pd.DataFrame(rows)


def load_float64_policy(path: str | Path) -> Policy:
    """A policy folder (`load_policy`), or "tiny-base" for the cached tiny base model, in float64 on CPU, eval mode.

    Every Qwen2.5-VL RMSNorm is replaced by a `torch.nn.RMSNorm` sharing its weight (the same function, computed in
    the input's dtype): transformers' RMSNorm computes in float32 whatever the model's dtype, which rounds every
    gradient passing through it to float32 (identity residuals ~4e-8 instead of ~1e-13). One float32 step remains,
    in transformers' vision rotary embedding (`apply_rotary_pos_emb_vision` casts q and k to float32): it bounds the
    residuals at float32 precision times the vision attention's share of the gradient.
    """
    if str(path) == TINY_BASE_MODEL:
        from visurf_ray.train.pretrain import ensure_base_model  # pretrains it on first use (minutes)

        path = ensure_base_model()
    policy = load_policy(path, dtype=torch.float64, device="cpu")
    use_input_dtype_norms(policy.model)
    policy.model.eval()
    return policy


def _run_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    steps = []
    for step_dir in sorted((run_dir / "checkpoints").glob("step_*")):
        state_file = step_dir / TRAINER_STATE
        if not state_file.is_file():
            raise ValueError(f"checkpoint {step_dir} has no {TRAINER_STATE} (incomplete checkpoint)")
        steps.append((int(read_trainer_state(step_dir)["step"]), step_dir))
    if not steps:
        raise ValueError(f"run folder {run_dir} has no checkpoints/step_* folder")
    return sorted(steps)


def checkpoint_policies(checkpoint: str | Path) -> Iterator[tuple[int, Policy]]:
    """(step, float64 policy) pairs: for a policy folder or "tiny-base", only (0, it); for a run folder written by
    `visurf_ray.train.loop.LocalSession` (`<run>/checkpoints/step_*/`), the run's starting model (its
    trainer_state.json's config model.path) as step 0, then every checkpoint in step order. Each policy is loaded
    fresh when its turn comes."""
    path = Path(checkpoint)
    if str(checkpoint) == TINY_BASE_MODEL or (path / "config.json").is_file():
        yield 0, load_float64_policy(checkpoint)
        return
    if not (path / "checkpoints").is_dir():
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} is neither a policy folder (config.json), 'tiny-base' nor a "
            "run folder (checkpoints/step_*/)"
        )
    checkpoints = _run_checkpoints(path)
    base = read_trainer_state(checkpoints[0][1])["config"]["model"]["path"]
    yield 0, load_float64_policy(base)
    for step, step_dir in checkpoints:
        policy = load_float64_policy(base)
        load_saved_weights(policy.model, step_dir)
        yield step, policy


def analyse_checkpoints(checkpoint: str | Path, samples: list[Sample], cfg: GradientCheckConfig) -> pd.DataFrame:
    """`gradient_table` of groups sampled (same prompts, same seed) from every policy of `checkpoint_policies`,
    concatenated: one row per (step, prompt)."""
    tables = [
        gradient_table(policy, sample_groups(policy, samples, cfg), cfg, step=step)
        for step, policy in checkpoint_policies(checkpoint)
    ]
    return pd.concat(tables, ignore_index=True)
