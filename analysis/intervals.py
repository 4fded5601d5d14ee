"""Bootstrap intervals of a sweep's evaluation metrics, and paired differences between variants.

The input is the per-item evaluation table (`analysis.results.load_items`: one row per trial × eval step × eval set ×
eval item, with its slice and per-item values). `bootstrap` resamples it hierarchically and paired, `n_boot` times:
- seeds with replacement, by position in each variant's sorted seeds, the same positions for every variant with as
  many seeds (so variants with the same seeds are paired by seed);
- per eval set, items with replacement *stratified by slice* (each slice keeps its number of distinct items), the
  same items for every variant and for step 0 and the final step. Items that show and ask the same (the same
  "content" key, `Sample.content_key`) are one item: a greedy evaluation answers them alike, so they are drawn
  together (a cluster bootstrap), and a slice of 100 items with 4 distinct ones gets the interval of 4 items.
A cell (variant, column) of one draw is its metric computed per resampled seed on the resampled items, averaged over
the resampled seeds; its point estimate is the plain metric averaged over the variant's seeds. The resamples depend
only on the items' eval sets, slices and contents, the seed counts, `n_boot` and `seed`: two calls with the same
items and seed draw the same resamples whatever columns they ask for, so their cells stay paired.

Columns: "<eval_set>/<metric>" (metric: any `visurf_ray.rewards.metrics.reported_metrics(task)` name, or "score",
the task's headline), "<eval_set>/<metric>_change" (final step − step 0 on the same items and seeds: forgetting on
retained sets, gain over the base model elsewhere), and "mean/score" or "mean/score_change" (mean over eval sets of
their "score" or "score_change"). Metrics are the suite's `ItemMetric` definitions, never re-defined here.

Imports numpy, pandas, `visurf_ray.rewards.metrics` and `analysis.results`; never Ray or torch.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.results import variant_order
from visurf_ray.rewards import get_task
from visurf_ray.rewards.item_metrics import ItemMetric
from visurf_ray.rewards.metrics import reported_metrics
from visurf_ray.validation import check_int, require

LEVEL = 0.95
"""Coverage of the percentile intervals."""
MEAN_SET = "mean"
CHANGE_SUFFIX = "_change"
RETAINED_PREFIX = "retained/"
ITEM_KEYS = ("trial_id", "variant", "paradigm", "seed", "step", "eval_set", "task", "item_id", "slice")
"""Columns every items table has; an optional "content" names items that repeat (`Sample.content_key`); the others
are per-item values (NaN where they do not apply)."""
POST_TRAINING_EXTRAS = {
    "grounding": (
        "giou_object",
        "n_acc_empty_image",
        "n_acc",
        "empty_rate_object",
        "abstain_balanced_accuracy_empty_image",
        "abstain_balanced_accuracy",
    ),
    "anomaly": ("accuracy_clean", "accuracy_defect"),
}
"""Metrics `default_columns` adds beside the score of a post-training eval set of the task."""


@dataclass(frozen=True)
class Bootstrap:
    """Point estimates and bootstrap draws per (variant, column).

    variants: paper order (`analysis.results.variant_order`). seeds: each variant's sorted seeds. estimates: the plain
    metric averaged over seeds. draws: [n_boot] per cell. item_counts: per eval set [n_boot, N], how often each of its
    N items is drawn (items ordered by slice, then id; `item_slices` [N] gives their slices).
    """

    variants: tuple[str, ...]
    columns: tuple[str, ...]
    seeds: dict[str, tuple[int, ...]]
    estimates: dict[tuple[str, str], float]
    draws: dict[tuple[str, str], np.ndarray]
    item_counts: dict[str, np.ndarray] = field(repr=False)
    item_slices: dict[str, np.ndarray] = field(repr=False)
    n_boot: int = 2000
    seed: int = 0

    def cell(self, variant: str, column: str) -> tuple[float, np.ndarray]:
        """(point estimate, draws [n_boot]) of one cell; ValueError naming the variant or column if it has none."""
        if variant not in self.seeds:
            raise ValueError(f"variant {variant!r} is not in the bootstrap (variants: {list(self.variants)})")
        if column not in self.columns:
            raise ValueError(f"column {column!r} was not bootstrapped (columns: {list(self.columns)})")
        return self.estimates[(variant, column)], self.draws[(variant, column)]


@dataclass(frozen=True)
class _Column:
    """A parsed column: `metric` is a reported metric name or "score"; `change`: final − step 0."""

    name: str
    eval_set: str
    metric: str
    change: bool


def _contents(rows: pd.DataFrame) -> pd.Series:
    """Each row's unit of resampling: its "content" key (`Sample.content_key`: items that show and ask the same are one
    item), or its item id where the table has none."""
    ids = "item:" + rows["item_id"].astype(str)
    return ids if "content" not in rows.columns else rows["content"].astype(object).fillna(ids).astype(str)


class _EvalSet:
    """One eval set's items as arrays: values [R, N] per value name, R = (trial_id, step) rows, N items."""

    def __init__(self, name: str, rows: pd.DataFrame):
        tasks = rows["task"].unique()
        if len(tasks) != 1:
            raise ValueError(f"eval set {name!r} mixes tasks {sorted(tasks)}")
        items = rows.assign(content=_contents(rows))[["item_id", "slice", "content"]].drop_duplicates()
        if items["item_id"].duplicated().any():
            item = items.loc[items["item_id"].duplicated(), "item_id"].iloc[0]
            raise ValueError(f"eval set {name!r}: item {item!r} appears in more than one slice or with two contents")
        units = items[["content", "slice"]].drop_duplicates()
        if units["content"].duplicated().any():
            content = units.loc[units["content"].duplicated(), "content"].iloc[0]
            raise ValueError(f"eval set {name!r}: content {content!r} appears in more than one slice")
        items = items.sort_values(["slice", "item_id"], kind="stable")
        self.name, self.task, self.rows = name, str(tasks[0]), rows
        self.item_ids = items["item_id"].to_numpy()
        self.slices = items["slice"].to_numpy(dtype=object)
        self.units = pd.factorize(items["content"], sort=True)[0]
        codes, self.keys = pd.MultiIndex.from_frame(rows[["trial_id", "step"]]).factorize()
        self.cells = (codes, pd.Index(self.item_ids).get_indexer(rows["item_id"]))
        if len(np.unique(self.cells[0] * len(self.item_ids) + self.cells[1])) < len(rows):
            raise ValueError(f"eval set {name!r} has an item twice for one trial and step")
        self.present = self._fill(np.ones(len(rows)), 0.0) > 0
        self._values: dict[str, np.ndarray] = {}

    def _fill(self, column: np.ndarray, empty: float) -> np.ndarray:
        table = np.full((len(self.keys), len(self.item_ids)), empty)
        table[self.cells] = column
        return table

    def values(self, value: str, trial_steps: Sequence[tuple[str, int]], why: str) -> np.ndarray:
        """[S, N] item values `value` of the (trial_id, step) rows; ValueError (starting with `why`) if one is
        missing or lacks an item."""
        if value not in self._values:
            self._values[value] = self._fill(pd.to_numeric(self.rows[value]).to_numpy(np.float64), math.nan)
        positions = self.keys.get_indexer(pd.MultiIndex.from_tuples(trial_steps, names=["trial_id", "step"]))
        for (trial, step), position in zip(trial_steps, positions):
            if position < 0 or not self.present[position].all():
                missing = "rows" if position < 0 else "some items"
                raise ValueError(f"{why}: trial {trial!r} has no {missing} at step {step} in eval set {self.name!r}")
        return self._values[value][positions]


@dataclass(frozen=True)
class _Trial:
    trial_id: object  # as in the items (usually str)
    seed: int
    final_step: int


def _trials(items: pd.DataFrame) -> dict[str, list[_Trial]]:
    """Each variant's trials sorted by seed; ValueError if a variant has two trials with one seed."""
    finals = items.groupby(["variant", "seed", "trial_id"], sort=True)["step"].max().reset_index()
    trials: dict[str, list[_Trial]] = {}
    for row in finals.itertuples():
        runs = trials.setdefault(row.variant, [])
        if runs and runs[-1].seed == row.seed:
            raise ValueError(
                f"variant {row.variant!r} has trials {runs[-1].trial_id!r} and {row.trial_id!r} for seed {row.seed}"
            )
        runs.append(_Trial(row.trial_id, int(row.seed), int(row.step)))
    return trials


def _item_metric(task: str, metric: str) -> ItemMetric | None:
    """The ItemMetric of `metric` ("score": the headline) for `task`, None if it reports no such metric."""
    if metric == "score":
        metric = get_task(task).HEADLINE
    return reported_metrics(task).get(metric)


def _parse(column: str, sets: dict[str, _EvalSet], items: pd.DataFrame) -> _Column:
    """ValueError naming the column if its eval set, metric or the metric's item values are unknown."""
    eval_set, _, metric = column.rpartition("/")
    if eval_set == MEAN_SET:
        if metric not in ("score", "score" + CHANGE_SUFFIX):
            raise ValueError(f"unknown column {column!r}: the mean over eval sets has only score and score_change")
        return _Column(column, eval_set, "score", metric.endswith(CHANGE_SUFFIX))
    if eval_set not in sets:
        raise ValueError(f"unknown column {column!r}: no eval set {eval_set!r} in the items (sets: {sorted(sets)})")
    task = sets[eval_set].task
    change = _item_metric(task, metric) is None and metric.endswith(CHANGE_SUFFIX)
    base = metric.removesuffix(CHANGE_SUFFIX) if change else metric
    item_metric = _item_metric(task, base)
    if item_metric is None:
        raise ValueError(f"unknown column {column!r}: task {task!r} reports no metric {base!r}")
    if item_metric.value not in items.columns:
        raise ValueError(f"unknown column {column!r}: the items have no {item_metric.value!r} values")
    return _Column(column, eval_set, base, change)


def _item_counts(slices: np.ndarray, units: np.ndarray, n_boot: int, seed: int, name: str) -> np.ndarray:
    """[n_boot, N] counts of each item in each draw: per slice, its distinct contents (`units` [N], a code per item)
    resampled with replacement, each drawn content bringing all its items (a cluster bootstrap; with no repeated
    content, the items themselves)."""
    rng = np.random.default_rng([seed, 0, zlib.crc32(name.encode())])
    n_units = int(units.max()) + 1
    counts = np.zeros(n_boot * n_units, dtype=np.int64)
    offsets = np.arange(n_boot)[:, None] * n_units
    for slice_ in sorted(set(slices)):
        members = np.unique(units[slices == slice_])
        picks = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
        counts += np.bincount((offsets + picks).ravel(), minlength=n_boot * n_units)
    return counts.reshape(n_boot, n_units)[:, units]


def _seed_positions(n_seeds: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_seeds] resampled positions into a variant's sorted seeds (the same for every n_seeds-seed variant)."""
    return np.random.default_rng([seed, 1, n_seeds]).integers(0, n_seeds, size=(n_boot, n_seeds))


def _metric_draws(metric: ItemMetric, values: np.ndarray, slices: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[B, S] the metric per draw and seed: values [S, N] per seed and item, slices [N], counts [B, N] per draw.

    `ItemMetric.compute` with item weights: per part, the count-weighted mean of the non-NaN values of its items."""
    measured = ~np.isnan(values)
    filled = np.where(measured, values, 0.0)
    parts = []
    for part in metric.parts:
        weights = counts * (np.ones(len(slices), bool) if part is None else np.isin(slices, part))
        with np.errstate(invalid="ignore", divide="ignore"):
            parts.append((weights @ filled.T) / (weights @ measured.T))
    return np.mean(parts, axis=0)


def _metric_per_seed(
    eval_set: _EvalSet, metric: ItemMetric, counts: np.ndarray, rows: list[tuple[str, int]], why: str
) -> tuple[np.ndarray, np.ndarray]:
    """(estimates [S], draws [B, S]) of `metric` on the (trial_id, step) rows of S seeds; counts [B, N]."""
    values = eval_set.values(metric.value, rows, why)
    estimates = np.array([metric.compute(seed_values, eval_set.slices) for seed_values in values])
    return estimates, _metric_draws(metric, values, eval_set.slices, counts)


def _per_seed(
    column: _Column, sets: dict[str, _EvalSet], counts: dict[str, np.ndarray], trials: list[_Trial]
) -> tuple[np.ndarray, np.ndarray]:
    """(estimates [S], draws [B, S]) of a column for one variant's S trials, before averaging over seeds."""
    if column.eval_set == MEAN_SET:
        parts = [_per_seed(_Column(column.name, name, "score", column.change), sets, counts, trials) for name in sets]
        return np.mean([p[0] for p in parts], axis=0), np.mean([p[1] for p in parts], axis=0)
    eval_set, why = sets[column.eval_set], f"column {column.name!r}"
    metric = _item_metric(eval_set.task, column.metric)
    final = [(t.trial_id, t.final_step) for t in trials]
    estimates, draws = _metric_per_seed(eval_set, metric, counts[eval_set.name], final, why)
    if not column.change:
        return estimates, draws
    start = [(t.trial_id, 0) for t in trials]
    start_estimates, start_draws = _metric_per_seed(eval_set, metric, counts[eval_set.name], start, why)
    return estimates - start_estimates, draws - start_draws


def bootstrap(items: pd.DataFrame, columns: Sequence[str], *, n_boot: int = 2000, seed: int = 0) -> Bootstrap:
    """Hierarchical paired bootstrap (see the module docstring) of `columns` for every variant of `items`.

    items: the per-item table (ITEM_KEYS plus value columns); n_boot: draws; seed: >= 0. ValueError naming the column
    or variant for an unknown column, a missing step 0 (for *_change), a variant without rows for an eval set the
    column needs, or two trials of one variant with one seed."""
    missing = [key for key in ITEM_KEYS if key not in items.columns]
    require(not missing, "items table", f"lacks columns {missing}")
    require(not items.empty, "items table", "is empty")
    check_int("n_boot", n_boot, low=1)
    check_int("seed", seed, low=0)
    sets = {str(name): _EvalSet(str(name), rows) for name, rows in items.groupby("eval_set", sort=True)}
    parsed = [_parse(column, sets, items) for column in dict.fromkeys(columns)]
    trials = _trials(items)
    counts = {name: _item_counts(s.slices, s.units, n_boot, seed, name) for name, s in sets.items()}
    estimates, draws = {}, {}
    for variant, runs in trials.items():
        positions = _seed_positions(len(runs), n_boot, seed)
        for column in parsed:
            try:
                per_seed, per_draw = _per_seed(column, sets, counts, runs)
            except ValueError as error:
                raise ValueError(f"variant {variant!r}: {error}") from error
            estimates[(variant, column.name)] = float(np.mean(per_seed))
            draws[(variant, column.name)] = np.take_along_axis(per_draw, positions, axis=1).mean(axis=1)
    paradigm_of = dict(zip(items["variant"], items["paradigm"]))
    return Bootstrap(
        variants=tuple(variant_order(trials, paradigm_of)),
        columns=tuple(c.name for c in parsed),
        seeds={variant: tuple(t.seed for t in runs) for variant, runs in trials.items()},
        estimates=estimates,
        draws=draws,
        item_counts=counts,
        item_slices={name: s.slices for name, s in sets.items()},
        n_boot=n_boot,
        seed=seed,
    )


def percentile_interval(draws: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """(low, high) percentile interval of draws [n_boot] (NaN draws ignored; NaN if all are NaN)."""
    tail = (1.0 - level) / 2.0 * 100.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(np.asarray(draws, dtype=np.float64), [tail, 100.0 - tail])
    return float(low), float(high)


def difference(boot: Bootstrap, variant: str, other: str, column: str, *, paired: bool = True):
    """(estimate, draws [n_boot]) of variant − other on `column`. paired: the two must have the same seeds
    (ValueError naming both otherwise); unpaired, variants with different seed counts were resampled independently."""
    if paired and boot.seeds.get(variant) != boot.seeds.get(other):
        raise ValueError(
            f"cannot pair {variant!r} with {other!r} by seed: seeds {boot.seeds.get(variant)} and "
            f"{boot.seeds.get(other)} differ"
        )
    estimate, draws = boot.cell(variant, column)
    other_estimate, other_draws = boot.cell(other, column)
    return estimate - other_estimate, draws - other_draws


def half_width(boot: Bootstrap, variant: str, column: str) -> float:
    """Half the width of the 95% interval of one cell (in the metric's units)."""
    low, high = percentile_interval(boot.cell(variant, column)[1])
    return (high - low) / 2.0


def format_cell(estimate: float, low: float, high: float) -> str:
    """ "0.123 [0.100, 0.150]", or "–" for a NaN estimate."""
    return "–" if math.isnan(estimate) else f"{estimate:.3f} [{low:.3f}, {high:.3f}]"


def interval_table(boot: Bootstrap, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows: variants in paper order; columns: `columns` (default: all bootstrapped); cells "est [low, high]"."""
    columns = list(boot.columns if columns is None else columns)
    table = pd.DataFrame(index=list(boot.variants), columns=columns, dtype=object)
    for variant in boot.variants:
        for column in columns:
            estimate, draws = boot.cell(variant, column)
            table.loc[variant, column] = format_cell(estimate, *percentile_interval(draws))
    table.index.name = f"{LEVEL:.0%} interval (bootstrap over items and seeds)"
    return table


def paired_table(boot: Bootstrap, reference: str = "ViSurf", columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows "reference − X" for every other variant (paper order), paired by seed; cells "est [low, high]".
    ValueError if `reference` is not bootstrapped or a variant's seeds differ from the reference's."""
    if reference not in boot.seeds:
        raise ValueError(f"reference variant {reference!r} is not in the bootstrap (variants: {list(boot.variants)})")
    columns = list(boot.columns if columns is None else columns)
    others = [variant for variant in boot.variants if variant != reference]
    table = pd.DataFrame(index=[f"{reference} − {other}" for other in others], columns=columns, dtype=object)
    for other in others:
        for column in columns:
            estimate, draws = difference(boot, reference, other, column)
            table.loc[f"{reference} − {other}", column] = format_cell(estimate, *percentile_interval(draws))
    table.index.name = f"paired difference, {LEVEL:.0%} interval"
    return table


def slice_sizes(items: pd.DataFrame) -> pd.DataFrame:
    """Per (eval_set, slice) of the items table: "items" (distinct item ids) and "distinct" (distinct contents, what
    the bootstrap resamples)."""
    unique = items.drop_duplicates(["eval_set", "item_id"])
    unique = unique.assign(content=_contents(unique))
    return unique.groupby(["eval_set", "slice"], sort=False).agg(
        items=("item_id", "size"), distinct=("content", "nunique")
    )


def estimates_by_step(items: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Point estimates (mean over seeds) of `columns` at every eval step all trials share: where the curves settle.
    Rows (variant in paper order, step); cells as `bootstrap`'s estimates with that step as the final one (so a
    `*_change` column is that step − step 0). ValueError if the trials share no eval step."""
    steps_of = items.groupby("trial_id")["step"].unique()
    shared = sorted(set.intersection(*(set(steps.tolist()) for steps in steps_of)))
    require(bool(shared), "items table", "has no eval step that every trial shares")
    rows = []
    for step in shared:
        boot = bootstrap(items.loc[items["step"] <= step], columns, n_boot=1)
        rows += [
            [variant, int(step), *(boot.estimates[(variant, c)] for c in boot.columns)] for variant in boot.variants
        ]
    table = pd.DataFrame(rows, columns=["variant", "step", *dict.fromkeys(columns)])
    order = {variant: position for position, variant in enumerate(boot.variants)}
    return table.sort_values(["variant", "step"], key=lambda k: k.map(order) if k.name == "variant" else k)


def default_columns(items: pd.DataFrame) -> list[str]:
    """Every eval set's "score"; on post-training sets the metrics of POST_TRAINING_EXTRAS (grounding: gIoU on object
    items, N-Acc on both no-object slices, the `[]` rate on object items and the balanced accuracies of answering
    `[]`; anomaly: accuracy on clean and on defect items) where the items have their values and slices; each retained
    set's "score_change"; and "mean/score". Only eval sets present in `items`, in their order of appearance."""
    task_of = dict(zip(items["eval_set"], items["task"]))
    columns = [f"{name}/score" for name in task_of]
    for name, task in task_of.items():
        if name.startswith(RETAINED_PREFIX):
            continue
        slices = set(items.loc[items["eval_set"] == name, "slice"])
        for metric in POST_TRAINING_EXTRAS.get(task, ()):
            item_metric = _item_metric(task, metric)
            if (
                item_metric is not None
                and item_metric.value in items.columns
                and all(part is None or slices & set(part) for part in item_metric.parts)
            ):
                columns.append(f"{name}/{metric}")
    columns += [f"{name}/score{CHANGE_SUFFIX}" for name in task_of if name.startswith(RETAINED_PREFIX)]
    return [*columns, f"{MEAN_SET}/score"]
