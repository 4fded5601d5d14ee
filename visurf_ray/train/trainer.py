"""The trainer: policy, engine, rollout backend and paradigm, built once, and one optimizer step of any paradigm.

A step is `collect` (rollouts → rewards → reward controls → advantages → old log-probs, gathered into a `Batch`, as
TRL's `_generate_and_score_completions` returns one) then `update` (the paradigm's loss over prompt-aligned
micro-batches, one optimizer step). Members of a prompt are ordered as the objectives expect: its rollouts (G, or
G − 1 where the label takes a slot of the group: `Paradigm.rollouts_per_prompt`), then its label (where the paradigm
uses one). The policy's module is the engine's (checked when the trainer is built); nothing reassigns it. Used by
the training loop (`train.loop.run_training`), the benchmarks and the tests. Never imports Ray: the loop that calls
it runs in-process or under Ray Train.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from visurf_ray import rewards
from visurf_ray.config import ExperimentConfig
from visurf_ray.data.sample import Sample
from visurf_ray.models.generation import Rollouts
from visurf_ray.models.inputs import (
    PromptBatch,
    VisionLanguageModel,
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
from visurf_ray.objectives.paradigms import GroupAdvantages, ObjectiveConfig, Paradigm, get_paradigm, stack_members
from visurf_ray.rollout.base import RolloutBackend, SamplingConfig
from visurf_ray.train.engine import Engine, build_engine
from visurf_ray.train.models import load_reference, resolve_policy
from visurf_ray.train.rollout import make_backend
from visurf_ray.train.step import (
    ScoredGroup,
    label_token_ids,
    length_groups,
    loss_weights,
    mean_of,
    pad_columns,
    score_groups,
    scored_labels,
    smoothing_reference,
)
from visurf_ray.validation import check_int, require


@dataclass
class Batch:
    """One step's collected members, prompt-major (see the module docstring), and what the update needs of them.

    prompts: the B encoded prompts. completion_ids / prompt_index: each member's completion tokens and prompt.
    old_logp: per member, π_old of the sampled tokens from the sampling engine, or None (the trainer's own log-probs
    at the update, detached: ratio exactly 1 at the one update per batch). engine_logp: per member, a separate
    sampling engine's log-probs (vLLM), compared with the trainer's, or None. advantages: [members] float32; is_label:
    [members] bool. metrics: what collecting measured (times, rewards, advantages, rollouts).
    """

    samples: list[Sample]
    prompts: PromptBatch
    completion_ids: list[list[int]]
    prompt_index: list[int]
    old_logp: list[torch.Tensor | None]
    engine_logp: list[torch.Tensor | None]
    advantages: torch.Tensor
    is_label: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.completion_ids]


@dataclass
class Trainer:
    """The parts of one worker's training (`from_config` builds them as the training loop does).

    paradigm: the configured paradigm (a schedule of stages, e.g. SFT→RLVR); `step(index, ...)` resolves the stage of
    step `index` of `total_steps` and gives each later stage a fresh optimizer state. micro_batches: prompt-aligned
    chunks per update, each weighted so that the gradient equals the whole batch's. length_groups_per_chunk: forward
    passes per chunk, grouped by completion length (`step.length_groups`), so that short members (e.g. labels
    shorter than the rollouts) are not padded to the longest; the loss and gradient are those of one padded pass.
    reference: the frozen reference policy of a KL penalty, or None.
    """

    policy: Policy
    engine: Engine
    backend: RolloutBackend
    paradigm: Paradigm
    objective: ObjectiveConfig
    sampling: SamplingConfig
    total_steps: int
    micro_batches: int = 1
    reference: VisionLanguageModel | None = None
    length_groups_per_chunk: int = 2

    def __post_init__(self) -> None:
        check_int("length_groups_per_chunk", self.length_groups_per_chunk, low=1, note="(1: one pass)")
        require(
            self.engine.module is self.policy.model,
            "engine",
            "must train the policy's own module (build_engine(policy.model, ...))",
        )
        self.stage_starts = self.paradigm.stage_starts(self.total_steps, self.objective)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, *, world_size: int = 1) -> Trainer:
        """The trainer of `cfg` on one of `world_size` workers: the policy of `cfg.model`, its engine (micro-batch
        sized for this worker's share of the prompts), the rollout backend, and the reference when KL is on."""
        policy = resolve_policy(cfg.model)
        paradigm = get_paradigm(cfg.objective.paradigm)
        local_members = cfg.data.prompts_per_step // world_size * (cfg.objective.num_rollouts + 1)
        engine = build_engine(
            policy.model,
            cfg.optim,
            cfg.deepspeed,
            total_steps=cfg.steps,
            micro_batch=max(1, local_members // cfg.optim.micro_batches),
            stage_starts=paradigm.stage_starts(cfg.steps, cfg.objective),
        )
        return cls(
            policy=policy,
            engine=engine,
            backend=make_backend(cfg.rollout, policy),
            paradigm=paradigm,
            objective=cfg.objective,
            sampling=SamplingConfig(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p),
            total_steps=cfg.steps,
            micro_batches=cfg.optim.micro_batches,
            reference=load_reference(cfg) if cfg.objective.kl_coef > 0 else None,
        )

    @property
    def module(self) -> torch.nn.Module:
        """The trained module (the engine's)."""
        return self.engine.module

    def step(self, index: int, samples: list[Sample], seed: int) -> dict[str, float]:
        """Optimizer step `index` (0-based) on `samples`, rollouts sampled with `seed`; returns its metrics."""
        if index in self.stage_starts[1:]:
            self.engine.reset_optimizer_state()
        stage = self.paradigm.for_step(index, self.total_steps, self.objective)
        cpu_started = time.process_time()
        batch = self.collect(samples, stage, seed)
        metrics = {**self.update(batch, stage), **batch.metrics}
        metrics["step_time"] = metrics["time/rollout"] + metrics["time/reward"] + metrics["time/update"]
        # this process's CPU seconds (all its threads) in the step: below step_time × threads when others share the
        # cores, so a report can tell a contended trial's wall times apart
        metrics["step_cpu_time"] = time.process_time() - cpu_started
        self.backend.sync_weights(self.engine.module)
        return metrics

    def collect(self, samples: list[Sample], paradigm: Paradigm, seed: int) -> Batch:
        """Rollouts, rewards, the label, advantages and old log-probs of `samples` for `paradigm` (a resolved
        stage): the step's `Batch`."""
        objective = self.objective
        started = time.perf_counter()
        prompts = encode_prompts(self.policy, [s.image for s in samples], [s.problem for s in samples])
        rollouts = None
        if paradigm.needs_rollouts:
            self.engine.module.eval()
            rollouts = self.backend.generate(
                prompts,
                paradigm.rollouts_per_prompt(objective),
                self.sampling,
                seed,
                images=[s.image for s in samples],
                questions=[s.problem for s in samples],
            )
            self.engine.module.train()
        rollout_time = time.perf_counter() - started

        started = time.perf_counter()
        groups = score_groups(samples, rollouts, objective, paradigm)
        rollout_rewards = label_rewards = None
        if paradigm.needs_rollouts:
            rollout_rewards = torch.tensor(
                [[c["overall"] for c in g.rollout_components] for g in groups], dtype=torch.float64
            )
        label_texts, label_components = scored_labels(groups) if paradigm.needs_label else ([], [])
        if paradigm.needs_label:
            label_rewards = torch.tensor([c["overall"] for c in label_components], dtype=torch.float64)
        compared = (
            smoothing_reference(groups, objective.smoothing_rule)
            if paradigm.needs_rollouts and paradigm.needs_label
            else None
        )
        advantages = paradigm.advantages(rollout_rewards, label_rewards, objective, smoothing_reference=compared)

        completion_ids: list[list[int]] = []
        prompt_index: list[int] = []
        old_logp: list[torch.Tensor | None] = []
        engine_logp: list[torch.Tensor | None] = []
        labels = label_token_ids(self.policy, label_texts)
        for index in range(len(samples)):
            if rollouts is not None:
                for j, owner in enumerate(rollouts.prompt_index):
                    if owner == index:
                        completion_ids.append(rollouts.completion_ids[j])
                        prompt_index.append(index)
                        old_logp.append(None if rollouts.old_logp is None else rollouts.old_logp[j])
                        engine_logp.append(None if rollouts.engine_logp is None else rollouts.engine_logp[j])
            if paradigm.needs_label:
                completion_ids.append(labels[index])
                prompt_index.append(index)
                old_logp.append(None)
                engine_logp.append(None)
        reward_time = time.perf_counter() - started
        return Batch(
            samples=samples,
            prompts=prompts,
            completion_ids=completion_ids,
            prompt_index=prompt_index,
            old_logp=old_logp,
            engine_logp=engine_logp,
            advantages=stack_members(advantages.rollout, advantages.label).float(),
            is_label=paradigm.member_is_label(len(samples), objective),
            metrics=_collect_metrics(samples, rollouts, groups, advantages, paradigm, rollout_time, reward_time),
        )

    def update(self, batch: Batch, paradigm: Paradigm) -> dict[str, float]:
        """The paradigm's loss over `batch` in `micro_batches` prompt-aligned chunks, backward, one optimizer step;
        returns the update's metrics (loss terms weighted over chunks, grad_norm, this step's lr, entropy, tokens)."""
        started = time.perf_counter()
        samples, module, device = batch.samples, self.policy.model, self.policy.device
        check_int("micro_batches", self.micro_batches, low=1, high=len(samples), note="(this step's prompts)")
        lengths = batch.lengths
        per_prompt = len(lengths) // len(samples)
        chunks = [
            slice(int(c[0]) * per_prompt, (int(c[-1]) + 1) * per_prompt)
            for c in torch.arange(len(samples)).tensor_split(self.micro_batches)
        ]
        weights = loss_weights(lengths, chunks, self.objective.agg)
        loss_metrics: dict[str, float] = {}
        entropy_sum = tokens = prompt_tokens = 0.0
        engine_gap_sum = engine_gap_max = engine_tokens = 0.0
        for chunk, weight in zip(chunks, weights):
            # One forward per length group (rows are independent, so the chunk's logp equals one padded forward's),
            # then the chunk's members back in member order for the paradigm's loss.
            width = max(lengths[chunk])
            passes = [
                [chunk.start + i for i in group]
                for group in length_groups(lengths[chunk], max_groups=self.length_groups_per_chunk)
            ]
            # Each prompt (image and tokens) runs once for all its members and passes; autograd sums their gradients
            # into it. Gradient checkpointing drops the key/value cache, so under it every member runs with its prompt.
            owners = sorted(set(batch.prompt_index[chunk]))
            row_of = {owner: row for row, owner in enumerate(owners)}
            chunk_prompts = batch.prompts.select(owners)
            features = image_features(module, chunk_prompts)
            share_prompts = not module.is_gradient_checkpointing
            prompt_lengths = chunk_prompts.attention_mask.sum(dim=1).tolist()
            prompt_tokens += (
                sum(prompt_lengths)
                if share_prompts
                else sum(prompt_lengths[row_of[p]] for p in batch.prompt_index[chunk])
            )
            if share_prompts:
                states = prompt_states(module, chunk_prompts, features)
                if self.reference is not None:
                    with torch.no_grad():
                        reference_states = prompt_states(self.reference, chunk_prompts)
            parts, reference_parts = [], []
            for group in passes:
                completions = [batch.completion_ids[m] for m in group]
                prompt_rows = [row_of[batch.prompt_index[m]] for m in group]
                if share_prompts:
                    completion_part = encode_completions(self.policy, completions, prompt_rows)
                    parts.append(shared_prompt_logprobs_and_entropy(module, states, completion_part))
                    if self.reference is not None:
                        with torch.no_grad():
                            reference_parts.append(
                                shared_prompt_logprobs_and_entropy(self.reference, reference_states, completion_part)[0]
                            )
                else:
                    sequence_part = encode_sequences(self.policy, chunk_prompts, completions, prompt_rows).to(device)
                    parts.append(completion_logprobs_and_entropy(module, sequence_part, dict(enumerate(features))))
                    if self.reference is not None:
                        with torch.no_grad():
                            reference_parts.append(completion_logprobs(self.reference, sequence_part)[0])
            rows = torch.tensor([m - chunk.start for group in passes for m in group], device=device).argsort()
            logp, entropy, mask = (torch.cat([pad_columns(p[i], width) for p in parts])[rows] for i in range(3))
            ref_logp = torch.cat([pad_columns(r, width) for r in reference_parts])[rows] if reference_parts else None
            mask = mask.bool()
            old = logp.detach().clone()
            for row, member in enumerate(range(chunk.start, chunk.stop)):
                engine_logp, old_logp = batch.engine_logp[member], batch.old_logp[member]
                if engine_logp is not None:
                    gap = (engine_logp.to(old) - old[row, : lengths[member]]).abs()
                    engine_gap_sum += float(gap.sum())
                    engine_gap_max = max(engine_gap_max, float(gap.max()))
                    engine_tokens += lengths[member]
                if old_logp is not None:
                    old[row, : lengths[member]] = old_logp.to(old)
            loss, loss_terms = paradigm.loss(
                logp,
                old,
                mask,
                batch.advantages[chunk].to(device),
                batch.is_label[chunk],  # on the CPU: the loss checks its layout there, without a device sync
                self.objective,
                ref_logp=ref_logp,
            )
            self.engine.backward(loss * weight)
            for key, value in loss_terms.items():
                loss_metrics[key] = loss_metrics.get(key, 0.0) + weight * value
            entropy_sum += float(entropy.detach().sum())
            tokens += float(mask.sum())
        lr = self.engine.lr  # this step's learning rate (the schedule advances in engine.step)
        grad_norm = self.engine.step()
        update_time = time.perf_counter() - started

        metrics: dict[str, float] = {"time/update": update_time, **loss_metrics}
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = lr
        metrics["entropy"] = entropy_sum / max(tokens, 1.0)
        metrics["paradigm_stage"] = float(paradigm.paradigm_id)  # the stage a schedule ran (sft_rlvr: sft, then rlvr)
        if engine_tokens:  # |log π_engine − log π_trainer| per rollout token, nats (the ratio's departure from 1)
            metrics["engine_logp_diff_mean"] = engine_gap_sum / engine_tokens
            metrics["engine_logp_diff_max"] = engine_gap_max
        metrics["update_tokens"] = tokens
        metrics["update_prompt_tokens"] = float(
            prompt_tokens
        )  # prompt tokens the update ran (once per prompt if shared)
        metrics["update_tokens_per_s"] = tokens / max(update_time, 1e-9)
        return metrics


def _collect_metrics(
    samples: list[Sample],
    rollouts: Rollouts | None,
    groups: list[ScoredGroup],
    advantages: GroupAdvantages,
    paradigm: Paradigm,
    rollout_time: float,
    reward_time: float,
) -> dict[str, float]:
    """What collecting a batch measured: times, the advantages' metrics, rollout rewards and lengths, all-fail and
    success rates, label rewards."""
    metrics = {"time/rollout": rollout_time, "time/reward": reward_time, **advantages.metrics}
    if rollouts is not None:
        every = [c for g in groups for c in g.rollout_components]
        metrics.update(mean_of(every, "rollout"))
        lengths = [len(ids) for ids in rollouts.completion_ids]
        metrics["response_length"] = sum(lengths) / len(lengths)
        metrics["generated_tokens"] = float(rollouts.num_tokens())
        metrics["rollout_tokens_per_s"] = rollouts.num_tokens() / max(rollout_time, 1e-9)
        success = [
            [rewards.get_task(s.task).is_success(c) for c in g.rollout_components] for s, g in zip(samples, groups)
        ]
        metrics["all_fail_fraction"] = sum(not any(row) for row in success) / len(success)
        metrics["rollout_success_rate"] = sum(map(sum, success)) / sum(map(len, success))
    if paradigm.needs_label:
        metrics.update(mean_of(scored_labels(groups)[1], "label"))
    return metrics
