"""What a policy writes before its grounding answers: each greedy completion's think — none, empty (`<think></think>`,
the paper's reasoning-free label), one that states a position (the tiny benchmark's template, "The red circle is at
column 6, row 1.", from which its boxes are copied) or another — beside the item's IoU and whether it answered `[]`.
The check behind the README's "why localisation goes"; run it on a sweep's trial checkpoints:

    python -m analysis.answers tiny-base runs/sweeps/tiny-visurf-paper/ViSurf_seed0_*/checkpoint_000004

Imports torch and the suite's model, data and reward code; never Ray.
"""

from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd

from visurf_ray.config import TINY_BASE_MODEL, ModelConfig
from visurf_ray.data.benchmark import iter_split
from visurf_ray.data.frames import in_image_frame
from visurf_ray.data.sample import Sample
from visurf_ray.models.policy import Policy
from visurf_ray.rewards.grounding import OBJECT_SLICES
from visurf_ray.rewards.metrics import item_values
from visurf_ray.train.engine import load_saved_weights
from visurf_ray.train.evaluate import greedy_answers
from visurf_ray.train.loop import TRAINER_STATE, read_trainer_state
from visurf_ray.train.models import resolve_policy
from visurf_ray.validation import ValidationError

THINK = re.compile(r"<think>(.*?)</think>", re.S)
POSITION = re.compile(r"\b(column|row)\b")
THINK_KINDS = ("no think", "empty think", "position think", "other think")


def think_kind(completion: str) -> str:
    """The completion's first think block: "no think", "empty think" (only whitespace), "position think" (it names a
    column or row) or "other think"."""
    match = THINK.search(completion)
    if match is None:
        return "no think"
    think = match.group(1).strip()
    if not think:
        return "empty think"
    return "position think" if POSITION.search(think) else "other think"


def load_checkpoint_policy(checkpoint: str | Path) -> tuple[int, Policy]:
    """(step, policy in eval mode): a policy folder or "tiny-base" as step 0, or a trainer checkpoint folder (a Tune
    trial's `checkpoint_*`, a run's `checkpoints/step_*`) — its starting model (trainer_state.json's config
    model.path) with the checkpoint's saved weights."""
    path = Path(checkpoint)
    if (path / TRAINER_STATE).is_file():
        state = read_trainer_state(path)
        policy = resolve_policy(ModelConfig(path=state["config"]["model"]["path"]))
        load_saved_weights(policy.model, path)
        step = int(state["step"])
    elif str(checkpoint) == TINY_BASE_MODEL or (path / "config.json").is_file():
        policy, step = resolve_policy(ModelConfig(path=str(checkpoint))), 0
    else:
        raise ValidationError(
            f"checkpoint {str(checkpoint)!r} is neither a policy folder (config.json), 'tiny-base' nor a trainer "
            f"checkpoint folder ({TRAINER_STATE})"
        )
    policy.model.eval()
    return step, policy


def object_items(count: int, seed: int = 0) -> list[Sample]:
    """The first `count` held-out grounding items with an object ("eval/grounding", `seed`)."""
    stream = iter_split("eval/grounding", seed, where=lambda meta: meta["slice"] in OBJECT_SLICES)
    return list(itertools.islice(stream, count))


def answer_table(policy: Policy, samples: list[Sample], max_new_tokens: int = 128) -> pd.DataFrame:
    """One row per grounding item: its id and slice, the greedy completion's think kind, its IoU and whether it is
    a valid `[]` (the suite's per-item grounding values, in the image's frame as the evaluation scores them)."""
    answers = greedy_answers(policy, samples, max_new_tokens)
    scored, solutions, sizes = zip(*(in_image_frame(s, answer) for s, answer in zip(samples, answers)))
    values = item_values("grounding", list(scored), list(solutions), list(sizes))
    return pd.DataFrame(
        {
            "item_id": [s.id for s in samples],
            "slice": [s.meta.get("slice") for s in samples],
            "think": [think_kind(answer) for answer in answers],
            "iou": [row["iou"] for row in values],
            "empty": [row["empty"] for row in values],
        }
    )


def think_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per think kind present: items, share answering `[]`, and mean IoU of the answers that are not `[]` (NaN when
    all are)."""
    rows = {}
    for kind in THINK_KINDS:
        chosen = table[table["think"] == kind]
        if len(chosen):
            boxed = chosen.loc[chosen["empty"] == 0, "iou"]
            rows[kind] = {
                "items": len(chosen),
                "[] share": chosen["empty"].mean(),
                "IoU of boxed answers": boxed.mean() if len(boxed) else np.nan,
            }
    return pd.DataFrame.from_dict(rows, orient="index")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Think kinds of policies' greedy grounding answers, with their IoU.")
    parser.add_argument("checkpoints", nargs="+", help="policy folders, 'tiny-base' or trainer checkpoint folders")
    parser.add_argument("--items", type=int, default=120, help="held-out grounding items with an object")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out item stream")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    samples = object_items(args.items, args.seed)
    for checkpoint in args.checkpoints:
        step, policy = load_checkpoint_policy(checkpoint)
        summary = think_summary(answer_table(policy, samples, args.max_new_tokens))
        print(f"{checkpoint} (step {step}, {len(samples)} items with an object)\n{summary.round(3).to_string()}\n")


if __name__ == "__main__":
    main()
