"""One optimizer step of any paradigm: rollouts → rewards → reward controls → advantages → loss → optimizer step.

The data flow of ../shared/DESIGN.md. Members of a prompt are ordered as the objectives expect: its rollouts (G, or
G − 1 where the label takes a slot of the group: `Paradigm.rollouts_per_prompt`), then its label (where the paradigm
uses one). Never imports Ray: the loop that calls this runs in-process or under Ray Train.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from visurf_ray import rewards
from visurf_ray.data.sample import Sample
from visurf_ray.models.inputs import (
    completion_logprobs,
    completion_logprobs_and_entropy,
    encode_completions,
    encode_prompts,
    encode_sequences,
    image_features,
    prompt_states,
    shared_prompt_logprobs_and_entropy,
)
from visurf_ray.models.policy import Policy
from visurf_ray.objectives.paradigms import ObjectiveConfig, Paradigm, stack_members
from visurf_ray.rewards.controls import eliminate_thinking_reward, label_completion
from visurf_ray.rollout.base import RolloutBackend, Rollouts, SamplingConfig
from visurf_ray.train.engine import Engine


@dataclass
class ScoredGroup:
    """Reward components of one prompt's rollouts and of its label completion."""

    rollout_components: list[dict[str, float]]
    label_text: str | None
    label_components: dict[str, float] | None


def label_reasoning(sample: Sample) -> str:
    """The sample's reasoning trace for its label (`objective.label_reasoning`); ValueError naming the sample if it
    has none (the offline benchmark's samples do; the ViSurf training rows do not)."""
    if not isinstance(sample.meta.get("think"), str):
        raise ValueError(
            f"sample {sample.id!r} has no reasoning trace (meta['think']): objective.label_reasoning needs one per "
            "sample; the offline benchmark provides it, rows loaded from files do not"
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
    label = [without_thinking(g.label_components) for g in groups]
    return torch.tensor(rollout, dtype=torch.float64), torch.tensor(label, dtype=torch.float64)


def label_token_ids(policy: Policy, texts: list[str]) -> list[list[int]]:
    """Token ids of label completions, each closed by the end-of-turn token the rollouts end with."""
    tokenizer = policy.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] for text in texts]


def _mean_of(components: list[dict[str, float]], prefix: str) -> dict[str, float]:
    if not components:
        return {}
    return {f"{prefix}/{key}": sum(c[key] for c in components) / len(components) for key in components[0]}


def _loss_weights(lengths: list[int], chunks: list[slice], agg: str) -> list[float]:
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
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be a non-empty list of positive token counts, got {lengths}")
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")
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


def _pad_columns(values: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad [n, T] with zeros to [n, width]."""
    return F.pad(values, (0, width - values.shape[1]))


def train_step(
    *,
    policy: Policy,
    engine: Engine,
    backend: RolloutBackend,
    paradigm: Paradigm,
    objective: ObjectiveConfig,
    samples: list[Sample],
    sampling: SamplingConfig,
    seed: int,
    micro_batches: int = 1,
    reference: torch.nn.Module | None = None,
    length_groups_per_chunk: int = 2,
) -> dict[str, float]:
    """Run one optimizer step of `paradigm` (already resolved for this step) on `samples`; return its metrics.

    Rollouts are sampled with `seed`; members are split into `micro_batches` prompt-aligned chunks for the
    forward/backward, each weighted so that the gradient equals that of the whole batch at once. Within a chunk, the
    members run in up to `length_groups_per_chunk` forward passes grouped by completion length (`length_groups`), so
    that short members (e.g. labels shorter than the rollouts) are not padded to the longest; the loss and gradient
    are those of one padded pass.
    """
    times = {"time/rollout": 0.0, "time/reward": 0.0, "time/update": 0.0}
    start = time.perf_counter()
    prompts = encode_prompts(policy, [s.image for s in samples], [s.problem for s in samples])
    rollouts = None
    if paradigm.needs_rollouts:
        policy.model.eval()
        rollouts = backend.generate(
            prompts,
            paradigm.rollouts_per_prompt(objective),
            sampling,
            seed,
            images=[s.image for s in samples],
            questions=[s.problem for s in samples],
        )
        policy.model.train()
    times["time/rollout"] = time.perf_counter() - start

    start = time.perf_counter()
    groups = score_groups(samples, rollouts, objective, paradigm)
    rollout_rewards = label_rewards = None
    if paradigm.needs_rollouts:
        rollout_rewards = torch.tensor(
            [[c["overall"] for c in g.rollout_components] for g in groups], dtype=torch.float64
        )
    if paradigm.needs_label:
        label_rewards = torch.tensor([g.label_components["overall"] for g in groups], dtype=torch.float64)
    compared = (
        smoothing_reference(groups, objective.smoothing_rule)
        if paradigm.needs_rollouts and paradigm.needs_label
        else None
    )
    advantages = paradigm.advantages(rollout_rewards, label_rewards, objective, smoothing_reference=compared)
    member_advantages = stack_members(advantages.rollout, advantages.label).float()
    is_label = paradigm.member_is_label(len(samples), objective)

    completion_ids: list[list[int]] = []
    prompt_index: list[int] = []
    old_logp: list[torch.Tensor | None] = []  # None: scored at the update itself (ratio 1, one update per batch)
    labels = label_token_ids(policy, [g.label_text for g in groups]) if paradigm.needs_label else []
    for index in range(len(samples)):
        if rollouts is not None:
            for j, owner in enumerate(rollouts.prompt_index):
                if owner == index:
                    completion_ids.append(rollouts.completion_ids[j])
                    prompt_index.append(index)
                    old_logp.append(None if rollouts.old_logp is None else rollouts.old_logp[j])
        if paradigm.needs_label:
            completion_ids.append(labels[index])
            prompt_index.append(index)
            old_logp.append(None)
    times["time/reward"] = time.perf_counter() - start

    start = time.perf_counter()
    if not 1 <= micro_batches <= len(samples):
        raise ValueError(f"micro_batches={micro_batches} must be in [1, {len(samples)}] (the prompts of this step)")
    if length_groups_per_chunk < 1:
        raise ValueError(f"length_groups_per_chunk={length_groups_per_chunk} must be >= 1 (1: one padded pass)")
    per_prompt = len(completion_ids) // len(samples)
    chunks = [
        slice(int(c[0]) * per_prompt, (int(c[-1]) + 1) * per_prompt)
        for c in torch.arange(len(samples)).tensor_split(micro_batches)
    ]
    lengths = [len(ids) for ids in completion_ids]
    weights = _loss_weights(lengths, chunks, objective.agg)
    device = policy.device
    loss_metrics: dict[str, float] = {}
    entropy_sum = tokens = prompt_tokens = 0.0
    for chunk, weight in zip(chunks, weights):
        # One forward per length group (rows are independent, so the chunk's logp equals one padded forward's), then
        # the chunk's members back in member order for the paradigm's loss.
        width = max(lengths[chunk])
        passes = [
            [chunk.start + i for i in group]
            for group in length_groups(lengths[chunk], max_groups=length_groups_per_chunk)
        ]
        # Each prompt (image and tokens) runs once for all its members and passes; autograd sums their gradients into
        # it. Gradient checkpointing drops the key/value cache, so under it every member runs with its prompt.
        owners = sorted(set(prompt_index[chunk]))
        row_of = {owner: row for row, owner in enumerate(owners)}
        chunk_prompts = prompts.select(owners)
        features = image_features(engine.module, chunk_prompts)
        share_prompts = not engine.module.is_gradient_checkpointing
        prompt_lengths = chunk_prompts.attention_mask.sum(dim=1).tolist()
        prompt_tokens += (
            sum(prompt_lengths) if share_prompts else sum(prompt_lengths[row_of[p]] for p in prompt_index[chunk])
        )
        if share_prompts:
            states = prompt_states(engine.module, chunk_prompts, features)
            if reference is not None:
                with torch.no_grad():
                    reference_states = prompt_states(reference, chunk_prompts)
        parts = []
        for group in passes:
            completions = [completion_ids[m] for m in group]
            prompt_rows = [row_of[prompt_index[m]] for m in group]
            group_ref = None
            if share_prompts:
                part = encode_completions(policy, completions, prompt_rows)
                group_logp, group_entropy, group_mask = shared_prompt_logprobs_and_entropy(engine.module, states, part)
                if reference is not None:
                    with torch.no_grad():
                        group_ref, _, _ = shared_prompt_logprobs_and_entropy(reference, reference_states, part)
            else:
                part = encode_sequences(policy, chunk_prompts, completions, prompt_rows).to(device)
                group_logp, group_entropy, group_mask = completion_logprobs_and_entropy(
                    engine.module, part, dict(enumerate(features))
                )
                if reference is not None:
                    with torch.no_grad():
                        group_ref, _ = completion_logprobs(reference, part)
            parts.append((group_logp, group_entropy, group_mask, group_ref))
        rows = torch.tensor([m - chunk.start for group in passes for m in group], device=device).argsort()
        logp, entropy, mask = (torch.cat([_pad_columns(p[i], width) for p in parts])[rows] for i in range(3))
        ref_logp = None if reference is None else torch.cat([_pad_columns(p[3], width) for p in parts])[rows]
        mask = mask.bool()
        old = logp.detach().clone()
        for row, member in enumerate(range(chunk.start, chunk.stop)):
            if old_logp[member] is not None:
                old[row, : lengths[member]] = old_logp[member].to(old)
        loss, metrics = paradigm.loss(
            logp,
            old,
            mask,
            member_advantages[chunk].to(device),
            is_label[chunk].to(device),
            objective,
            ref_logp=ref_logp,
        )
        engine.backward(loss * weight)
        for key, value in metrics.items():
            loss_metrics[key] = loss_metrics.get(key, 0.0) + weight * value
        entropy_sum += float(entropy.detach().sum())
        tokens += float(mask.sum())
    lr = engine.lr  # this step's learning rate (the schedule advances in engine.step)
    grad_norm = engine.step()
    times["time/update"] = time.perf_counter() - start

    metrics: dict[str, float] = {**times, **loss_metrics, **advantages.metrics}
    metrics["grad_norm"] = grad_norm
    metrics["lr"] = lr
    metrics["entropy"] = entropy_sum / max(tokens, 1.0)
    metrics["paradigm_stage"] = float(paradigm.paradigm_id)  # the stage a schedule ran (sft_rlvr: sft, then rlvr)
    if rollouts is not None:
        every = [c for g in groups for c in g.rollout_components]
        metrics.update(_mean_of(every, "rollout"))
        lengths = [len(ids) for ids in rollouts.completion_ids]
        metrics["response_length"] = sum(lengths) / len(lengths)
        metrics["generated_tokens"] = float(rollouts.num_tokens())
        metrics["rollout_tokens_per_s"] = rollouts.num_tokens() / max(times["time/rollout"], 1e-9)
        success = [
            [rewards.get_verifier(s.task).is_success(c) for c in g.rollout_components] for s, g in zip(samples, groups)
        ]
        metrics["all_fail_fraction"] = sum(not any(row) for row in success) / len(success)
        metrics["rollout_success_rate"] = sum(map(sum, success)) / sum(map(len, success))
    if paradigm.needs_label:
        metrics.update(_mean_of([g.label_components for g in groups], "label"))
    metrics["update_tokens"] = tokens
    metrics["update_prompt_tokens"] = float(prompt_tokens)  # prompt tokens the update ran (once per prompt if shared)
    metrics["update_tokens_per_s"] = tokens / max(times["time/update"], 1e-9)
    metrics["step_time"] = sum(times.values())
    return metrics
