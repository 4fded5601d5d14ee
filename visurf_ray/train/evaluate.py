"""Periodic evaluation: greedy answers on held-out and retained sets, scored with the paper's metrics per item and
per slice (`visurf_ray.rewards.metrics`).

Each rank decodes its shard of every set; item rows are gathered so that every rank returns the same evaluation.
Never imports Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from visurf_ray.data.frames import in_image_frame
from visurf_ray.data.sample import Sample
from visurf_ray.models.generation import generate
from visurf_ray.models.inputs import completion_logprobs, encode_prompts, encode_sequences
from visurf_ray.models.policy import Policy
from visurf_ray.rewards import get_task
from visurf_ray.rewards.metrics import item_values, solution_slice, summarise
from visurf_ray.validation import require

EVAL_BATCH = 64  # prompts per generate call (measured on the tiny model: 64 decodes 192 items 17% faster than 32)
ANSWER_OPEN = "<answer>"


@dataclass(frozen=True)
class Evaluation:
    """metrics: `eval/<set>/<metric>` for every set and reported metric (NaN ones left out), `eval/<set>/score` (the
    task's headline) and `eval/mean_score` (mean of the sets' scores; the sweep's default objective).
    items: one row per eval item: eval_set, item_id, content (`Sample.content_key`: repeated items share it), task,
    slice and its values (`rewards.metrics.item_values`; items of tasks with an ABSTAIN_ANSWER, e.g. grounding, also
    "logp_empty")."""

    metrics: dict[str, float]
    items: list[dict]


def sample_slice(sample: Sample) -> str:
    """The item's evaluation slice: `meta["slice"]` (the offline benchmark sets it), else from its solution
    (`rewards.metrics.solution_slice`: grounding no_object / object, anomaly clean / defect, else all)."""
    return sample.meta.get("slice") or solution_slice(sample.task, sample.solution)


@torch.no_grad()
def greedy_answers(policy: Policy, samples: list[Sample], max_new_tokens: int) -> list[str]:
    """Greedy completions (text) of `samples`, in order; max_new_tokens in tokens."""
    texts: list[str] = []
    for first in range(0, len(samples), EVAL_BATCH):
        batch = samples[first : first + EVAL_BATCH]
        prompts = encode_prompts(policy, [s.image for s in batch], [s.problem for s in batch])
        texts += generate(policy, prompts, num_return_sequences=1, max_new_tokens=max_new_tokens, do_sample=False).texts
    return texts


@torch.no_grad()
def abstain_answer_logprobs(policy: Policy, samples: list[Sample], answers: list[str], abstain: str) -> list[float]:
    """log π(`abstain` | image, prompt, the model's own answer up to its first `<answer>`) in nats, per sample: how
    close the policy is to answering "nothing matches" (e.g. grounding's `[]`) after its own reasoning. NaN where the
    answer has no `<answer>` tag or the tokenizer merges `abstain` into the tag (the prefix's tokens are then not a
    prefix of the whole)."""
    tokenizer = policy.tokenizer
    rows, completions = [], []
    for index, answer in enumerate(answers):
        cut = answer.find(ANSWER_OPEN)
        if cut < 0:
            continue
        prefix = answer[: cut + len(ANSWER_OPEN)]
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(prefix + abstain, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prefix_ids)] == prefix_ids and len(full_ids) > len(prefix_ids):
            rows.append((index, len(prefix_ids)))
            completions.append(full_ids)
    values = [math.nan] * len(samples)
    for first in range(0, len(rows), EVAL_BATCH):
        batch = rows[first : first + EVAL_BATCH]
        chosen = [samples[index] for index, _ in batch]
        prompts = encode_prompts(policy, [s.image for s in chosen], [s.problem for s in chosen])
        sequences = encode_sequences(policy, prompts, completions[first : first + len(batch)], list(range(len(batch))))
        logp, _ = completion_logprobs(policy.model, sequences.to(policy.device))
        for row, (index, start) in enumerate(batch):
            values[index] = float(logp[row, start : len(completions[first + row])].sum())
    return values


def _set_rows(policy: Policy, label: str, samples: list[Sample], max_new_tokens: int) -> list[dict]:
    """Item rows of this rank's `samples` of eval set `label` (all of one task), each answer scored in its image's own
    frame (`data.frames.in_image_frame`: mapped back from the model's when the image was resized)."""
    if not samples:
        return []
    answers = greedy_answers(policy, samples, max_new_tokens)
    task = samples[0].task
    scored, solutions, sizes = zip(*(in_image_frame(s, answer) for s, answer in zip(samples, answers)))
    values = item_values(task, list(scored), list(solutions), list(sizes))
    abstain = get_task(task).ABSTAIN_ANSWER
    if abstain is not None:
        for row, logp in zip(values, abstain_answer_logprobs(policy, samples, answers, abstain)):
            row["logp_empty"] = logp
    return [
        {"eval_set": label, "item_id": s.id, "content": s.content_key(), "task": task, "slice": sample_slice(s), **row}
        for s, row in zip(samples, values)
    ]


def evaluate(
    policy: Policy, eval_sets: dict[str, list[Sample]], max_new_tokens: int, *, rank: int = 0, world_size: int = 1
) -> Evaluation:
    """Evaluate every set (all of one task; a set named "eval/<x>" reports as `eval/<x>/...`, others by their name,
    e.g. `eval/retained/count/...`); see `Evaluation`."""
    was_training = policy.model.training
    policy.model.eval()
    metrics: dict[str, float] = {}
    items: list[dict] = []
    for name, samples in eval_sets.items():
        tasks = {s.task for s in samples}
        require(len(tasks) == 1, f"eval set {name!r}", f"mixes tasks {sorted(tasks)}; an eval set holds one task")
        label = name.removeprefix("eval/")
        rows = _set_rows(policy, label, samples[rank::world_size], max_new_tokens)
        if world_size > 1:
            gathered: list = [None] * world_size
            dist.all_gather_object(gathered, rows)
            order = {s.id: position for position, s in enumerate(samples)}
            rows = sorted((row for part in gathered for row in part), key=lambda row: order[row["item_id"]])
        summary = summarise(tasks.pop(), rows, [row["slice"] for row in rows])
        metrics.update({f"eval/{label}/{k}": v for k, v in summary.items() if not math.isnan(v)})
        items += rows
    policy.model.train(was_training)
    scores = [v for k, v in metrics.items() if k.endswith("/score")]
    metrics["eval/mean_score"] = sum(scores) / len(scores)
    return Evaluation(metrics, items)
