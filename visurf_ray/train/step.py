"""The parts of a training step that need no trainer state: scoring groups and building labels, the smoothing
reference, label tokens, and how members split into micro-batches and length-grouped forward passes
(`visurf_ray.train.trainer.Trainer` runs the step). Never imports Ray.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from visurf_ray import rewards
from visurf_ray.data.sample import Sample
from visurf_ray.models.generation import Rollouts
from visurf_ray.models.policy import Policy
from visurf_ray.objectives.paradigms import ObjectiveConfig, Paradigm
from visurf_ray.rewards.controls import eliminate_thinking_reward, label_completion
from visurf_ray.validation import ValidationError, check_int, require


@dataclass
class ScoredGroup:
    """Reward components of one prompt's rollouts and of its label completion."""

    rollout_components: list[dict[str, float]]
    label_text: str | None
    label_components: dict[str, float] | None


def scored_labels(groups: list[ScoredGroup]) -> tuple[list[str], list[dict[str, float]]]:
    """(texts, components) of every group's label; ValueError if a group has none (a paradigm without labels)."""
    texts, components = [], []
    for index, group in enumerate(groups):
        if group.label_text is None or group.label_components is None:
            raise ValidationError(f"group {index} has no scored label")
        texts.append(group.label_text)
        components.append(group.label_components)
    return texts, components


def label_reasoning(sample: Sample) -> str:
    """The sample's reasoning trace for its label (`objective.label_reasoning`); ValueError naming the sample if it
    has none (the offline benchmark's samples do; the ViSurf training rows do not)."""
    require(
        isinstance(sample.meta.get("think"), str),
        f"sample {sample.id!r}",
        "has no reasoning trace (meta['think']): objective.label_reasoning needs one per sample; the offline benchmark "
        "provides it, rows loaded from files do not",
    )
    return sample.meta["think"]


def sft_label(sample: Sample, target: str) -> str:
    """The SFT baseline's training text for `sample` (`ObjectiveConfig.sft_target`): "answer" = `<answer>{the
    dataset's solution verbatim}</answer>`; "empty_think" = `<think></think><answer>{json.dumps-spaced
    solution}</answer>`; "reasoning" = the same with the sample's reasoning trace in the think block."""
    if target == "answer":
        return label_completion(sample.task, sample.solution, [], align=False)
    reasoning = label_reasoning(sample) if target == "reasoning" else None
    return label_completion(sample.task, sample.solution, [], align=True, reasoning=reasoning)


def score_groups(
    samples: list[Sample], rollouts: Rollouts | None, objective: ObjectiveConfig, paradigm: Paradigm
) -> list[ScoredGroup]:
    """Score every rollout with its task's verifier (`objective.strict_format`) and build each label completion:
    for the SFT paradigm (or stage) its `sft_label`; for a paradigm with rollouts and a label (ViSurf, LUFFY,
    CHORD: the same label, mixed in differently), ViSurf's label —
    aligned to its own group's rollouts when `objective.align_label`, with the sample's reasoning when
    `objective.label_reasoning`, scored with its thinking reward eliminated when `objective.eliminate_label_thinking`.
    """
    groups = []
    for index, sample in enumerate(samples):
        score = functools.partial(
            rewards.score,
            sample.task,
            solution=sample.solution,
            image_size=(sample.img_width, sample.img_height),
            strict_format=objective.strict_format,
        )
        texts = [] if rollouts is None else [t for t, p in zip(rollouts.texts, rollouts.prompt_index) if p == index]
        rollout_components = [score(text) for text in texts]
        label_text = label_components = None
        if paradigm.needs_label and not paradigm.needs_rollouts:
            label_text = sft_label(sample, objective.sft_target)
            label_components = score(label_text)
        elif paradigm.needs_label:
            label_text = label_completion(
                sample.task,
                sample.solution,
                texts,
                align=objective.align_label,
                reasoning=label_reasoning(sample) if objective.label_reasoning else None,
            )
            label_components = score(label_text)
            if objective.eliminate_label_thinking:
                label_components = eliminate_thinking_reward(label_components)
        groups.append(ScoredGroup(rollout_components, label_text, label_components))
    return groups


def smoothing_reference(groups: list[ScoredGroup], rule: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rewards ViSurf's smoothing compares (`ObjectiveConfig.smoothing_rule`): None for "literal" (the rewards
    themselves); for "like_for_like", rollouts [B, G] and labels [B] without their thinking-format reward."""
    if rule == "literal":
        return None

    def without_thinking(c: dict[str, float]) -> float:
        return c["overall"] - c["thinking_format"]

    rollout = [[without_thinking(c) for c in g.rollout_components] for g in groups]
    label = [without_thinking(c) for c in scored_labels(groups)[1]]
    return torch.tensor(rollout, dtype=torch.float64), torch.tensor(label, dtype=torch.float64)


def label_token_ids(policy: Policy, texts: list[str]) -> list[list[int]]:
    """Token ids of label completions, each closed by the end-of-turn token the rollouts end with."""
    tokenizer = policy.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] for text in texts]


def mean_of(components: list[dict[str, float]], prefix: str) -> dict[str, float]:
    if not components:
        return {}
    return {f"{prefix}/{key}": sum(c[key] for c in components) / len(components) for key in components[0]}


def loss_weights(lengths: list[int], chunks: list[slice], agg: str) -> list[float]:
    """Each micro-batch's share of the batch loss, so that Σ weight·chunk loss = the loss of the whole batch: by
    tokens for "token-mean", by sequences for the per-sequence aggregations. lengths: completion tokens per member."""
    if agg == "token-mean":
        return [sum(lengths[c]) / sum(lengths) for c in chunks]
    return [(c.stop - c.start) / len(lengths) for c in chunks]


def length_groups(lengths: list[int], *, max_groups: int = 2, min_saving: float = 0.1) -> list[list[int]]:
    """Split members into at most `max_groups` forward passes so that each pads only to its own longest completion.

    lengths: completion tokens per member. Members are sorted by length and cut into contiguous runs minimising the
    padded completion tokens Σ_group |group| · max length in group (dynamic programming); a split is taken only when it
    saves at least `min_saving` of the unsplit batch's padded tokens (each extra pass costs a kernel launch per layer).
    Returns lists of member indices (into `lengths`), shortest completions first; their union is every member once.
    """
    require(
        lengths and min(lengths) >= 1, "lengths", f"must be a non-empty list of positive token counts, got {lengths}"
    )
    check_int("max_groups", max_groups, low=1)
    order = sorted(range(len(lengths)), key=lambda member: lengths[member])
    sorted_lengths = [lengths[member] for member in order]
    n = len(order)
    # best[k][i]: least padded tokens for the first i sorted members in k runs; cut[k][i]: where its last run starts.
    best = [[0.0] + [float("inf")] * n for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    for k in range(1, max_groups + 1):
        for i in range(1, n + 1):
            for start in range(k - 1, i):
                cost = best[k - 1][start] + (i - start) * sorted_lengths[i - 1]
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, start
    groups_used = min(range(1, max_groups + 1), key=lambda k: (best[k][n], k))
    if best[groups_used][n] > (1 - min_saving) * best[1][n]:
        groups_used = 1
    bounds, end = [], n
    for k in range(groups_used, 0, -1):
        bounds.append((cut[k][end], end))
        end = cut[k][end]
    return [order[start:stop] for start, stop in reversed(bounds)]


def pad_columns(values: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad [n, T] with zeros to [n, width]."""
    return F.pad(values, (0, width - values.shape[1]))
