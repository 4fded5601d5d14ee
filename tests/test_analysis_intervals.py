"""analysis.intervals: point estimates equal the suite's metrics on hand-made items, zero-width intervals for constant
columns, paired differences, stratification by slice, determinism, coverage on Bernoulli items, tables, estimates by
eval step and errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.intervals import (
    _metric_draws,
    bootstrap,
    default_columns,
    difference,
    estimates_by_step,
    half_width,
    interval_table,
    paired_table,
    percentile_interval,
    slice_sizes,
)
from visurf_ray.rewards.metrics import reported_metrics, summarise

GROUNDING_SLICES = ["seen"] * 3 + ["unseen_attribute"] * 3 + ["no_object"] * 4
ANOMALY_SLICES = ["clean"] * 4 + ["defect"] * 6


def set_rows(eval_set: str, task: str, slices: list[str], values: dict[str, list[float]]) -> list[dict]:
    """Rows of one eval set at one step: item i has slices[i] and values[name][i]."""
    return [
        {"eval_set": eval_set, "task": task, "item_id": f"{eval_set}-{i}", "slice": s}
        | {name: float(column[i]) for name, column in values.items()}
        for i, s in enumerate(slices)
    ]


def trial_rows(variant: str, paradigm: str, seed: int, steps: dict[int, list[dict]]) -> list[dict]:
    """One trial's rows: steps maps step → its set rows."""
    trial = {"trial_id": f"{variant}-{seed}", "variant": variant, "paradigm": paradigm, "seed": seed}
    return [trial | {"step": step} | row for step, rows in steps.items() for row in rows]


def grounding(iou: list[float], empty: list[float]) -> list[dict]:
    return set_rows("grounding", "grounding", GROUNDING_SLICES, {"iou": iou, "empty": empty})


def anomaly(correct: list[float]) -> list[dict]:
    return set_rows("anomaly", "anomaly", ANOMALY_SLICES, {"correct": correct})


def count(correct: list[float], eval_set: str = "retained/count") -> list[dict]:
    return set_rows(eval_set, "count", ["all"] * len(correct), {"correct": correct})


IOU = [0.9, 0.5, 0.1, 0.8, 0.6, 0.0, 1, 1, 1, 0]
EMPTY = [0, 0, 1, 0, 0, 0, 1, 1, 1, 0]  # N-Acc 3/4, empty rate on items with an object 1/6
ANOMALY = [1, 0, 0, 0, 1, 1, 1, 1, 1, 0]  # clean 1/4, defect 5/6
COUNT_START, COUNT_FINAL = [1] * 8, [1, 1, 0, 1, 0, 1, 1, 1]


def hand_items() -> pd.DataFrame:
    """Two variants × two seeds, steps 0 and 10: ViSurf as above at step 10; SFT the same except one count item."""
    start = grounding([0.3] * 10, [0] * 10) + anomaly([0] * 4 + [1] * 6) + count(COUNT_START)
    rows = []
    for seed in (0, 1):
        final = grounding(IOU, EMPTY) + anomaly(ANOMALY) + count(COUNT_FINAL)
        rows += trial_rows("ViSurf", "visurf", seed, {0: start, 10: final})
        sft_final = grounding(IOU, EMPTY) + anomaly(ANOMALY) + count([0, *COUNT_FINAL[1:]])
        rows += trial_rows("SFT", "sft", seed, {0: start, 10: sft_final})
    return pd.DataFrame(rows)


def test_point_estimates_equal_the_suites_metrics():
    boot = bootstrap(
        hand_items(),
        [
            "grounding/n_acc",
            "grounding/empty_rate_object",
            "grounding/score",
            "grounding/n_acc_change",
            "anomaly/balanced_accuracy",
            "anomaly/score",
            "retained/count/score_change",
            "mean/score",
        ],
        n_boot=50,
    )
    estimate = dict(zip(boot.columns, (boot.cell("ViSurf", c)[0] for c in boot.columns)))
    assert estimate["grounding/n_acc"] == pytest.approx(0.75)
    assert estimate["grounding/empty_rate_object"] == pytest.approx(1 / 6)
    assert estimate["grounding/score"] == pytest.approx(np.mean(IOU))
    assert estimate["grounding/n_acc_change"] == pytest.approx(0.75 - 0.0)
    balanced = (1 / 4 + 5 / 6) / 2
    assert estimate["anomaly/balanced_accuracy"] == estimate["anomaly/score"] == pytest.approx(balanced)
    assert estimate["retained/count/score_change"] == pytest.approx(6 / 8 - 1)
    assert estimate["mean/score"] == pytest.approx((np.mean(IOU) + balanced + 6 / 8) / 3)
    rows = [{"iou": i, "empty": e} for i, e in zip(IOU, EMPTY)]
    assert summarise("grounding", rows, GROUNDING_SLICES)["n_acc"] == pytest.approx(estimate["grounding/n_acc"])


def test_vectorised_draws_equal_item_metric_compute():
    """With every item drawn once (and with some drawn twice) the vectorised metric is ItemMetric.compute."""
    values = np.array([ANOMALY, [1, 1, 0, np.nan, 0, 1, 0, 1, 1, 1]], dtype=np.float64)
    slices = np.array(ANOMALY_SLICES, dtype=object)
    counts = np.array([[1] * 10, [2, 1, 0, 1, 3, 0, 1, 1, 1, 0]])
    for metric in reported_metrics("anomaly").values():
        if metric.value != "correct":
            continue
        draws = _metric_draws(metric, values, slices, counts)
        for s in range(2):
            assert draws[0, s] == pytest.approx(metric.compute(values[s], slices))
            repeated = np.repeat(np.arange(10), counts[1])
            assert draws[1, s] == pytest.approx(metric.compute(values[s][repeated], slices[repeated]))


def test_constant_column_has_a_zero_width_interval():
    boot = bootstrap(hand_items(), ["grounding/n_acc_change"], n_boot=200)  # start 0, final 3/4: varies with items
    assert half_width(boot, "ViSurf", "grounding/n_acc_change") > 0.05
    items = hand_items()
    items.loc[items["eval_set"] == "grounding", "empty"] = 1.0
    constant = bootstrap(items, ["grounding/n_acc", "grounding/empty_rate_object"], n_boot=200)
    for column in constant.columns:
        low, high = percentile_interval(constant.cell("SFT", column)[1])
        assert low == pytest.approx(1.0) and high == pytest.approx(1.0)
        assert half_width(constant, "SFT", column) == pytest.approx(0.0, abs=1e-12)


def test_paired_difference_of_variants_differing_on_one_item():
    """Two variants equal on 40 items but the first (1 → 0 in SFT), at steps 0 and 10: the paired interval contains
    the difference 1/40, never goes below 0, and is far narrower than either variant's own interval."""
    final = [1, 0, 1, 1] * 10
    rows = []
    for seed in (0, 1):
        rows += trial_rows("ViSurf", "visurf", seed, {0: count([1] * 40), 10: count(final)})
        rows += trial_rows("SFT", "sft", seed, {0: count([1] * 40), 10: count([0, *final[1:]])})
    boot = bootstrap(pd.DataFrame(rows), ["retained/count/score", "retained/count/score_change"], n_boot=400)
    for column in boot.columns:
        estimate, draws = difference(boot, "ViSurf", "SFT", column)
        low, high = percentile_interval(draws)
        assert estimate == pytest.approx(1 / 40)
        assert 0.0 <= low <= 1 / 40 <= high
        assert (high - low) / 2 < 0.5 * min(half_width(boot, v, column) for v in ("ViSurf", "SFT"))


def test_stratification_keeps_slice_sizes():
    boot = bootstrap(hand_items(), ["grounding/score", "anomaly/score"], n_boot=300)
    for eval_set, slices in (("grounding", GROUNDING_SLICES), ("anomaly", ANOMALY_SLICES)):
        counts, item_slices = boot.item_counts[eval_set], boot.item_slices[eval_set]
        assert counts.shape == (300, len(slices))
        for name in set(slices):
            assert (counts[:, item_slices == name].sum(axis=1) == slices.count(name)).all()
        assert counts.max() > 1  # items were drawn with replacement


def test_repeated_items_are_resampled_as_one():
    """A no-object slice of 4 distinct items shown 25 times each (one content key per distinct item) gets exactly the
    draws of the 4 items alone; without content keys the 100 rows read as 100 items and the interval is far too
    narrow. Slices without repeats draw as before."""
    answers = [1, 0, 1, 1]

    def items(copies: int, keyed: bool) -> pd.DataFrame:
        slices = ["seen"] * 6 + ["no_object"] * (4 * copies)
        empty = [0] * 6 + answers * copies
        rows = set_rows("grounding", "grounding", slices, {"iou": [0.5] * 6 + [1.0] * (4 * copies), "empty": empty})
        for number, row in enumerate(rows):
            if keyed:
                row["content"] = row["item_id"] if number < 6 else f"query-{(number - 6) % 4}"
        return pd.DataFrame(trial_rows("ViSurf", "visurf", 0, {0: rows}))

    column = ["grounding/n_acc", "grounding/score"]
    alone, repeated, unkeyed = (bootstrap(items(*a), column, n_boot=500) for a in ((1, True), (25, True), (25, False)))
    np.testing.assert_array_equal(alone.cell("ViSurf", column[0])[1], repeated.cell("ViSurf", column[0])[1])
    assert half_width(repeated, "ViSurf", "grounding/n_acc") > 2.5 * half_width(unkeyed, "ViSurf", "grounding/n_acc")
    np.testing.assert_array_equal(
        bootstrap(hand_items(), column, n_boot=100).cell("SFT", "grounding/score")[1],
        bootstrap(hand_items().assign(content=lambda f: f["item_id"]), column, n_boot=100).cell("SFT", column[1])[1],
    )
    sizes = slice_sizes(items(25, True))
    assert sizes.loc[("grounding", "no_object")].tolist() == [100, 4] and sizes.loc[("grounding", "seen")].tolist() == [
        6,
        6,
    ]


def test_determinism_by_seed_and_stable_resamples_across_columns():
    items = hand_items()
    first = bootstrap(items, ["grounding/score", "mean/score"], n_boot=100, seed=3)
    again = bootstrap(items, ["grounding/score", "mean/score"], n_boot=100, seed=3)
    alone = bootstrap(items, ["grounding/score"], n_boot=100, seed=3)
    other = bootstrap(items, ["grounding/score", "mean/score"], n_boot=100, seed=4)
    for key, draws in first.draws.items():
        np.testing.assert_array_equal(draws, again.draws[key])
    np.testing.assert_array_equal(first.cell("SFT", "grounding/score")[1], alone.cell("SFT", "grounding/score")[1])
    assert not np.array_equal(first.cell("SFT", "grounding/score")[1], other.cell("SFT", "grounding/score")[1])


def test_seeds_are_resampled_and_averaged():
    """Two seeds with different values: the estimate is their mean and the draws take both seeds' values."""
    rows = []
    for seed, value in ((0, 0.2), (1, 0.6)):
        rows += trial_rows("RLVR", "rlvr", seed, {5: count([value] * 6, "count")})
    boot = bootstrap(pd.DataFrame(rows), ["count/score"], n_boot=400)
    estimate, draws = boot.cell("RLVR", "count/score")
    assert estimate == pytest.approx(0.4)
    assert set(np.round(draws, 6)) == {0.2, 0.4, 0.6}


def test_bernoulli_half_width_matches_the_normal_approximation():
    rows = trial_rows("RLVR", "rlvr", 0, {3: count([1, 0] * 50, "count")})
    boot = bootstrap(pd.DataFrame(rows), ["count/score"], n_boot=2000, seed=1)
    expected = 1.96 * math.sqrt(0.25 / 100)
    assert half_width(boot, "RLVR", "count/score") == pytest.approx(expected, rel=0.10)


def test_tables_and_default_columns():
    items = hand_items()
    columns = default_columns(items)
    assert columns == [
        "grounding/score",
        "anomaly/score",
        "retained/count/score",
        "grounding/giou_object",
        "grounding/n_acc",
        "grounding/empty_rate_object",
        "anomaly/accuracy_clean",
        "anomaly/accuracy_defect",
        "retained/count/score_change",
        "mean/score",
    ]
    boot = bootstrap(items, columns, n_boot=100)
    table = interval_table(boot)
    assert list(table.index) == ["SFT", "ViSurf"] and list(table.columns) == columns
    assert table.loc["ViSurf", "grounding/n_acc"].startswith("0.750 [")
    paired = paired_table(boot, reference="ViSurf", columns=["retained/count/score"])
    assert list(paired.index) == ["ViSurf − SFT"]
    assert paired.iloc[0, 0].startswith("0.125 [")
    no_retained = default_columns(items[~items["eval_set"].str.startswith("retained/")])
    assert "retained/count/score_change" not in no_retained and no_retained[-1] == "mean/score"
    with_abstain = items.assign(
        abstain_correct=np.where(items["slice"] == "no_object", items["empty"], 1 - items["empty"])
    )
    balanced = "grounding/abstain_balanced_accuracy"
    assert default_columns(with_abstain) == [*columns[:6], balanced, *columns[6:]]  # no empty images: one of the two
    # ViSurf: N-Acc 3/4, one `[]` among 6 object items
    assert bootstrap(with_abstain, [balanced], n_boot=1).estimates[("ViSurf", balanced)] == pytest.approx(
        (0.75 + 5 / 6) / 2
    )


def test_estimates_by_step_are_the_point_estimates_at_each_shared_step():
    items = hand_items()
    columns = ["grounding/n_acc", "retained/count/score_change", "mean/score"]
    table = estimates_by_step(items, columns)
    assert list(table.columns) == ["variant", "step", *columns]
    assert list(zip(table["variant"], table["step"])) == [("SFT", 0), ("SFT", 10), ("ViSurf", 0), ("ViSurf", 10)]
    final = bootstrap(items, columns, n_boot=1)
    for row in table.itertuples(index=False):
        if row.step == 10:
            assert list(row[2:]) == pytest.approx([final.estimates[(row.variant, c)] for c in columns])
        else:
            assert row[2] == 0.0 and row[3] == 0.0  # no `[]` at step 0; a change from step 0 to itself
    later = items.assign(trial_id=items["trial_id"] + "x", seed=items["seed"] + 2)
    later = later[later["variant"] == "SFT"].assign(step=lambda frame: frame["step"].replace({10: 20}))
    shared = estimates_by_step(pd.concat([items, later]), columns)
    assert sorted(set(shared["step"])) == [0]  # step 10 and step 20 are not shared by every trial
    with pytest.raises(ValueError, match="no eval step that every trial shares"):
        estimates_by_step(pd.concat([items[items["step"] == 10], later[later["step"] == 0]]), columns)


def test_absence_by_step_gives_log_probs_gaps_and_separation():
    from analysis.report import absence_by_step

    slices = ["seen", "seen", "no_object", "no_object", "empty_image", "empty_image"]

    def logps(values: list[float]) -> list[dict]:
        return set_rows("grounding", "grounding", slices, {"logp_empty": values})

    start = logps([-10.0] * 6)
    rows = trial_rows("ViSurf", "visurf", 0, {0: start, 10: logps([-4, -6, -3, -5, -1, -2])})
    rows += trial_rows("ViSurf", "visurf", 1, {0: start, 10: logps([-5, -6, -3, -5, -5, -5])})
    table = absence_by_step(pd.DataFrame(rows))
    assert list(table.columns) == [
        "empty image", "no object", "object", "empty image − object", "no object − object", "AUC empty image",
        "AUC no object",
    ]  # fmt: skip
    assert table.loc[("ViSurf", 0)].tolist() == [-10, -10, -10, 0, 0, 0.5, 0.5]  # ties count half
    final = table.loc[("ViSurf", 10)]
    # empty images: above every object item in seed 0 (AUC 1), tie with -5 and above -6 in seed 1 (3/4);
    # no object: 3 of 4 pairs in seed 0, 3.5 of 4 in seed 1
    assert final.tolist() == pytest.approx([-3.25, -4.0, -5.25, 2.0, 1.25, 0.875, 0.8125])
    assert absence_by_step(pd.DataFrame(rows).drop(columns="logp_empty")) is None
    assert absence_by_step(hand_items().assign(logp_empty=-1.0)) is not None  # no empty images: the no-object slice
    objects_only = pd.DataFrame(rows).query("slice == 'seen'")
    assert absence_by_step(objects_only) is None


def test_errors_name_the_column_or_variant():
    items = hand_items()
    with pytest.raises(ValueError, match="grounding/nonsense"):
        bootstrap(items, ["grounding/nonsense"], n_boot=10)
    with pytest.raises(ValueError, match="ocr/score"):
        bootstrap(items, ["ocr/score"], n_boot=10)
    with pytest.raises(ValueError, match="mean/accuracy"):
        bootstrap(items, ["mean/accuracy"], n_boot=10)
    without_start = items[(items["step"] > 0) | (items["variant"] != "SFT")]
    with pytest.raises(ValueError, match=r"SFT.*retained/count/score_change.*step 0"):
        bootstrap(without_start, ["retained/count/score_change"], n_boot=10)
    bootstrap(without_start, ["retained/count/score"], n_boot=10)  # levels need no step 0
    boot = bootstrap(items[(items["variant"] != "SFT") | (items["seed"] == 0)], ["anomaly/score"], n_boot=10)
    with pytest.raises(ValueError, match=r"cannot pair 'ViSurf' with 'SFT'"):
        paired_table(boot)
    with pytest.raises(ValueError, match="RLVR"):
        boot.cell("RLVR", "anomaly/score")
    with pytest.raises(ValueError, match="'grounding/score' was not bootstrapped"):
        half_width(boot, "ViSurf", "grounding/score")
    clash = items.assign(
        content=np.where(items["item_id"].isin(["grounding-0", "grounding-9"]), "same", items["item_id"])
    )
    with pytest.raises(ValueError, match="content 'same' appears in more than one slice"):
        bootstrap(clash, ["grounding/score"], n_boot=10)
    twice = pd.concat([items, items.assign(trial_id="ViSurf-0-again")[items["trial_id"] == "ViSurf-0"]])
    with pytest.raises(ValueError, match="ViSurf.*seed 0"):
        bootstrap(twice, ["anomaly/score"], n_boot=10)
