"""Periodic evaluation: greedy answers on held-out and retained sets, scored with the paper's metrics.

Each rank decodes its shard of every set; answers are gathered so that every rank returns the same metrics.
Never imports Ray.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from visurf_ray.data.sample import Sample
from visurf_ray.models.generation import generate
from visurf_ray.models.inputs import encode_prompts
from visurf_ray.models.policy import Policy
from visurf_ray.rewards.metrics import evaluate as task_metrics

HEADLINE_METRIC = {"grounding": "giou", "gui_point": "point_accuracy", "anomaly": "accuracy", "count": "accuracy"}
"""The metric reported as `eval/<set>/score` (the paper's main number for each task)."""

EVAL_BATCH = 32  # prompts per generate call


@torch.no_grad()
def greedy_answers(policy: Policy, samples: list[Sample], max_new_tokens: int) -> list[str]:
    """Greedy completions (text) of `samples`, in order; max_new_tokens in tokens."""
    texts: list[str] = []
    for first in range(0, len(samples), EVAL_BATCH):
        batch = samples[first : first + EVAL_BATCH]
        prompts = encode_prompts(policy, [s.image for s in batch], [s.problem for s in batch])
        texts += generate(policy, prompts, num_return_sequences=1, max_new_tokens=max_new_tokens, do_sample=False).texts
    return texts


def evaluate(
    policy: Policy, eval_sets: dict[str, list[Sample]], max_new_tokens: int, *, rank: int = 0, world_size: int = 1
) -> dict[str, float]:
    """Metrics `eval/<set>/<metric>` for every set (all of one task; <set> is its name without a leading "eval/", so
    split "eval/grounding" reports as `eval/grounding/...`), `eval/<set>/score` (HEADLINE_METRIC) and
    `eval/mean_score` (mean over sets; the sweep's default objective).

    NaN metrics (e.g. N-Acc of a set without empty ground truths) are left out.
    """
    was_training = policy.model.training
    policy.model.eval()
    results: dict[str, float] = {}
    for name, samples in eval_sets.items():
        tasks = {s.task for s in samples}
        if len(tasks) != 1:
            raise ValueError(f"eval set {name!r} mixes tasks {sorted(tasks)}; an eval set holds one task")
        shard = samples[rank::world_size]
        answers = list(zip(greedy_answers(policy, shard, max_new_tokens) if shard else [], shard))
        if world_size > 1:
            gathered: list = [None] * world_size
            dist.all_gather_object(gathered, [(text, s.solution, (s.img_width, s.img_height)) for text, s in answers])
            rows = [row for part in gathered for row in part]
        else:
            rows = [(text, s.solution, (s.img_width, s.img_height)) for text, s in answers]
        task = tasks.pop()
        metrics = task_metrics(task, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
        metrics["score"] = metrics[HEADLINE_METRIC[task]]
        label = name.removeprefix("eval/")
        results.update({f"eval/{label}/{k}": v for k, v in metrics.items() if not math.isnan(v)})
    policy.model.train(was_training)
    scores = [v for k, v in results.items() if k.endswith("/score")]
    results["eval/mean_score"] = sum(scores) / len(scores)
    return results
