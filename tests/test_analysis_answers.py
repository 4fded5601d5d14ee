"""analysis.answers: think kinds of completions, their summary on a hand-made table, and the checkpoint loader and
command on a short run of the small policy."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from analysis.answers import (
    THINK_KINDS,
    answer_table,
    load_checkpoint_policy,
    main,
    object_items,
    think_kind,
    think_summary,
)
from visurf_ray.validation import ValidationError


@pytest.mark.parametrize(
    ("completion", "kind"),
    [
        ('<answer>[{"bbox_2d": [1, 2, 3, 4]}]</answer>', "no think"),
        ("<think></think><answer>[]</answer>", "empty think"),
        ("<think> \n</think><answer>[]</answer>", "empty think"),
        ("<think>The red circle is at column 6, row 1.</think><answer>[]</answer>", "position think"),
        ("<think>I see a red circle.</think><answer>[]</answer>", "other think"),
        ("<think>The columns of text.</think><answer>[]</answer>", "other think"),  # a word, not "column"
        ("<think></think><answer>…</think><think>at row 2</think>", "empty think"),  # the first block counts
    ],
)
def test_think_kind(completion, kind):
    assert think_kind(completion) == kind


def test_think_summary_counts_kinds_and_averages_boxed_answers_only():
    table = pd.DataFrame(
        {
            "think": ["empty think", "empty think", "empty think", "position think", "no think"],
            "iou": [0.0, 0.2, 0.4, 0.9, 0.0],
            "empty": [1.0, 0.0, 0.0, 0.0, 1.0],
        }
    )
    summary = think_summary(table)
    assert list(summary.index) == ["no think", "empty think", "position think"]  # THINK_KINDS order, present only
    assert summary.loc["empty think"].tolist() == pytest.approx([3, 1 / 3, 0.3])
    assert summary.loc["position think"].tolist() == pytest.approx([1, 0.0, 0.9])
    assert summary.loc["no think", "items"] == 1 and math.isnan(summary.loc["no think", "IoU of boxed answers"])


def test_checkpoint_policy_answer_table_and_command(small_run, small_policy_dir, capsys):
    run = small_run()
    step_dir = sorted((run / "checkpoints").glob("step_*"))[-1]
    step, trained = load_checkpoint_policy(step_dir)
    start_step, start = load_checkpoint_policy(small_policy_dir)
    assert (step, start_step) == (2, 0) and not trained.model.training
    changed = [
        name
        for (name, after), before in zip(trained.model.named_parameters(), start.model.parameters())
        if not torch.equal(after, before)
    ]
    assert changed  # the checkpoint's weights, not the starting model's

    samples = object_items(3)
    assert all(s.meta["slice"] in ("seen", "unseen_attribute") for s in samples)
    table = answer_table(trained, samples, max_new_tokens=8)
    assert list(table.columns) == ["item_id", "slice", "think", "iou", "empty"]
    assert list(table["item_id"]) == [s.id for s in samples] and set(table["think"]) <= set(THINK_KINDS)
    assert table["iou"].between(0, 1).all() and table["empty"].isin([0.0, 1.0]).all()

    main([str(small_policy_dir), str(step_dir), "--items", "2", "--max-new-tokens", "8"])
    printed = capsys.readouterr().out
    assert f"{small_policy_dir} (step 0, 2 items with an object)" in printed
    assert f"{step_dir} (step 2, 2 items with an object)" in printed and "IoU of boxed answers" in printed
    with pytest.raises(ValidationError, match="neither a policy folder"):
        load_checkpoint_policy(run)
